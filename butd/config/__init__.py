"""Configuration: typed defaults (``defaults.py``) and YAML loading with inheritance and overrides (``load.py``)."""
from butd.config.defaults import Config, DataConfig, EvalConfig, ModelConfig, ScstConfig, TrainConfig
from butd.config.load import apply_overrides, config_from_dict, config_to_dict, load_config, save_config

__all__ = [
    "apply_overrides",
    "Config",
    "DataConfig",
    "EvalConfig",
    "ModelConfig",
    "ScstConfig",
    "TrainConfig",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "save_config",
]
