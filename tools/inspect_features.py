"""Print a JSON summary of a butd LMDB feature store, or of one of its records.

    python tools/inspect_features.py data/feats36.lmdb            # count, dtype, dim, boxes per image, ...
    python tools/inspect_features.py data/feats36.lmdb --id 150367  # one record: shapes and first values
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from importlib import resources

import numpy as np

from butd.data.store import FeatureStore
from butd.errors import ButdError


def summarize_store(store: FeatureStore) -> dict:
    """Store-level summary; reads only the record headers."""
    counts, with_objects, with_attrs, sizes_unknown = [], 0, 0, 0
    for head in store.headers():
        counts.append(head.num_boxes)
        with_objects += head.has_objects
        with_attrs += head.has_attributes
        sizes_unknown += head.image_w == 0 or head.image_h == 0
    counts_arr = np.asarray(counts or [0])
    return {
        "path": str(store.path), "count": len(counts), "dtype": str(store.dtype),
        "feature_dim": store.feature_dim, "layout_version": store.metadata.layout_version,
        "boxes_per_image": {"min": int(counts_arr.min()), "mean": round(float(counts_arr.mean()), 3),
                            "max": int(counts_arr.max())},
        "images_with_objects": with_objects, "images_with_attributes": with_attrs,
        "images_with_unknown_size": sizes_unknown,
    }


def _stats(arr: np.ndarray, first: int = 8) -> dict:
    flat = arr.astype(np.float64).reshape(-1)
    return {"shape": list(arr.shape), "dtype": str(arr.dtype), "min": float(flat.min()), "max": float(flat.max()),
            "mean": float(flat.mean()), "first": [float(v) for v in flat[:first]]}


def _vocab(name: str) -> list[str]:
    return resources.files("butd.resources").joinpath(name).read_text().splitlines()


def summarize_record(store: FeatureStore, image_id: int) -> dict:
    """One record: sizes, feature statistics, every box, and named objects/attributes when stored."""
    rec = store[image_id]
    out = {"image_id": rec.image_id, "image_w": rec.image_w, "image_h": rec.image_h, "num_boxes": rec.num_boxes,
           "features": _stats(rec.features), "boxes": [[round(float(v), 2) for v in b] for b in rec.boxes]}
    for ids, conf, vocab_file, key in ((rec.object_ids, rec.object_conf, "objects_vocab.txt", "objects"),
                                       (rec.attr_ids, rec.attr_conf, "attributes_vocab.txt", "attributes")):
        if ids is not None:
            names = _vocab(vocab_file)
            out[key] = [{"id": int(i), "name": names[i] if i < len(names) else None,
                         "conf": None if conf is None else round(float(c), 4)}
                        for i, c in zip(ids, conf if conf is not None else [None] * len(ids))]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="feature store directory")
    p.add_argument("--id", type=int, default=None, help="print this image's record instead of the summary")
    args = p.parse_args(argv)
    try:
        with FeatureStore(args.path) as store:
            out = summarize_store(store) if args.id is None else summarize_record(store, args.id)
    except (ButdError, KeyError) as exc:
        print(f"error: {exc.args[0] if isinstance(exc, KeyError) else exc}", file=sys.stderr)
        return 1
    print(_compact_json(out))
    return 0


def _compact_json(obj: dict) -> str:
    """Indented JSON with lists of numbers kept on one line (a record has 100 boxes)."""
    text = json.dumps(obj, indent=2)
    return re.sub(r"\[\s+([^\[\]{}]*?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)


if __name__ == "__main__":
    sys.exit(main())
