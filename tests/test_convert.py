"""Import of public feature formats (bottom-up TSV, LXMERT TSV, bottom-up-attention.pytorch and self-critical npz)."""
from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from butd.data.prep.convert import convert_features, read_features, read_npz, read_tsv
from butd.data.store import FeatureRecord, FeatureStore
from butd.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT.parent / "shared" / "data" / "butd_features_sample" / "trainval_36_sample10.tsv"


def b64(arr, dtype) -> str:
    return base64.b64encode(np.ascontiguousarray(arr, dtype=dtype).tobytes()).decode()


def make_record(image_id: int, n: int, d: int = 16, *, extras: bool = False) -> FeatureRecord:
    rng = np.random.default_rng(image_id)
    optional = {}
    if extras:
        optional = dict(object_ids=rng.integers(0, 1600, n), object_conf=rng.random(n, dtype=np.float32),
                        attr_ids=rng.integers(0, 400, n), attr_conf=rng.random(n, dtype=np.float32))
    return FeatureRecord(image_id=image_id, features=rng.random((n, d), dtype=np.float32) * 8,
                         boxes=(rng.random((n, 4)) * 400).astype(np.float32),
                         image_w=500 + image_id % 100, image_h=300 + image_id % 50, **optional)


def bottom_up_line(r: FeatureRecord) -> str:
    return "\t".join([str(r.image_id), str(r.image_w), str(r.image_h), str(r.num_boxes),
                      b64(r.boxes, "<f4"), b64(r.features, "<f4")])


def lxmert_line(r: FeatureRecord, name: str) -> str:
    return "\t".join([name, str(r.image_h), str(r.image_w), b64(r.object_ids, "<i8"), b64(r.object_conf, "<f4"),
                      b64(r.attr_ids, "<i8"), b64(r.attr_conf, "<f4"), str(r.num_boxes),
                      b64(r.boxes, "<f4"), b64(r.features, "<f4")])


def assert_same(got: FeatureRecord, want: FeatureRecord, *, extras: bool) -> None:
    assert (got.image_id, got.image_w, got.image_h) == (want.image_id, want.image_w, want.image_h)
    np.testing.assert_array_equal(got.features, want.features.astype(got.features.dtype))
    np.testing.assert_array_equal(got.boxes, want.boxes)
    for name in ("object_ids", "object_conf", "attr_ids", "attr_conf"):
        if extras:
            np.testing.assert_array_equal(getattr(got, name), getattr(want, name))
        else:
            assert getattr(got, name) is None


def contents(path: Path) -> dict[int, FeatureRecord]:
    with FeatureStore(path) as store:
        return {i: store[i] for i in store.image_ids()}


def sample_first_row() -> tuple[list[str], np.ndarray, np.ndarray]:
    fields = SAMPLE.read_text().split("\n", 1)[0].rstrip("\r").split("\t")
    boxes = np.frombuffer(base64.b64decode(fields[4]), np.float32).reshape(-1, 4)
    return fields, boxes, np.frombuffer(base64.b64decode(fields[5]), np.float32).reshape(36, -1)


@pytest.mark.skipif(not SAMPLE.exists(), reason=f"real bottom-up sample not found at {SAMPLE}")
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_real_bottom_up_sample(tmp_path, dtype):
    summary = convert_features([SAMPLE], tmp_path / "f.lmdb", dtype=dtype, progress=False)
    assert (summary.written, summary.skipped, summary.total) == (10, 0, 10)
    fields, boxes, feats = sample_first_row()
    with FeatureStore(tmp_path / "f.lmdb") as store:
        assert store.feature_dim == 2048 and store.dtype == np.dtype(dtype)
        assert 138629 in store and len(store) == 10
        rec = store[150367]
    assert (rec.image_w, rec.image_h, rec.num_boxes) == (640, 480, 36) and fields[:4] == ["150367", "640", "480", "36"]
    np.testing.assert_array_equal(rec.boxes, boxes)
    if dtype == "float32":
        np.testing.assert_array_equal(rec.features, feats)
    else:
        np.testing.assert_allclose(rec.features.astype(np.float32), feats, rtol=2**-11, atol=2**-24)
    again = convert_features([SAMPLE], tmp_path / "f.lmdb", progress=False)  # dtype kept from the store
    assert (again.written, again.skipped, again.total) == (0, 10, 10)


