"""Batches for training and validation: one item per image, padded into a :class:`Batch`.

Data order is a pure function of ``(seed, epoch, rank, world_size)`` and the caption rows drawn for an image of
``(seed, epoch, image_id)``. Nothing depends on worker processes or on the global RNG, so a run resumed at
``(epoch, start_batch)`` sees exactly the batches an uninterrupted run would have seen.

``data.cache`` keeps a whole split's region features in padded tensors (CPU memory or the GPU); batches are
then gathered by indexing those tensors in the main process instead of reading LMDB in workers.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from butd.core.batch import Batch, Example, collate
from butd.data.caption_choice import choose_caption_rows
from butd.data.captions import CaptionData
from butd.data.store import FeatureStore
from butd.errors import DataError

ItemKey = tuple[int, int]  # (dataset index, epoch): the epoch seeds the caption choice


class CaptionDataset(Dataset):
    """Item ``i`` (or ``(i, epoch)``) -> :class:`Example` of the ``i``-th image of ``split``."""

    def __init__(self, data: CaptionData, features_path: str | Path, split: str, *, seq_per_img: int = 5,
                 seed: int = 0, max_boxes: int = 0, with_labels: bool = True) -> None:
        if seq_per_img < 1:
            raise ValueError(f"seq_per_img must be >= 1, got {seq_per_img}")
        self.data = data
        self.split = split
        self.image_ids = data.split_ids(split)
        self.store = FeatureStore(features_path)  # opens LMDB lazily, once per process
        self.seq_per_img = seq_per_img
        self.seed = seed
        self.max_boxes = max_boxes
        self.with_labels = with_labels
        self.cache: FeatureCache | None = None

    def __len__(self) -> int:
        return len(self.image_ids)

    def labels_for_batch(self, indices: Sequence[int] | np.ndarray, epoch: int) -> np.ndarray:
        """The ``seq_per_img`` label rows of items ``indices`` in ``epoch``: [B, seq_per_img, max_length].

        A pure function of (seed, epoch, image id), computed for the whole batch at once
        (``butd.data.caption_choice``)."""
        image_ids = self.image_ids[np.asarray(indices, dtype=np.int64)]
        starts, counts = self.data.caption_ranges(image_ids)
        chosen = choose_caption_rows(counts, self.seq_per_img, seed=self.seed, epoch=epoch, image_ids=image_ids)
        return self.data.label_rows(starts[:, None] + chosen)

    def labels_for(self, index: int, epoch: int) -> np.ndarray:
        """The ``seq_per_img`` label rows of item ``index`` in ``epoch`` (deterministic): [seq_per_img, max_length]."""
        return self.labels_for_batch([index], epoch)[0]

    def __getitem__(self, key: int | ItemKey) -> Example:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        image_id = int(self.image_ids[index])
        return Example.from_record(self.store[image_id], max_boxes=self.max_boxes,
                                   labels=self.labels_for(index, epoch) if self.with_labels else None)

    def use_cache(self, device: torch.device | str = "cpu") -> None:
        """Load every region feature of the split into resident tensors on ``device`` (``data.cache``)."""
        self.cache = FeatureCache.load(self.store, self.image_ids, max_boxes=self.max_boxes, device=device)


def require_features(store: FeatureStore, data: CaptionData, splits: Sequence[str]) -> None:
    """DataError (with the count and the first missing ids) unless every image of ``splits`` is in ``store``."""
    stored = set(store.image_ids())
    for split in splits:
        ids = data.split_ids(split)
        missing = [int(i) for i in ids if int(i) not in stored]
        if missing:
            raise DataError(f"{len(missing)} of the {len(ids)} {split} images of {data.data_dir} have no features "
                            f"in {store.path}, e.g. {missing[:10]}; extract or convert features for them first")


class EpochBatchSampler(Sampler[list[ItemKey]]):
    """The batches of one epoch for one rank, starting at batch ``start_batch``.

    The epoch's permutation is seeded by ``(seed, epoch)``; it is padded by wrapping around to a multiple of
    ``world_size`` so every rank gets the same number of batches (DDP needs equal step counts), and rank ``r``
    takes positions ``r, r + world_size, ...``. The last batch of a rank may be smaller than ``batch_size``.
    """

    def __init__(self, num_items: int, *, batch_size: int, shuffle: bool, seed: int, epoch: int,
                 start_batch: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if num_items < 1 or batch_size < 1:
            raise ValueError(f"need at least one item and batch_size >= 1, got {num_items} items, "
                             f"batch_size {batch_size}")
        if shuffle:
            generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
            order = torch.randperm(num_items, generator=generator)
        else:
            order = torch.arange(num_items)
        padded = -(-num_items // world_size) * world_size
        order = torch.cat([order, order[: padded - num_items]]) if padded > num_items else order
        mine = order[rank::world_size].tolist()
        self.batches = [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]
        if not 0 <= start_batch <= len(self.batches):
            raise ValueError(f"start_batch {start_batch} is outside the epoch's {len(self.batches)} batches")
        self.start_batch = start_batch
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[ItemKey]]:
        for batch in self.batches[self.start_batch:]:
            yield [(index, self.epoch) for index in batch]

    def __len__(self) -> int:
        return len(self.batches) - self.start_batch


def batches_per_epoch(num_items: int, *, batch_size: int, world_size: int = 1) -> int:
    """How many batches each rank gets per epoch (see :class:`EpochBatchSampler`)."""
    per_rank = -(-num_items // world_size)
    return -(-per_rank // batch_size)


def build_loader(dataset: CaptionDataset, *, batch_size: int, shuffle: bool, num_workers: int, seed: int,
                 epoch: int, start_batch: int = 0, rank: int = 0, world_size: int = 1,
                 pin_memory: bool = False) -> Iterable[Batch]:
    """Batches of ``dataset`` for one epoch from batch ``start_batch`` on, for ``rank`` of ``world_size``.

    A ``DataLoader`` reading the store in ``num_workers`` processes, or, when the dataset has a feature cache,
    a loader that gathers each batch from the cache's tensors (on the cache's device).
    """
    sampler = EpochBatchSampler(len(dataset), batch_size=batch_size, shuffle=shuffle, seed=seed, epoch=epoch,
                                start_batch=start_batch, rank=rank, world_size=world_size)
    if dataset.cache is not None:
        return CachedLoader(dataset, sampler)
    # Its own generator: the loader must not draw from the global RNG, which drives dropout and sampling
    # and is restored exactly on resume.
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate,
                      pin_memory=pin_memory, generator=torch.Generator().manual_seed(seed + epoch))


@dataclass
class FeatureCache:
    """Region features of a whole split in padded resident tensors (row ``i`` = dataset item ``i``)."""

    features: torch.Tensor  # [I, Nmax, D] in the store's dtype (float16 halves the memory)
    boxes: torch.Tensor  # [I, Nmax, 4] float32
    image_size: torch.Tensor  # [I, 2] float32
    num_boxes: torch.Tensor  # [I] int64

    @classmethod
    def load(cls, store: FeatureStore, image_ids: np.ndarray, *, max_boxes: int = 0,
             device: torch.device | str = "cpu", chunk: int = 1024) -> FeatureCache:
        """Read ``image_ids`` from ``store``; filled chunk by chunk so host memory stays small for a GPU cache."""
        # Headers only: the padded size is known before any feature array is decoded.
        count_of = {h.image_id: h.num_boxes for h in store.headers()}
        counts = [count_of[int(i)] for i in image_ids]
        nmax = max(counts) if max_boxes <= 0 else min(max(counts), max_boxes)
        dtype = torch.float16 if np.dtype(store.dtype) == np.float16 else torch.float32
        features = torch.zeros(len(image_ids), nmax, store.feature_dim, dtype=dtype, device=device)
        boxes = torch.zeros(len(image_ids), nmax, 4, dtype=torch.float32, device=device)
        sizes = torch.zeros(len(image_ids), 2, dtype=torch.float32)
        num = torch.zeros(len(image_ids), dtype=torch.int64)
        for start in range(0, len(image_ids), chunk):
            ids = image_ids[start:start + chunk]
            part_f = torch.zeros(len(ids), nmax, store.feature_dim, dtype=dtype)
            part_b = torch.zeros(len(ids), nmax, 4, dtype=torch.float32)
            for j, image_id in enumerate(ids):
                record = store[int(image_id)]
                k = min(record.num_boxes, nmax)
                part_f[j, :k] = torch.from_numpy(np.asarray(record.features[:k])).to(dtype)
                part_b[j, :k] = torch.from_numpy(np.asarray(record.boxes[:k], dtype=np.float32))
                sizes[start + j] = torch.tensor([record.image_w, record.image_h], dtype=torch.float32)
                num[start + j] = k
            features[start:start + len(ids)] = part_f.to(device)
            boxes[start:start + len(ids)] = part_b.to(device)
        return cls(features=features, boxes=boxes, image_size=sizes.to(device), num_boxes=num.to(device))

    def gather(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(features float32, boxes, image_size, region_mask) of rows ``index``, cut to their largest count."""
        index = index.to(self.features.device)
        num = self.num_boxes[index]
        n = int(num.max())
        mask = torch.arange(n, device=num.device).unsqueeze(0) < num.unsqueeze(1)
        return (self.features[index, :n].float(), self.boxes[index, :n], self.image_size[index], mask)


class CachedLoader:
    """One epoch of batches gathered from a :class:`FeatureCache` (labels chosen as in the DataLoader path)."""

    def __init__(self, dataset: CaptionDataset, sampler: EpochBatchSampler) -> None:
        self.dataset = dataset
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[Batch]:
        cache = self.dataset.cache
        assert cache is not None
        for keys in self.sampler:
            rows = [index for index, _ in keys]
            index = torch.tensor(rows, dtype=torch.int64)
            features, boxes, image_size, mask = cache.gather(index)
            labels = None
            if self.dataset.with_labels:
                epoch = keys[0][1]  # the sampler gives every key of a batch the same epoch
                labels = torch.from_numpy(self.dataset.labels_for_batch(rows, epoch)).to(features.device)
            image_ids = torch.from_numpy(self.dataset.image_ids[rows]).to(features.device)
            yield Batch(image_ids=image_ids, features=features, boxes=boxes, image_size=image_size,
                        region_mask=mask, labels=labels)
