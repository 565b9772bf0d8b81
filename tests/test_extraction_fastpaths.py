"""The speed work keeps the outputs: batched selection, the sync-free RPN, background writes, device decoding,
parallel workers and channels_last give what the plain paths give."""
from __future__ import annotations

import io
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from butd.data.store import FeatureRecord, FeatureStore, FeatureWriter
from feature_extraction.boxes import clip_boxes, nms_legacy
from feature_extraction.config import DetectorConfig
from feature_extraction.detector import BottomUpDetector, BoxPolicy
from feature_extraction.extract import extract_images
from feature_extraction.loading import ImageDataset, decode_on_device
from feature_extraction.merge import records_equal
from feature_extraction.rpn import ProposalGenerator
from feature_extraction.selection import build_detections, select_regions_batch
from feature_extraction.sources import FailureLog, list_images
from feature_extraction.weights import initialize_random

COCO_IMAGES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "coco_images"
GOOD = ["COCO_val2014_000000273052.jpg", "000000126107.jpg", "000000165518.jpg"]
CONFIG = replace(DetectorConfig.small(), test_scale=160, test_max_size=260, rpn_pre_nms_topk=600, rpn_post_nms_topk=60)


def random_image(seed: int, num: int, classes: int, std: float) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 300, (num, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(10, 120, (num, 2))], axis=1).astype(np.float32)
    logits = rng.normal(0, std, (num, classes))
    scores = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return torch.from_numpy(boxes), torch.from_numpy(scores.astype(np.float32))


def test_batched_selection_equals_image_by_image():
    # Images taking every branch: in range, too many, too few, nothing confident, fewer proposals than the floor.
    images = [random_image(1, 120, 60, 1.5), random_image(0, 120, 60, 2.5), random_image(4, 120, 60, 1.0),
              random_image(3, 120, 60, 0.05), random_image(5, 6, 60, 0.05), random_image(6, 300, 60, 0.05)]
    policy = BoxPolicy(min_boxes=10, max_boxes=100)
    together = select_regions_batch([b for b, _ in images], [s for _, s in images], policy)
    for (boxes, scores), got in zip(images, together):
        (alone,) = select_regions_batch([boxes], [scores], policy)
        assert got.tolist() == alone.tolist()
    assert [len(k) for k in together] == [57, 100, 10, 10, 6, 10]


def test_regions_keep_proposal_order_unless_clamped():
    # Four separate boxes, all confident: the reference keeps them in proposal order, not by confidence.
    boxes = torch.tensor([[0, 0, 9, 9], [20, 0, 29, 9], [40, 0, 49, 9], [60, 0, 69, 9]], dtype=torch.float32)
    conf = torch.tensor([0.3, 0.9, 0.5, 0.7])
    probs = torch.stack([1 - conf, conf], dim=1)  # background, one object class
    features = torch.arange(4, dtype=torch.float32)[:, None].repeat(1, 3)
    (det,) = build_detections([(80, 80)], [boxes], features, probs, probs, BoxPolicy(min_boxes=2, max_boxes=4))
    np.testing.assert_allclose(det.object_conf, [0.3, 0.9, 0.5, 0.7])
    np.testing.assert_array_equal(det.features[:, 0], [0, 1, 2, 3])
    np.testing.assert_array_equal(det.boxes, boxes.numpy())
    (clamped,) = build_detections([(80, 80)], [boxes], features, probs, probs, BoxPolicy(min_boxes=1, max_boxes=3))
    np.testing.assert_allclose(clamped.object_conf, [0.9, 0.7, 0.5])  # the 3 most confident, best first


def plain_proposals(generator: ProposalGenerator, logits: torch.Tensor, deltas: torch.Tensor,
                    image_size: tuple[int, int], scale: float) -> torch.Tensor:
    """The proposal layer written the simple way: drop invalid anchors first (one host sync per image)."""
    from feature_extraction.boxes import decode_deltas, grid_anchors

    cfg = generator.cfg
    _, anchors_per_cell, height, width = logits.shape
    scores = logits.permute(0, 2, 3, 1).reshape(-1)
    deltas = deltas.reshape(anchors_per_cell, 4, height, width).permute(2, 3, 0, 1).reshape(-1, 4)
    anchors = grid_anchors(generator.cell_anchors, height, width, cfg.feat_stride)
    boxes = clip_boxes(decode_deltas(deltas, anchors, cfg.bbox_reg_weights, cfg.bbox_scale_clamp), *image_size)
    min_size = cfg.rpn_min_size * scale
    valid = torch.nonzero((boxes[:, 2] - boxes[:, 0] + 1 >= min_size)
                          & (boxes[:, 3] - boxes[:, 1] + 1 >= min_size)).flatten()
    top = valid[torch.topk(scores[valid], min(cfg.rpn_pre_nms_topk, valid.numel())).indices]
    keep = nms_legacy(boxes[top], scores[top], cfg.rpn_nms_thresh)[: cfg.rpn_post_nms_topk]
    return boxes[top[keep]]


