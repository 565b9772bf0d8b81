"""Checkpoints: both published layouts round-trip, mismatches are listed, unsafe pickles are refused."""
from __future__ import annotations

import logging
import pickle
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from butd.errors import ConfigError
from feature_extraction.config import DetectorConfig
from feature_extraction.detector import BottomUpDetector
from feature_extraction.weights import (CheckpointError, initialize_random, load_weights, read_checkpoint,
                                        save_weights)

CONFIG = replace(DetectorConfig.small(), test_scale=160, test_max_size=260, rpn_pre_nms_topk=600, rpn_post_nms_topk=60)


def make_model(seed: int) -> BottomUpDetector:
    model = BottomUpDetector(config=CONFIG)
    initialize_random(model, seed=seed)
    return model


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (120, 170, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def model() -> BottomUpDetector:
    return make_model(seed=0)


@pytest.mark.parametrize("suffix", [".pkl", ".pth"])
def test_round_trip_gives_the_same_outputs(tmp_path, model, image, suffix):
    path = tmp_path / f"detector{suffix}"
    save_weights(model, path)
    other = make_model(seed=1)
    before = other.detect([image])[0]
    load_weights(other, path)
    want, got = model.detect([image])[0], other.detect([image])[0]
    assert not np.array_equal(before.features, want.features)  # a different network until loaded
    for name in ["features", "boxes", "object_ids", "object_conf", "attr_ids", "attr_conf"]:
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)


def test_pkl_file_has_the_detectron2_layout(tmp_path, model):
    save_weights(model, tmp_path / "d2.pkl")
    raw = read_checkpoint(tmp_path / "d2.pkl")
    with (tmp_path / "d2.pkl").open("rb") as f:
        assert set(pickle.load(f)) == {"model", "__author__"}
    ours = {k: v.numpy() for k, v in model.state_dict().items()}
    pred = "roi_heads.box_predictor."
    # background last (detectron2), first here (Caffe)
    np.testing.assert_array_equal(raw[pred + "cls_score.weight"][-1], ours[pred + "cls_score.weight"][0])
    np.testing.assert_array_equal(raw[pred + "attr_score.bias"][:-1], ours[pred + "attr_score.bias"][1:])
    assert raw[pred + "bbox_pred.weight"].shape[0] == 4 * 1600  # no background deltas
    # one objectness logit per anchor; detectron2 orders anchors size-major, Caffe ratio-major
    logits = raw["proposal_generator.rpn_head.objectness_logits.bias"]
    assert logits.shape == (12,)
    np.testing.assert_array_equal(logits[1 * 3 + 2], ours["proposal_generator.rpn_head.objectness_logits.bias"][2 * 4 + 1])
    assert "backbone.res2.0.conv1.norm.running_var" in raw


def test_pth_file_has_the_bottom_up_attention_pytorch_layout(tmp_path, model):
    save_weights(model, tmp_path / "bua.pth")
    payload = torch.load(tmp_path / "bua.pth", weights_only=True)
    raw = payload["model"]
    rpn = "proposal_generator.rpn_head.objectness_logits."
    assert raw[rpn + "weight"].shape[0] == 24  # background block then object block, per anchor
    ours = model.state_dict()[rpn + "bias"]
    torch.testing.assert_close(torch.sigmoid(ours), torch.softmax(raw[rpn + "bias"].reshape(2, 12), dim=0)[1])
    assert {"roi_heads.box_predictor.cls_embed.weight", "roi_heads.box_predictor.attr_linear1.weight",
            "roi_heads.box_predictor.attr_linear2.weight"} <= set(raw)
    assert raw["roi_heads.box_predictor.bbox_pred.weight"].shape[0] == 4 * 1601


def test_a_mismatching_checkpoint_lists_missing_and_unexpected_keys(tmp_path, model):
    save_weights(model, tmp_path / "good.pth")
    state = torch.load(tmp_path / "good.pth", weights_only=True)["model"]
    state.pop("backbone.res3.0.conv2.weight")
    state["roi_heads.box_predictor.mask_head.weight"] = torch.zeros(3)
    state["roi_heads.box_predictor.attr_linear2.bias"] = torch.zeros(7)
    state["backbone.res4.0.conv1.norm.num_batches_tracked"] = torch.tensor(0)  # harmless: ignored
    torch.save({"model": state}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as err:
        load_weights(make_model(seed=1), tmp_path / "bad.pth")
    message = str(err.value)
    assert "missing keys (1): backbone.res3.0.conv2.weight" in message
    assert "unexpected keys (1): roi_heads.box_predictor.mask_head.weight" in message
    assert "roi_heads.box_predictor.attr_score.bias [7] (expected [401])" in message
    assert str(tmp_path / "bad.pth") in message


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickle_with_anything_but_arrays_is_refused_unexecuted(tmp_path):
    marker = tmp_path / "pwned"
    with (tmp_path / "evil.pkl").open("wb") as f:
        pickle.dump({"model": {"x": np.zeros(2), "y": _RunsCode(marker)}}, f)
    with pytest.raises(CheckpointError, match="refusing to unpickle pathlib"):
        read_checkpoint(tmp_path / "evil.pkl")
    assert not marker.exists()


def test_unreadable_and_unknown_weights_files(tmp_path):
    (tmp_path / "broken.pkl").write_bytes(b"\x80\x04not a pickle")
    with pytest.raises(CheckpointError, match="unreadable"):
        read_checkpoint(tmp_path / "broken.pkl")
    with pytest.raises(ConfigError, match="unknown file type"):
        read_checkpoint(tmp_path / "weights.h5")
    with pytest.raises(ConfigError, match="not found") as err:
        BottomUpDetector.from_weights(str(tmp_path / "missing.pkl"))
    # Detector weights are "weights" (a "checkpoint" is the captioner's), and the message says where to get them.
    message = str(err.value)
    assert "detector weights" in message and "checkpoint" not in message
    assert "docs/extraction.md" in message and "--detector random" in message


def test_random_weights_are_seeded_and_announced(caplog):
    with caplog.at_level(logging.WARNING):
        a = BottomUpDetector.from_weights("random", small=True)
    assert "RANDOM DETECTOR WEIGHTS" in caplog.text
    b = BottomUpDetector.from_weights("random", small=True)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
