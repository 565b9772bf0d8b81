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

import torch
from tqdm import tqdm

from butd.data.store import FeatureRecord, FeatureWriter
from butd.errors import ConfigError
from feature_extraction.detector import BottomUpDetector, BoxPolicy
from feature_extraction.images import DEFAULT_MAX_PIXELS
from feature_extraction.loading import DECODERS, ImageDataset, Loaded, decode_on_device, make_loader
from feature_extraction.precision import DEFAULT_MODE, resolve_mode
from feature_extraction.published import boxes_warning
from feature_extraction.sources import Failure, FailureLog, ImageItem, list_images, shard
from feature_extraction.writing import BackgroundWriter

log = logging.getLogger(__name__)

# At most this many extracted images are uncommitted at any time (what a kill loses): a few seconds of GPU work,
# while commits (one fsync each) run on the writer thread and never hold the detector up.
DEFAULT_COMMIT_EVERY = 64


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
                   max_pixels: int = DEFAULT_MAX_PIXELS, progress: bool = True,
                   commit_every: int = DEFAULT_COMMIT_EVERY, decode: str = "workers",
                   background_writes: bool = True) -> ExtractionStats:
    """Extract ``items`` (none may be in ``writer`` yet) in order, batch by batch, into ``writer``.

    Bad images are added to ``failures`` and skipped. At most ``commit_every`` extracted images are ever
    uncommitted (what a kill can lose). ``decode`` is "workers" (PIL in the DataLoader workers) or "device"
    (JPEGs decoded on the detector's device, see loading.py); ``background_writes`` moves encoding and commits to a
    thread (same records). Returns counts and the wall time of the loop.
    """
    if decode not in DECODERS:
        raise ConfigError(f"decode must be one of {', '.join(DECODERS)}, got {decode!r}")
    cfg = detector.config
    dataset = ImageDataset(items, max_pixels=max_pixels, scale=cfg.test_scale, max_size=cfg.test_max_size,
                           decode=decode)
    loader = make_loader(dataset, batch_size=batch_size, num_workers=num_workers)
    stats = ExtractionStats(listed=len(items))
    start = time.perf_counter()
    sink = BackgroundWriter(writer, max_uncommitted=commit_every, threaded=background_writes)
    try:
        with tqdm(total=len(items), unit="img", disable=not progress, dynamic_ncols=True) as bar:
            for batch in loader:
                if decode == "device":
                    decode_on_device(batch, detector.device, max_pixels=max_pixels)
                _extract_batch(batch, detector, sink, policy, failures, stats)
                bar.update(len(batch))
                if stats.failed:
                    bar.set_postfix(failed=stats.failed)
        sink.close()
    except BaseException:
        sink.abort()
        raise
    if detector.device.type == "cuda":
        torch.cuda.synchronize(detector.device)
    stats.seconds = time.perf_counter() - start
    return stats


def _extract_batch(batch: list[Loaded], detector: BottomUpDetector, sink: BackgroundWriter, policy: BoxPolicy,
                   failures: FailureLog, stats: ExtractionStats) -> None:
    good = [entry for entry in batch if entry.image is not None]
    for entry in batch:
        if entry.image is None:
            _fail(failures, stats, entry.item, entry.reason)
    detections = detector.detect([entry.image for entry in good], boxes=policy) if good else []
    records = []
    for entry, det in zip(good, detections):
        if det.num_boxes == 0:
            _fail(failures, stats, entry.item, "the detector found no regions")
            continue
        records.append(FeatureRecord(image_id=entry.item.image_id, features=det.features, boxes=det.boxes,
                                     image_w=det.image_w, image_h=det.image_h, object_ids=det.object_ids,
                                     object_conf=det.object_conf, attr_ids=det.attr_ids, attr_conf=det.attr_conf))
    sink.put_batch(records)
    stats.extracted += len(records)


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
    mode: str = DEFAULT_MODE  # "reference" or "fast" (precision.py)
    precision: str | None = None  # overrides the mode's compute precision
    dtype: str | None = None  # overrides the mode's stored feature dtype
    failures: Path | None = None  # default: OUTPUT.failures.jsonl
    max_pixels: int = DEFAULT_MAX_PIXELS
    retry_failed: bool = False
    small: bool = False  # the reduced random network (tests)
    progress: bool = True
    commit_every: int = DEFAULT_COMMIT_EVERY
    decode: str = "workers"  # or "device" (loading.py)
    channels_last: bool | None = None  # default: on CUDA only

    @property
    def failures_path(self) -> Path:
        return self.failures or self.output.with_name(self.output.name + ".failures.jsonl")


def run_extraction(config: ExtractionConfig, *, detector: BottomUpDetector | None = None) -> ExtractionStats:
    """List, shard, skip what is done, extract the rest. Stats count this shard's images.

    ``detector`` overrides the one ``config`` describes (weights, device, precision), e.g. a prebuilt network.
    """
    policy = BoxPolicy.parse(config.boxes)
    mode = resolve_mode(config.mode, precision=config.precision, dtype=config.dtype)
    if config.commit_every < 1:
        raise ConfigError(f"--commit-every must be >= 1, got {config.commit_every}")
    warning = boxes_warning(config.weights, str(policy))
    if warning:
        log.warning("%s", warning)
    items = shard(list_images(config.images), *config.shard)
    failures = FailureLog(config.failures_path)
    if config.retry_failed:
        failures.forget({item.image_id for item in items})
    if detector is None:
        detector = BottomUpDetector.from_weights(config.weights, device=config.device, small=config.small,
                                                 precision=mode.precision, channels_last=config.channels_last)
    with FeatureWriter(config.output, dtype=mode.dtype, commit_every=config.commit_every) as writer:
        missing = [item for item in items if item.image_id not in writer]
        todo = [item for item in missing if item.image_id not in failures.previous]
        done, skipped = len(items) - len(missing), len(missing) - len(todo)
        log.info("%d images in shard %d/%d: %d already stored, %d failed in an earlier run (skipped; "
                 "--retry-failed retries them), %d to extract", len(items), config.shard[0], config.shard[1],
                 done, skipped, len(todo))
        stats = extract_images(todo, detector, writer, policy=policy, failures=failures,
                               batch_size=config.batch_size, num_workers=config.num_workers,
                               max_pixels=config.max_pixels, progress=config.progress,
                               commit_every=config.commit_every, decode=config.decode)
    stats.listed, stats.already_done, stats.previously_failed = len(items), done, skipped
    return stats
