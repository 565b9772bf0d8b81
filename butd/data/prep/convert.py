"""Readers for the public region-feature formats, and the import of their files into a feature store.

Each reader is a generator of validated FeatureRecords; malformed input raises DataError naming the file, the line
(TSV) and the reason. Formats are described in docs/formats.md ("Feature store", "Importing public features").
"""
from __future__ import annotations

import base64
import binascii
import re
import shutil
import warnings
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from butd.data.store import FeatureRecord, FeatureStore, FeatureWriter, read_metadata, validate_record
from butd.errors import DataError

BOTTOM_UP_FIELDS = ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features")
LXMERT_FIELDS = ("img_id", "img_h", "img_w", "objects_id", "objects_conf", "attrs_id", "attrs_conf",
                 "num_boxes", "boxes", "features")
_F4, _I8 = np.dtype("<f4"), np.dtype("<i8")
_TRAILING_INT = re.compile(r"(\d+)$")


def trailing_int(name: str, where: str) -> int:
    """The integer an image name ends with: "COCO_val2014_000000391895" -> 391895, "150367" -> 150367."""
    match = _TRAILING_INT.search(name)
    if match is None:
        raise DataError(f"{where}: image id {name!r} does not end with an integer")
    return int(match.group(1))


def _int_field(value: bytes, name: str, where: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise DataError(f"{where}: field {name} is not an integer: {value[:40]!r}") from None


def _b64_array(value: bytes, dtype: np.dtype, count: int, name: str, where: str) -> np.ndarray:
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise DataError(f"{where}: field {name} is not valid base64 ({exc})") from None
    if len(raw) != count * dtype.itemsize:
        raise DataError(f"{where}: field {name} decodes to {len(raw)} bytes; num_boxes implies "
                        f"{count} {dtype.name} values ({count * dtype.itemsize} bytes)")
    return np.frombuffer(raw, dtype)


def _features(value: bytes, n: int, where: str) -> np.ndarray:
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise DataError(f"{where}: field features is not valid base64 ({exc})") from None
    if n < 1 or len(raw) == 0 or len(raw) % (4 * n):
        raise DataError(f"{where}: field features decodes to {len(raw)} bytes, not num_boxes={n} rows of "
                        "float32 values")
    return np.frombuffer(raw, _F4).reshape(n, -1)


def _parse_bottom_up(fields: list[bytes], where: str) -> FeatureRecord:
    n = _int_field(fields[3], "num_boxes", where)
    return FeatureRecord(
        image_id=trailing_int(fields[0].decode("ascii", "replace"), where),
        image_w=_int_field(fields[1], "image_w", where), image_h=_int_field(fields[2], "image_h", where),
        boxes=_b64_array(fields[4], _F4, 4 * n, "boxes", where).reshape(n, 4),
        features=_features(fields[5], n, where))


def _parse_lxmert(fields: list[bytes], where: str) -> FeatureRecord:
    n = _int_field(fields[7], "num_boxes", where)
    return FeatureRecord(
        image_id=trailing_int(fields[0].decode("ascii", "replace"), where),
        image_h=_int_field(fields[1], "img_h", where), image_w=_int_field(fields[2], "img_w", where),
        object_ids=_b64_array(fields[3], _I8, n, "objects_id", where),
        object_conf=_b64_array(fields[4], _F4, n, "objects_conf", where),
        attr_ids=_b64_array(fields[5], _I8, n, "attrs_id", where),
        attr_conf=_b64_array(fields[6], _F4, n, "attrs_conf", where),
        boxes=_b64_array(fields[8], _F4, 4 * n, "boxes", where).reshape(n, 4),
        features=_features(fields[9], n, where))


def read_tsv(path: str | Path) -> Iterator[FeatureRecord]:
    """Records of a bottom-up (6 fields) or LXMERT / py-bottom-up-attention (10 fields) TSV file.

    The format is detected from the first line's field count; every line must then match it. Blank lines are
    skipped; an image id seen twice in the file is an error.
    """
    path = Path(path)
    parse, expected, first_line = None, 0, {}
    # Plain split instead of the csv module: base64 never contains tabs or quotes, and csv's field size limit
    # (128 KiB by default) is far below one row of 100 x 2048 features.
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, start=1):
            line = line.rstrip(b"\r\n")
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            fields = line.split(b"\t")
            if parse is None:
                if len(fields) == len(BOTTOM_UP_FIELDS):
                    parse, expected = _parse_bottom_up, len(BOTTOM_UP_FIELDS)
                elif len(fields) == len(LXMERT_FIELDS):
                    parse, expected = _parse_lxmert, len(LXMERT_FIELDS)
                else:
                    raise DataError(f"{where}: {len(fields)} tab-separated fields; expected 6 (bottom-up: "
                                    f"{', '.join(BOTTOM_UP_FIELDS)}) or 10 (LXMERT: {', '.join(LXMERT_FIELDS)})")
            if len(fields) != expected:
                raise DataError(f"{where}: {len(fields)} tab-separated fields, expected {expected} like the "
                                "first line (short or truncated line?)")
            record = parse(fields, where)
            if record.image_id in first_line:
                raise DataError(f"{where}: duplicate image id {record.image_id} "
                                f"(first seen on line {first_line[record.image_id]})")
            first_line[record.image_id] = line_no
            _validated(record, where)
            yield record


