"""COCO-proxy: real COCO captions with synthetic region features ("real language, synthetic vision").

No image features are available offline, but the real COCO 2014 captions are. :func:`make_proxy_dataset` writes

* ``dataset_coco.json``: the chosen images in Karpathy's format (train / restval / val / test), real captions;
* ``features.lmdb``: a feature store whose regions show the objects and attributes the captions mention
  (see :mod:`butd.data.proxy.features`), padded with distractor regions;
* ``info.json`` and ``README.txt``, which say that this is a proxy.

The selection rule, documented in docs/formats.md ("COCO-proxy"): with ``num_images`` N below the total, take
round(N/10) (at least 1 when N >= 3) images from each of the Karpathy val and test lists and the rest from the
train+restval pool, each a seeded sample without replacement; N = all takes every image (113,287 / 5,000 / 5,000).
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from butd.core.files import write_atomic, write_json_atomic
from butd.data.captions import butd_version, tokenize
from butd.data.prep.coco_source import CocoCaptions, KarpathySplit
from butd.data.proxy.concepts import ConceptLexicon
from butd.data.proxy.features import FEATURE_DIM, WORLD_SEED, FeatureSynthesizer, image_rng, layout_regions
from butd.data.store import FeatureRecord, FeatureStore, FeatureWriter, read_metadata
from butd.errors import ConfigError, DataError

GENERATOR_VERSION = 1
LABEL = "COCO-proxy: real language, synthetic vision"
README = f"""{LABEL}

