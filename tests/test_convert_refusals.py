"""Feature import into outputs it must not touch (another program's LMDB, a folder of other files) and from inputs
that hold nothing: one clear error, nothing of the user's changed, no empty store left behind."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lmdb
import numpy as np
import pytest

from butd.data.prep.convert import convert_features
from butd.data.store import FeatureRecord, FeatureStore, FeatureWriter
from butd.errors import DataError

ROOT = Path(__file__).resolve().parents[1]


def record(image_id: int) -> FeatureRecord:
    rng = np.random.default_rng(image_id)
    return FeatureRecord(image_id=image_id, features=rng.random((4, 8), dtype=np.float32),
                         boxes=np.tile(np.array([[0, 0, 10, 10]], np.float32), (4, 1)), image_w=64, image_h=48)


def good_tsv(path: Path, *ids: int) -> Path:
    import base64

    def b64(arr) -> str:
        return base64.b64encode(np.ascontiguousarray(arr, dtype="<f4").tobytes()).decode()

    lines = ["\t".join([str(r.image_id), str(r.image_w), str(r.image_h), str(r.num_boxes), b64(r.boxes),
                        b64(r.features)]) for r in map(record, ids)]
    path.write_text("\n".join(lines) + "\n")
    return path


def foreign_lmdb(path: Path) -> Path:
    env = lmdb.open(str(path), map_size=1 << 20)
    with env.begin(write=True) as txn:
        txn.put(b"hello", b"world")
    env.close()
    return path


def lmdb_items(path: Path) -> dict[bytes, bytes]:
    env = lmdb.open(str(path), readonly=True, lock=False)
    with env.begin() as txn:
        items = {bytes(k): bytes(v) for k, v in txn.cursor()}
    env.close()
    return items


def run_tool(*args: object) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, str(ROOT / "tools" / "convert_features.py"), *map(str, args),
                           "--no-progress"], env=env, capture_output=True, text=True, timeout=120, check=False)


def test_another_programs_lmdb_is_refused_and_left_as_it_was(tmp_path):
    other = foreign_lmdb(tmp_path / "other.lmdb")
    tsv = good_tsv(tmp_path / "a.tsv", 1, 2)
    with pytest.raises(DataError, match="other.lmdb is an LMDB database that is not a butd feature store"):
        convert_features([tsv], other, progress=False)
    with pytest.raises(DataError, match="not a butd feature store"):
        FeatureWriter(other)
    assert lmdb_items(other) == {b"hello": b"world"}

    proc = run_tool("--input", tsv, "--output", other)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [(f"error: {other} is an LMDB database that is not a butd feature store "
                                         "(1 entries, no butd metadata record); refusing to write into it (choose "
                                         "a new output path)")]
    assert lmdb_items(other) == {b"hello": b"world"}


def test_a_folder_of_other_files_is_refused_untouched(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "cat.jpg").write_bytes(b"not really")
    with pytest.raises(DataError, match="photos is a folder with other files in it, not a feature store"):
        convert_features([good_tsv(tmp_path / "a.tsv", 1)], folder, progress=False)
    assert sorted(p.name for p in folder.iterdir()) == ["cat.jpg"]


def test_a_store_that_another_program_wrote_into_reads_as_a_clear_error(tmp_path):
    """A store damaged before the refusal existed: readers name the foreign key instead of int(b'hello')."""
    with FeatureWriter(tmp_path / "f.lmdb") as writer:
        writer.put(record(7))
    env = lmdb.open(str(tmp_path / "f.lmdb"))
    with env.begin(write=True) as txn:
        txn.put(b"hello", b"world")
    env.close()
    store = FeatureStore(tmp_path / "f.lmdb")
    with pytest.raises(DataError, match=r"f.lmdb: key b'hello' is not an image id"):
        store.image_ids()
    with pytest.raises(DataError, match=r"key b'hello' is not an image id"):
        list(store.headers())
    store.close()


@pytest.mark.parametrize("text", ["", "\n\n  \n"])
def test_empty_input_leaves_no_store_behind(tmp_path, text):
    empty = tmp_path / "empty.tsv"
    empty.write_text(text)
    with pytest.raises(DataError, match="empty.tsv: no feature records found"):
        convert_features([empty], tmp_path / "new.lmdb", progress=False)
    assert not (tmp_path / "new.lmdb").exists()

    proc = run_tool("--input", empty, "--output", tmp_path / "new.lmdb")
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [f"error: {empty}: no feature records found (empty input?); nothing written"]
    assert not (tmp_path / "new.lmdb").exists()


def test_empty_input_leaves_an_existing_store_as_it_was(tmp_path):
    convert_features([good_tsv(tmp_path / "a.tsv", 1, 2)], tmp_path / "f.lmdb", progress=False)
    (tmp_path / "empty.tsv").write_text("")
    with pytest.raises(DataError, match="no feature records found"):
        convert_features([tmp_path / "empty.tsv"], tmp_path / "f.lmdb", progress=False)
    assert FeatureStore(tmp_path / "f.lmdb").image_ids() == [1, 2]


def test_bad_first_record_leaves_no_store_behind_but_keeps_a_started_one(tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("1\t2\t3\n")
    with pytest.raises(DataError, match="bad.tsv:1: 3 tab-separated fields"):
        convert_features([bad], tmp_path / "new.lmdb", progress=False)
    assert not (tmp_path / "new.lmdb").exists()
    # Into a store that already holds records, a failed import removes nothing.
    convert_features([good_tsv(tmp_path / "a.tsv", 1)], tmp_path / "f.lmdb", progress=False)
    with pytest.raises(DataError, match="bad.tsv:1"):
        convert_features([bad], tmp_path / "f.lmdb", progress=False)
    assert FeatureStore(tmp_path / "f.lmdb").image_ids() == [1]
