"""LMDB store of per-image region features: one versioned binary record per image id.

``FeatureStore`` reads (lazily, one environment per process, never across fork); ``FeatureWriter`` writes in
batched transactions, grows the map when it fills and skips ids already present, so a killed job resumes. The
record layout lives in ``butd.data.layout`` and is documented in docs/formats.md ("Feature store").
"""
from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import lmdb
import numpy as np

from butd.data.layout import (
    LAYOUT_VERSION,
    META_KEY,
    FeatureRecord,
    RecordHeader,
    StoreMetadata,
    check_dtype_name,
    decode_header,
    decode_record,
    encode_record,
    image_key,
    validate_record,
)
from butd.errors import ConfigError, DataError

__all__ = ["LAYOUT_VERSION", "FeatureRecord", "FeatureStore", "FeatureWriter", "RecordHeader", "StoreMetadata",
           "read_metadata", "validate_record", "encode_record", "decode_record", "decode_header", "image_key"]
# LMDB allows one environment per file per process: a FeatureStore and a FeatureWriter on one path cannot coexist.
_ALREADY_OPEN_HINT = "; close the FeatureStore / FeatureWriter using this path in this process first"


class _ReadEnvs:
    """The read-only LMDB environments of this process, shared by its FeatureStores.

    LMDB allows one environment per file per process, so two stores on one path share an env (reference counted).
    A forked child drops what it inherited: an env must never be used across fork.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._envs: dict[str, list] = {}  # real path -> [env, number of stores using it]

    def acquire(self, path: Path) -> lmdb.Environment:
        key = os.path.realpath(path)
        with self._lock:
            entry = self._envs.get(key)
            if entry is None:
                try:
                    env = lmdb.open(key, readonly=True, lock=False, readahead=False, subdir=True, max_readers=1024)
                except lmdb.Error as exc:
                    raise DataError(f"{path}: cannot open feature store ({exc})"
                                    + _ALREADY_OPEN_HINT * ("already open" in str(exc))) from None
                entry = self._envs[key] = [env, 0]
            entry[1] += 1
            return entry[0]

    def release(self, path: Path) -> None:
        key = os.path.realpath(path)
        with self._lock:
            entry = self._envs.get(key)
            if entry is not None:
                entry[1] -= 1
                if entry[1] <= 0:
                    entry[0].close()
                    del self._envs[key]

    def after_fork_in_child(self) -> None:
        # Closing only unmaps the files in this process; these envs are read-only and lock-free (lock=False),
        # so nothing is shared with the parent. It also frees the paths for this process's own envs.
        self._lock = threading.Lock()
        for env, _ in self._envs.values():
            env.close()
        self._envs.clear()


_READ_ENVS = _ReadEnvs()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_READ_ENVS.after_fork_in_child)


def read_metadata(path: str | Path) -> StoreMetadata | None:
    """Metadata of the store at ``path``; None if the path does not exist or holds no metadata yet."""
    path = Path(path)
    if not (path / "data.mdb").is_file():
        return None
    env = _READ_ENVS.acquire(path)
    try:
        with env.begin() as txn:
            raw = txn.get(META_KEY)
        return None if raw is None else StoreMetadata.from_bytes(raw, path)
    finally:
        _READ_ENVS.release(path)


def _key_image_id(key: bytes, path: Path) -> int:
    """The image id a record key spells; DataError for a key that butd did not write (another program's entry)."""
    if not key.isdigit():
        raise DataError(f"{path}: key {key[:40]!r} is not an image id; the store holds entries that butd did not "
                        "write (rebuild it in a new folder)")
    return int(key)


class FeatureStore:
    """Read-only view of a feature store.

    The LMDB environment is opened lazily in each process (the pid is checked on every access), so a store created
    in the parent can be handed to DataLoader workers: a worker never uses the parent's environment. Do not read
    a store while a writer is adding to it (readers take no locks).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise DataError(f"feature store {self.path} does not exist")
        if not (self.path / "data.mdb").is_file():
            raise DataError(f"{self.path} is not an LMDB feature store (no data.mdb inside)")
        self._env: lmdb.Environment | None = None
        self._pid = -1
        self._ids: list[int] | None = None
        with self._txn() as txn:
            raw = txn.get(META_KEY)
        entries = self._env.stat()["entries"]
        if raw is None:
            self.close()
            raise DataError(f"{self.path}: no metadata record (empty store, or not written by butd)")
        self.metadata = StoreMetadata.from_bytes(raw, self.path)
        self.feature_dim: int = self.metadata.feature_dim
        self.dtype: np.dtype = np.dtype(self.metadata.dtype)
        self._len = entries - 1

    def _txn(self) -> lmdb.Transaction:
        if self._env is None or self._pid != os.getpid():
            self._env = _READ_ENVS.acquire(self.path)
            self._pid = os.getpid()
        return self._env.begin(buffers=True)

    def __len__(self) -> int:
        return self._len

    def image_ids(self) -> list[int]:
        """All stored image ids, sorted ascending."""
        if self._ids is None:
            with self._txn() as txn:
                keys = [bytes(k) for k in txn.cursor().iternext(keys=True, values=False)]
            self._ids = sorted(_key_image_id(k, self.path) for k in keys if k != META_KEY)
        return list(self._ids)

    def __contains__(self, image_id: object) -> bool:
        if not isinstance(image_id, (int, np.integer)):
            return False
        with self._txn() as txn:
            return txn.get(image_key(image_id)) is not None

    def __getitem__(self, image_id: int) -> FeatureRecord:
        with self._txn() as txn:
            buf = txn.get(image_key(image_id))
            if buf is None:
                raise KeyError(f"image {image_id} is not in feature store {self.path}")
            return decode_record(int(image_id), buf, self.path)

    def headers(self) -> Iterator[RecordHeader]:
        """Headers of all records in key order, without decoding the feature arrays."""
        with self._txn() as txn:
            for key, buf in txn.cursor():
                if bytes(key) != META_KEY:
                    yield decode_header(_key_image_id(bytes(key), self.path), buf, self.path)

    def close(self) -> None:
        """Release this process's environment (closed when no other store uses it); a later access reopens it."""
        if self._env is not None and self._pid == os.getpid():
            _READ_ENVS.release(self.path)
        self._env = None

    def __del__(self) -> None:
        # Frees the path for a FeatureWriter in this process when a store is dropped without close().
        if getattr(self, "_env", None) is not None:
            self.close()

    def __getstate__(self) -> dict:
        # Pickled for spawn-started workers: never ship an open environment.
        state = self.__dict__.copy()
        state["_env"], state["_pid"] = None, -1
        return state

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.path)!r}, images={self._len}, dim={self.feature_dim}, dtype={self.dtype})"


