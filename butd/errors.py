"""Exceptions raised by butd. Every message names the file, line or image id and what is wrong."""
from __future__ import annotations


class ButdError(Exception):
    """Base class of the errors butd raises on bad input."""


class DataError(ButdError, ValueError):
    """Input data (captions, features, result files, images) is malformed or inconsistent."""


class ConfigError(ButdError, ValueError):
    """A configuration file or a command-line override is invalid."""
