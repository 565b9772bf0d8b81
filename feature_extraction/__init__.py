"""Bottom-up region features: the Visual Genome Faster R-CNN (ResNet-101 C4, attributes) in plain torch/torchvision.

Public API: :func:`feature_extraction.images.load_image`, :class:`feature_extraction.detector.BottomUpDetector`
(with :class:`BoxPolicy` and :class:`Detections`), and the extraction loop in :mod:`feature_extraction.extract`.
"""
from __future__ import annotations

_EXPORTS = {
    "BottomUpDetector": "feature_extraction.detector",
    "BoxPolicy": "feature_extraction.detector",
    "Detections": "feature_extraction.detector",
    "DetectorConfig": "feature_extraction.config",
    "ImageError": "feature_extraction.images",
    "load_image": "feature_extraction.images",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    # Lazy, so that importing the package (e.g. in DataLoader workers) does not pull in torch until needed.
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'feature_extraction' has no attribute {name!r}")
