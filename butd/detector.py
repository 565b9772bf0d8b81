"""What the captioner needs of a region detector, typed: ``RegionDetector`` and the ``DetectedRegions`` it returns.

``feature_extraction.BottomUpDetector`` (the Visual Genome Faster R-CNN) is the detector butd ships; anything with
the same shape (a test double, another detector) can caption through ``butd.Captioner``.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np


class DetectedRegions(Protocol):
    """The regions of one image: boxes in original-image pixels and, when the detector names them, the Visual
    Genome object and attribute ids (0-based into objects_vocab.txt / attributes_vocab.txt)."""

    features: np.ndarray  # [N, D] float32
    boxes: np.ndarray  # [N, 4] float32, x1, y1, x2, y2
    image_w: int
    image_h: int
    object_ids: np.ndarray | None  # [N] int32
    object_conf: np.ndarray | None  # [N] float32
    attr_ids: np.ndarray | None  # [N] int32
    attr_conf: np.ndarray | None  # [N] float32


class DetectorSettings(Protocol):
    """The settings the captioner reads: the feature size and the test-time resize (to refuse unusable images)."""

    feature_dim: int
    test_scale: int  # the short side is resized to this many pixels ...
    test_max_size: int  # ... unless the long side would exceed this many


class RegionDetector(Protocol):
    """Detects regions in RGB images (H x W x 3 uint8) and returns one ``DetectedRegions`` per image, in order."""

    config: DetectorSettings

    def detect(self, images: list[np.ndarray], *, boxes: Any) -> Sequence[DetectedRegions]:
        """``boxes`` is the detector's box policy (``feature_extraction.detector.BoxPolicy``)."""
        ...
