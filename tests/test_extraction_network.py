"""The detector's building blocks: the full ResNet-101 network's layout, Caffe box arithmetic, region selection."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from feature_extraction.boxes import decode_deltas, generate_anchors, nms_legacy
from feature_extraction.config import DetectorConfig
from feature_extraction.detector import BottomUpDetector, BoxPolicy
from feature_extraction.selection import select_regions_batch
from feature_extraction.images import load_image
from feature_extraction.weights import initialize_random

COCO_IMAGES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "coco_images"


def test_full_network_has_the_published_layout_and_2048_d_features():
    image_path = COCO_IMAGES / "COCO_val2014_000000273052.jpg"
    if not image_path.is_file():
        pytest.skip(f"shared COCO images not found at {COCO_IMAGES}")
    # The real architecture; only the test-time resize and the proposal count are reduced to keep CPU time low.
    config = replace(DetectorConfig(), test_scale=96, test_max_size=160, rpn_pre_nms_topk=200, rpn_post_nms_topk=6)
    model = BottomUpDetector(config=config)
    initialize_random(model, seed=0)
    state = model.state_dict()
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    assert len([k for k in shapes if k.startswith("backbone.res4.") and k.endswith(".conv3.weight")]) == 23
    assert shapes["backbone.stem.conv1.weight"] == (64, 3, 7, 7)
    assert shapes["backbone.res4.22.conv3.norm.running_var"] == (1024,)
    assert shapes["proposal_generator.rpn_head.conv.weight"] == (512, 1024, 3, 3)
    assert shapes["proposal_generator.rpn_head.objectness_logits.weight"] == (12, 512, 1, 1)
    assert shapes["proposal_generator.rpn_head.anchor_deltas.weight"] == (48, 512, 1, 1)
    assert shapes["roi_heads.res5.0.shortcut.weight"] == (2048, 1024, 1, 1)
    assert shapes["roi_heads.res5.2.conv2.weight"] == (512, 512, 3, 3)
    assert model.roi_heads.res5[0].conv1.stride == 1 and model.roi_heads.res5[0].conv2.dilation == 2
    assert model.backbone.res3[0].conv1.stride == 2 and model.backbone.res3[0].conv2.stride == 1  # stride in 1x1
    assert shapes["roi_heads.box_predictor.cls_score.weight"] == (1601, 2048)
    assert shapes["roi_heads.box_predictor.bbox_pred.weight"] == (6404, 2048)
    assert shapes["roi_heads.box_predictor.cls_embedding.weight"] == (1601, 256)
    assert shapes["roi_heads.box_predictor.fc_attr.weight"] == (512, 2304)
    assert shapes["roi_heads.box_predictor.attr_score.weight"] == (401, 512)

    (det,) = model.detect([load_image(image_path)], boxes=BoxPolicy(min_boxes=5, max_boxes=5))
    assert det.features.shape == (5, 2048) and det.features.dtype == np.float32
    assert det.boxes.shape == (5, 4) and (det.image_w, det.image_h) == (500, 334)
    assert np.isfinite(det.features).all() and (det.features >= 0).all()  # pooled after a ReLU


def test_backbone_valid_sizes_match_the_real_feature_maps():
    # Batching masks rely on this arithmetic (Caffe ceil-mode pool included) for every input size.
    cfg = DetectorConfig.small()
    model = BottomUpDetector(config=cfg)
    initialize_random(model)
    for height, width in [(33, 47), (600, 800), (601, 799), (97, 64)]:
        with torch.inference_mode():
            res4, sizes = model.backbone(torch.zeros(1, 3, height, width), [(height, width)])
        assert tuple(res4.shape[2:]) == sizes[0] == model.backbone.level_sizes(height, width)[3]
    assert model.backbone.level_sizes(600, 800)[1] == (150, 200)  # ceil-mode stem pool: 300 -> 150, 400 -> 200


def test_anchors_are_the_caffe_ones():
    anchors = generate_anchors(16, (0.5, 1.0, 2.0), (8.0, 16.0, 32.0))
    # The well-known output of py-faster-rcnn's generate_anchors() (default scales 8, 16, 32).
    expected = [[-84, -40, 99, 55], [-176, -88, 191, 103], [-360, -184, 375, 199],
                [-56, -56, 71, 71], [-120, -120, 135, 135], [-248, -248, 263, 263],
                [-36, -80, 51, 95], [-80, -168, 95, 183], [-168, -344, 183, 359]]
    np.testing.assert_array_equal(anchors, expected)
    assert generate_anchors(16, (0.5, 1.0, 2.0), (4.0, 8.0, 16.0, 32.0)).shape == (12, 4)


def test_box_decoding_uses_inclusive_widths():
    boxes = torch.tensor([[10.0, 20.0, 19.0, 39.0]])  # 10 x 20 pixels
    same = decode_deltas(torch.zeros(1, 4), boxes, (1, 1, 1, 1), 4.0)
    torch.testing.assert_close(same, torch.tensor([[10.0, 20.0, 20.0, 40.0]]))  # x2 = ctr + w/2 (py-faster-rcnn)
    doubled = decode_deltas(torch.tensor([[0.0, 0.0, float(np.log(2)), 0.0]]), boxes, (1, 1, 1, 1), 4.0)
    torch.testing.assert_close(doubled[0, 2] - doubled[0, 0], torch.tensor(20.0))


def test_nms_uses_the_plus_one_iou():
    # Inclusive-corner IoU: 1x... boxes [0,0,9,9] and [5,0,14,9]: inter 5*10=50, union 150 -> 0.333;
    # continuous IoU would be 4*9 / (81+81-36) = 0.286.
    boxes = torch.tensor([[0.0, 0.0, 9.0, 9.0], [5.0, 0.0, 14.0, 9.0]])
    scores = torch.tensor([0.9, 0.8])
    assert nms_legacy(boxes, scores, 0.3).tolist() == [0]
    assert nms_legacy(boxes, scores, 0.34).tolist() == [0, 1]


def reference_selection(boxes: np.ndarray, scores: np.ndarray, policy: BoxPolicy) -> np.ndarray:
    """generate_tsv.py written out: greedy NMS per class, max surviving score, threshold, clamp."""
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    max_conf = np.zeros(len(boxes))
    for c in range(scores.shape[1]):
        order = np.argsort(-scores[:, c], kind="stable")
        keep = []
        while order.size:
            i = order[0]
            keep.append(i)
            w = np.maximum(0, np.minimum(x2[i], x2[order[1:]]) - np.maximum(x1[i], x1[order[1:]]) + 1)
            h = np.maximum(0, np.minimum(y2[i], y2[order[1:]]) - np.maximum(y1[i], y1[order[1:]]) + 1)
            inter = w * h
            iou = inter / (areas[i] + areas[order[1:]] - inter)
            order = order[1:][iou <= policy.nms_thresh]
        keep = np.array(keep)
        max_conf[keep] = np.maximum(max_conf[keep], scores[keep, c])
    above = np.nonzero(max_conf >= policy.conf_thresh)[0]
    if policy.min_boxes <= above.size <= policy.max_boxes:
        return above
    k = policy.max_boxes if above.size > policy.max_boxes else policy.min_boxes
    return np.argsort(-max_conf, kind="stable")[:k]


# (seed, logit std, classes, max boxes): which branch of the rule each case takes.
SELECTION_CASES = {
    "in_range": (1, 1.5, 60, 100),  # 57 regions pass the 0.2 threshold
    "too_many": (0, 2.5, 60, 100),  # 107 pass: the 100 most confident
    "clamped_low_max": (2, 4.0, 60, 30),  # 118 pass: the 30 most confident
    "too_few": (4, 1.0, 60, 100),  # 3 pass: the 10 most confident, below the threshold too
    "all_tiny": (3, 0.05, 60, 100),  # a random network: nothing passes, the 10-box floor decides
    "all_pairs": (6, 0.05, 20, 100),  # few (box, class) pairs: every pair goes through NMS at once
}


@pytest.mark.parametrize("case", sorted(SELECTION_CASES))
def test_region_selection_matches_the_reference_rule(case):
    seed, std, classes, max_boxes = SELECTION_CASES[case]
    rng = np.random.default_rng(seed)
    num = 120
    xy = rng.uniform(0, 300, (num, 2))
    wh = rng.uniform(10, 120, (num, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1).astype(np.float32)
    logits = rng.normal(0, std, (num, classes))
    scores = (np.exp(logits) / np.exp(logits).sum(1, keepdims=True)).astype(np.float32)
    policy = BoxPolicy(min_boxes=10, max_boxes=max_boxes)
    (got,) = select_regions_batch([torch.from_numpy(boxes)], [torch.from_numpy(scores)], policy)
    want = reference_selection(boxes, scores, policy)
    # Same regions in the same order: proposal order when the threshold decides, most confident first when clamped.
    assert got.tolist() == want.tolist()
    assert policy.min_boxes <= len(got) <= policy.max_boxes


def test_box_policy_parsing():
    assert BoxPolicy.parse("10-100") == BoxPolicy(10, 100)
    assert BoxPolicy.parse("36") == BoxPolicy(36, 36)
    assert str(BoxPolicy.parse("36")) == "36" and str(BoxPolicy()) == "10-100"
    for bad in ["", "ten", "100-10", "0", "5-x"]:
        with pytest.raises(ValueError):
            BoxPolicy.parse(bad)
