"""The config system: defaults, ``_BASE_`` inheritance, ``section.key=value`` overrides, strict keys and types."""
from __future__ import annotations

from pathlib import Path

import pytest

from butd.config import Config, config_from_dict, config_to_dict, load_config, save_config
from butd.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_no_file_gives_the_defaults():
    assert load_config() == Config()
    assert Config().train.lr == 5e-4 and Config().scst.baseline == "mean"


def test_shipped_configs_load_and_scst_builds_on_xe():
    xe = load_config(CONFIGS / "butd_xe.yaml")
    scst = load_config(CONFIGS / "butd_scst.yaml")
    assert xe.model.rnn_size == scst.model.rnn_size == 1000 and scst.train.batch_size == xe.train.batch_size
    assert scst.train.lr == 5e-5 and xe.train.lr == 5e-4 and scst.train.lr_decay_every == 0
    assert scst.scst.num_samples == 5 and scst.scst.baseline == "mean"
    for path in CONFIGS.glob("*.yaml"):
        load_config(path)  # every shipped file is valid


def test_base_chain_resolves_relative_to_each_file(tmp_path):
    write(tmp_path / "a.yaml", "model:\n  rnn_size: 64\n  dropout: 0.1\ntrain:\n  lr: 1.0e-3\n")
    write(tmp_path / "sub" / "b.yaml", "_BASE_: ../a.yaml\nmodel:\n  rnn_size: 128\n")
    c = write(tmp_path / "sub" / "deeper" / "c.yaml", "_BASE_: ../b.yaml\ntrain:\n  batch_size: 7\n")
    cfg = load_config(c)
    assert (cfg.model.rnn_size, cfg.model.dropout, cfg.train.lr, cfg.train.batch_size) == (128, 0.1, 1e-3, 7)
    assert cfg.model.att_hid_size == Config().model.att_hid_size  # untouched keys keep their defaults


def test_overrides_are_typed_and_win_over_the_file(tmp_path):
    path = write(tmp_path / "x.yaml", "train:\n  lr: 1.0e-3\n")
    cfg = load_config(path, ["train.lr=1e-4", "train.batch_size=7", "train.tensorboard=false",
                             "model.name=updown", "train.grad_clip=1"])
    assert cfg.train.lr == 1e-4 and cfg.train.batch_size == 7 and cfg.train.tensorboard is False
    assert cfg.train.grad_clip == 1.0 and isinstance(cfg.train.grad_clip, float)  # int accepted for a float key
    assert load_config(write(tmp_path / "y.yaml", "train:\n  lr: 5e-4\n")).train.lr == 5e-4  # YAML 1.1 string


@pytest.mark.parametrize("text, message", [
    ("train:\n  learning_rate: 1.0\n", "unknown key train.learning_rate"),
    ("optimizer:\n  lr: 1.0\n", "unknown section 'optimizer'"),
    ("train:\n  batch_size: 1.5\n", "train.batch_size must be int"),
    ("train:\n  batch_size: true\n", "train.batch_size must be int"),
    ("train:\n  lr: fast\n", "train.lr must be float"),
    ("data:\n  cache: disk\n", "data.cache must be one of none, memory, gpu"),
    ("train: 3\n", "section 'train' must be a mapping"),
    ("- a\n- b\n", "top level must be a mapping"),
    ("train: [\n", "not valid YAML"),
])
def test_bad_files_are_refused_with_the_file_named(tmp_path, text, message):
    path = write(tmp_path / "bad.yaml", text)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(path)
    assert "bad.yaml" in str(info.value)


@pytest.mark.parametrize("override, message", [
    ("train.nonsense=1", "unknown key train.nonsense"),
    ("lr=1e-4", "must look like section.key=value"),
    ("train.lr", "must look like section.key=value"),
    ("train.max_epochs=ten", "train.max_epochs must be int"),
    ("scst.baseline=median", "scst.baseline must be one of mean, greedy"),
])
def test_bad_overrides_are_refused_with_the_override_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_inheritance_loops_and_missing_files_are_errors(tmp_path):
    write(tmp_path / "a.yaml", "_BASE_: b.yaml\n")
    write(tmp_path / "b.yaml", "_BASE_: a.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    write(tmp_path / "c.yaml", "_BASE_: gone.yaml\n")
    with pytest.raises(ConfigError, match="gone.yaml"):
        load_config(tmp_path / "c.yaml")


def test_save_and_dict_round_trips(tmp_path):
    cfg = load_config(CONFIGS / "butd_scst.yaml", ["train.lr=3e-5", "data.cache=memory"])
    save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(tmp_path / "run" / "config.yaml") == cfg
    assert config_from_dict(config_to_dict(cfg)) == cfg
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["config.yaml"]  # no temporary file left
    with pytest.raises(ConfigError, match="checkpoint: unknown key model.depth"):
        config_from_dict({"model": {"depth": 3}}, source="checkpoint")
