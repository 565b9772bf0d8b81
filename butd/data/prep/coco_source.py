"""Reading the official COCO 2014 caption annotations and the Karpathy val/test image lists.

The annotation files (``captions_train2014.json``, ``captions_val2014.json``) may be plain JSON, xz-compressed
(``.json.xz``), or - when no file is given - read from inside the installed ``pycocoevalcap`` wheel, whose
``pycocoevalcap/spice/spice-1.0.jar`` carries both as ``coco/annotations/captions_{train,val}2014.json``.
"""
from __future__ import annotations

import json
import lzma
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from butd.data import package_data
from butd.errors import DataError

JAR_ENTRIES = ("coco/annotations/captions_train2014.json", "coco/annotations/captions_val2014.json")
KARPATHY_VAL_FILE, KARPATHY_TEST_FILE = "karpathy_val_images.txt", "karpathy_test_images.txt"


@dataclass(frozen=True)
class CocoImage:
    """One annotated image: id, file name (e.g. ``COCO_val2014_000000011169.jpg``), size, raw captions."""

    image_id: int
    file_name: str
    width: int
    height: int
    captions: tuple[str, ...]


@dataclass(frozen=True)
class CocoCaptions:
    """The images of one or more annotation files, keyed by image id, and where they were read from."""

    images: dict[int, CocoImage]
    sources: tuple[str, ...]


@dataclass(frozen=True)
class KarpathySplit:
    """The Karpathy val and test image ids (every other image is train/restval) and where they came from."""

    val: frozenset[int]
    test: frozenset[int]
    source: str


def spice_jar_path() -> Path:
    """Path of ``spice-1.0.jar`` inside the installed pycocoevalcap package."""
    try:
        jar = Path(str(resources.files("pycocoevalcap") / "spice" / "spice-1.0.jar"))
    except ModuleNotFoundError as exc:
        raise DataError("pycocoevalcap is not installed, so its bundled COCO annotations cannot be read; "
                        "pass the annotation files explicitly") from exc
    if not jar.is_file():
        raise DataError(f"{jar} is missing; pass the COCO caption annotation files explicitly")
    return jar


def _parse_annotations(raw: bytes, source: str) -> list[CocoImage]:
    try:
        doc = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{source}: not valid JSON ({exc})") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list) \
            or not isinstance(doc.get("annotations"), list):
        raise DataError(f"{source}: not a COCO caption file (needs 'images' and 'annotations' lists)")
    meta: dict[int, dict] = {}
    for index, img in enumerate(doc["images"]):
        if not isinstance(img, dict) or not isinstance(img.get("id"), int) or "file_name" not in img:
            raise DataError(f"{source}: images[{index}] lacks an integer 'id' or a 'file_name'")
        if img["id"] in meta:
            raise DataError(f"{source}: images[{index}] repeats image id {img['id']}")
        meta[img["id"]] = img
    captions: dict[int, list[str]] = {i: [] for i in meta}
    for index, ann in enumerate(doc["annotations"]):
        if not isinstance(ann, dict) or not isinstance(ann.get("caption"), str) or "image_id" not in ann:
            raise DataError(f"{source}: annotations[{index}] lacks 'image_id' or a string 'caption'")
        if ann["image_id"] not in captions:
            raise DataError(f"{source}: annotations[{index}] refers to image {ann['image_id']}, "
                            f"which is not in 'images'")
        captions[ann["image_id"]].append(ann["caption"])
    out = []
    for image_id, img in meta.items():
        if not captions[image_id]:
            raise DataError(f"{source}: image {image_id} has no captions")
        out.append(CocoImage(image_id=image_id, file_name=str(img["file_name"]),
                             width=int(img.get("width", 640)), height=int(img.get("height", 480)),
                             captions=tuple(captions[image_id])))
    return out


def _read_file(path: Path) -> bytes:
    if not path.is_file():
        raise DataError(f"COCO caption file {path} does not exist")
    if path.suffix == ".xz":
        try:
            with lzma.open(path) as f:
                return f.read()
        except lzma.LZMAError as exc:
            raise DataError(f"{path}: corrupt xz data ({exc})") from exc
    return path.read_bytes()


def load_coco_captions(paths: Sequence[str | Path] | None = None) -> CocoCaptions:
    """Read COCO caption annotation files (plain or .xz); with no paths, the two inside pycocoevalcap's jar.

    Raises DataError naming the file and image id on malformed input or an image id present in two files.
    """
    parsed: list[tuple[str, list[CocoImage]]] = []
    if paths:
        for p in paths:
            parsed.append((str(p), _parse_annotations(_read_file(Path(p)), str(p))))
    else:
        jar = spice_jar_path()
        with zipfile.ZipFile(jar) as z:
            for entry in JAR_ENTRIES:
                source = f"{jar}!{entry}"
                try:
                    raw = z.read(entry)
                except KeyError as exc:
                    raise DataError(f"{jar} has no entry {entry}") from exc
                parsed.append((source, _parse_annotations(raw, source)))
    images: dict[int, CocoImage] = {}
    first_source: dict[int, str] = {}
    for source, imgs in parsed:
        for img in imgs:
            if img.image_id in images:
                raise DataError(f"{source}: image {img.image_id} is also in {first_source[img.image_id]}")
            images[img.image_id] = img
            first_source[img.image_id] = source
    return CocoCaptions(images=images, sources=tuple(source for source, _ in parsed))


def _read_id_list(path: Path) -> frozenset[int]:
    """Lines ``val2014/COCO_val2014_000000011169.jpg 11169`` (or just ``11169``): the id is the last field."""
    if not path.is_file():
        raise DataError(f"Karpathy split file {path} does not exist")
    ids: set[int] = set()
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if not fields[-1].isdigit() or len(fields) > 2:
            raise DataError(f"{path}:{number}: expected 'FILE IMAGE_ID', got {line!r}")
        if int(fields[-1]) in ids:
            raise DataError(f"{path}:{number}: image {fields[-1]} is listed twice")
        ids.add(int(fields[-1]))
    return frozenset(ids)


def read_karpathy_split(split_dir: str | Path | None = None) -> KarpathySplit:
    """The Karpathy val/test ids from ``split_dir`` (karpathy_{val,test}_images.txt) or, if None, the packaged lists."""
    if split_dir is None:
        val, test = frozenset(package_data.karpathy_val_ids()), frozenset(package_data.karpathy_test_ids())
        source = "butd package data (karpathy_val_ids.txt, karpathy_test_ids.txt)"
    else:
        split_dir = Path(split_dir)
        val = _read_id_list(split_dir / KARPATHY_VAL_FILE)
        test = _read_id_list(split_dir / KARPATHY_TEST_FILE)
        source = str(split_dir)
    both = val & test
    if both:
        raise DataError(f"{source}: image {min(both)} is in both the Karpathy val and test lists")
    return KarpathySplit(val=val, test=test, source=source)
