"""The LMDB feature store: record layout, round trips, refusal of mismatches, resume, map growth, workers."""
from __future__ import annotations

import os
import pickle
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch

from butd.data.store import FeatureRecord, FeatureStore, FeatureWriter, read_metadata
from butd.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[1]


def make_record(image_id: int, n: int, d: int = 8, *, extras: bool = False, seed: int | None = None) -> FeatureRecord:
    rng = np.random.default_rng(image_id if seed is None else seed)
    optional = {}
    if extras:
        optional = dict(object_ids=rng.integers(0, 1600, n), object_conf=rng.random(n, dtype=np.float32),
                        attr_ids=rng.integers(0, 400, n).astype(np.int32), attr_conf=rng.random(n, dtype=np.float32))
    return FeatureRecord(image_id=image_id, features=rng.standard_normal((n, d)).astype(np.float32) * 4,
                         boxes=(rng.random((n, 4)) * 500).astype(np.float32),
                         image_w=640 + image_id, image_h=480 + image_id % 7, **optional)


def assert_same(got: FeatureRecord, want: FeatureRecord, dtype: str) -> None:
    assert got.image_id == want.image_id and got.num_boxes == want.num_boxes
    assert (got.image_w, got.image_h) == (want.image_w, want.image_h)
    assert got.features.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(got.features, want.features.astype(dtype))
    assert got.boxes.dtype == np.float32
    np.testing.assert_array_equal(got.boxes, want.boxes)
    for name in ("object_ids", "object_conf", "attr_ids", "attr_conf"):
        if getattr(want, name) is None:
            assert getattr(got, name) is None
        else:
            np.testing.assert_array_equal(getattr(got, name), getattr(want, name))
    if got.object_ids is not None:
        assert got.object_ids.dtype == np.int32 and got.attr_ids.dtype == np.int32


def snapshot(path: Path) -> dict[int, FeatureRecord]:
    with FeatureStore(path) as store:
        return {i: store[i] for i in store.image_ids()}


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("extras", [False, True])
def test_round_trip(tmp_path, dtype, extras):
    records = [make_record(i, n, extras=extras) for i, n in [(42, 10), (7, 36), (1000, 1), (3, 100)]]
    with FeatureWriter(tmp_path / "f.lmdb", dtype=dtype, commit_every=2) as writer:
        assert all(writer.put(r) for r in records)
    store = FeatureStore(tmp_path / "f.lmdb")
    assert len(store) == 4 and store.image_ids() == [3, 7, 42, 1000]
    assert store.dtype == np.dtype(dtype) and store.feature_dim == 8
    assert 42 in store and 43 not in store and "42" not in store
    for r in records:
        assert_same(store[r.image_id], r, dtype)
    store[7].features[0, 0] = 1.0  # records own their memory: writable and independent of the txn
    assert read_metadata(tmp_path / "f.lmdb").dtype == dtype
    store.close()
    assert store[3].num_boxes == 100  # reopens after close


def test_float16_precision(tmp_path):
    rec = make_record(1, 36, d=64)
    with FeatureWriter(tmp_path / "f.lmdb") as writer:
        writer.put(rec)
    got = FeatureStore(tmp_path / "f.lmdb")[1].features
    np.testing.assert_allclose(got.astype(np.float32), rec.features, rtol=2**-10, atol=2**-14)


def test_layout_matches_docs(tmp_path):
    """Decode a raw LMDB value by the layout documented in docs/formats.md, without butd."""
    rec = make_record(5, 3, d=3, extras=True)  # 9 float16 values: 18 bytes, padded to 20
    with FeatureWriter(tmp_path / "f.lmdb") as writer:
        writer.put(rec)
    env = lmdb.open(str(tmp_path / "f.lmdb"), readonly=True, lock=False)
    with env.begin() as txn:
        raw, meta = txn.get(b"5"), txn.get(b"__meta__")
    env.close()
    assert b'"layout_version": 1' in meta and b'"feature_dim": 3' in meta
    magic, version, code, flags, n, d, w, h = struct.unpack_from("<4sHBBIIII", raw)
    assert (magic, version, code, flags, n, d, w, h) == (b"BUTF", 1, 1, 15, 3, 3, 645, 485)
    feats = np.frombuffer(raw, "<f2", 9, 24).reshape(3, 3)
    boxes = np.frombuffer(raw, "<f4", 12, 44).reshape(3, 4)
    objects = np.frombuffer(raw, "<i4", 3, 92)
    assert len(raw) == 24 + 20 + 48 + 4 * 12
    np.testing.assert_array_equal(feats, rec.features.astype(np.float16))
    np.testing.assert_array_equal(boxes, rec.boxes)
    np.testing.assert_array_equal(objects, rec.object_ids)


