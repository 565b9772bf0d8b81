"""Batched extraction into an LMDB feature store: parallel decoding, resume, shards and a failures file.

Determinism: the detector runs in eval mode, images are processed in image-id order, and a result does not depend
on which images share its batch (padding is masked, see backbone.py), so a restarted run stores the same records as
an uninterrupted one, up to floating-point noise between differently shaped batches (none on CPU in our tests;
GPU kernels may differ in the last bits, and a near-tie between two regions could then swap them).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from butd.data.store import FeatureRecord, FeatureWriter
from feature_extraction.detector import BottomUpDetector, BoxPolicy
from feature_extraction.images import DEFAULT_MAX_PIXELS, ImageError, check_resizable, load_image
from feature_extraction.sources import Failure, FailureLog, ImageItem, list_images, shard

log = logging.getLogger(__name__)


@dataclass
class Loaded:
    """A decoded image, or why it could not be decoded."""

    item: ImageItem
    image: np.ndarray | None
    reason: str | None


class ImageDataset(Dataset):
    """Decodes images in DataLoader workers; a bad image becomes a ``Loaded`` with a reason, never an exception."""

    def __init__(self, items: list[ImageItem], *, max_pixels: int, scale: int, max_size: int) -> None:
        self.items, self.max_pixels, self.scale, self.max_size = items, max_pixels, scale, max_size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Loaded:
        item = self.items[index]
        try:
            image = load_image(item.path, max_pixels=self.max_pixels)
            check_resizable(image.shape[0], image.shape[1], scale=self.scale, max_size=self.max_size,
                            source=str(item.path))
        except ImageError as exc:
            return Loaded(item, None, exc.reason)
        return Loaded(item, image, None)


def _collate(batch: list[Loaded]) -> list[Loaded]:
    return batch


@dataclass
class ExtractionStats:
    """What a run did."""

    listed: int = 0  # images in this shard
    already_done: int = 0  # skipped: already in the store
    previously_failed: int = 0  # skipped: in the failures file from an earlier run
    extracted: int = 0
    failed: int = 0
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return (self.extracted + self.failed) / self.seconds if self.seconds > 0 else 0.0


def extract_images(items: list[ImageItem], detector: BottomUpDetector, writer: FeatureWriter, *,
                   policy: BoxPolicy, failures: FailureLog, batch_size: int = 8, num_workers: int = 4,
                   max_pixels: int = DEFAULT_MAX_PIXELS, progress: bool = True) -> ExtractionStats:
    """Extract ``items`` (none may be in ``writer`` yet) in order, batch by batch, into ``writer``.

    Bad images are added to ``failures`` and skipped. Returns counts and the wall time of the loop.
    """
    cfg = detector.config
    dataset = ImageDataset(items, max_pixels=max_pixels, scale=cfg.test_scale, max_size=cfg.test_max_size)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=_collate, prefetch_factor=4 if num_workers > 0 else None)
    stats = ExtractionStats(listed=len(items))
    start = time.perf_counter()
    with tqdm(total=len(items), unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for batch in loader:
            good = [entry for entry in batch if entry.image is not None]
            for entry in batch:
                if entry.image is None:
                    _fail(failures, stats, entry.item, entry.reason)
            detections = detector.detect([entry.image for entry in good], boxes=policy) if good else []
            for entry, det in zip(good, detections):
                if det.num_boxes == 0:
                    _fail(failures, stats, entry.item, "the detector found no regions")
                    continue
                writer.put(FeatureRecord(image_id=entry.item.image_id, features=det.features, boxes=det.boxes,
                                         image_w=det.image_w, image_h=det.image_h, object_ids=det.object_ids,
                                         object_conf=det.object_conf, attr_ids=det.attr_ids,
                                         attr_conf=det.attr_conf))
                stats.extracted += 1
            bar.update(len(batch))
            if stats.failed:
                bar.set_postfix(failed=stats.failed)
    if detector.device.type == "cuda":
        torch.cuda.synchronize(detector.device)
    stats.seconds = time.perf_counter() - start
    return stats


def _fail(failures: FailureLog, stats: ExtractionStats, item: ImageItem, reason: str) -> None:
    log.warning("skipping image %d (%s): %s", item.image_id, item.path, reason)
    failures.add(Failure(str(item.path), item.image_id, reason))
    stats.failed += 1


@dataclass(frozen=True)
class ExtractionConfig:
    """Everything ``tools/extract_features.py`` takes."""

    images: Path
    weights: str
    output: Path
    boxes: str = "10-100"
    batch_size: int = 8
    shard: tuple[int, int] = (0, 1)
    device: str = "cuda"
    num_workers: int = 4
    precision: str = "bf16"
    dtype: str = "float16"
    failures: Path | None = None  # default: OUTPUT.failures.jsonl
    max_pixels: int = DEFAULT_MAX_PIXELS
    retry_failed: bool = False
    small: bool = False  # the reduced random network (tests)
    progress: bool = True
    commit_every: int = 256

    @property
    def failures_path(self) -> Path:
        return self.failures or self.output.with_name(self.output.name + ".failures.jsonl")


def run_extraction(config: ExtractionConfig, *, detector: BottomUpDetector | None = None) -> ExtractionStats:
    """List, shard, skip what is done, extract the rest. Stats count this shard's images.

    ``detector`` overrides the one ``config`` describes (weights, device, precision), e.g. a prebuilt network.
    """
    policy = BoxPolicy.parse(config.boxes)
    items = shard(list_images(config.images), *config.shard)
    failures = FailureLog(config.failures_path)
    if config.retry_failed:
        failures.forget({item.image_id for item in items})
    if detector is None:
        detector = BottomUpDetector.from_weights(config.weights, device=config.device, small=config.small,
                                                 precision=config.precision)
    with FeatureWriter(config.output, dtype=config.dtype, commit_every=config.commit_every) as writer:
        missing = [item for item in items if item.image_id not in writer]
        todo = [item for item in missing if item.image_id not in failures.previous]
        done, skipped = len(items) - len(missing), len(missing) - len(todo)
        log.info("%d images in shard %d/%d: %d already stored, %d failed in an earlier run (skipped; "
                 "--retry-failed retries them), %d to extract", len(items), config.shard[0], config.shard[1],
                 done, skipped, len(todo))
        stats = extract_images(todo, detector, writer, policy=policy, failures=failures,
                               batch_size=config.batch_size, num_workers=config.num_workers,
                               max_pixels=config.max_pixels, progress=config.progress)
    stats.listed, stats.already_done, stats.previously_failed = len(items), done, skipped
    return stats
