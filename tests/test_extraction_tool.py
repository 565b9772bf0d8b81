"""Extraction into the LMDB store: the CLI, failures file, resume, shards and merging, image listing."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from butd.data.store import FeatureRecord, FeatureStore, FeatureWriter
from butd.errors import ConfigError, DataError
from feature_extraction.config import DetectorConfig
from feature_extraction.detector import BottomUpDetector
from feature_extraction.extract import ExtractionConfig, run_extraction
from feature_extraction.merge import merge_stores, records_equal
from feature_extraction.sources import ImageItem, image_id_from_name, list_images, parse_shard, shard
from feature_extraction.weights import initialize_random

ROOT = Path(__file__).resolve().parents[1]
COCO_IMAGES = ROOT.parent / "shared" / "data" / "coco_images"
GOOD = ["COCO_val2014_000000273052.jpg", "000000126107.jpg", "000000165518.jpg", "000000183709.jpg"]


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four real COCO images (ids 126107, 165518, 183709, 273052)."""
    if not all((COCO_IMAGES / n).is_file() for n in GOOD):
        pytest.skip(f"shared COCO images not found at {COCO_IMAGES}")
    folder = tmp_path_factory.mktemp("images")
    for name in GOOD:
        shutil.copy(COCO_IMAGES / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def detector() -> BottomUpDetector:
    config = replace(DetectorConfig.small(), test_scale=224, test_max_size=360, rpn_pre_nms_topk=1000,
                     rpn_post_nms_topk=100)
    model = BottomUpDetector(config=config)
    initialize_random(model, seed=0)
    return model


def extract(detector, images: Path, output: Path, **kwargs):
    config = ExtractionConfig(images=images, weights="random", output=output, device="cpu", num_workers=0,
                              progress=False, **kwargs)
    return run_extraction(config, detector=detector)


def read_all(path: Path) -> dict[int, FeatureRecord]:
    with FeatureStore(path) as store:
        return {i: store[i] for i in store.image_ids()}


def assert_same_regions(got: FeatureRecord, want: FeatureRecord) -> None:
    """Equal up to float noise: batches of other shapes may round differently in the last bits (then float16
    storage can differ by one unit in the last place)."""
    assert (got.image_w, got.image_h, got.num_boxes) == (want.image_w, want.image_h, want.num_boxes)
    np.testing.assert_array_equal(got.object_ids, want.object_ids)
    np.testing.assert_array_equal(got.attr_ids, want.attr_ids)
    np.testing.assert_allclose(got.boxes, want.boxes, rtol=0, atol=1e-3)
    np.testing.assert_allclose(got.features.astype(np.float32), want.features.astype(np.float32), rtol=2e-3, atol=1e-3)
    np.testing.assert_allclose(got.object_conf, want.object_conf, rtol=1e-4)
    np.testing.assert_allclose(got.attr_conf, want.attr_conf, rtol=1e-4)


@pytest.fixture(scope="module")
def uninterrupted(detector, image_dir, tmp_path_factory) -> dict[int, FeatureRecord]:
    out = tmp_path_factory.mktemp("full") / "feats.lmdb"
    stats = extract(detector, image_dir, out, batch_size=3)
    assert (stats.extracted, stats.failed) == (4, 0)
    return read_all(out)


def test_records_hold_the_detections(uninterrupted):
    assert sorted(uninterrupted) == [126107, 165518, 183709, 273052]
    record = uninterrupted[273052]
    assert (record.image_w, record.image_h) == (500, 334)
    # The default reference mode stores float32, like the published features.
    assert record.features.dtype == np.float32 and record.features.shape == (10, 128)
    assert record.object_ids.max() < 1600 and record.attr_ids.max() < 400


def test_restart_resumes_and_equals_an_uninterrupted_run(detector, image_dir, uninterrupted, tmp_path):
    out = tmp_path / "feats.lmdb"
    partial = tmp_path / "first_two.txt"  # a run killed after two images left these two stored
    partial.write_text("".join(f"{image_dir / n}\t{image_id_from_name(n)}\n" for n in GOOD[:2]))
    assert extract(detector, partial, out, batch_size=2).extracted == 2
    stats = extract(detector, image_dir, out, batch_size=4)  # the restart, with another batch composition
    assert (stats.already_done, stats.extracted) == (2, 2)
    resumed = read_all(out)
    assert sorted(resumed) == sorted(uninterrupted)
    for image_id, record in uninterrupted.items():
        assert_same_regions(resumed[image_id], record)


def test_shards_partition_the_images_and_merge_back(detector, image_dir, uninterrupted, tmp_path):
    parts = [tmp_path / f"shard{i}.lmdb" for i in range(2)]
    for i, part in enumerate(parts):
        assert extract(detector, image_dir, part, shard=(i, 2)).extracted == 2
    assert not set(read_all(parts[0])) & set(read_all(parts[1]))
    report = merge_stores([parts[0], parts[1], parts[0]], tmp_path / "merged.lmdb")
    assert (report.written, report.identical_duplicates) == (4, 2)
    merged = read_all(tmp_path / "merged.lmdb")
    shards = {**read_all(parts[0]), **read_all(parts[1])}
    assert all(records_equal(merged[i], shards[i]) for i in shards)  # copied bit for bit
    for image_id, record in uninterrupted.items():
        assert_same_regions(merged[image_id], record)


def test_merge_refuses_conflicting_duplicates(uninterrupted, tmp_path):
    base = uninterrupted[126107]
    for name, scale in (("a.lmdb", 1.0), ("b.lmdb", 2.0)):
        with FeatureWriter(tmp_path / name) as writer:
            writer.put(replace(base, features=base.features.astype(np.float32) * scale))
    with pytest.raises(DataError, match="image 126107 differs between"):
        merge_stores([tmp_path / "a.lmdb", tmp_path / "b.lmdb"], tmp_path / "out.lmdb")
    assert not (tmp_path / "out.lmdb").exists()
    with pytest.raises(DataError, match="already exists"):
        merge_stores([tmp_path / "a.lmdb"], tmp_path / "a.lmdb")


def test_image_ids_and_lists(tmp_path):
    assert image_id_from_name("COCO_val2014_000000391895.jpg") == 391895
    assert image_id_from_name("train2014/COCO_train2014_000000000009.jpg") == 9
    assert image_id_from_name("000000391895.jpg") == 391895
    with pytest.raises(DataError, match="no image id in the file name"):
        image_id_from_name("holiday.jpg")
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "cat.png").write_bytes(b"")
    with pytest.raises(DataError, match="cat.png: no image id"):
        list_images(tmp_path / "imgs")
    listing = tmp_path / "list.txt"
    listing.write_text("# comment\nimgs/cat.png\t7\n/abs/dog.jpg\t3\n")
    assert [(i.path, i.image_id) for i in list_images(listing)] == [
        (Path("/abs/dog.jpg"), 3), (tmp_path / "imgs" / "cat.png", 7)]
    listing.write_text("a.jpg\t1\nb.jpg 2\n")
    with pytest.raises(DataError, match=r"list.txt:2: expected 'path<TAB>image id'"):
        list_images(listing)
    listing.write_text("a.jpg\t1\nb.jpg\t1\n")
    with pytest.raises(DataError, match="image id 1 appears twice"):
        list_images(listing)


