"""Data: the LMDB region-feature store, caption preprocessing (DATA_DIR), batches and the COCO-proxy generator."""
from __future__ import annotations

__all__ = ["FeatureRecord", "FeatureStore", "FeatureWriter"]


def __getattr__(name: str):
    # Lazy, so that `butd.data.captions` can be imported without loading lmdb.
    if name in __all__:
        from butd.data import store

        return getattr(store, name)
    raise AttributeError(f"module 'butd.data' has no attribute {name!r}")
