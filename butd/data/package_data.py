"""Paths to and contents of the data files shipped in ``butd/resources/``.

* ``objects_vocab.txt`` / ``attributes_vocab.txt``: the 1,600 Visual Genome object classes and 400 attributes of the
  bottom-up detector, one class per line in classifier order (line i is id i, 0-based); a line may hold several
  comma-separated synonyms ("stop sign,stopsign").
* ``karpathy_val_ids.txt`` / ``karpathy_test_ids.txt``: the 5,000 + 5,000 COCO image ids of the Karpathy val/test
  splits, one id per line.
"""
from __future__ import annotations

from functools import lru_cache
from importlib import resources
from pathlib import Path

from butd.errors import DataError

OBJECTS_VOCAB = "objects_vocab.txt"
ATTRIBUTES_VOCAB = "attributes_vocab.txt"
KARPATHY_VAL_IDS = "karpathy_val_ids.txt"
KARPATHY_TEST_IDS = "karpathy_test_ids.txt"


def resource_path(name: str) -> Path:
    """Filesystem path of the packaged data file ``name``; DataError if it is missing from the installation."""
    path = Path(str(resources.files("butd") / "resources" / name))
    if not path.is_file():
        raise DataError(f"packaged data file {path} is missing (broken butd installation?)")
    return path


def _read_lines(name: str) -> list[str]:
    path = resource_path(name)
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            raise DataError(f"{path}:{number}: empty line")
    return [line.strip() for line in lines]


@lru_cache(maxsize=None)
def _class_names(name: str) -> tuple[tuple[str, ...], ...]:
    return tuple(tuple(s.strip() for s in line.split(",") if s.strip()) for line in _read_lines(name))


def object_names() -> list[list[str]]:
    """The 1,600 object classes: entry i lists the synonyms of class i (first one is the display name)."""
    return [list(names) for names in _class_names(OBJECTS_VOCAB)]


def attribute_names() -> list[list[str]]:
    """The 400 attribute classes: entry i lists the synonyms of attribute i (first one is the display name)."""
    return [list(names) for names in _class_names(ATTRIBUTES_VOCAB)]


@lru_cache(maxsize=None)
def _id_list(name: str) -> tuple[int, ...]:
    path = resource_path(name)
    ids = []
    for number, line in enumerate(_read_lines(name), start=1):
        if not line.isdigit():
            raise DataError(f"{path}:{number}: expected a COCO image id, got {line!r}")
        ids.append(int(line))
    return tuple(ids)


def karpathy_val_ids() -> list[int]:
    """The 5,000 COCO image ids of the Karpathy val split, in file order."""
    return list(_id_list(KARPATHY_VAL_IDS))


def karpathy_test_ids() -> list[int]:
    """The 5,000 COCO image ids of the Karpathy test split, in file order."""
    return list(_id_list(KARPATHY_TEST_IDS))
