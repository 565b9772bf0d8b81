"""The published weights: the anchors buffer they carry is accepted and checked, and --boxes must fit the file."""
from __future__ import annotations

import importlib.util
import logging
import pickle
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from feature_extraction.config import DetectorConfig
from feature_extraction.detector import BottomUpDetector
from feature_extraction.extract import ExtractionConfig, run_extraction
from feature_extraction.published import (ANCHORS_KEY, PUBLISHED, boxes_warning, caffe_cell_anchors,
                                          detectron2_cell_anchors, identify)
from feature_extraction.weights import CheckpointError, initialize_random, load_weights, save_weights

ROOT = Path(__file__).resolve().parents[1]
CONFIG = replace(DetectorConfig.small(), test_scale=96, test_max_size=160, rpn_pre_nms_topk=200, rpn_post_nms_topk=20)


@pytest.fixture(scope="module")
def model() -> BottomUpDetector:
    detector = BottomUpDetector(config=CONFIG)
    initialize_random(detector, seed=0)
    return detector


def fresh() -> BottomUpDetector:
    detector = BottomUpDetector(config=CONFIG)
    initialize_random(detector, seed=1)
    return detector


def rewrite(path: Path, change) -> None:
    """Edit the raw {name: array} of a .pth or .pkl written by save_weights."""
    if path.suffix == ".pkl":
        payload = pickle.loads(path.read_bytes())
        change(payload["model"])
        path.write_bytes(pickle.dumps(payload, protocol=4))
    else:
        payload = torch.load(path, weights_only=True)
        raw = {k: v.numpy() for k, v in payload["model"].items()}
        change(raw)
        torch.save({"model": {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in raw.items()}}, path)


def assert_same_weights(a: BottomUpDetector, b: BottomUpDetector) -> None:
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        if name.endswith("bbox_pred.weight") or name.endswith("bbox_pred.bias"):
            x, y = x[4:], y[4:]  # the .pkl layout has no background deltas
        assert torch.equal(x, y), name


@pytest.mark.parametrize("suffix", [".pth", ".pkl"])
def test_the_anchors_buffer_is_accepted_in_the_layouts_own_order(tmp_path, model, suffix):
    path = tmp_path / f"weights{suffix}"
    save_weights(model, path)
    seen = {}
    rewrite(path, lambda raw: seen.update(anchors=raw[ANCHORS_KEY].copy()))
    assert seen["anchors"].shape == (12, 4)
    other = fresh()
    load_weights(other, path)  # the buffer is not an "unexpected key"
    assert_same_weights(other, model)


@pytest.mark.parametrize("suffix,wrong,found", [
    (".pth", detectron2_cell_anchors, "size-major (detectron2)"),
    (".pkl", caffe_cell_anchors, "ratio-major (Caffe)"),
])
def test_anchors_in_the_other_order_are_refused(tmp_path, model, suffix, wrong, found):
    path = tmp_path / f"weights{suffix}"
    save_weights(model, path)
    rewrite(path, lambda raw: raw.update({ANCHORS_KEY: wrong(CONFIG)}))
    with pytest.raises(CheckpointError) as err:
        load_weights(fresh(), path)
    message = str(err.value)
    assert f"in {found} order" in message and "wrong anchors" in message and str(path) in message


def test_anchors_of_another_network_or_shape_are_refused(tmp_path, model):
    path = tmp_path / "weights.pth"
    save_weights(model, path)
    shuffled = caffe_cell_anchors(CONFIG)[[1, 0, *range(2, 12)]]
    rewrite(path, lambda raw: raw.update({ANCHORS_KEY: shuffled}))
    with pytest.raises(CheckpointError, match="in an unknown order"):
        load_weights(fresh(), path)
    rewrite(path, lambda raw: raw.update({ANCHORS_KEY: caffe_cell_anchors(CONFIG) / 8}))  # 8 to 64 pixel sides
    with pytest.raises(CheckpointError, match="row 0 is a .* anchor, not one of this network's"):
        load_weights(fresh(), path)
    rewrite(path, lambda raw: raw.update({ANCHORS_KEY: caffe_cell_anchors(CONFIG)[:9]}))
    with pytest.raises(CheckpointError, match=r"has shape \[9, 4\], expected \[12, 4\]"):
        load_weights(fresh(), path)


def test_the_loader_stays_strict_about_other_keys(tmp_path, model):
    path = tmp_path / "weights.pkl"
    save_weights(model, path)
    rewrite(path, lambda raw: raw.update({ANCHORS_KEY.replace(".0", ".1"): detectron2_cell_anchors(CONFIG)}))
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): proposal_generator.anchor_generator.cell_a"):
        load_weights(fresh(), path)


def test_the_published_files_are_paired_with_their_boxes():
    by_boxes = {boxes: sorted(w.file_name for w in PUBLISHED if w.boxes == boxes) for boxes in ("10-100", "36")}
    assert by_boxes == {
        "10-100": ["bua-caffe-frcn-r101_with_attributes.pth", "faster_rcnn_from_caffe_attr_original.pkl"],
        "36": ["bua-caffe-frcn-r101_with_attributes_fix36.pth", "faster_rcnn_from_caffe_attr.pkl"]}
    assert {w.caffe_model for w in PUBLISHED if w.boxes == "36"} == {"iter_320000"}
    assert {w.caffe_model for w in PUBLISHED if w.boxes == "10-100"} == {"resnet101_faster_rcnn_final"}
    assert identify("/models/FASTER_RCNN_FROM_CAFFE_ATTR.pkl").boxes == "36"
    assert identify("my_detector.pth") is None


def test_boxes_that_do_not_fit_the_weights_are_warned_about():
    assert boxes_warning("w/faster_rcnn_from_caffe_attr.pkl", "36") is None
    assert boxes_warning("w/bua-caffe-frcn-r101_with_attributes.pth", "10-100") is None
    assert boxes_warning("renamed.pth", "36") is None  # the name does not say which network it is
    warning = boxes_warning("w/faster_rcnn_from_caffe_attr.pkl", "10-100")
    assert "iter_320000" in warning and "faster_rcnn_from_caffe_attr_original.pkl" in warning
    warning = boxes_warning("bua-caffe-frcn-r101_with_attributes.pth", "36")
    assert "resnet101_faster_rcnn_final" in warning and "bua-caffe-frcn-r101_with_attributes_fix36.pth" in warning
    assert "faster_rcnn_from_caffe_attr_original.pkl" in boxes_warning("faster_rcnn_from_caffe_attr.pkl", "20-50")


def test_the_extraction_run_logs_the_mismatch(tmp_path, model, caplog):
    image = tmp_path / "images" / "COCO_val2014_000000000001.png"
    image.parent.mkdir()
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(image)
    config = ExtractionConfig(images=image.parent, weights=str(tmp_path / "faster_rcnn_from_caffe_attr.pkl"),
                              output=tmp_path / "feats.lmdb", boxes="10-100", device="cpu", num_workers=0,
                              progress=False)
    with caplog.at_level(logging.WARNING):
        run_extraction(config, detector=model)
    assert "--boxes 10-100 with faster_rcnn_from_caffe_attr.pkl" in caplog.text


def test_the_caption_tool_reports_missing_detector_weights(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("butd_tool_caption", ROOT / "tools" / "caption.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    code = tool.main(["x.jpg", "--detector", str(tmp_path / "bua-caffe-frcn-r101_with_attributes.pth"),
                      "--checkpoint", str(tmp_path / "best.pt"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2
    assert "detector weights" in err and "not found" in err and "docs/extraction.md" in err and "Traceback" not in err