@pytest.mark.parametrize("height,width,pre_nms", [(12, 16, 6000), (5, 7, 6000), (12, 16, 300)])
def test_sync_free_proposals_equal_the_plain_proposal_layer(height, width, pre_nms):
    # (5, 7): fewer valid anchors than pre_nms_topk, and fewer survivors than post_nms_topk.
    cfg = replace(DetectorConfig.small(), rpn_pre_nms_topk=pre_nms, rpn_post_nms_topk=300)
    generator = ProposalGenerator(cfg)
    image_size, scale = (height * 16, width * 16), 1.3
    torch.manual_seed(height * width)
    features = torch.randn(1, cfg.res4_channels, height, width)
    for module in (generator.rpn_head.conv, generator.rpn_head.objectness_logits, generator.rpn_head.anchor_deltas):
        torch.nn.init.normal_(module.weight, std=0.05)
    with torch.inference_mode():
        (got,) = generator(features, [(height, width)], [image_size], [scale])
        logits, deltas = generator.rpn_head(features)
        want = plain_proposals(generator, logits, deltas, image_size, scale)
    assert got.shape[0] > 0
    assert torch.equal(got, want)


@pytest.fixture(scope="module")
def detector() -> BottomUpDetector:
    model = BottomUpDetector(config=CONFIG)
    initialize_random(model, seed=0)
    return model


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    """Three real JPEGs, a PNG and an EXIF-rotated JPEG (the last two are never decoded on the device)."""
    if not all((COCO_IMAGES / n).is_file() for n in GOOD):
        pytest.skip(f"shared COCO images not found at {COCO_IMAGES}")
    folder = tmp_path_factory.mktemp("images")
    for name in GOOD:
        shutil.copy(COCO_IMAGES / name, folder / name)
    with Image.open(COCO_IMAGES / GOOD[0]) as im:
        im.save(folder / "COCO_val2014_000000000007.png")
        exif = Image.Exif()
        exif[0x0112] = 6
        buf = io.BytesIO()
        im.save(buf, format="JPEG", exif=exif, quality=90)
        (folder / "COCO_val2014_000000000008.jpg").write_bytes(buf.getvalue())
    return folder


def extract_records(detector, image_dir: Path, out: Path, **options) -> dict[int, FeatureRecord]:
    with FeatureWriter(out, dtype="float32") as writer:
        stats = extract_images(list_images(image_dir), detector, writer, policy=BoxPolicy(),
                               failures=FailureLog(out.with_suffix(".failures.jsonl")), batch_size=2,
                               progress=False, **{"num_workers": 0, **options})
    assert (stats.extracted, stats.failed) == (5, 0)
    with FeatureStore(out) as store:
        return {i: store[i] for i in store.image_ids()}


def test_background_writes_device_decoding_and_workers_store_the_same_records(detector, image_dir, tmp_path):
    plain = extract_records(detector, image_dir, tmp_path / "plain.lmdb", background_writes=False)
    variants = {"threaded writes": {"background_writes": True, "commit_every": 3},
                "device decode": {"decode": "device"},
                "two workers": {"num_workers": 2}}
    for name, options in variants.items():
        got = extract_records(detector, image_dir, tmp_path / f"{name}.lmdb", **options)
        assert sorted(got) == sorted(plain) and all(records_equal(got[i], plain[i]) for i in plain), name


def test_channels_last_changes_only_rounding(detector, image_dir):
    images = [np.asarray(Image.open(image_dir / name).convert("RGB")) for name in GOOD]
    want = detector.detect(images)
    detector.set_channels_last(True)
    try:
        got = detector.detect(images)
    finally:
        detector.set_channels_last(False)
    # Other convolution kernels: equal up to float32 rounding (not bit for bit).
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a.object_ids, b.object_ids)
        np.testing.assert_allclose(a.boxes, b.boxes, atol=1e-3)
        np.testing.assert_allclose(a.features, b.features, rtol=1e-4, atol=1e-5)


def test_only_plain_colour_jpegs_are_left_to_the_device(image_dir):
    items = list_images(image_dir)
    dataset = ImageDataset(items, max_pixels=10**8, scale=CONFIG.test_scale, max_size=CONFIG.test_max_size,
                           decode="device")
    entries = [dataset[i] for i in range(len(items))]
    on_device = {e.item.path.name for e in entries if e.jpeg is not None}
    assert on_device == set(GOOD)  # not the PNG, not the EXIF-rotated JPEG
    decode_on_device(entries, torch.device("cpu"), max_pixels=10**8)
    for entry in entries:
        want = np.asarray(Image.open(entry.item.path).convert("RGB")) if entry.item.path.name in GOOD else None
        assert entry.jpeg is None and entry.image is not None
        if want is not None:
            assert isinstance(entry.image, torch.Tensor) and np.array_equal(entry.image.numpy(), want)
