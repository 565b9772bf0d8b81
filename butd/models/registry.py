"""Captioner registry: ``build_model`` looks the class up by ``cfg.name``; ``load_state_checked`` loads
saved weights with errors that name the checkpoint and both architectures."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from butd.errors import ConfigError

MODEL_REGISTRY: dict[str, type[nn.Module]] = {}


def register_model(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator registering a captioner under ``name``.

    The class must provide ``from_config(cfg, vocab_size)``; registering a name twice is an error
    (two models silently shadowing each other would make checkpoints ambiguous).
    """

    def decorator(cls: type[nn.Module]) -> type[nn.Module]:
        if name in MODEL_REGISTRY and MODEL_REGISTRY[name] is not cls:
            raise ConfigError(
                f"model name {name!r} is already registered by {MODEL_REGISTRY[name].__qualname__}"
            )
        if not callable(getattr(cls, "from_config", None)):
            raise ConfigError(f"model {cls.__qualname__} registered as {name!r} has no from_config()")
        MODEL_REGISTRY[name] = cls
        return cls

    return decorator


def build_model(cfg: Any, vocab_size: int) -> nn.Module:
    """Build the captioner named ``cfg.name`` (a ``butd.config.ModelConfig``) for ``vocab_size`` tokens."""
    name = getattr(cfg, "name", None)
    cls = MODEL_REGISTRY.get(name)  # type: ignore[arg-type]
    if cls is None:
        known = ", ".join(sorted(MODEL_REGISTRY)) or "(none)"
        raise ConfigError(f"model.name: unknown model {name!r}; known models: {known}")
    return cls.from_config(cfg, vocab_size)  # type: ignore[attr-defined]


def model_name_of(model: nn.Module) -> str:
    """The ``model.name`` a captioner was registered under (its class's ``name``)."""
    name = getattr(model, "name", None)
    if isinstance(name, str) and name:
        return name
    for registered, cls in MODEL_REGISTRY.items():
        if type(model) is cls:
            return registered
    return type(model).__qualname__


def _listed(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_state_checked(
    model: nn.Module,
    state_dict: Mapping[str, Any],
    *,
    source: str | Path,
    checkpoint_model_name: str | None,
) -> None:
    """Load ``state_dict`` (the weights saved in checkpoint ``source``) into ``model``, strictly.

    ``checkpoint_model_name`` is the ``model.name`` recorded with the weights (the checkpoint's
    config); ``None`` skips that check for a checkpoint that does not record one. Raises a
    ``ConfigError`` naming both architectures when the names differ, listing the missing and
    unexpected parameter names when the keys differ, and naming the parameters whose shapes differ
    (e.g. another ``model.rnn_size``). The model is left untouched when an error is raised.
    """
    expected = model_name_of(model)
    if checkpoint_model_name is not None and checkpoint_model_name != expected:
        raise ConfigError(
            f"checkpoint {source} was trained with model.name={checkpoint_model_name}, cannot load into {expected}"
        )
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing from the checkpoint: {_listed(missing)}")
        if unexpected:
            parts.append(f"not in a {expected} model: {_listed(unexpected)}")
        raise ConfigError(
            f"checkpoint {source} does not fit this {expected} model (was it trained with other model.* "
            f"options?); " + "; ".join(parts)
        )
    wrong = [
        f"{key} {tuple(value.shape)} vs {tuple(own[key].shape)}"
        for key, value in state_dict.items()
        if hasattr(value, "shape") and tuple(value.shape) != tuple(own[key].shape)
    ]
    if wrong:
        raise ConfigError(
            f"checkpoint {source}: parameter shapes differ from this {expected} model (checkpoint vs model; "
            f"another model.* size or vocabulary?): {_listed(wrong)}"
        )
    model.load_state_dict(state_dict)