def test_missing_id_and_missing_path(tmp_path):
    with FeatureWriter(tmp_path / "f.lmdb") as writer:
        writer.put(make_record(1, 2))
    with pytest.raises(KeyError, match=r"image 99 .*f\.lmdb"):
        FeatureStore(tmp_path / "f.lmdb")[99]
    with pytest.raises(DataError, match="nowhere.lmdb does not exist"):
        FeatureStore(tmp_path / "nowhere.lmdb")
    FeatureWriter(tmp_path / "empty.lmdb").close()
    with pytest.raises(DataError, match="no metadata record"):
        FeatureStore(tmp_path / "empty.lmdb")


def test_mismatched_dtype_and_dim_refused(tmp_path):
    path = tmp_path / "f.lmdb"
    with FeatureWriter(path, dtype="float16") as writer:
        writer.put(make_record(1, 4, d=8))
        with pytest.raises(DataError, match="image 2: feature dim 16 does not match .* 8"):
            writer.put(make_record(2, 4, d=16))
    with pytest.raises(DataError, match="holds float16 features"):
        FeatureWriter(path, dtype="float32")
    with FeatureWriter(path, dtype="float16") as writer:  # reopened: dim comes from the metadata
        with pytest.raises(DataError, match="feature dim 4 does not match"):
            writer.put(make_record(3, 4, d=4))
    with pytest.raises(ConfigError, match="float64"):
        FeatureWriter(tmp_path / "g.lmdb", dtype="float64")
    assert FeatureStore(path).image_ids() == [1]


def _replace(rec: FeatureRecord, **changes) -> FeatureRecord:
    return FeatureRecord(**{**rec.__dict__, **changes})


@pytest.mark.parametrize("change, message", [
    (lambda r: _replace(r, features=np.where(np.eye(4, 8) > 0, np.nan, r.features)), "NaN or infinite"),
    (lambda r: _replace(r, features=r.features * 1e5), "overflow float16"),
    (lambda r: _replace(r, boxes=r.boxes[:3]), r"boxes must have shape \[4, 4\]"),
    (lambda r: _replace(r, boxes=r.boxes[:, :2]), r"boxes must have shape"),
    (lambda r: _replace(r, features=r.features[0]), r"features must have shape \[N, D\]"),
    (lambda r: _replace(r, features=r.features[:0], boxes=r.boxes[:0]), r"N, D >= 1"),
    (lambda r: _replace(r, object_ids=np.arange(3)), r"object_ids must have shape \[4\]"),
    (lambda r: _replace(r, object_ids=np.arange(4) - 1), "non-negative int32"),
    (lambda r: _replace(r, image_w=-1), "image_w must be a non-negative integer"),
])
def test_invalid_records_refused(tmp_path, change, message):
    with FeatureWriter(tmp_path / "f.lmdb") as writer:
        with pytest.raises(DataError, match=message) as info:
            writer.put(change(make_record(9, 4, d=8)))
        assert "image 9" in str(info.value)
        assert 9 not in writer


def test_put_skips_stored_ids(tmp_path):
    path = tmp_path / "f.lmdb"
    with FeatureWriter(path, commit_every=100) as writer:
        assert writer.put(make_record(1, 3))
        assert 1 in writer and not writer.put(make_record(1, 5, seed=0))  # pending
    with FeatureWriter(path) as writer:
        assert not writer.put(make_record(1, 5, seed=0))  # committed
        assert writer.put(make_record(2, 5))
    assert snapshot(path)[1].num_boxes == 3


def test_resume_after_exception_in_with(tmp_path):
    records = [make_record(i, 5 + i, extras=i % 2 == 0) for i in range(10)]
    with FeatureWriter(tmp_path / "ref.lmdb", commit_every=3) as writer:
        for r in records:
            writer.put(r)
    path = tmp_path / "f.lmdb"
    with pytest.raises(RuntimeError):
        with FeatureWriter(path, commit_every=3) as writer:
            for r in records[:7]:
                writer.put(r)
            raise RuntimeError("job killed")
    assert FeatureStore(path).image_ids() == list(range(6))  # two full batches; the pending 7th dropped
    for i, rec in snapshot(path).items():
        assert_same(rec, records[i], "float16")
    with FeatureWriter(path, commit_every=3) as writer:
        assert [writer.put(r) for r in records] == [False] * 6 + [True] * 4
    got, want = snapshot(path), snapshot(tmp_path / "ref.lmdb")
    assert got.keys() == want.keys()
    for i in want:
        assert_same(got[i], want[i], "float16")