This is NOT a real image-captioning dataset. The captions are the real COCO 2014 captions (CC BY 4.0) of the
images listed in dataset_coco.json, but the region features in features.lmdb are synthetic: each image's regions
encode the Visual Genome objects and attributes that its captions mention (more mentions -> stronger, larger
regions), plus noise and weaker distractor regions. The features say what is in the picture, nothing else.
Scores on this proxy are not comparable with scores on real COCO features. Made by butd
(tools/make_proxy_dataset.py); parameters in info.json.
"""


@dataclass(frozen=True)
class ProxyConfig:
    """Generation parameters: ``num_images`` None = all; ``boxes`` (min, max) regions per image."""

    num_images: int | None = 2000
    seed: int = 0
    boxes: tuple[int, int] = (10, 100)
    device: str = "cpu"
    chunk_size: int = 256

    def identity(self) -> dict:
        """The parameters that determine the output (a rerun must match them to resume)."""
        return {"generator_version": GENERATOR_VERSION, "num_images": self.num_images, "seed": self.seed,
                "boxes": list(self.boxes), "feature_dim": FEATURE_DIM, "world_seed": WORLD_SEED}


@dataclass(frozen=True)
class ProxySummary:
    """Outcome of one run: images per split, records written / already present, mean boxes, seconds."""

    splits: dict[str, int]
    written: int
    skipped: int
    mean_boxes: float
    mean_caption_regions: float
    seconds: float


def parse_boxes(spec: str) -> tuple[int, int]:
    """``"10-100"`` -> (10, 100); ``"36"`` -> (36, 36). ConfigError if malformed or outside 1..1000."""
    parts = spec.split("-")
    if len(parts) not in (1, 2) or not all(p.strip().isdigit() for p in parts):
        raise ConfigError(f"--boxes must be MIN-MAX or K (e.g. 10-100 or 36), got {spec!r}")
    lo, hi = int(parts[0]), int(parts[-1])
    if not 1 <= lo <= hi <= 1000:
        raise ConfigError(f"--boxes needs 1 <= MIN <= MAX <= 1000, got {spec!r}")
    return lo, hi


def select_images(coco: CocoCaptions, split: KarpathySplit, num_images: int | None,
                  seed: int) -> dict[str, list[int]]:
    """Image ids per split ("train" = train+restval pool, "val", "test"), sorted; see the module docstring."""
    pools = {"val": sorted(split.val), "test": sorted(split.test),
             "train": sorted(coco.images.keys() - split.val - split.test)}
    for name in ("val", "test"):
        missing = [i for i in pools[name] if i not in coco.images]
        if missing:
            raise DataError(f"{split.source}: {len(missing)} Karpathy {name} images (e.g. image {missing[0]}) are "
                            f"not in the caption files {list(coco.sources)}")
    total = sum(len(p) for p in pools.values())
    if num_images is None or num_images == total:
        return pools
    if not 1 <= num_images <= total:
        raise ConfigError(f"--num-images must be between 1 and {total} (or 'all'), got {num_images}")
    held_out = max(round(num_images / 10), 1 if num_images >= 3 else 0)
    sizes = {name: min(held_out, len(pools[name])) for name in ("val", "test")}
    sizes["train"] = num_images - sizes["val"] - sizes["test"]
    rng = np.random.default_rng([seed, 0x2222, 0])
    return {name: sorted(int(i) for i in rng.choice(pools[name], size=sizes[name], replace=False))
            for name in ("train", "val", "test")}


def karpathy_document(coco: CocoCaptions, selection: dict[str, list[int]]) -> dict:
    """The chosen images in Karpathy's dataset_coco.json format (train2014 train images are "train",
    the other non-val/test ones "restval")."""
    split_of = {i: name for name, ids in selection.items() for i in ids}
    images, sentid = [], 0
    for imgid, image_id in enumerate(sorted(split_of)):
        img = coco.images[image_id]
        folder = "train2014" if "train2014" in img.file_name else "val2014"
        name = split_of[image_id]
        if name == "train" and folder == "val2014":
            name = "restval"
        sentences = []
        for raw in img.captions:
            tokens = tokenize(raw)
            if tokens:
                sentences.append({"tokens": tokens, "raw": raw.strip(), "imgid": imgid, "sentid": sentid})
                sentid += 1
        images.append({"filepath": folder, "filename": img.file_name, "imgid": imgid, "split": name,
                       "cocoid": image_id, "sentids": [s["sentid"] for s in sentences], "sentences": sentences})
    return {"dataset": "coco", "proxy": LABEL, "images": images}


def _check_resume(out: Path, config: ProxyConfig) -> None:
    info_path = out / "info.json"
    if not info_path.is_file():
        return
    try:
        previous = json.loads(info_path.read_text(encoding="utf-8"))["parameters"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DataError(f"{info_path}: unreadable proxy info ({exc}); remove {out} or pick a new output") from exc
    if previous != config.identity():
        raise DataError(f"{out} was generated with {previous}, not {config.identity()}; resuming would mix "
                        f"two datasets: pick a new output directory")


def make_proxy_dataset(coco: CocoCaptions, split: KarpathySplit, output: str | Path, config: ProxyConfig, *,
                       progress: Callable[[int], None] | None = None) -> ProxySummary:
    """Write the COCO-proxy to ``output`` (resumable: ids already in features.lmdb are skipped)."""
    if config.chunk_size < 1:
        raise ConfigError(f"chunk_size must be >= 1, got {config.chunk_size}")
    start = time.time()
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    _check_resume(out, config)
    selection = select_images(coco, split, config.num_images, config.seed)
    info = {"kind": "COCO-proxy", "label": LABEL, "parameters": config.identity(), "complete": False,
            "created_by": f"butd {butd_version()} (butd.data.proxy.generator)", "caption_sources": list(coco.sources),
            "karpathy_split_source": split.source, "images": {k: len(v) for k, v in selection.items()},
            "feature_dtype": "float16", "features": "features.lmdb", "dataset": "dataset_coco.json"}
    write_json_atomic(out / "info.json", info)
    write_json_atomic(out / "dataset_coco.json", karpathy_document(coco, selection))
    write_atomic(out / "README.txt", README)

    lexicon = ConceptLexicon.packaged()
    synth = FeatureSynthesizer(num_objects=lexicon.num_objects, num_attributes=lexicon.num_attributes,
                               device=config.device)
    ids = sorted(i for ids in selection.values() for i in ids)
    store_path = out / "features.lmdb"
    done: set[int] = set()
    if read_metadata(store_path) is not None:  # resuming: one key scan instead of a lookup per image
        with FeatureStore(store_path) as store:
            done = set(store.image_ids())
    written = skipped = boxes = caption_regions = 0
    with FeatureWriter(store_path, dtype="float16", commit_every=config.chunk_size) as writer:
        for begin in range(0, len(ids), config.chunk_size):
            chunk = [i for i in ids[begin:begin + config.chunk_size] if i not in done]
            skipped += min(config.chunk_size, len(ids) - begin) - len(chunk)
            layouts = []
            for image_id in chunk:
                img = coco.images[image_id]
                concepts = lexicon.image_concepts([tokenize(c) for c in img.captions])
                layouts.append(layout_regions(concepts, rng=image_rng(config.seed, image_id), width=img.width,
                                              height=img.height, boxes=config.boxes,
                                              num_objects=lexicon.num_objects,
                                              num_attributes=lexicon.num_attributes))
            for image_id, lay, feats in zip(chunk, layouts, synth.render(layouts)):
                img = coco.images[image_id]
                writer.put(FeatureRecord(image_id=image_id, features=feats, boxes=lay.boxes, image_w=img.width,
                                         image_h=img.height, object_ids=lay.object_ids,
                                         object_conf=lay.object_conf, attr_ids=lay.attr_ids[:, 0].copy(),
                                         attr_conf=lay.attr_conf))
                boxes += lay.num_boxes
                caption_regions += int(lay.from_captions.sum())
            written += len(chunk)
            if progress is not None:
                progress(min(config.chunk_size, len(ids) - begin))
    summary = ProxySummary(splits={k: len(v) for k, v in selection.items()}, written=written, skipped=skipped,
                           mean_boxes=boxes / max(written, 1), mean_caption_regions=caption_regions / max(written, 1),
                           seconds=time.time() - start)
    write_json_atomic(out / "info.json", {**info, "complete": True, "last_run": asdict(summary)})
    return summary
