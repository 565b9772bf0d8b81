"""Which images to extract: listing a folder or a list file, image ids, sharding, and the failures log."""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from butd.core.files import write_atomic
from butd.errors import ConfigError, DataError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
# "COCO_val2014_000000391895" and "000000391895" -> 391895: the digits after the last underscore (or the whole
# stem).
_ID_PATTERN = re.compile(r"^(?:.*_)?(\d+)$")


@dataclass(frozen=True)
class ImageItem:
    """One image to extract and the id its record is stored under."""

    path: Path
    image_id: int


def image_id_from_name(path: str | Path) -> int:
    """The image id in a file name: ``COCO_val2014_000000391895.jpg`` or ``000000391895.jpg`` -> 391895."""
    match = _ID_PATTERN.match(Path(path).stem)
    if match is None:
        raise DataError(f"{path}: no image id in the file name (expected e.g. COCO_val2014_000000391895.jpg or "
                        "000000391895.jpg); give a list file with 'path<TAB>id' lines instead")
    return int(match.group(1))


def _read_list(list_file: Path) -> list[ImageItem]:
    items = []
    for number, line in enumerate(list_file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = line.split("\t")
        if len(fields) != 2 or not fields[0].strip():
            raise DataError(f"{list_file}:{number}: expected 'path<TAB>image id', got {line!r}")
        try:
            image_id = int(fields[1])
        except ValueError:
            raise DataError(f"{list_file}:{number}: image id {fields[1]!r} is not an integer") from None
        if image_id < 0:
            raise DataError(f"{list_file}:{number}: image id {image_id} is negative")
        path = Path(fields[0].strip())
        items.append(ImageItem(path if path.is_absolute() else list_file.parent / path, image_id))
    return items


def list_images(source: str | Path) -> list[ImageItem]:
    """The images of a folder (searched recursively, ids from file names) or of a ``path<TAB>id`` list file
    (relative paths are relative to the list file), sorted by image id. Duplicate ids are an error."""
    source = Path(source)
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        items = [ImageItem(p, image_id_from_name(p)) for p in files]
    elif source.is_file():
        items = _read_list(source)
    else:
        raise ConfigError(f"--images {source} is neither a folder nor a list file")
    if not items:
        raise DataError(f"{source}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    items.sort(key=lambda item: (item.image_id, str(item.path)))
    for previous, item in zip(items, items[1:]):
        if previous.image_id == item.image_id:
            raise DataError(f"image id {item.image_id} appears twice: {previous.path} and {item.path}")
    return items


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> (I, N) with 0 <= I < N."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard must be 'I/N' (e.g. 0/4), got {text!r}") from None
    if not (count >= 1 and 0 <= index < count):
        raise ConfigError(f"--shard {text}: need 0 <= I < N")
    return index, count


def shard(items: list[ImageItem], index: int, count: int) -> list[ImageItem]:
    """Shard ``index`` of ``count``: every count-th image of the list sorted by id, starting at ``index``."""
    ordered = sorted(items, key=lambda item: item.image_id)
    return ordered[index::count]


@dataclass(frozen=True)
class Failure:
    """An image that could not be extracted."""

    path: str
    image_id: int
    reason: str


class FailureLog:
    """Append-only JSON-lines file of failed images (one object per line: path, id, reason).

    Lines already in the file are read on open: a restarted run skips those images (their failure is
    deterministic) unless they are retried. A last line cut short (a run killed mid-write, a full disk) is dropped
    with a warning and the file is repaired at once, so that the next failure is not appended to the fragment.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.previous: dict[int, Failure] = {}
        if self.path.is_file():
            self._read()
        self.new: list[Failure] = []

    def _read(self) -> None:
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        complete = lines[:-1] if data.endswith(b"\n") else lines
        repaired = False
        for number, raw in enumerate(complete, start=1):
            try:
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                d = json.loads(line)
                failure = Failure(str(d["path"]), int(d["id"]), str(d["reason"]))
            except (ValueError, KeyError, TypeError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
                if number == len(complete):  # a line cut short by a killed run
                    log.warning("%s:%d: dropping an incomplete last line (%r) and repairing the file", self.path,
                                number, raw[:80])
                    write_atomic(self.path, b"".join(line + b"\n" for line in complete[:-1]))
                    repaired = True
                    continue
                raise DataError(f"{self.path}:{number}: not a failure record: {raw!r}; fix or delete the line")
            self.previous[failure.image_id] = failure
        if data and not data.endswith(b"\n") and not repaired:
            # The last record is whole but lost its newline: add it, or the next record would join its line.
            with self.path.open("ab") as f:
                f.write(b"\n")

    def add(self, failure: Failure) -> None:
        """Record a failure (flushed at once, so it survives a killed run)."""
        self.new.append(failure)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(_line(failure))

    def forget(self, image_ids: set[int]) -> None:
        """Drop earlier failures of these ids (they are being retried) from the file, atomically."""
        if not image_ids & set(self.previous):
            return
        self.previous = {k: v for k, v in self.previous.items() if k not in image_ids}
        write_atomic(self.path, "".join(_line(f) for f in self.previous.values()))


def _line(failure: Failure) -> str:
    return json.dumps({"path": failure.path, "id": failure.image_id, "reason": failure.reason}) + "\n"
