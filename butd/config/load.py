"""Reading configurations: YAML with ``_BASE_`` inheritance, then ``key=value`` overrides, strictly typed.

A YAML file may name another file in ``_BASE_`` (relative to itself); the base is loaded first and the file's
keys override it, section by section. Command-line overrides use dotted keys (``train.lr=1e-4``). Unknown keys,
values of the wrong type and values outside a key's choices are errors that name the file or override.
"""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

import yaml

from butd.config.defaults import Config
from butd.core.files import write_atomic
from butd.errors import ConfigError



def _choices() -> dict[str, tuple[str, ...]]:
    """``{"section.key": allowed words}`` for every key typed as a ``Literal`` in defaults.py."""
    choices = {}
    for section in dataclasses.fields(Config):
        hints = typing.get_type_hints(section.default_factory)  # type: ignore[arg-type]
        for name, hint in hints.items():
            if typing.get_origin(hint) is typing.Literal:
                choices[f"{section.name}.{name}"] = typing.get_args(hint)
    return choices


# Keys whose value must be one of a few words (from their Literal types).
CHOICES: dict[str, tuple[str, ...]] = _choices()


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build a ``Config`` from the defaults, an optional YAML file (with its bases) and ``key=value`` overrides."""
    tree: dict[str, Any] = {}
    if path is not None:
        tree = _read_yaml_tree(Path(path), chain=())
    _merge_overrides(tree, overrides)
    return config_from_dict(tree, source=str(path) if path else "overrides")


def apply_overrides(config: Config, overrides: list[str] | tuple[str, ...], *, source: str = "overrides") -> Config:
    """A new ``Config``: ``config`` with ``section.key=value`` overrides applied and checked (``config`` unchanged)."""
    tree = config_to_dict(config)
    _merge_overrides(tree, overrides)
    return config_from_dict(tree, source=source)


def _merge_overrides(tree: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> None:
    for item in overrides:
        key, value = _parse_override(item)
        section, _, name = key.partition(".")
        _check_known(section, name, source=f"override {item!r}")
        tree.setdefault(section, {})[name] = value


def config_from_dict(tree: dict[str, Any], *, source: str = "config") -> Config:
    """Build a ``Config`` from nested dicts (as saved in a run directory or a checkpoint), checking every value."""
    config = Config()
    for section, values in tree.items():
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section {section!r} must be a mapping, got {type(values).__name__}")
        for name, value in values.items():
            _check_known(section, name, source=source)
            target = getattr(config, section)
            setattr(target, name, _coerce(f"{section}.{name}", value, getattr(target, name), source))
    return config


def config_to_dict(config: Config) -> dict[str, dict[str, Any]]:
    """The configuration as nested plain dicts (YAML- and JSON-serialisable)."""
    return dataclasses.asdict(config)


def save_config(config: Config, path: str | Path) -> None:
    """Write the merged configuration as YAML, atomically (temporary file, then rename)."""
    text = yaml.safe_dump(config_to_dict(config), sort_keys=False)
    write_atomic(path, text)


def _read_yaml_tree(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    path = path.resolve()
    if path in chain:
        raise ConfigError(f"{path}: _BASE_ inheritance loops back to itself ({' -> '.join(map(str, chain))})")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from error
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    base_name = tree.pop("_BASE_", None)
    merged: dict[str, Any] = {}
    if base_name is not None:
        merged = _read_yaml_tree(path.parent / base_name, chain + (path,))
    for section, values in tree.items():
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: section {section!r} must be a mapping")
        for name in values:
            _check_known(section, name, source=str(path))
        merged.setdefault(section, {}).update(values)
    return merged


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, raw = item.partition("=")
    if not sep or "." not in key:
        raise ConfigError(f"override {item!r} must look like section.key=value (e.g. train.lr=1e-4)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as error:
        raise ConfigError(f"override {item!r}: cannot parse the value: {error}") from error
    return key.strip(), value


def _check_known(section: str, name: str, *, source: str) -> None:
    defaults = Config()
    if not hasattr(defaults, section):
        known = ", ".join(f.name for f in dataclasses.fields(Config))
        raise ConfigError(f"{source}: unknown section {section!r} (known: {known})")
    fields = {f.name for f in dataclasses.fields(getattr(defaults, section))}
    if name not in fields:
        raise ConfigError(f"{source}: unknown key {section}.{name} (known in {section}: {', '.join(sorted(fields))})")


def _coerce(key: str, value: Any, default: Any, source: str) -> Any:
    expected = type(default)
    if expected is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = float(value)
    elif expected is float and isinstance(value, str):
        # YAML 1.1 reads "5e-4" (no dot) as a string; accept it as the number it obviously is.
        try:
            value = float(value)
        except ValueError:
            pass
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise ConfigError(f"{source}: {key} must be {expected.__name__}, got {value!r} ({type(value).__name__})")
    if key in CHOICES and value not in CHOICES[key]:
        raise ConfigError(f"{source}: {key} must be one of {', '.join(CHOICES[key])}, got {value!r}")
    return value