def _constant_record(i: int) -> FeatureRecord:
    return FeatureRecord(i, np.full((20 + i, 8), i, np.float32), np.full((20 + i, 4), i, np.float32), 100, 50)


def test_resume_after_kill(tmp_path):
    """A writer process killed by SIGKILL mid-batch leaves exactly its committed, complete records."""
    script = textwrap.dedent(f"""
        import os, signal
        import numpy as np
        from butd.data.store import FeatureRecord, FeatureWriter
        writer = FeatureWriter({str(tmp_path / "f.lmdb")!r}, commit_every=4)
        for i in range(10):
            writer.put(FeatureRecord(i, np.full((20 + i, 8), i, np.float32), np.full((20 + i, 4), i, np.float32),
                                     100, 50))
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=60)
    assert proc.returncode == -9, proc.stderr.decode()
    partial = snapshot(tmp_path / "f.lmdb")
    assert sorted(partial) == list(range(8))  # two committed batches; the pending two are gone
    for i, rec in partial.items():
        assert_same(rec, _constant_record(i), "float16")
    with FeatureWriter(tmp_path / "f.lmdb", commit_every=4) as writer:
        assert [writer.put(_constant_record(i)) for i in range(10)] == [False] * 8 + [True] * 2
    got = snapshot(tmp_path / "f.lmdb")
    assert sorted(got) == list(range(10))
    for i in range(10):
        assert_same(got[i], _constant_record(i), "float16")


def test_map_grows_when_full(tmp_path):
    path = tmp_path / "f.lmdb"
    records = [make_record(i, 50, d=64) for i in range(40)]  # ~13 KiB each in float32, 520 KiB in all
    with FeatureWriter(path, dtype="float32", commit_every=8, map_size=64 * 1024) as writer:
        for r in records:
            writer.put(r)
    assert (path / "data.mdb").stat().st_size > 512 * 1024
    got = snapshot(path)
    for r in records:
        assert_same(got[r.image_id], r, "float32")


class StoreDataset(torch.utils.data.Dataset):
    def __init__(self, store: FeatureStore) -> None:
        self.store, self.ids = store, store.image_ids()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        rec = self.store[self.ids[i]]
        # The env this process reads through must have been opened by this very process.
        return rec.image_id, torch.from_numpy(rec.features.astype(np.float32)), self.store._pid == os.getpid()


def test_worker_safe_reading(tmp_path):
    path = tmp_path / "f.lmdb"
    with FeatureWriter(path) as writer:
        for i in range(12):
            writer.put(make_record(i, 6))
    store = FeatureStore(path)
    expected = {i: store[i].features.astype(np.float32) for i in store.image_ids()}  # env opened in the parent
    loader = torch.utils.data.DataLoader(StoreDataset(store), batch_size=None, num_workers=2)
    seen = set()
    for image_id, feats, own_env in loader:
        assert own_env
        np.testing.assert_array_equal(feats.numpy(), expected[int(image_id)])
        seen.add(int(image_id))
    assert seen == set(range(12))
    clone = pickle.loads(pickle.dumps(store))  # spawn-started workers receive a pickled store
    assert clone._env is None and len(clone) == 12
    np.testing.assert_array_equal(clone[3].features, store[3].features)


def test_corrupt_record_reported(tmp_path):
    path = tmp_path / "f.lmdb"
    with FeatureWriter(path) as writer:
        writer.put(make_record(4, 3))
    env = lmdb.open(str(path))
    with env.begin(write=True) as txn:
        txn.put(b"4", txn.get(b"4")[:-2])
    env.close()
    with pytest.raises(DataError, match=r"image 4 is corrupt: expected \d+ bytes"):
        FeatureStore(path)[4]


def test_stores_share_a_path_and_block_writers(tmp_path):
    path = tmp_path / "f.lmdb"
    with FeatureWriter(path) as writer:
        writer.put(make_record(1, 2))
    train, val = FeatureStore(path), FeatureStore(path)  # e.g. two datasets over one feature file
    train.close()
    assert val[1].num_boxes == 2
    with pytest.raises(DataError, match="close the FeatureStore / FeatureWriter using this path"):
        FeatureWriter(path)
    val.close()
    with FeatureWriter(path) as writer:
        assert writer.put(make_record(2, 3))
