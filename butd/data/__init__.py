"""Data at run time: the LMDB region-feature store (``store``, ``layout``), the DATA_DIR captions (``captions``),
datasets and loaders (``dataset``, ``caption_choice``) and the packaged Visual Genome names (``package_data``).

Two subpackages stand beside them: ``butd.data.prep`` (offline preparation: caption preprocessing, feature import)
and ``butd.data.proxy`` (the COCO-proxy generator).
"""
from __future__ import annotations

__all__ = ["FeatureRecord", "FeatureStore", "FeatureWriter"]


def __getattr__(name: str):
    # Lazy, so that `butd.data.captions` can be imported without loading lmdb.
    if name in __all__:
        from butd.data import store

        return getattr(store, name)
    raise AttributeError(f"module 'butd.data' has no attribute {name!r}")