def test_adaptive_bottom_up_tsv(tmp_path):
    records = [make_record(i, n) for i, n in [(11, 10), (12, 100), (13, 57)]]
    tsv = tmp_path / "adaptive.tsv"
    tsv.write_text("".join(bottom_up_line(r) + "\r\n" for r in records) + "\n")  # CRLF and a blank last line
    convert_features([tsv], tmp_path / "f.lmdb", dtype="float32", progress=False)
    got = contents(tmp_path / "f.lmdb")
    assert sorted(got) == [11, 12, 13]
    for r in records:
        assert_same(got[r.image_id], r, extras=False)


def test_lxmert_tsv_keeps_objects_and_attributes(tmp_path):
    records = [make_record(i, n, extras=True) for i, n in [(391895, 36), (522418, 12)]]
    tsv = tmp_path / "val2014_obj36.tsv"
    tsv.write_text("\n".join(lxmert_line(r, f"COCO_val2014_{r.image_id:012d}") for r in records) + "\n")
    convert_features([tsv], tmp_path / "f.lmdb", dtype="float32", progress=False)
    got = contents(tmp_path / "f.lmdb")
    for r in records:
        assert_same(got[r.image_id], r, extras=True)  # img_h / img_w order of LXMERT is respected


def test_bottom_up_attention_pytorch_npz(tmp_path):
    d = tmp_path / "npz"
    d.mkdir()
    a, b = make_record(42, 10, extras=True), make_record(7, 20)
    info = {"objects_id": a.object_ids, "objects_conf": a.object_conf, "attrs_id": a.attr_ids,
            "attrs_conf": a.attr_conf, "image_id": "COCO_val2014_000000000042"}
    np.savez_compressed(d / "COCO_val2014_000000000042.npz", x=a.features, bbox=a.boxes, num_bbox=10,
                        image_h=a.image_h, image_w=a.image_w, info=info)
    np.savez_compressed(d / "7.npz", x=b.features.T, bbox=b.boxes, num_bbox=20,  # [D, N] is accepted
                        image_h=b.image_h, image_w=b.image_w)
    convert_features([d], tmp_path / "pickled.lmdb", dtype="float32", allow_pickle=True, progress=False)
    got = contents(tmp_path / "pickled.lmdb")
    assert_same(got[42], a, extras=True)
    assert_same(got[7], b, extras=False)
    with pytest.warns(UserWarning, match="skipped the pickled 'info'"):
        rec = read_npz(d / "COCO_val2014_000000000042.npz")
    assert rec.object_ids is None
    np.testing.assert_array_equal(rec.features, a.features)


def test_self_critical_npz(tmp_path):
    att, box = tmp_path / "cocobu_att", tmp_path / "cocobu_box"
    att.mkdir(), box.mkdir()
    records = [make_record(i, 36) for i in (9, 391895)]
    for r in records:
        np.savez_compressed(att / f"{r.image_id}.npz", feat=r.features)
        np.save(box / f"{r.image_id}.npy", r.boxes)
    got = {r.image_id: r for r in read_features(att)}
    for r in records:
        np.testing.assert_array_equal(got[r.image_id].features, r.features)
        np.testing.assert_array_equal(got[r.image_id].boxes, r.boxes)
        assert (got[r.image_id].image_w, got[r.image_id].image_h) == (0, 0)  # the format keeps no image size
    (box / "9.npy").unlink()
    with pytest.raises(DataError, match=r"9\.npz: box file .*9\.npy is missing"):
        list(read_features(att))
    box.rename(tmp_path / "elsewhere")
    with pytest.warns(UserWarning, match="zero boxes") as caught:
        got = list(read_features(att))
    assert len(caught) == 1  # once per directory, not once per file
    assert all(not r.boxes.any() and r.boxes.shape == (36, 4) for r in got)


def test_unknown_npz_layout(tmp_path):
    np.savez(tmp_path / "5.npz", features=np.ones((3, 4)))
    with pytest.raises(DataError, match=r"5\.npz: unknown npz layout with keys \['features'\]"):
        read_npz(tmp_path / "5.npz")
    (tmp_path / "6.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match=r"6\.npz: not a readable \.npz"):
        read_npz(tmp_path / "6.npz")


GOOD = [make_record(i, 10 + i) for i in range(1, 6)]


@pytest.mark.parametrize("bad_line, reason", [
    ("\t".join(bottom_up_line(GOOD[3]).split("\t")[:5]), "5 tab-separated fields, expected 6"),
    (bottom_up_line(GOOD[3])[:-200], "field features decodes to"),
    (bottom_up_line(GOOD[3]) + "\textra", "7 tab-separated fields, expected 6"),
    ("\t".join(bottom_up_line(GOOD[3]).split("\t")[:4] + ["@@@@", "AAAA"]), "field boxes is not valid base64"),
    ("\t".join(["4", "500", "300", "13"] + bottom_up_line(GOOD[3]).split("\t")[4:]), "num_boxes implies 52"),
    (bottom_up_line(GOOD[1]), "duplicate image id 2 (first seen on line 2)"),
    ("\t".join(["4", "wide"] + bottom_up_line(GOOD[3]).split("\t")[2:]), "field image_w is not an integer"),
])
def test_bad_tsv_line_stops_with_file_and_line(tmp_path, bad_line, reason):
    lines = [bottom_up_line(r) for r in GOOD]
    lines[3] = bad_line
    tsv = tmp_path / "bad.tsv"
    tsv.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="bad.tsv:4: ") as info:
        convert_features([tsv], tmp_path / "f.lmdb", commit_every=2, progress=False)
    assert reason in str(info.value)
    assert FeatureStore(tmp_path / "f.lmdb").image_ids() == [1, 2, 3]  # what came before is kept


