"""BottomUpDetector.detect with the small random network on real COCO images: outputs, box policy, determinism."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from butd.data.package_data import ATTRIBUTES_VOCAB, OBJECTS_VOCAB, resource_path
from butd.errors import ConfigError
from feature_extraction.config import DetectorConfig
from feature_extraction.detector import BottomUpDetector, BoxPolicy, Detections
from feature_extraction.images import load_image
from feature_extraction.weights import initialize_random

COCO_IMAGES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "coco_images"


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    names = ["COCO_val2014_000000273052.jpg", "000000126107.jpg", "000000165518.jpg"]
    if not all((COCO_IMAGES / n).is_file() for n in names):
        pytest.skip(f"shared COCO images not found at {COCO_IMAGES}")
    return [load_image(COCO_IMAGES / n) for n in names]  # 500x334, 640x480 and 612x612: three batch shapes


@pytest.fixture(scope="module")
def detector() -> BottomUpDetector:
    # The small network with a reduced test-time resize and 150 proposals: fast on CPU, same code paths.
    config = replace(DetectorConfig.small(), test_scale=256, test_max_size=400, rpn_pre_nms_topk=1500,
                     rpn_post_nms_topk=150)
    model = BottomUpDetector(config=config)
    initialize_random(model, seed=0)
    return model


def check_detections(det: Detections, image: np.ndarray, feature_dim: int) -> None:
    n = det.num_boxes
    assert det.features.shape == (n, feature_dim) and det.features.dtype == np.float32
    assert det.boxes.shape == (n, 4) and det.boxes.dtype == np.float32
    assert (det.image_w, det.image_h) == (image.shape[1], image.shape[0])
    x1, y1, x2, y2 = det.boxes.T
    assert (x1 >= 0).all() and (y1 >= 0).all() and (x2 < det.image_w).all() and (y2 < det.image_h).all()
    assert (x1 <= x2).all() and (y1 <= y2).all()
    for name, dtype in [("object_ids", np.int32), ("attr_ids", np.int32), ("object_conf", np.float32),
                        ("attr_conf", np.float32)]:
        arr = getattr(det, name)
        assert arr.shape == (n,) and arr.dtype == dtype, name
    assert det.object_ids.min() >= 0 and det.object_ids.max() < 1600
    assert det.attr_ids.min() >= 0 and det.attr_ids.max() < 400
    assert ((det.object_conf > 0) & (det.object_conf <= 1)).all() and ((det.attr_conf > 0) & (det.attr_conf <= 1)).all()


def test_vocabularies_match_the_classifier(detector):
    objects = resource_path(OBJECTS_VOCAB).read_text().splitlines()
    attributes = resource_path(ATTRIBUTES_VOCAB).read_text().splitlines()
    assert len(objects) + 1 == detector.config.num_classes  # + background
    assert len(attributes) + 1 == detector.config.num_attributes  # + "no attribute"


def test_adaptive_policy_outputs(detector, images):
    dets = detector.detect(images, boxes=BoxPolicy.parse("10-100"))
    assert len(dets) == len(images)
    for det, image in zip(dets, images):
        check_detections(det, image, detector.config.feature_dim)
        # Random weights: no region reaches 0.2 confidence, so the floor of 10 applies, as in the reference.
        assert det.num_boxes == 10 and det.object_conf.max() < 0.2


def test_fixed_policy_gives_exactly_k(detector, images):
    for det, image in zip(detector.detect(images, boxes=BoxPolicy.parse("36")), images):
        check_detections(det, image, detector.config.feature_dim)
        assert det.num_boxes == 36


def test_confident_detector_is_capped_at_max_boxes(detector, images):
    # Make one class certain everywhere: every region passes 0.2, and per-class NMS plus the cap decide.
    confident = BottomUpDetector(config=detector.config)
    confident.load_state_dict(detector.state_dict())
    confident.roi_heads.box_predictor.cls_score.bias.data[7] = 50.0
    (det,) = confident.detect(images[:1], boxes=BoxPolicy(min_boxes=10, max_boxes=12))
    check_detections(det, images[0], detector.config.feature_dim)
    assert det.num_boxes == 12 and (det.object_ids == 6).all() and (det.object_conf > 0.99).all()


def test_results_are_deterministic_and_independent_of_the_batch(detector, images):
    policy = BoxPolicy.parse("10-100")
    batched = detector.detect(images, boxes=policy)
    again = detector.detect(images, boxes=policy)
    alone = [detector.detect([image], boxes=policy)[0] for image in images]
    for a, b, c in zip(batched, again, alone):
        for name in ["features", "boxes", "object_ids", "object_conf", "attr_ids", "attr_conf"]:
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
            # Padding to the batch's largest image must not leak into the result (masked in the backbone).
            np.testing.assert_allclose(getattr(a, name), getattr(c, name), rtol=1e-5, atol=1e-5, err_msg=name)


def test_bad_inputs_are_refused(detector, images):
    with pytest.raises(ConfigError, match="uint8"):
        detector.detect([images[0].astype(np.float32)])
    with pytest.raises(ConfigError, match="precision"):
        detector.set_precision("fp8")
    assert detector.detect([]) == []