def _validated(record: FeatureRecord, where: str) -> FeatureRecord:
    try:
        validate_record(record)
    except DataError as exc:
        raise DataError(f"{where}: {exc}") from None
    return record


def find_box_dir(att_dir: Path) -> Path | None:
    """The self-critical.pytorch box directory beside ``att_dir``: ``X_box`` for ``X_att``, else ``<dir>_box``."""
    candidates = [att_dir.parent / f"{att_dir.name}_box"]
    if att_dir.name.endswith("_att"):
        candidates.insert(0, att_dir.parent / f"{att_dir.name[:-4]}_box")
    return next((c for c in candidates if c.is_dir()), None)


def read_npz(path: str | Path, *, allow_pickle: bool = False, box_dir: Path | None = None) -> FeatureRecord:
    """One per-image .npz of bottom-up-attention.pytorch (key ``x``) or self-critical.pytorch (key ``feat``).

    The image id is the integer the file name ends with. ``allow_pickle`` lets the pickled ``info`` dict of
    bottom-up-attention.pytorch (object / attribute ids) be read; only enable it for files you trust.
    ``box_dir`` is the self-critical.pytorch box directory (default: found beside the file's directory).
    """
    record, notes = _read_npz(Path(path), allow_pickle, box_dir)
    for note in notes:
        warnings.warn(note, stacklevel=2)
    return record


def _read_npz(path: Path, allow_pickle: bool, box_dir: Path | None) -> tuple[FeatureRecord, list[str]]:
    """The record of one .npz and the directory-level notes (warnings) it gave rise to."""
    where = str(path)
    image_id = trailing_int(path.stem, where)
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files if k != "info"}
            has_info = "info" in npz.files
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{where}: not a readable .npz file ({exc})") from None
    notes = []
    if "x" in arrays:
        record = _bottom_up_pytorch(image_id, arrays, where, _info(path) if has_info and allow_pickle else {})
        if has_info and not allow_pickle:
            notes.append(f"{path.parent}: skipped the pickled 'info' entries (object/attribute ids); pass "
                         "allow_pickle=True (--allow-pickle) to import them from trusted files")
    elif "feat" in arrays:
        box_dir = box_dir if box_dir is not None else find_box_dir(path.parent)
        if box_dir is None:
            notes.append(f"{path.parent}: no sibling *_box directory; storing zero boxes (box geometry is lost)")
        record = _self_critical(image_id, arrays["feat"], path, box_dir)
    else:
        raise DataError(f"{where}: unknown npz layout with keys {sorted(arrays)}; expected 'x' "
                        "(bottom-up-attention.pytorch) or 'feat' (self-critical.pytorch)")
    return _validated(record, where), notes


def _info(path: Path) -> dict:
    with np.load(path, allow_pickle=True) as npz:
        info = npz["info"]
    info = info.item() if isinstance(info, np.ndarray) and info.dtype == object else info
    if not isinstance(info, dict):
        raise DataError(f"{path}: 'info' entry is a {type(info).__name__}, expected a dict")
    return info


def _bottom_up_pytorch(image_id: int, a: dict[str, np.ndarray], where: str, info: dict) -> FeatureRecord:
    missing = [k for k in ("bbox", "image_h", "image_w") if k not in a]
    if missing:
        raise DataError(f"{where}: missing keys {missing} of the bottom-up-attention.pytorch layout")
    boxes, x = a["bbox"], a["x"]
    n = int(a["num_bbox"]) if "num_bbox" in a else boxes.shape[0]
    if boxes.shape != (n, 4):
        raise DataError(f"{where}: bbox has shape {list(boxes.shape)}, num_bbox says {n} boxes")
    if x.ndim == 2 and x.shape[0] != n and x.shape[1] == n:
        x = x.T  # stored as [D, N]
    if x.ndim != 2 or x.shape[0] != n:
        raise DataError(f"{where}: x has shape {list(x.shape)}, expected [{n}, D] for num_bbox={n}")
    optional = {}
    for src, dst in (("objects_id", "object_ids"), ("objects_conf", "object_conf"),
                     ("attrs_id", "attr_ids"), ("attrs_conf", "attr_conf")):
        if info.get(src) is not None:
            optional[dst] = np.asarray(info[src]).reshape(-1)
    return FeatureRecord(image_id=image_id, features=x, boxes=boxes.astype(np.float32),
                         image_w=int(a["image_w"]), image_h=int(a["image_h"]), **optional)


