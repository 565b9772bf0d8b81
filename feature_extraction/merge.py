"""Merging feature stores (e.g. the shards of one extraction) into a new store."""
from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from butd.data.store import FeatureRecord, FeatureStore, FeatureWriter
from butd.errors import DataError

log = logging.getLogger(__name__)

_ARRAYS = ("features", "boxes", "object_ids", "object_conf", "attr_ids", "attr_conf")


@dataclass
class MergeReport:
    """Counts of a merge."""

    written: int = 0
    identical_duplicates: int = 0


def records_equal(a: FeatureRecord, b: FeatureRecord) -> bool:
    """Same image size and bit-identical arrays (same dtypes and shapes; absent fields absent in both)."""
    if (a.image_id, a.image_w, a.image_h) != (b.image_id, b.image_w, b.image_h):
        return False
    for name in _ARRAYS:
        x, y = getattr(a, name), getattr(b, name)
        if (x is None) != (y is None):
            return False
        if x is not None and (x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes()):
            return False
    return True


def merge_stores(inputs: list[str | Path], output: str | Path, *, commit_every: int = 256,
                 progress: bool = False) -> MergeReport:
    """Copy every record of ``inputs`` into the new store ``output``.

    An id present in several inputs must have identical records there (then it is written once); different content
    under one id is a DataError naming the id and both stores. All inputs must share feature dtype and dimension.
    """
    output = Path(output)
    if output.exists():
        raise DataError(f"merge output {output} already exists; choose a new path")
    if not inputs:
        raise DataError("nothing to merge: no input stores given")
    stores = [FeatureStore(path) for path in inputs]
    try:
        first = stores[0]
        for store in stores[1:]:
            if (store.dtype, store.feature_dim) != (first.dtype, first.feature_dim):
                raise DataError(f"cannot merge {store.path} ({store.feature_dim}-d {store.dtype}) with {first.path} "
                                f"({first.feature_dim}-d {first.dtype})")
        try:
            report = _copy_all(stores, output, commit_every=commit_every, progress=progress)
        except BaseException:
            shutil.rmtree(output, ignore_errors=True)  # never leave a partial merge behind
            raise
        log.info("merged %d stores into %s: %d records, %d identical duplicates skipped", len(stores), output,
                 report.written, report.identical_duplicates)
        return report
    finally:
        for store in stores:
            store.close()


def _copy_all(stores: list[FeatureStore], output: Path, *, commit_every: int, progress: bool) -> MergeReport:
    owner: dict[int, int] = {}  # image id -> index of the store it was written from
    report = MergeReport()
    with FeatureWriter(output, dtype=stores[0].dtype.name, commit_every=commit_every) as writer:
        for index, store in enumerate(stores):
            for image_id in tqdm(store.image_ids(), desc=str(store.path), unit="img", disable=not progress):
                record = store[image_id]
                if image_id in owner:
                    earlier = stores[owner[image_id]]
                    if not records_equal(earlier[image_id], record):
                        raise DataError(f"image {image_id} differs between {earlier.path} and {store.path}; "
                                        "refusing to merge conflicting records")
                    report.identical_duplicates += 1
                    continue
                writer.put(record)
                owner[image_id] = index
                report.written += 1
    return report

