"""Caption vocabulary, tokenisation, and the DATA_DIR written by ``tools/prepro_captions.py``.

DATA_DIR holds ``vocab.json``, ``captions.h5``, ``splits.json``, ``references.json`` and ``info.json``; the layout is
documented in docs/formats.md ("DATA_DIR"). :class:`CaptionData` reads it fully into memory (numpy arrays and plain
Python containers, no open file handles), so it can be shared with forked DataLoader workers.
"""
from __future__ import annotations

import json
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import h5py
import numpy as np

from butd.core.files import write_atomic, write_json_atomic
from butd.core.tokens import Vocabulary
from butd.errors import DataError

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
VOCAB_FILE, CAPTIONS_FILE, SPLITS_FILE = "vocab.json", "captions.h5", "splits.json"
REFERENCES_FILE, INFO_FILE = "references.json", "info.json"

_PUNCTUATION = string.punctuation.encode("ascii")
TOKENIZATION_RULE = ("lowercase, delete the ASCII punctuation characters (string.punctuation), split on whitespace "
                     "(the rule of Karpathy's neuraltalk preprocessing)")


def tokenize(raw: str) -> list[str]:
    """Lowercase ``raw``, delete ASCII punctuation (so "dog's" -> "dogs") and split on whitespace."""
    # bytes.translate is ~10x faster than str.translate; ASCII bytes never occur inside multi-byte UTF-8 characters.
    return raw.lower().encode("utf-8").translate(None, _PUNCTUATION).decode("utf-8").split()


@dataclass(frozen=True)
class EncodedCaptions:
    """Label rows of all images, grouped by image: rows ``caption_start[i] : + caption_count[i]`` of image i."""

    image_ids: np.ndarray  # [I] int64, ascending
    caption_start: np.ndarray  # [I] int64
    caption_count: np.ndarray  # [I] int32
    labels: np.ndarray  # [M, max_length] int32, zero padded
    lengths: np.ndarray  # [M] int32, words stored (after truncation)

    @property
    def max_length(self) -> int:
        return int(self.labels.shape[1])


def butd_version() -> str:
    """Version of the installed butd distribution, for the ``created_by`` field of written files."""
    try:
        return metadata.version("butd")
    except metadata.PackageNotFoundError:
        return "unknown (butd is not installed as a distribution)"


