"""The binary layout of one feature-store record: FeatureRecord, its validation, encoding and decoding.

The record layout (documented in docs/formats.md, "Feature store") is a 24-byte little-endian header followed by
raw arrays; no pickle is involved, so a store written on one machine reads anywhere numpy does.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from butd.errors import ConfigError, DataError

LAYOUT_VERSION = 1
MAGIC = b"BUTF"
META_KEY = b"__meta__"
# magic, layout version, dtype code, flags, num_boxes, feature_dim, image_w, image_h
_HEADER = struct.Struct("<4sHBBIIII")
_DTYPE_CODES = {1: np.dtype("<f2"), 2: np.dtype("<f4")}
_DTYPE_NAMES = {"float16": 1, "float32": 2}
# Optional [N] arrays in layout order: (field name, flag bit, dtype).
_OPTIONAL = (
    ("object_ids", 1, np.dtype("<i4")),
    ("object_conf", 2, np.dtype("<f4")),
    ("attr_ids", 4, np.dtype("<i4")),
    ("attr_conf", 8, np.dtype("<f4")),
)
_INT32_MAX = np.iinfo(np.int32).max


@dataclass(frozen=True, eq=False)
class FeatureRecord:
    """Region features of one image. Boxes are x1, y1, x2, y2 in pixels of the original image."""

    image_id: int
    features: np.ndarray  # [N, D] float16 or float32
    boxes: np.ndarray  # [N, 4] float32
    image_w: int
    image_h: int
    object_ids: np.ndarray | None = None  # [N] int32, 0-based into objects_vocab.txt
    object_conf: np.ndarray | None = None  # [N] float32
    attr_ids: np.ndarray | None = None  # [N] int32, 0-based into attributes_vocab.txt
    attr_conf: np.ndarray | None = None  # [N] float32

    @property
    def num_boxes(self) -> int:
        """Number of regions N."""
        return int(self.features.shape[0])


@dataclass(frozen=True)
class StoreMetadata:
    """The metadata record of a store: layout version, feature dtype name and feature dimension."""

    layout_version: int
    dtype: str
    feature_dim: int

    def to_bytes(self) -> bytes:
        return json.dumps({"format": "butd-features", "layout_version": self.layout_version,
                           "dtype": self.dtype, "feature_dim": self.feature_dim}).encode()

    @classmethod
    def from_bytes(cls, raw: bytes, path: Path) -> StoreMetadata:
        try:
            d = json.loads(bytes(raw))
            meta = cls(int(d["layout_version"]), str(d["dtype"]), int(d["feature_dim"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{path}: unreadable metadata record ({exc})") from exc
        if meta.layout_version > LAYOUT_VERSION:
            raise DataError(f"{path}: layout version {meta.layout_version} is newer than this butd "
                            f"(reads up to {LAYOUT_VERSION})")
        if meta.dtype not in _DTYPE_NAMES:
            raise DataError(f"{path}: metadata names unknown feature dtype {meta.dtype!r}")
        return meta


@dataclass(frozen=True)
class RecordHeader:
    """The fixed header of one stored record, readable without decoding the arrays."""

    image_id: int
    num_boxes: int
    feature_dim: int
    dtype: np.dtype
    image_w: int
    image_h: int
    flags: int

    @property
    def has_objects(self) -> bool:
        return bool(self.flags & 1)

    @property
    def has_attributes(self) -> bool:
        return bool(self.flags & 4)


def image_key(image_id: int) -> bytes:
    """LMDB key of an image id: its decimal digits in ASCII."""
    return str(int(image_id)).encode("ascii")


def check_dtype_name(dtype: str) -> str:
    """Return ``dtype`` if it is a storable feature dtype name, else raise ConfigError."""
    if dtype not in _DTYPE_NAMES:
        raise ConfigError(f"feature dtype must be one of {sorted(_DTYPE_NAMES)}, got {dtype!r}")
    return dtype


def validate_record(record: FeatureRecord, *, feature_dim: int | None = None) -> None:
    """Raise DataError naming the image id if ``record`` is inconsistent (shapes, dtypes, non-finite values)."""
    where = f"image {record.image_id}"
    if not isinstance(record.image_id, (int, np.integer)) or not 0 <= record.image_id <= 2**63 - 1:
        raise DataError(f"{where}: image id must be a non-negative integer")
    feats, boxes = np.asarray(record.features), np.asarray(record.boxes)
    if feats.ndim != 2 or feats.shape[0] == 0 or feats.shape[1] == 0:
        raise DataError(f"{where}: features must have shape [N, D] with N, D >= 1, got {list(feats.shape)}")
    if not np.issubdtype(feats.dtype, np.floating):
        raise DataError(f"{where}: features must be floating point, got {feats.dtype}")
    n, d = feats.shape
    if feature_dim is not None and d != feature_dim:
        raise DataError(f"{where}: feature dim {d} does not match the store's feature dim {feature_dim}")
    if boxes.shape != (n, 4):
        raise DataError(f"{where}: boxes must have shape [{n}, 4] to match {n} feature rows, "
                        f"got {list(boxes.shape)}")
    if not np.isfinite(feats).all():
        raise DataError(f"{where}: features contain NaN or infinite values")
    if not np.isfinite(boxes).all():
        raise DataError(f"{where}: boxes contain NaN or infinite values")
    for name, size in (("image_w", record.image_w), ("image_h", record.image_h)):
        if not isinstance(size, (int, np.integer)) or not 0 <= size <= _INT32_MAX:
            raise DataError(f"{where}: {name} must be a non-negative integer, got {size!r}")
    for name, _, dtype in _OPTIONAL:
        arr = getattr(record, name)
        if arr is None:
            continue
        arr = np.asarray(arr)
        if arr.shape != (n,):
            raise DataError(f"{where}: {name} must have shape [{n}], got {list(arr.shape)}")
        if dtype.kind == "i":
            if not np.issubdtype(arr.dtype, np.integer):
                raise DataError(f"{where}: {name} must be integers, got {arr.dtype}")
            if n and (arr.min() < 0 or arr.max() > _INT32_MAX):
                raise DataError(f"{where}: {name} must be non-negative int32 values")
        elif not np.isfinite(arr).all():
            raise DataError(f"{where}: {name} contains NaN or infinite values")


def encode_record(record: FeatureRecord, dtype: str) -> bytes:
    """Serialise a validated record, casting features to ``dtype`` ("float16" or "float32")."""
    code = _DTYPE_NAMES[check_dtype_name(dtype)]
    with np.errstate(over="ignore"):  # reported just below, with the image id
        feats = np.ascontiguousarray(record.features, dtype=_DTYPE_CODES[code])
    if not np.isfinite(feats).all():  # float32 values beyond 65504 overflow float16
        raise DataError(f"image {record.image_id}: features overflow {dtype} (max abs "
                        f"{float(np.abs(record.features).max()):g})")
    n, d = feats.shape
    flags, tail = 0, []
    for name, bit, arr_dtype in _OPTIONAL:
        arr = getattr(record, name)
        if arr is not None:
            flags |= bit
            tail.append(np.ascontiguousarray(arr, dtype=arr_dtype).tobytes())
    body = feats.tobytes()
    pad = b"\0" * (-len(body) % 4)  # keeps the 4-byte arrays that follow aligned
    header = _HEADER.pack(MAGIC, LAYOUT_VERSION, code, flags, n, d, int(record.image_w), int(record.image_h))
    boxes = np.ascontiguousarray(record.boxes, dtype="<f4").tobytes()
    return b"".join([header, body, pad, boxes, *tail])


def decode_header(image_id: int, buf, path: Path) -> RecordHeader:
    """Parse the fixed header of a stored record (``buf`` is bytes or a memoryview)."""
    if len(buf) < _HEADER.size:
        raise DataError(f"{path}: record of image {image_id} is truncated ({len(buf)} bytes)")
    magic, version, code, flags, n, d, w, h = _HEADER.unpack_from(buf, 0)
    if magic != MAGIC:
        raise DataError(f"{path}: record of image {image_id} has bad magic {magic!r}")
    if version > LAYOUT_VERSION or code not in _DTYPE_CODES:
        raise DataError(f"{path}: record of image {image_id} has unsupported layout version {version} "
                        f"or dtype code {code}")
    return RecordHeader(image_id, n, d, _DTYPE_CODES[code], w, h, flags)


def decode_record(image_id: int, buf, path: Path) -> FeatureRecord:
    """Decode a stored record. ``buf`` is copied once into a private buffer that the arrays view."""
    head = decode_header(image_id, buf, path)
    n, d = head.num_boxes, head.feature_dim
    feat_bytes = n * d * head.dtype.itemsize
    offsets, pos = {}, _HEADER.size + feat_bytes + (-feat_bytes % 4)
    offsets["boxes"], pos = pos, pos + 16 * n
    for name, bit, _ in _OPTIONAL:
        if head.flags & bit:
            offsets[name], pos = pos, pos + 4 * n
    if len(buf) != pos:
        raise DataError(f"{path}: record of image {image_id} is corrupt: expected {pos} bytes, got {len(buf)}")
    # One copy out of the LMDB map (valid only inside the transaction); arrays below are views of it.
    data = bytearray(buf)
    optional = {name: np.frombuffer(data, dtype, n, offsets[name]) for name, bit, dtype in _OPTIONAL
                if head.flags & bit}
    return FeatureRecord(
        image_id=image_id,
        features=np.frombuffer(data, head.dtype, n * d, _HEADER.size).reshape(n, d),
        boxes=np.frombuffer(data, "<f4", 4 * n, offsets["boxes"]).reshape(n, 4),
        image_w=head.image_w, image_h=head.image_h, **optional)
