"""The batch every decoder and objective takes: images' regions zero padded to one size, with a region mask.

``collate`` is the one place where regions are padded: the training loader, decoding a store's images
(``butd.inference``) and the captioner's fresh detections all build :class:`Example` items and collate them, so
an image gets the same tensors, hence the same caption, whatever path it took.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch


class RegionRecord(Protocol):
    """Anything with an image's regions: a stored ``FeatureRecord`` or a detector's ``Detections`` (which has no
    ``image_id``: pass one to :meth:`Example.from_record`)."""

    features: np.ndarray  # [N, D]
    boxes: np.ndarray  # [N, 4] x1, y1, x2, y2 pixels
    image_w: int
    image_h: int


@dataclass
class Batch:
    """A padded batch of images (and, for training, ``seq_per_img`` label rows per image)."""

    image_ids: torch.Tensor  # [B] int64
    features: torch.Tensor  # [B, N, D] float32, zero padded
    boxes: torch.Tensor  # [B, N, 4] float32 pixels, zero padded
    image_size: torch.Tensor  # [B, 2] float32 (w, h)
    region_mask: torch.Tensor  # [B, N] bool, True for real regions
    labels: torch.Tensor | None  # [B, seq_per_img, max_length] int64 (None at test time)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """The same batch with every tensor on ``device``."""
        move = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return Batch(image_ids=move(self.image_ids), features=move(self.features), boxes=move(self.boxes),
                     image_size=move(self.image_size), region_mask=move(self.region_mask), labels=move(self.labels))

    def __len__(self) -> int:
        return int(self.image_ids.shape[0])


@dataclass
class Example:
    """One image as read from the store: region arrays plus the label rows chosen for this epoch."""

    image_id: int
    features: np.ndarray  # [N, D]
    boxes: np.ndarray  # [N, 4]
    image_w: int
    image_h: int
    labels: np.ndarray | None = None  # [seq_per_img, max_length] int64 (None at test time)

    @classmethod
    def from_record(cls, record: RegionRecord, *, max_boxes: int = 0, labels: np.ndarray | None = None,
                    image_id: int | None = None) -> Example:
        """The example of a stored record or a detection, keeping its first ``max_boxes`` regions (0: all), as
        training (``data.max_boxes``), evaluation and the captioner all do."""
        keep = len(record.boxes) if max_boxes <= 0 else min(max_boxes, len(record.boxes))
        return cls(image_id=int(record.image_id if image_id is None else image_id),  # type: ignore[attr-defined]
                   features=np.asarray(record.features[:keep]), boxes=np.asarray(record.boxes[:keep]),
                   image_w=int(record.image_w), image_h=int(record.image_h), labels=labels)


def collate(items: Sequence[Example]) -> Batch:
    """Pad a list of examples to the largest region count among them (at least one column, so an image without
    regions still gets a [1, N>=1] mask that is all False)."""
    n = max(1, max(item.features.shape[0] for item in items))
    dim = items[0].features.shape[1]
    features = torch.zeros(len(items), n, dim, dtype=torch.float32)
    boxes = torch.zeros(len(items), n, 4, dtype=torch.float32)
    mask = torch.zeros(len(items), n, dtype=torch.bool)
    for b, item in enumerate(items):
        k = item.features.shape[0]
        features[b, :k] = torch.from_numpy(np.asarray(item.features, dtype=np.float32))
        boxes[b, :k] = torch.from_numpy(np.asarray(item.boxes, dtype=np.float32))
        mask[b, :k] = True
    labels = None
    if items[0].labels is not None:
        labels = torch.from_numpy(np.stack([item.labels for item in items])).long()
    return Batch(image_ids=torch.tensor([item.image_id for item in items], dtype=torch.int64), features=features,
                 boxes=boxes, image_size=torch.tensor([[item.image_w, item.image_h] for item in items],
                                                      dtype=torch.float32),
                 region_mask=mask, labels=labels)
