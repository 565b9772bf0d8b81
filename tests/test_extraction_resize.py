"""The network input equals the reference's: mean subtraction then OpenCV's INTER_LINEAR resize with fx = fy = s."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from feature_extraction.config import DetectorConfig
from feature_extraction.detector import BottomUpDetector
from feature_extraction.images import load_image, resize_scale, resized_shape
from feature_extraction.preprocess import prepare_batch

cv2 = pytest.importorskip("cv2", reason="OpenCV (the test dependency opencv-python-headless) is not installed")

COCO_IMAGES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "coco_images"
CONFIG = DetectorConfig()
MEAN = np.asarray(CONFIG.pixel_mean_bgr, dtype=np.float32)
PIXEL_MEAN = torch.tensor(CONFIG.pixel_mean_bgr).reshape(3, 1, 1)
# Both sides compute bilinear weights in float32 (OpenCV from a double position, ATen from a float one), so the
# results differ by float rounding only: measured at most 0.01 grey levels on the COCO images.
TOLERANCE = 0.05


def reference_input(rgb: np.ndarray, scale: int, max_size: int) -> np.ndarray:
    """py-faster-rcnn's _get_image_blob: BGR float32, minus the means, cv2.resize with fx = fy = the factor."""
    factor = resize_scale(rgb.shape[0], rgb.shape[1], scale=scale, max_size=max_size)
    bgr = rgb[:, :, ::-1].astype(np.float32) - MEAN
    return cv2.resize(bgr, None, None, fx=factor, fy=factor, interpolation=cv2.INTER_LINEAR)


class _Captured(Exception):
    """Raised by the hook below to stop the detector once its input batch is seen."""


def our_input(rgb: np.ndarray, scale: int, max_size: int) -> np.ndarray:
    """What BottomUpDetector.detect feeds its backbone (the network itself is not run)."""
    detector = BottomUpDetector(config=replace(DetectorConfig.small(), test_scale=scale, test_max_size=max_size))
    seen = []

    def capture(module, args):
        seen.append(args[0])
        raise _Captured

    detector.backbone.register_forward_pre_hook(capture)
    with pytest.raises(_Captured):
        detector.detect([rgb])
    batch, sizes, _ = prepare_batch([rgb], pixel_mean=PIXEL_MEAN, scale=scale, max_size=max_size)
    assert tuple(seen[0].shape[2:]) == sizes[0] and torch.equal(seen[0], batch)
    return batch[0].permute(1, 2, 0).numpy()


def coco_images() -> list[Path]:
    paths = sorted(COCO_IMAGES.glob("*.jpg"))
    if len(paths) < 9:
        pytest.skip(f"the 9 shared COCO images were not found at {COCO_IMAGES}")
    return paths


def test_network_input_matches_opencv_on_the_real_images():
    worst = 0.0
    for path in coco_images():
        rgb = load_image(path)
        want = reference_input(rgb, CONFIG.test_scale, CONFIG.test_max_size)
        got = our_input(rgb, CONFIG.test_scale, CONFIG.test_max_size)
        assert got.shape == want.shape, path.name
        worst = max(worst, float(np.abs(got - want).max()))
    assert worst < TOLERANCE


def test_the_size_based_resize_differs_from_the_reference():
    # Why the scale-factor form matters: F.interpolate(size=...) steps by in/out, not 1/s (issue 16).
    path = COCO_IMAGES / "COCO_val2014_000000273052.jpg"
    if not path.is_file():
        pytest.skip(f"shared COCO images not found at {COCO_IMAGES}")
    rgb = load_image(path)
    want = reference_input(rgb, CONFIG.test_scale, CONFIG.test_max_size)
    bgr = torch.from_numpy(np.ascontiguousarray(rgb[:, :, ::-1], dtype=np.float32) - MEAN).permute(2, 0, 1)[None]
    by_size = F.interpolate(bgr, size=want.shape[:2], mode="bilinear", align_corners=False)[0].permute(1, 2, 0)
    assert np.abs(by_size.numpy() - want).max() > 10 * TOLERANCE  # 15.8 grey levels
    assert np.abs(our_input(rgb, CONFIG.test_scale, CONFIG.test_max_size) - want).max() < TOLERANCE


# (height, width, scale, max size): upscales whose rounded size is not in * s, a capped longest side, a
# downscale, an exact halving (OpenCV switches to INTER_AREA there, which is the same average), tiny and odd sizes.
SYNTHETIC = [(334, 500, 600, 1000), (427, 640, 600, 1000), (100, 1337, 600, 1000), (1200, 2000, 600, 1000),
             (1999, 1001, 600, 1000), (45, 61, 96, 160), (333, 335, 500, 900), (613, 23, 600, 1000)]


@pytest.mark.parametrize("height,width,scale,max_size", SYNTHETIC)
def test_network_input_matches_opencv_on_noise(height, width, scale, max_size):
    # Uniform noise is the worst case for interpolation differences: every neighbour pair differs.
    rgb = np.random.default_rng(height * width).integers(0, 256, (height, width, 3), dtype=np.uint8)
    want = reference_input(rgb, scale, max_size)
    got = our_input(rgb, scale, max_size)
    assert got.shape == want.shape
    assert np.abs(got - want).max() < TOLERANCE


def test_resized_shape_rounds_like_opencv():
    for height, width, factor in [(333, 335, 1.5), (331, 337, 1.5), (7, 9, 0.5), (11, 13, 0.5), (334, 500, 600 / 334),
                                  (427, 640, 600 / 427), (101, 103, 2.5)]:
        image = np.zeros((height, width), np.float32)
        want = cv2.resize(image, None, None, fx=factor, fy=factor, interpolation=cv2.INTER_LINEAR).shape
        assert resized_shape(height, width, factor) == want, (height, width, factor)