class FeatureWriter:
    """Writes records into a (new or existing) feature store; use it as a context manager.

    Records are committed in batches of ``commit_every``; each batch is one LMDB transaction, so a killed job leaves
    only complete records behind, and ids already stored are skipped (``put`` returns False) so a rerun resumes.
    The map grows automatically (doubling) when it is full. An exception inside ``with`` drops the uncommitted
    batch; leaving the block normally commits it.
    """

    def __init__(self, path: str | Path, *, dtype: str = "float16", commit_every: int = 256,
                 map_size: int = 1 << 30) -> None:
        self.path = Path(path)
        self.dtype = check_dtype_name(dtype)
        if commit_every < 1:
            raise ConfigError(f"commit_every must be >= 1, got {commit_every}")
        if self.path.exists() and not self.path.is_dir():
            raise DataError(f"{self.path} exists and is not a directory (an LMDB feature store is a directory)")
        if self.path.is_dir() and not (self.path / "data.mdb").exists() and any(self.path.iterdir()):
            raise DataError(f"{self.path} is a folder with other files in it, not a feature store; refusing to "
                            "write there (choose a new output path)")
        self.commit_every = commit_every
        self.committed = 0  # records committed by this writer
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            self._env: lmdb.Environment | None = lmdb.open(str(self.path), map_size=map_size, subdir=True,
                                                           meminit=False, max_readers=1024)
        except lmdb.Error as exc:
            raise DataError(f"{self.path}: cannot open feature store for writing ({exc})"
                            + _ALREADY_OPEN_HINT * ("already open" in str(exc))) from None
        self._pending: dict[int, bytes] = {}
        with self._env.begin() as txn:
            raw = txn.get(META_KEY)
        if raw is None and self._env.stat()["entries"]:
            # Another program's LMDB: butd records added to it would sit beside keys its readers cannot parse.
            entries = self._env.stat()["entries"]
            self._env.close()
            self._env = None
            raise DataError(f"{self.path} is an LMDB database that is not a butd feature store ({entries} entries, "
                            "no butd metadata record); refusing to write into it (choose a new output path)")
        self._meta = None if raw is None else StoreMetadata.from_bytes(raw, self.path)
        if self._meta is not None and self._meta.dtype != self.dtype:
            self._env.close()
            self._env = None
            raise DataError(f"{self.path} holds {self._meta.dtype} features; refusing to add {self.dtype} "
                            f"records (use dtype={self._meta.dtype!r} or a new store)")
        self._feature_dim = None if self._meta is None else self._meta.feature_dim

    @property
    def feature_dim(self) -> int | None:
        """Feature dimension of the store (None until the first record of a new store)."""
        return self._feature_dim

    def _live_env(self) -> lmdb.Environment:
        if self._env is None:
            raise DataError(f"feature writer for {self.path} is closed")
        return self._env

    def __contains__(self, image_id: object) -> bool:
        """True if the id is stored already, committed or pending."""
        if not isinstance(image_id, (int, np.integer)):
            return False
        if int(image_id) in self._pending:
            return True
        with self._live_env().begin() as txn:
            return txn.get(image_key(image_id)) is not None

    def put(self, record: FeatureRecord) -> bool:
        """Validate and queue a record; False (nothing written) if its image id is already stored."""
        if record.image_id in self:
            return False
        validate_record(record, feature_dim=self._feature_dim)
        blob = encode_record(record, self.dtype)
        if self._feature_dim is None:
            self._feature_dim = int(record.features.shape[1])
        self._pending[int(record.image_id)] = blob
        if len(self._pending) >= self.commit_every:
            self.commit()
        return True

    def commit(self) -> None:
        """Write the pending records (and, for a new store, the metadata record) in one transaction."""
        env = self._live_env()
        if not self._pending:
            return
        meta = self._meta or StoreMetadata(LAYOUT_VERSION, self.dtype, int(self._feature_dim))
        while True:
            try:
                with env.begin(write=True) as txn:
                    if self._meta is None:
                        txn.put(META_KEY, meta.to_bytes())
                    for image_id, blob in self._pending.items():
                        txn.put(image_key(image_id), blob, overwrite=False)
                break
            except lmdb.MapFullError:
                # The failed transaction was aborted whole; grow the map and replay the batch.
                env.set_mapsize(env.info()["map_size"] * 2)
        self._meta = meta
        self.committed += len(self._pending)
        self._pending.clear()

    def close(self) -> None:
        """Commit what is pending and close the environment (idempotent)."""
        if self._env is None:
            return
        try:
            self.commit()
        finally:
            self._env.close()
            self._env = None

    def abort(self) -> None:
        """Drop the pending (uncommitted) records and close the environment."""
        self._pending.clear()
        if self._env is not None:
            self._env.close()
            self._env = None

    def __enter__(self) -> FeatureWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