def write_data_dir(out_dir: str | Path, *, vocab: Vocabulary, captions: EncodedCaptions,
                   splits: Mapping[str, Sequence[int]], references: Mapping[int, Sequence[str]],
                   info: Mapping) -> None:
    """Write the five DATA_DIR files, each atomically; ``info.json`` last, so its presence marks a complete dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / VOCAB_FILE, vocab.to_json())

    def write_h5(tmp: Path) -> None:
        with h5py.File(tmp, "w") as f:
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["max_length"] = captions.max_length
            f.create_dataset("image_ids", data=captions.image_ids.astype(np.int64))
            f.create_dataset("caption_start", data=captions.caption_start.astype(np.int64))
            f.create_dataset("caption_count", data=captions.caption_count.astype(np.int32))
            f.create_dataset("labels", data=captions.labels.astype(np.int32), compression="gzip")
            f.create_dataset("lengths", data=captions.lengths.astype(np.int32))

    write_atomic(out / CAPTIONS_FILE, write_h5)
    write_json_atomic(out / SPLITS_FILE, {name: [int(i) for i in splits[name]] for name in SPLITS})
    write_json_atomic(out / REFERENCES_FILE, {str(int(k)): list(v) for k, v in references.items()})
    write_json_atomic(out / INFO_FILE, dict(info))


def _read_json(path: Path) -> object:
    if not path.is_file():
        raise DataError(f"{path} is missing (run tools/prepro_captions.py to create the data dir)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from exc


class CaptionData:
    """Encoded captions, splits and reference captions of a DATA_DIR, held in memory."""

    def __init__(self, *, data_dir: Path, vocab: Vocabulary, captions: EncodedCaptions,
                 splits: Mapping[str, np.ndarray]) -> None:
        self.data_dir = data_dir
        self.vocab = vocab
        self.max_length = captions.max_length
        self._captions = captions
        self._splits = dict(splits)
        self._references: dict[str, list[str]] | None = None  # parsed on first use (evaluation only)

    @classmethod
    def load(cls, data_dir: str | Path) -> CaptionData:
        """Read DATA_DIR; DataError naming the file if one is missing, malformed or inconsistent."""
        data_dir = Path(data_dir)
        vocab_path = data_dir / VOCAB_FILE
        vocab_doc = _read_json(vocab_path)
        try:
            vocab = Vocabulary.from_json(vocab_doc)
        except DataError as exc:
            raise DataError(f"{vocab_path}: {exc}") from exc
        captions = _read_captions_h5(data_dir / CAPTIONS_FILE, len(vocab))
        splits_path = data_dir / SPLITS_FILE
        raw = _read_json(splits_path)
        if not isinstance(raw, dict) or any(not isinstance(raw.get(s), list) for s in SPLITS):
            raise DataError(f"{splits_path}: expected an object with lists {list(SPLITS)}")
        splits = {name: np.asarray(ids, dtype=np.int64) for name, ids in raw.items()}
        for name, ids in splits.items():
            pos = np.searchsorted(captions.image_ids, ids).clip(max=len(captions.image_ids) - 1)
            missing = ids[captions.image_ids[pos] != ids] if len(captions.image_ids) else ids
            if len(missing):
                raise DataError(f"{splits_path}: split {name!r} lists image {int(missing[0])}, "
                                f"which has no captions in {data_dir / CAPTIONS_FILE}")
        if not (data_dir / REFERENCES_FILE).is_file():
            raise DataError(f"{data_dir / REFERENCES_FILE} is missing (run tools/prepro_captions.py)")
        return cls(data_dir=data_dir, vocab=vocab, captions=captions, splits=splits)

    def split_ids(self, split: str) -> np.ndarray:
        """Image ids (int64) of ``split`` ("train", "val" or "test")."""
        if split not in self._splits:
            raise DataError(f"{self.data_dir / SPLITS_FILE} has no split {split!r} "
                            f"(has {sorted(self._splits)})")
        return self._splits[split].copy()

    def labels(self, image_id: int) -> np.ndarray:
        """All label rows of ``image_id``: [k, max_length] int64 word ids, zero padded, no bos/eos."""
        (start,), (count,) = self.caption_ranges(np.asarray([image_id]))
        return self.label_rows(np.arange(start, start + count))

    def caption_ranges(self, image_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(first label row, number of captions) of each of ``image_ids`` [B], for ``label_rows``."""
        ids = self._captions.image_ids
        image_ids = np.asarray(image_ids, dtype=np.int64)
        pos = np.searchsorted(ids, image_ids).clip(max=max(len(ids) - 1, 0))
        missing = image_ids[ids[pos] != image_ids] if len(ids) else image_ids
        if len(missing):
            raise KeyError(f"image {int(missing[0])} has no captions in {self.data_dir / CAPTIONS_FILE}")
        return (self._captions.caption_start[pos].astype(np.int64),
                self._captions.caption_count[pos].astype(np.int64))

    def label_rows(self, rows: np.ndarray) -> np.ndarray:
        """Label rows by their index in the whole table (``caption_ranges``): [...] -> [..., max_length] int64."""
        return self._captions.labels[rows].astype(np.int64)

    def references(self, image_id: int) -> list[str]:
        """The raw reference captions of ``image_id`` (for evaluation)."""
        if self._references is None:
            refs = _read_json(self.data_dir / REFERENCES_FILE)
            if not isinstance(refs, dict):
                raise DataError(f"{self.data_dir / REFERENCES_FILE}: expected an object image id -> captions")
            self._references = refs
        try:
            return list(self._references[str(int(image_id))])
        except KeyError:
            raise KeyError(f"image {image_id} has no references in {self.data_dir / REFERENCES_FILE}") from None

    def all_image_ids(self) -> np.ndarray:
        """All image ids with captions, ascending (int64)."""
        return self._captions.image_ids.copy()

    def __repr__(self) -> str:
        sizes = ", ".join(f"{k}={len(v)}" for k, v in self._splits.items())
        return f"CaptionData({str(self.data_dir)!r}, vocab={len(self.vocab)}, {sizes})"


def _read_captions_h5(path: Path, vocab_size: int) -> EncodedCaptions:
    if not path.is_file():
        raise DataError(f"{path} is missing (run tools/prepro_captions.py to create the data dir)")
    try:
        with h5py.File(path, "r") as f:
            if int(f.attrs.get("format_version", -1)) != FORMAT_VERSION:
                raise DataError(f"{path}: format_version {f.attrs.get('format_version')!r} is not {FORMAT_VERSION}")
            captions = EncodedCaptions(
                image_ids=f["image_ids"][()].astype(np.int64), caption_start=f["caption_start"][()].astype(np.int64),
                caption_count=f["caption_count"][()].astype(np.int32), labels=f["labels"][()].astype(np.int32),
                lengths=f["lengths"][()].astype(np.int32))
    except (OSError, KeyError) as exc:
        raise DataError(f"{path}: unreadable captions file ({exc})") from exc
    n, m = len(captions.image_ids), len(captions.labels)
    ends = captions.caption_start + captions.caption_count
    if (len(captions.caption_start) != n or len(captions.caption_count) != n or len(captions.lengths) != m
            or (n and (ends.max() > m or captions.caption_count.min() < 1))
            or np.any(np.diff(captions.image_ids) <= 0)):
        raise DataError(f"{path}: inconsistent arrays (image_ids must ascend; caption ranges must lie in labels)")
    if m and (captions.labels.min() < 0 or captions.labels.max() >= vocab_size):
        raise DataError(f"{path}: labels hold word ids outside the vocabulary of {vocab_size} words")
    return captions
