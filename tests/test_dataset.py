"""Batches: padding, caption choice, a resumable seeded data order that is rank aware, feature caches."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from butd.data.caption_choice import choose_caption_rows
from butd.data.captions import CaptionData
from butd.data.dataset import (Batch, CaptionDataset, EpochBatchSampler, batches_per_epoch, build_loader,
                               collate, require_features)
from butd.errors import DataError
from train_fixtures import FEATURE_DIM, make_tiny_dataset


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    data_dir, features = make_tiny_dataset(tmp_path_factory.mktemp("tiny"), num_images=30)
    return CaptionData.load(data_dir), features


def batches_of(loader) -> list[Batch]:
    return list(loader)


def assert_same_batches(a: list[Batch], b: list[Batch]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for name in ("image_ids", "features", "boxes", "image_size", "region_mask", "labels"):
            assert torch.equal(getattr(x, name), getattr(y, name)), name


def test_collate_pads_regions_and_masks_them(tiny):
    data, features = tiny
    dataset = CaptionDataset(data, features, "train", seq_per_img=5)
    items = [dataset[i] for i in range(3)]
    batch = collate(items)
    counts = [item.features.shape[0] for item in items]
    assert batch.features.shape == (3, max(counts), FEATURE_DIM) and batch.features.dtype == torch.float32
    assert batch.region_mask.sum(dim=1).tolist() == counts
    assert bool((batch.features[~batch.region_mask] == 0).all()) and bool((batch.boxes[~batch.region_mask] == 0).all())
    assert batch.labels.shape == (3, 5, data.max_length)
    assert batch.image_ids.tolist() == [int(i) for i in data.split_ids("train")[:3]]
    assert batch.image_size[0].tolist() == [64.0, 48.0]
    assert batch.to("cpu").labels is not None and len(batch) == 3


def test_choose_caption_rows_subsets_or_samples_with_replacement():
    counts = np.array([3, 7, 5, 1, 6] * 40)
    image_ids = np.arange(len(counts)) * 11
    chosen = choose_caption_rows(counts, 5, seed=0, epoch=2, image_ids=image_ids)
    assert chosen.shape == (200, 5) and (chosen >= 0).all() and (chosen < counts[:, None]).all()
    for rows, k in zip(chosen, counts):
        if k >= 5:
            assert len(set(rows.tolist())) == 5  # drawn without replacement
        else:
            assert set(rows.tolist()) == set(range(k))  # every caption used, some repeated
    # Random order: with fewer captions, the repeats are not always at the end; with more, not always ascending.
    three = chosen[counts == 3]
    assert len({tuple(r) for r in three}) > 10 and not all(tuple(r[:3]) == (0, 1, 2) for r in three)
    assert not all((np.diff(r) > 0).all() for r in chosen[counts == 7])


def test_choose_caption_rows_is_a_function_of_seed_epoch_and_image_only():
    counts, image_ids = np.array([7, 4, 6]), np.array([5, 9, 13])
    batch = choose_caption_rows(counts, 5, seed=1, epoch=3, image_ids=image_ids)
    for i in range(3):  # the same rows alone, in another batch, or in another order
        assert np.array_equal(choose_caption_rows(counts[i:i + 1], 5, seed=1, epoch=3, image_ids=image_ids[i:i + 1]),
                              batch[i:i + 1])
    assert np.array_equal(choose_caption_rows(counts[::-1], 5, seed=1, epoch=3, image_ids=image_ids[::-1]),
                          batch[::-1])
    many = np.full(50, 7)
    ids = np.arange(50)
    first = choose_caption_rows(many, 5, seed=1, epoch=0, image_ids=ids)
    assert not np.array_equal(first, choose_caption_rows(many, 5, seed=1, epoch=1, image_ids=ids))
    assert not np.array_equal(first, choose_caption_rows(many, 5, seed=2, epoch=0, image_ids=ids))
    with pytest.raises(ValueError, match="image 9 has no caption"):
        choose_caption_rows(np.array([3, 0]), 5, seed=0, epoch=0, image_ids=np.array([5, 9]))


def test_caption_choice_is_uniform_over_an_images_captions():
    """Over many epochs each of 7 captions is one of the 5 chosen equally often (5/7 of the epochs)."""
    epochs = np.arange(3000)
    hits = np.zeros(7)
    for epoch in epochs[:3000]:
        hits += np.bincount(choose_caption_rows(np.array([7]), 5, seed=0, epoch=int(epoch),
                                                image_ids=np.array([42]))[0], minlength=7)
    assert np.allclose(hits / len(epochs), 5 / 7, atol=0.03)


def test_caption_choice_is_seeded_per_epoch_and_image(tiny):
    data, features = tiny
    dataset = CaptionDataset(data, features, "train", seq_per_img=2, seed=1)
    again = CaptionDataset(data, features, "train", seq_per_img=2, seed=1)
    many = next(i for i in range(len(dataset)) if len(data.labels(int(dataset.image_ids[i]))) >= 6)
    assert np.array_equal(dataset.labels_for(many, 0), again.labels_for(many, 0))
    epochs = {dataset.labels_for(many, e).tobytes() for e in range(6)}
    assert len(epochs) > 1  # a different subset in some epoch


def test_max_boxes_keeps_the_first_regions(tiny):
    data, features = tiny
    dataset = CaptionDataset(data, features, "train", max_boxes=3)
    assert max(dataset[i].features.shape[0] for i in range(len(dataset))) == 3


def test_sampler_order_is_seeded_and_resumes_mid_epoch():
    full = [b for b in EpochBatchSampler(23, batch_size=4, shuffle=True, seed=5, epoch=2)]
    assert full == list(EpochBatchSampler(23, batch_size=4, shuffle=True, seed=5, epoch=2))
    assert full != list(EpochBatchSampler(23, batch_size=4, shuffle=True, seed=5, epoch=3))
    assert sorted(i for b in full for i, _ in b) == list(range(23))
    assert all(epoch == 2 for b in full for _, epoch in b)
    tail = list(EpochBatchSampler(23, batch_size=4, shuffle=True, seed=5, epoch=2, start_batch=4))
    assert tail == full[4:] and len(full) == batches_per_epoch(23, batch_size=4) == 6


def test_sampler_splits_an_epoch_across_ranks():
    per_rank = [list(EpochBatchSampler(23, batch_size=4, shuffle=True, seed=5, epoch=0, rank=r, world_size=3))
                for r in range(3)]
    assert len({len(batches) for batches in per_rank}) == 1  # equal step counts (DDP needs them)
    assert len(per_rank[0]) == batches_per_epoch(23, batch_size=4, world_size=3)
    seen = [i for batches in per_rank for b in batches for i, _ in b]
    assert len(seen) == 24 and set(seen) == set(range(23))  # one item repeated to pad 23 to 24


def test_loader_batches_do_not_depend_on_workers_or_global_rng(tiny):
    data, features = tiny
    dataset = CaptionDataset(data, features, "train", seq_per_img=3, seed=2)
    args = dict(batch_size=4, shuffle=True, seed=2, epoch=1)
    torch.manual_seed(0)
    plain = batches_of(build_loader(dataset, num_workers=0, **args))
    state = torch.get_rng_state()
    torch.manual_seed(99)
    workers = batches_of(build_loader(dataset, num_workers=2, **args))
    assert_same_batches(plain, workers)
    torch.manual_seed(0)
    build_loader(dataset, num_workers=0, **args).__iter__()
    assert torch.equal(torch.get_rng_state(), state)  # building/iterating a loader draws nothing globally


@pytest.mark.parametrize("max_boxes", [0, 4])
def test_memory_cache_gives_the_same_batches(tiny, max_boxes):
    data, features = tiny
    plain_set = CaptionDataset(data, features, "train", seq_per_img=3, seed=2, max_boxes=max_boxes)
    cached_set = CaptionDataset(data, features, "train", seq_per_img=3, seed=2, max_boxes=max_boxes)
    cached_set.use_cache("cpu")
    args = dict(batch_size=5, shuffle=True, num_workers=0, seed=2, epoch=3, start_batch=1)
    assert_same_batches(batches_of(build_loader(plain_set, **args)), batches_of(build_loader(cached_set, **args)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU feature cache needs CUDA")
def test_gpu_cache_batches_live_on_the_gpu(tiny):
    data, features = tiny
    dataset = CaptionDataset(data, features, "train", seq_per_img=3)
    dataset.use_cache("cuda")
    batch = next(iter(build_loader(dataset, batch_size=4, shuffle=True, num_workers=0, seed=0, epoch=0)))
    assert batch.features.is_cuda and batch.labels.is_cuda and batch.region_mask.is_cuda


def test_missing_features_are_counted_and_named(tmp_path):
    data_dir, features = make_tiny_dataset(tmp_path, num_images=12, missing_features=(14, 21))
    dataset = CaptionDataset(CaptionData.load(data_dir), features, "train")
    with pytest.raises(DataError, match=r"2 of the 8 train images .* \[14, 21\]"):
        require_features(dataset.store, dataset.data, ("train", "val"))