def test_shard_rule():
    assert parse_shard("1/4") == (1, 4)
    for bad in ("4/4", "-1/2", "x", "1/0"):
        with pytest.raises(ConfigError):
            parse_shard(bad)
    items = [ImageItem(Path(f"{i}.jpg"), i) for i in reversed(range(10))]
    parts = [shard(items, i, 3) for i in range(3)]
    assert sorted(x.image_id for p in parts for x in p) == list(range(10))
    assert [x.image_id for x in parts[1]] == [1, 4, 7]


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"butd_tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_tool(*args: str) -> subprocess.CompletedProcess:
    """A tool as a user runs it (the package found through PYTHONPATH, as if installed)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


def test_cli_skips_and_logs_bad_images_and_strict_fails(image_dir, tmp_path, capsys):
    folder = tmp_path / "mixed"
    folder.mkdir()
    shutil.copy(image_dir / GOOD[0], folder / GOOD[0])
    data = (image_dir / GOOD[1]).read_bytes()
    (folder / "COCO_val2014_000000000001.jpg").write_bytes(data[: len(data) // 4])  # truncated
    (folder / "COCO_val2014_000000000002.jpg").write_bytes(os.urandom(2048))  # not an image
    out = tmp_path / "feats.lmdb"
    args = ["tools/extract_features.py", "--images", str(folder), "--weights", "random", "--small", "--output",
            str(out), "--device", "cpu", "--num-workers", "1", "--batch-size", "2", "--no-progress"]
    proc = run_tool(*args)
    assert proc.returncode == 0, proc.stderr
    assert "RANDOM DETECTOR WEIGHTS" in proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (summary["extracted"], summary["failed"]) == (1, 2)
    failures = [json.loads(line) for line in Path(str(out) + ".failures.jsonl").read_text().splitlines()]
    assert {(f["id"], Path(f["path"]).name) for f in failures} == {
        (1, "COCO_val2014_000000000001.jpg"), (2, "COCO_val2014_000000000002.jpg")}
    reasons = {f["id"]: f["reason"] for f in failures}
    assert "truncated" in reasons[1] and "not an image" in reasons[2]
    with FeatureStore(out) as store:
        assert store.image_ids() == [273052] and store.feature_dim == 128

    # The same command again, in-process: nothing left to do, but with --strict the incomplete store is an error.
    assert load_tool("extract_features").main(args[1:] + ["--strict"]) == 1
    output = capsys.readouterr()
    assert "2 image(s) failed" in output.err
    assert json.loads(output.out.strip().splitlines()[-1])["already_done"] == 1

    # Retrying re-reads the bad files; they fail again and the failures file still lists each once.
    assert load_tool("extract_features").main(args[1:] + ["--retry-failed"]) == 0
    capsys.readouterr()
    lines = Path(str(out) + ".failures.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["id"] for line in lines) == [1, 2]

    assert load_tool("merge_features").main(["--inputs", str(out), "--output", str(tmp_path / "copy.lmdb"),
                                             "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["written"] == 1


def test_cli_modes_and_options(image_dir, tmp_path, capsys):
    tool = load_tool("extract_features")
    out = tmp_path / "fast.lmdb"
    base = ["--images", str(image_dir), "--weights", "random", "--small", "--device", "cpu", "--num-workers", "0",
            "--no-progress", "--batch-size", "2"]
    assert tool.main(base + ["--output", str(out), "--mode", "fast", "--commit-every", "1", "--decode", "device",
                             "--no-channels-last"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["extracted"] == 4
    with FeatureStore(out) as store:
        assert store.dtype == np.float16  # the fast mode's storage
    assert tool.main(base + ["--output", str(tmp_path / "f32.lmdb"), "--mode", "fast", "--dtype", "float32"]) == 0
    with FeatureStore(tmp_path / "f32.lmdb") as store:
        assert store.dtype == np.float32
    capsys.readouterr()
    assert tool.main(base + ["--output", str(tmp_path / "x.lmdb"), "--commit-every", "0"]) == 2
    assert "--commit-every must be >= 1" in capsys.readouterr().err
