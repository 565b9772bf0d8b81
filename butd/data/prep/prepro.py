"""Caption preprocessing: a Karpathy split JSON, or COCO caption annotations + Karpathy id lists -> DATA_DIR.

Both readers produce :class:`SourceImage` lists; :func:`build_data_dir` builds the vocabulary from the train
captions, encodes and truncates every caption, and writes DATA_DIR (see docs/formats.md, "DATA_DIR").
"""
from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np

from butd.data.captions import (FORMAT_VERSION, SPLITS, TOKENIZATION_RULE, EncodedCaptions, Vocabulary, butd_version,
                                tokenize, write_data_dir)
from butd.data.prep.coco_source import CocoCaptions, KarpathySplit
from butd.errors import DataError

KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}


@dataclass(frozen=True)
class SourceImage:
    """One image of the input: its id, split (train/val/test), tokenised captions and the raw captions."""

    image_id: int
    split: str
    tokens: tuple[tuple[str, ...], ...]
    raw: tuple[str, ...]


@dataclass(frozen=True)
class PreproSummary:
    """What :func:`build_data_dir` wrote: the info.json document and the vocabulary."""

    info: dict
    vocab: Vocabulary


def read_karpathy_json(path: str | Path) -> list[SourceImage]:
    """Read a Karpathy split file (dataset_coco.json / dataset_flickr8k.json / dataset_flickr30k.json).

    The image id is ``cocoid`` when present, else ``imgid``; ``restval`` joins train; the given ``tokens`` are used.
    Captions whose token list is empty are dropped. Raises DataError naming the file, image index and id.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Karpathy split file {path} does not exist")
    try:
        doc = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise DataError(f"{path}: expected an object with an 'images' list")
    images: list[SourceImage] = []
    seen: dict[int, int] = {}
    for index, img in enumerate(doc["images"]):
        if not isinstance(img, dict):
            raise DataError(f"{path}: images[{index}] is not an object")
        image_id = img.get("cocoid", img.get("imgid"))
        where = f"{path}: images[{index}] (image {image_id})"
        if not isinstance(image_id, int) or isinstance(image_id, bool) or image_id < 0:
            raise DataError(f"{path}: images[{index}] has no non-negative integer 'cocoid' or 'imgid'")
        if image_id in seen:
            raise DataError(f"{where}: duplicate image id (also images[{seen[image_id]}])")
        seen[image_id] = index
        split = KARPATHY_SPLITS.get(img.get("split"))  # type: ignore[arg-type]
        if split is None:
            raise DataError(f"{where}: 'split' must be one of {sorted(KARPATHY_SPLITS)}, got {img.get('split')!r}")
        sentences = img.get("sentences")
        if not isinstance(sentences, list):
            raise DataError(f"{where}: missing 'sentences' list")
        tokens, raw = [], []
        for s_index, sent in enumerate(sentences):
            if not isinstance(sent, dict) or not isinstance(sent.get("tokens"), list) \
                    or not isinstance(sent.get("raw"), str):
                raise DataError(f"{where}: sentences[{s_index}] lacks a 'tokens' list or a 'raw' string")
            if sent["tokens"]:
                tokens.append(tuple(str(t) for t in sent["tokens"]))
                raw.append(sent["raw"].strip())
        if not tokens:
            raise DataError(f"{where}: image has no captions")
        images.append(SourceImage(image_id=image_id, split=split, tokens=tuple(tokens), raw=tuple(raw)))
    return images


def images_from_coco(coco: CocoCaptions, split: KarpathySplit) -> list[SourceImage]:
    """COCO annotations -> SourceImages: Karpathy val/test ids by the lists, every other image train.

    Captions are tokenised with :func:`tokenize`. DataError if a listed val/test image has no annotations.
    """
    for name, ids in (("val", split.val), ("test", split.test)):
        missing = sorted(ids - coco.images.keys())
        if missing:
            raise DataError(f"{split.source}: {len(missing)} Karpathy {name} images (e.g. image {missing[0]}) are "
                            f"not in the caption files {list(coco.sources)}")
    images = []
    for image_id in sorted(coco.images):
        img = coco.images[image_id]
        name = "val" if image_id in split.val else "test" if image_id in split.test else "train"
        pairs = [(tuple(tokenize(c)), c.strip()) for c in img.captions]
        pairs = [(t, r) for t, r in pairs if t]
        if not pairs:
            raise DataError(f"{list(coco.sources)}: image {image_id} has only empty captions")
        images.append(SourceImage(image_id=image_id, split=name, tokens=tuple(t for t, _ in pairs),
                                  raw=tuple(r for _, r in pairs)))
    return images


def encode_captions(images: Sequence[SourceImage], vocab: Vocabulary, max_length: int) -> EncodedCaptions:
    """Encode every caption of ``images`` (sorted by id) into zero-padded label rows truncated to ``max_length``."""
    ordered = sorted(images, key=lambda im: im.image_id)
    counts = np.array([len(im.tokens) for im in ordered], dtype=np.int32)
    starts = np.zeros(len(ordered), dtype=np.int64)
    if len(ordered):
        starts[1:] = np.cumsum(counts[:-1], dtype=np.int64)
    # One flat encode and one scatter instead of a numpy assignment per caption (616k captions for COCO).
    truncated = [toks[:max_length] for im in ordered for toks in im.tokens]
    lengths = np.fromiter(map(len, truncated), dtype=np.int32, count=len(truncated))
    flat = np.array(vocab.encode(chain.from_iterable(truncated)), dtype=np.int32)
    labels = np.zeros((len(truncated), max_length), dtype=np.int32)
    labels[np.arange(max_length) < lengths[:, None]] = flat  # row-major order matches the flat word order
    return EncodedCaptions(image_ids=np.array([im.image_id for im in ordered], dtype=np.int64),
                           caption_start=starts, caption_count=counts, labels=labels, lengths=lengths)


def build_data_dir(images: Sequence[SourceImage], output: str | Path, *, min_count: int = 5, max_length: int = 16,
                   sources: Sequence[str], tokenization: str) -> PreproSummary:
    """Build the vocabulary from the train captions, encode all captions and write DATA_DIR at ``output``."""
    if max_length < 1:
        raise DataError(f"max_length must be >= 1, got {max_length}")
    if min_count < 0:
        raise DataError(f"min_count must be >= 0, got {min_count}")
    seen: set[int] = set()
    for im in images:
        if im.image_id in seen:
            raise DataError(f"{list(sources)}: image {im.image_id} appears twice")
        seen.add(im.image_id)
    counts = Counter(chain.from_iterable(toks for im in images if im.split == "train" for toks in im.tokens))
    vocab = Vocabulary.from_counts(counts, min_count=min_count)
    captions = encode_captions(images, vocab, max_length)
    splits = {name: sorted(im.image_id for im in images if im.split == name) for name in SPLITS}
    n_captions = len(captions.labels)
    all_lengths = np.fromiter((len(t) for im in images for t in im.tokens), dtype=np.int64, count=n_captions)
    unk = int((captions.labels == Vocabulary.UNK).sum())
    info = {
        "format_version": FORMAT_VERSION,
        "created_by": f"butd {butd_version()} (butd.data.prep.prepro)",
        "sources": list(sources),
        "tokenization": tokenization,
        "min_count": min_count,
        "max_length": max_length,
        "vocab_size": len(vocab),
        "train_words_total": len(counts),
        "images": {name: len(ids) for name, ids in splits.items()},
        "captions": {name: int(sum(len(im.tokens) for im in images if im.split == name)) for name in SPLITS},
        "num_captions": n_captions,
        "fraction_truncated": float((all_lengths > max_length).mean()) if n_captions else 0.0,
        "fraction_unk_tokens": unk / max(int(captions.lengths.sum()), 1),
    }
    write_data_dir(output, vocab=vocab, captions=captions, splits=splits,
                   references={im.image_id: list(im.raw) for im in images}, info=info)
    return PreproSummary(info=info, vocab=vocab)


def prepro_karpathy(input_path: str | Path, output: str | Path, *, min_count: int = 5,
                    max_length: int = 16) -> PreproSummary:
    """Karpathy split JSON -> DATA_DIR (uses the file's own ``tokens``)."""
    images = read_karpathy_json(input_path)
    return build_data_dir(images, output, min_count=min_count, max_length=max_length,
                          sources=[str(input_path)], tokenization="tokens given in the Karpathy split file")


def prepro_coco(coco: CocoCaptions, split: KarpathySplit, output: str | Path, *, min_count: int = 5,
                max_length: int = 16) -> PreproSummary:
    """COCO caption annotations + Karpathy val/test lists -> DATA_DIR (captions tokenised by :func:`tokenize`)."""
    images = images_from_coco(coco, split)
    return build_data_dir(images, output, min_count=min_count, max_length=max_length,
                          sources=[*coco.sources, split.source], tokenization=TOKENIZATION_RULE)
