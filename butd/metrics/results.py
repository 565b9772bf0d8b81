"""COCO caption result files and reference annotations: read, validate, write.

A result file is the COCO leaderboard format, a JSON list with one object per image::

    [{"image_id": 404464, "caption": "a man standing in front of a building"}, ...]

Extra keys in an entry are ignored. A reference file is a COCO caption annotation file
(``{"annotations": [{"image_id": ..., "caption": ...}, ...], ...}``), plain JSON or ``.xz``.

Line breaks inside a caption (real COCO annotations end some captions with "\n") become spaces, as pycocoevalcap's
tokenizer does before scoring; only a caption with no words left is refused.
"""
from __future__ import annotations

import json
import lzma
from collections.abc import Mapping
from pathlib import Path

from butd.core.files import write_atomic
from butd.errors import DataError

_MAX_LISTED = 10


def _read_json(path: Path) -> object:
    opener = lzma.open if path.suffix == ".xz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from e
    except (lzma.LZMAError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot be decoded ({e})") from e


def _refuse(path: Path | str, what: str, problems: list[str]) -> None:
    if problems:
        listed = "; ".join(problems[:_MAX_LISTED])
        more = f"; ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        raise DataError(f"{path}: {len(problems)} {what}: {listed}{more}")


def one_line(caption: str) -> str:
    """``caption`` with every line break replaced by a space and the ends stripped.

    pycocoevalcap's PTB tokenizer replaces "\n" by a space (it maps input lines to output lines); every other line
    break that str.splitlines knows ("\r", "\u2028", ...) is replaced too, so that no caption can shift the lines.
    """
    return " ".join(caption.splitlines()).strip()


def _caption_problem(caption: object) -> str | None:
    """Why a caption is unusable, or None when it is a string with words (line breaks allowed, see one_line)."""
    if not isinstance(caption, str):
        return f"caption is {type(caption).__name__}, not a string"
    if not one_line(caption):
        return "caption is empty"
    return None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def load_results(path: str | Path, references: Mapping[int, object] | None = None) -> dict[int, str]:
    """Read a COCO result file into ``{image_id: caption}`` (file order).

    Captions come back on one line (:func:`one_line`). Raises :class:`DataError` naming the file and the
    offending entries (at most 10 listed, plus a count) for: a shape other than a non-empty list of objects with
    ``image_id`` and ``caption``, non-integer ids, duplicate ids, empty captions (also those of line breaks and
    spaces only), and -- when ``references`` is given -- ids that have no references.
    """
    path = Path(path)
    data = _read_json(path)
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of {{\"image_id\": int, \"caption\": str}} objects, "
                        f"got a JSON {type(data).__name__}")
    if not data:
        raise DataError(f"{path}: the result list is empty")
    captions: dict[int, str] = {}
    first_entry: dict[int, int] = {}
    problems: list[str] = []
    for index, entry in enumerate(data):
        if not isinstance(entry, dict) or "image_id" not in entry or "caption" not in entry:
            problems.append(f"entry {index} is not an object with \"image_id\" and \"caption\"")
            continue
        image_id, caption = entry["image_id"], entry["caption"]
        if not _is_int(image_id):
            problems.append(f"entry {index}: image_id {image_id!r} is not an integer")
            continue
        where = f"entry {index} (image {image_id})"
        if image_id in first_entry:
            problems.append(f"{where}: duplicate image id, first at entry {first_entry[image_id]}")
            continue
        first_entry[image_id] = index
        if references is not None and image_id not in references:
            problems.append(f"{where}: image id not in the references")
        reason = _caption_problem(caption)
        if reason:
            problems.append(f"{where}: {reason}")
        elif isinstance(caption, str):
            captions[image_id] = one_line(caption)
    _refuse(path, "invalid result entries", problems)
    return captions


def load_coco_references(path: str | Path) -> dict[int, list[str]]:
    """Read a COCO caption annotation file into ``{image_id: [caption, ...]}`` sorted by image id.

    Captions keep their file order within an image. Images listed without annotations are left out.
    """
    path = Path(path)
    data = _read_json(path)
    annotations = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(annotations, list):
        raise DataError(f"{path}: expected a COCO caption file, an object with an \"annotations\" list")
    references: dict[int, list[str]] = {}
    problems: list[str] = []
    for index, ann in enumerate(annotations):
        if not isinstance(ann, dict) or not _is_int(ann.get("image_id")) or not isinstance(ann.get("caption"), str):
            problems.append(f"annotation {index} lacks an integer \"image_id\" or a string \"caption\"")
            continue
        references.setdefault(ann["image_id"], []).append(ann["caption"])
    _refuse(path, "invalid annotations", problems)
    if not references:
        raise DataError(f"{path}: no caption annotations")
    return dict(sorted(references.items()))


def write_results(path: str | Path, captions: Mapping[int, str]) -> None:
    """Write ``{image_id: caption}`` as a COCO result file, one entry per image sorted by id.

    The file is written to a temporary file in the same folder and moved into place, so a reader
    never sees a partial file. The same rules as :func:`load_results` apply to the captions, and they are
    written on one line (:func:`one_line`).
    """
    path = Path(path)
    problems = []
    for image_id, caption in captions.items():
        if not _is_int(image_id):
            problems.append(f"image_id {image_id!r} is not an integer")
        elif reason := _caption_problem(caption):
            problems.append(f"image {image_id}: {reason}")
    _refuse(path, "captions cannot be written", problems)
    entries = [{"image_id": i, "caption": one_line(captions[i])} for i in sorted(captions)]
    write_atomic(path, json.dumps(entries, ensure_ascii=False) + "\n")
