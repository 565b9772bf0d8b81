"""COCO-proxy generator: selection, determinism, feature statistics, concept regions, resuming, the tool."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from butd.data.captions import CaptionData, tokenize
from butd.data.prep.coco_source import CocoCaptions, load_coco_captions, read_karpathy_split
from butd.data.package_data import object_names
from butd.data.proxy.generator import ProxyConfig, make_proxy_dataset, parse_boxes, select_images
from butd.data.proxy.concepts import ConceptLexicon
from butd.data.proxy.features import FEATURE_DIM, FeatureSynthesizer, image_rng, layout_regions
from butd.data.store import FeatureStore
from butd.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
COCO_FILES = [SHARED / "coco_annotations" / f"captions_{s}2014.json.xz" for s in ("train", "val")]
DOG = next(i for i, names in enumerate(object_names()) if names[0] == "dog")


@pytest.fixture(scope="module")
def coco() -> CocoCaptions:
    if not all(p.is_file() for p in COCO_FILES):
        pytest.skip(f"real COCO caption annotations not found under {SHARED / 'coco_annotations'}")
    return load_coco_captions(COCO_FILES)


@pytest.fixture(scope="module")
def split():
    return read_karpathy_split(None)


@pytest.fixture(scope="module")
def proxy_dir(tmp_path_factory, coco, split) -> Path:
    out = tmp_path_factory.mktemp("proxy") / "p"
    make_proxy_dataset(coco, split, out, ProxyConfig(num_images=60, seed=3, chunk_size=16))
    return out


def _records(path: Path) -> dict:
    with FeatureStore(path) as store:
        return {i: store[i] for i in store.image_ids()}


def test_selection_keeps_karpathy_proportions(coco, split):
    demo = select_images(coco, split, 2000, seed=0)
    assert {k: len(v) for k, v in demo.items()} == {"train": 1600, "val": 200, "test": 200}
    assert set(demo["val"]) <= split.val and set(demo["test"]) <= split.test
    assert not set(demo["train"]) & (split.val | split.test)
    assert select_images(coco, split, 2000, seed=0) == demo
    assert select_images(coco, split, 2000, seed=1)["train"] != demo["train"]
    everything = select_images(coco, split, None, seed=0)
    assert {k: len(v) for k, v in everything.items()} == {"train": 113287, "val": 5000, "test": 5000}
    big = select_images(coco, split, 120000, seed=0)  # val/test capped at the 5,000 listed
    assert {k: len(v) for k, v in big.items()} == {"train": 110000, "val": 5000, "test": 5000}
    with pytest.raises(ConfigError, match="between 1 and 123287"):
        select_images(coco, split, 200000, seed=0)


def test_boxes_spec():
    assert parse_boxes("10-100") == (10, 100) and parse_boxes("36") == (36, 36)
    for bad in ("0-5", "9-3", "x", "1-2-3"):
        with pytest.raises(ConfigError):
            parse_boxes(bad)


def test_dataset_json_is_karpathy_format_with_real_captions(proxy_dir, coco):
    doc = json.loads((proxy_dir / "dataset_coco.json").read_text())
    assert "synthetic vision" in doc["proxy"]
    splits = [im["split"] for im in doc["images"]]
    assert splits.count("val") == splits.count("test") == 6
    assert splits.count("train") + splits.count("restval") == 48
    for im in doc["images"]:
        source = coco.images[im["cocoid"]]
        assert im["filename"] == source.file_name
        assert [s["raw"] for s in im["sentences"]] == [c.strip() for c in source.captions]
        assert [s["tokens"] for s in im["sentences"]] == [tokenize(c) for c in source.captions]
        assert (im["split"] == "restval") == ("val2014" in im["filename"] and im["split"] != "val"
                                              and im["split"] != "test")
    info = json.loads((proxy_dir / "info.json").read_text())
    assert info["complete"] and info["label"].endswith("real language, synthetic vision")
    assert "NOT a real image-captioning dataset" in (proxy_dir / "README.txt").read_text()


def test_feature_statistics_and_boxes(proxy_dir, coco):
    records = _records(proxy_dir / "features.lmdb")
    doc = json.loads((proxy_dir / "dataset_coco.json").read_text())
    assert sorted(records) == sorted(im["cocoid"] for im in doc["images"])
    counts = []
    for image_id, rec in records.items():
        img = coco.images[image_id]
        assert rec.features.dtype == np.float16 and rec.features.shape[1] == FEATURE_DIM
        assert (rec.features >= 0).all() and np.isfinite(rec.features).all()
        assert 0.2 < (rec.features > 0).mean() < 0.8  # sparse-ish, like ReLU outputs
        assert (rec.image_w, rec.image_h) == (img.width, img.height)
        b = rec.boxes
        assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 0] < b[:, 2]).all()
        assert (b[:, 1] < b[:, 3]).all() and (b[:, 2] <= img.width).all() and (b[:, 3] <= img.height).all()
        assert ((0 <= rec.object_ids) & (rec.object_ids < 1600)).all()
        assert ((0 <= rec.attr_ids) & (rec.attr_ids < 400)).all()
        assert ((rec.object_conf > 0) & (rec.object_conf < 1)).all() and (np.diff(rec.object_conf) <= 0).all()
        counts.append(rec.num_boxes)
    assert 10 <= min(counts) and max(counts) <= 100 and len(set(counts)) > 10


def test_regions_show_the_objects_the_captions_mention(proxy_dir, coco):
    records = _records(proxy_dir / "features.lmdb")
    lexicon = ConceptLexicon.packaged()
    embeddings = FeatureSynthesizer(num_objects=1600, num_attributes=400).object_embeddings()
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    recovered = total = 0
    for image_id, rec in list(records.items())[:20]:
        mentioned = {c.object_id for c in lexicon.image_concepts(
            [tokenize(c) for c in coco.images[image_id].captions]).objects}
        assert mentioned <= set(rec.object_ids.tolist())  # at most 100 regions: never exceeded here
        # The features say what is there: the nearest object embedding recovers the region's object.
        feats = rec.features.astype(np.float32)
        nearest = (feats @ unit.T).argmax(axis=1)
        recovered += int((nearest == rec.object_ids).sum())
        total += rec.num_boxes
    assert recovered / total > 0.95, recovered / total


def test_dog_captions_give_a_dog_region(coco, split):
    def says_dog(caption: str) -> bool:  # "hot dog" is food, its own VG class
        tokens = tokenize(caption)
        return any(t == "dog" and (k == 0 or tokens[k - 1] != "hot") for k, t in enumerate(tokens))

    dog_images = [i for i in sorted(split.val) if sum(map(says_dog, coco.images[i].captions)) >= 3][:3]
    assert dog_images
    lexicon = ConceptLexicon.packaged()
    synth = FeatureSynthesizer(num_objects=1600, num_attributes=400)
    for image_id in dog_images:
        concepts = lexicon.image_concepts([tokenize(c) for c in coco.images[image_id].captions])
        layout = layout_regions(concepts, rng=image_rng(0, image_id), width=640, height=480, boxes=(36, 36),
                                num_objects=1600, num_attributes=400)
        assert layout.num_boxes == 36
        feats = synth.render([layout])[0].astype(np.float32)
        dog_rows = np.flatnonzero(layout.object_ids == DOG)
        assert len(dog_rows) and layout.from_captions[dog_rows].all()
        dog = synth.object_embeddings()[DOG]
        others = np.setdiff1d(np.arange(36), dog_rows)
        assert (feats[dog_rows] @ dog).min() > (feats[others] @ dog).max()  # strong, unlike the distractors


def test_same_seed_is_byte_identical_across_chunkings_other_seed_differs(proxy_dir, tmp_path, coco, split):
    again = tmp_path / "again"
    make_proxy_dataset(coco, split, again, ProxyConfig(num_images=60, seed=3, chunk_size=7))
    first, second = _records(proxy_dir / "features.lmdb"), _records(again / "features.lmdb")
    assert first.keys() == second.keys()
    for image_id, rec in first.items():
        other = second[image_id]
        assert rec.features.tobytes() == other.features.tobytes() and rec.boxes.tobytes() == other.boxes.tobytes()
        assert np.array_equal(rec.object_ids, other.object_ids) and np.array_equal(rec.attr_ids, other.attr_ids)
    assert (proxy_dir / "dataset_coco.json").read_bytes() == (again / "dataset_coco.json").read_bytes()

    image_id = next(iter(first))
    concepts = ConceptLexicon.packaged().image_concepts([tokenize(c) for c in coco.images[image_id].captions])
    layouts = [layout_regions(concepts, rng=image_rng(seed, image_id), width=640, height=480, boxes=(10, 100),
                              num_objects=1600, num_attributes=400) for seed in (3, 4)]
    assert not np.array_equal(layouts[0].boxes, layouts[1].boxes)
    assert select_images(coco, split, 60, seed=4) != select_images(coco, split, 60, seed=3)


def test_rerun_resumes_and_other_parameters_are_refused(proxy_dir, coco, split):
    summary = make_proxy_dataset(coco, split, proxy_dir, ProxyConfig(num_images=60, seed=3, chunk_size=16))
    assert (summary.written, summary.skipped) == (0, 60)
    with pytest.raises(DataError, match="pick a new output directory"):
        make_proxy_dataset(coco, split, proxy_dir, ProxyConfig(num_images=60, seed=4))


def test_tool_end_to_end_with_fixed_boxes_then_prepro(tmp_path, coco, split):
    # Small caption files: 6 train2014 images plus 2 val and 2 test images of a custom Karpathy split.
    val, test = sorted(split.val)[:2], sorted(split.test)[:2]
    train = [i for i in sorted(coco.images) if "train2014" in coco.images[i].file_name][:6]
    files = []
    for name, ids in (("train", train), ("val", val + test)):
        imgs = [coco.images[i] for i in ids]
        doc = {"images": [{"id": im.image_id, "file_name": im.file_name, "width": im.width, "height": im.height}
                          for im in imgs],
               "annotations": [{"image_id": im.image_id, "caption": c} for im in imgs for c in im.captions]}
        files.append(tmp_path / f"captions_{name}.json")
        files[-1].write_text(json.dumps(doc))
    split_dir = tmp_path / "split"
    split_dir.mkdir()
    for name, ids in (("val", val), ("test", test)):
        (split_dir / f"karpathy_{name}_images.txt").write_text("".join(f"val2014/x.jpg {i}\n" for i in ids))

    def tool(name):
        spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    out = tmp_path / "proxy"
    assert tool("make_proxy_dataset").main([
        "--output", str(out), "--num-images", "all", "--boxes", "12", "--device", "cpu",
        "--coco-captions", *map(str, files), "--karpathy-split", str(split_dir)]) == 0
    records = _records(out / "features.lmdb")
    assert sorted(records) == sorted(train + val + test)
    assert {r.num_boxes for r in records.values()} == {12}
    assert tool("prepro_captions").main(["--input", str(out / "dataset_coco.json"), "--output",
                                         str(out / "data"), "--min-count", "0"]) == 0
    data = CaptionData.load(out / "data")
    assert data.split_ids("val").tolist() == val and data.split_ids("test").tolist() == test
    assert data.split_ids("train").tolist() == train
    assert data.references(val[0]) == [c.strip() for c in coco.images[val[0]].captions]
