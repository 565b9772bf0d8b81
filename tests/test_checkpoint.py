"""Checkpoints: atomic writes, version checks, RNG state, the payload contract, load_model, vocabulary checks."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

import butd
from butd.errors import DataError
from butd.core.checkpoint import load_checkpoint, save_checkpoint
from butd.models import load_model
from butd.train.rng import capture_rng_state, restore_rng_state
from butd.train.loop import TrainOptions, train
from train_fixtures import make_tiny_dataset, single_thread, tiny_config  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def run(single_thread, tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    data_dir, features = make_tiny_dataset(root)
    result = train(tiny_config("train.max_epochs=1"),
                   TrainOptions(stage="xe", data_dir=data_dir, features=features, output=root / "run"))
    return result, data_dir, features, root


def test_save_is_atomic_and_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"format_version": 1, "value": torch.arange(3)})

    def broken_save(obj, handle):
        handle.write(b"partial garbage")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"format_version": 1, "value": torch.arange(5)})
    assert torch.equal(torch.load(path, weights_only=True)["value"], torch.arange(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind


def test_load_refuses_files_that_are_not_butd_checkpoints(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="garbage.pt: not a readable butd checkpoint"):
        load_checkpoint(garbage)
    future = tmp_path / "future.pt"
    torch.save({"format_version": 99}, future)
    with pytest.raises(DataError, match="format_version 99 is not supported"):
        load_checkpoint(future)
    with pytest.raises(DataError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_rng_state_round_trip_through_a_checkpoint(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    save_checkpoint(tmp_path / "rng.pt", {"format_version": 1, "rng": capture_rng_state()})
    expected = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)])
    torch.manual_seed(7), np.random.seed(8), random.seed(9)
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"])
    assert torch.equal(torch.rand(4), expected[0])
    assert np.array_equal(np.random.rand(4), expected[1])
    assert [random.random() for _ in range(4)] == expected[2]


def test_checkpoint_payload_follows_the_contract(run):
    result, data_dir, _, root = run
    payload = load_checkpoint(root / "run" / "last.pt")
    for key in ("format_version", "stage", "model_name", "model", "config", "vocab", "optimizer", "scheduler",
                "scaler", "rng", "epoch", "iteration", "batch_in_epoch", "best_score", "val_metrics"):
        assert key in payload, key
    assert payload["stage"] == "xe" and payload["model_name"] == "updown"
    assert payload["epoch"] == 1 and payload["batch_in_epoch"] == 0 and payload["iteration"] == result.state.iteration
    assert payload["config"]["model"]["rnn_size"] == 32
    assert payload["vocab"][:4] == ["<pad>", "<bos>", "<eos>", "<unk>"]
    assert "CIDEr-D" in payload["val_metrics"]
    assert (root / "run" / "best.pt").is_file() and (root / "run" / "config.yaml").is_file()


def test_load_model_rebuilds_the_trained_captioner(run):
    result, _, _, root = run
    loaded = load_model(root / "run" / "best.pt")
    assert not loaded.model.training and loaded.stage == "xe" and loaded.epoch == 1
    assert loaded.config.model.rnn_size == 32 and len(loaded.vocab) == result.model.logit.out_features
    for name, tensor in result.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor), name
    assert isinstance(butd.load(str(root / "run" / "best.pt")).model, type(loaded.model))


def test_a_checkpoint_with_another_vocabulary_is_refused(run, tmp_path):
    _, _, _, root = run
    other_dir, other_features = make_tiny_dataset(tmp_path, vocab_extra=("zebra",))
    options = dict(stage="xe", data_dir=other_dir, features=other_features)
    with pytest.raises(DataError, match="vocabulary .* differs"):
        train(tiny_config(), TrainOptions(**options, output=tmp_path / "init", init=root / "run" / "best.pt"))
    with pytest.raises(DataError, match="vocabulary .* differs"):
        train(tiny_config(), TrainOptions(**options, output=root / "run", resume=True))