def _self_critical(image_id: int, feat: np.ndarray, path: Path, box_dir: Path | None) -> FeatureRecord:
    if feat.ndim != 2:
        raise DataError(f"{path}: feat has shape {list(feat.shape)}, expected [N, D]")
    if box_dir is None:
        boxes = np.zeros((feat.shape[0], 4), np.float32)
    else:
        box_file = box_dir / f"{path.stem}.npy"
        if not box_file.is_file():
            raise DataError(f"{path}: box file {box_file} is missing")
        try:
            boxes = np.load(box_file, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise DataError(f"{box_file}: not a readable .npy file ({exc})") from None
        if boxes.shape != (feat.shape[0], 4):
            raise DataError(f"{box_file}: boxes have shape {list(boxes.shape)}, expected [{feat.shape[0]}, 4] "
                            f"to match {path.name}")
    # self-critical.pytorch does not keep the image size.
    return FeatureRecord(image_id=image_id, features=feat, boxes=boxes.astype(np.float32), image_w=0, image_h=0)


def read_npz_dir(path: str | Path, *, allow_pickle: bool = False) -> Iterator[FeatureRecord]:
    """Records of every ``*.npz`` in a directory, in file-name order."""
    path = Path(path)
    files = sorted(path.glob("*.npz"))
    if not files:
        raise DataError(f"{path}: directory holds no .npz files")
    box_dir = find_box_dir(path)
    seen: dict[int, Path] = {}
    warned: set[str] = set()  # one warning per directory, not per file
    for file in files:
        record, notes = _read_npz(file, allow_pickle, box_dir)
        for note in notes:
            if note not in warned:
                warned.add(note)
                warnings.warn(note, stacklevel=2)
        if record.image_id in seen:
            raise DataError(f"{file}: duplicate image id {record.image_id} (also in {seen[record.image_id].name})")
        seen[record.image_id] = file
        yield record


def read_features(path: str | Path, *, allow_pickle: bool = False) -> Iterator[FeatureRecord]:
    """Records of one input: a directory of .npz files, a single .npz, or a TSV file."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"input {path} does not exist")
    if path.is_dir():
        return read_npz_dir(path, allow_pickle=allow_pickle)
    if path.suffix == ".npz":
        return iter([read_npz(path, allow_pickle=allow_pickle)])
    return read_tsv(path)


@dataclass(frozen=True)
class ConvertSummary:
    """Outcome of an import: records written now, skipped (already stored), and the store's size afterwards."""

    written: int
    skipped: int
    total: int


def convert_features(inputs: Iterable[str | Path], output: str | Path, *, dtype: str | None = None,
                     commit_every: int = 256, allow_pickle: bool = False, progress: bool = True) -> ConvertSummary:
    """Import public feature files into the store at ``output``; rerunning resumes (stored ids are skipped).

    ``dtype`` None keeps an existing store's dtype and uses float16 for a new one. On bad input the valid records
    read before it are committed, then the DataError propagates. Inputs that hold no records at all are a
    DataError too; a store this call created is then removed rather than left behind empty.
    """
    inputs = [Path(p) for p in inputs]
    for src in inputs:
        if not src.exists():
            raise DataError(f"input {src} does not exist")
    output = Path(output)
    created = not output.exists()
    try:
        summary = _import(inputs, output, dtype=dtype, commit_every=commit_every, allow_pickle=allow_pickle,
                          progress=progress)
    except BaseException:
        if created:
            _remove_if_empty(output)
        raise
    return summary


def _remove_if_empty(store: Path) -> None:
    """Remove a store this import created if nothing was committed to it (a commit writes the metadata record)."""
    try:
        empty = read_metadata(store) is None
    except DataError:  # unreadable: leave it for the user to look at
        return
    if empty:
        shutil.rmtree(store, ignore_errors=True)


def _import(inputs: list[Path], output: Path, *, dtype: str | None, commit_every: int, allow_pickle: bool,
            progress: bool) -> ConvertSummary:
    """The import itself (see convert_features)."""
    if dtype is None:
        meta = read_metadata(output)
        dtype = meta.dtype if meta is not None else "float16"
    written = skipped = 0
    origin: dict[int, Path] = {}
    with FeatureWriter(output, dtype=dtype, commit_every=commit_every) as writer, \
            tqdm(unit="img", desc="import", disable=not progress, dynamic_ncols=True) as bar:
        try:
            for src in inputs:
                for record in read_features(src, allow_pickle=allow_pickle):
                    if record.image_id in origin:
                        raise DataError(f"{src}: image {record.image_id} was already read from "
                                        f"{origin[record.image_id]} in this run")
                    origin[record.image_id] = src
                    try:
                        stored = writer.put(record)
                    except DataError as exc:  # e.g. feature dim differs from the existing store's
                        raise DataError(f"{src}: {exc}") from None
                    if stored:
                        written += 1
                    else:
                        skipped += 1
                    bar.update(1)
        except DataError:
            writer.commit()  # the records before the bad one are complete and valid: keep them
            raise
    if written + skipped == 0:
        raise DataError(f"{', '.join(map(str, inputs))}: no feature records found (empty input?); nothing written")
    with FeatureStore(output) as store:
        total = len(store)
    return ConvertSummary(written=written, skipped=skipped, total=total)
