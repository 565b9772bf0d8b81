"""Extraction on CUDA (skipped without a GPU): strict fp32 there, the fast paths equal the CPU ones, nvJPEG decoding."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from feature_extraction.config import DetectorConfig
from feature_extraction.detector import BottomUpDetector, BoxPolicy
from feature_extraction.images import load_image
from feature_extraction.selection import select_regions_batch
from feature_extraction.weights import initialize_random

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
COCO_IMAGES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "coco_images"
CONFIG = replace(DetectorConfig.small(), test_scale=224, test_max_size=360, rpn_pre_nms_topk=1000,
                 rpn_post_nms_topk=100)


def detector_on(device: str) -> BottomUpDetector:
    model = BottomUpDetector(config=CONFIG)
    initialize_random(model, seed=0)
    return model.to(device)


def test_reference_mode_runs_without_tf32_on_cuda():
    model = detector_on("cuda")
    seen = []
    model.backbone.res4[-1].register_forward_hook(
        lambda m, a, out: seen.append((torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision())))
    before = (torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision())
    model.detect([np.random.default_rng(0).integers(0, 256, (200, 300, 3), dtype=np.uint8)])
    assert seen == [(False, "highest")]
    assert (torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()) == before


def test_batched_selection_on_cuda_equals_cpu():
    rng = np.random.default_rng(0)
    boxes, scores = [], []
    for std in (1.5, 2.5, 1.0, 0.05):
        xy = rng.uniform(0, 300, (120, 2))
        boxes.append(torch.from_numpy(np.concatenate([xy, xy + rng.uniform(10, 120, (120, 2))], 1).astype(np.float32)))
        logits = torch.from_numpy(rng.normal(0, std, (120, 60)).astype(np.float32))
        scores.append(torch.softmax(logits, dim=1))
    policy = BoxPolicy()
    cpu = select_regions_batch(boxes, scores, policy)
    cuda = select_regions_batch([b.cuda() for b in boxes], [s.cuda() for s in scores], policy)
    assert [k.tolist() for k in cuda] == [k.tolist() for k in cpu]


def test_nvjpeg_decoding_is_close_to_pil():
    from feature_extraction.loading import Loaded, decode_on_device
    from feature_extraction.sources import ImageItem

    paths = sorted(COCO_IMAGES.glob("*.jpg"))
    if not paths:
        pytest.skip(f"shared COCO images not found at {COCO_IMAGES}")
    batch = [Loaded(ImageItem(p, i), None, None, jpeg=p.read_bytes()) for i, p in enumerate(paths)]
    decode_on_device(batch, torch.device("cuda"), max_pixels=10**8)
    for entry in batch:
        assert entry.image.is_cuda
        diff = np.abs(entry.image.cpu().numpy().astype(int) - load_image(entry.item.path).astype(int))
        assert diff.mean() < 1.0, entry.item.path.name  # IDCT / chroma upsampling may differ slightly