def test_rerun_after_bad_input_resumes(tmp_path):
    lines = [bottom_up_line(r) for r in GOOD]
    tsv = tmp_path / "part.tsv"
    tsv.write_text("\n".join(lines[:3] + [lines[3][:1000]] + lines[4:]) + "\n")  # a truncated download
    with pytest.raises(DataError, match="part.tsv:4"):
        convert_features([tsv], tmp_path / "f.lmdb", commit_every=2, progress=False)
    tsv.write_text("\n".join(lines) + "\n")
    summary = convert_features([tsv], tmp_path / "f.lmdb", commit_every=2, progress=False)
    assert (summary.written, summary.skipped, summary.total) == (2, 3, 5)
    convert_features([tsv], tmp_path / "ref.lmdb", commit_every=2, progress=False)
    got, want = contents(tmp_path / "f.lmdb"), contents(tmp_path / "ref.lmdb")
    assert got.keys() == want.keys()
    for i in want:
        assert_same(got[i], want[i], extras=False)


def test_format_and_duplicate_checks_across_inputs(tmp_path):
    odd = tmp_path / "odd.tsv"
    odd.write_text("1\t2\t3\n")
    with pytest.raises(DataError, match=r"odd.tsv:1: 3 tab-separated fields; expected 6 .* or 10"):
        list(read_tsv(odd))
    a, b = tmp_path / "a.tsv", tmp_path / "b.tsv"
    a.write_text(bottom_up_line(GOOD[0]) + "\n")
    b.write_text(bottom_up_line(GOOD[1]) + "\n" + bottom_up_line(GOOD[0]) + "\n")
    with pytest.raises(DataError, match=r"b.tsv: image 1 was already read from .*a.tsv"):
        convert_features([a, b], tmp_path / "f.lmdb", progress=False)
    with pytest.raises(DataError, match="holds float16 features"):
        convert_features([a], tmp_path / "f.lmdb", dtype="float32", progress=False)
    with pytest.raises(DataError, match="missing.tsv does not exist"):
        convert_features([tmp_path / "missing.tsv"], tmp_path / "g.lmdb", progress=False)


def run_tool(name: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "tools" / name), *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=120)


def test_command_line_tools(tmp_path):
    rec = make_record(391895, 12, extras=True)
    tsv = tmp_path / "lx.tsv"
    tsv.write_text(lxmert_line(rec, "COCO_val2014_000000391895") + "\nshort\tline\n")
    proc = run_tool("convert_features.py", "--input", tsv, "--output", tmp_path / "f.lmdb", "--no-progress")
    assert proc.returncode == 1 and "lx.tsv:2: 2 tab-separated fields, expected 10" in proc.stderr
    proc = run_tool("inspect_features.py", tmp_path / "f.lmdb")
    summary = json.loads(proc.stdout)
    assert summary["count"] == 1 and summary["dtype"] == "float16" and summary["feature_dim"] == 16
    assert summary["boxes_per_image"] == {"min": 12, "mean": 12.0, "max": 12}
    assert summary["images_with_objects"] == 1 and summary["images_with_attributes"] == 1
    proc = run_tool("inspect_features.py", tmp_path / "f.lmdb", "--id", "391895")
    one = json.loads(proc.stdout)
    assert one["num_boxes"] == 12 and one["features"]["shape"] == [12, 16] and len(one["boxes"]) == 12
    vocab = (ROOT / "butd" / "resources" / "objects_vocab.txt").read_text().splitlines()
    assert one["objects"][0]["name"] == vocab[rec.object_ids[0]]
    proc = run_tool("inspect_features.py", tmp_path / "f.lmdb", "--id", "1")
    assert proc.returncode == 1 and "image 1 is not in feature store" in proc.stderr
