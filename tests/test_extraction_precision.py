"""Extraction modes: the reference mode computes in strict float32 (TF32 off, flags restored) and stores float32;
the fast mode runs the network under bf16 autocast and stores float16."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from butd.data.store import FeatureStore
from butd.errors import ConfigError
from feature_extraction.config import DetectorConfig
from feature_extraction.detector import BottomUpDetector
from feature_extraction.extract import ExtractionConfig, run_extraction
from feature_extraction.precision import MODES, compute_context, resolve_mode
from feature_extraction.weights import initialize_random

CONFIG = replace(DetectorConfig.small(), test_scale=96, test_max_size=160, rpn_pre_nms_topk=300, rpn_post_nms_topk=30)


@pytest.fixture()
def detector() -> BottomUpDetector:
    model = BottomUpDetector(config=CONFIG)
    initialize_random(model, seed=0)
    return model


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8)


def tf32_flags() -> tuple[str, bool]:
    return torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32


@pytest.fixture()
def tf32_allowed():
    """The caller's flags allow TF32 (PyTorch's cuDNN default); restored after the test."""
    before = tf32_flags()
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True
    yield ("high", True)
    torch.set_float32_matmul_precision(before[0])
    torch.backends.cudnn.allow_tf32 = before[1]


def record_during_forward(detector: BottomUpDetector) -> list:
    """What the flags and the res4 dtype are while the network runs."""
    seen = []
    detector.backbone.res4[-1].register_forward_hook(
        lambda module, args, output: seen.append((tf32_flags(), output.dtype, torch.is_autocast_enabled("cpu"))))
    return seen


def test_reference_mode_turns_tf32_off_and_restores_the_flags(detector, image, tf32_allowed):
    seen = record_during_forward(detector)
    detector.detect([image])
    assert seen == [(("highest", False), torch.float32, False)]
    assert tf32_flags() == tf32_allowed


def test_reference_mode_is_fp32_even_inside_a_callers_autocast(detector, image):
    seen = record_during_forward(detector)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        detector.detect([image])
    assert seen[0][1:] == (torch.float32, False)


def test_the_flags_are_restored_when_the_forward_pass_fails(detector, image, tf32_allowed):
    def fail(module, args, output):
        raise RuntimeError("boom")

    detector.backbone.res4[-1].register_forward_hook(fail)
    with pytest.raises(RuntimeError, match="boom"):
        detector.detect([image])
    assert tf32_flags() == tf32_allowed


def test_fast_mode_runs_the_network_in_bf16(detector, image, tf32_allowed):
    detector.set_precision("bf16")
    seen = record_during_forward(detector)
    (det,) = detector.detect([image])
    assert seen[0][1:] == (torch.bfloat16, True)
    assert seen[0][0] == tf32_allowed  # the fast mode leaves the caller's TF32 choice alone
    assert det.features.dtype == np.float32 and np.isfinite(det.features).all() and det.num_boxes == 10


def test_modes_and_overrides():
    assert (MODES["reference"].precision, MODES["reference"].dtype) == ("fp32", "float32")
    assert (MODES["fast"].precision, MODES["fast"].dtype) == ("bf16", "float16")
    assert resolve_mode("reference") is MODES["reference"]
    custom = resolve_mode("fast", dtype="float32")
    assert (custom.name, custom.precision, custom.dtype) == ("custom", "bf16", "float32")
    for bad in ({"mode": "quick"}, {"mode": "fast", "precision": "fp8"}, {"mode": "fast", "dtype": "int8"}):
        with pytest.raises(ConfigError):
            resolve_mode(**bad)
    with pytest.raises(ConfigError, match="precision"):
        with compute_context(torch.device("cpu"), "tf32"):
            pass


@pytest.mark.parametrize("mode,dtype", [("reference", np.float32), ("fast", np.float16)])
def test_the_mode_sets_the_stored_dtype(tmp_path, detector, mode, dtype):
    (tmp_path / "images").mkdir()
    Image.fromarray(np.full((60, 80, 3), 128, np.uint8)).save(tmp_path / "images" / "COCO_x_000000000005.png")
    config = ExtractionConfig(images=tmp_path / "images", weights="random", output=tmp_path / "feats.lmdb",
                              device="cpu", num_workers=0, progress=False, mode=mode)
    assert run_extraction(config, detector=detector).extracted == 1
    with FeatureStore(tmp_path / "feats.lmdb") as store:
        assert store[5].features.dtype == dtype
