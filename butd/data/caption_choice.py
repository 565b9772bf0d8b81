"""Which of an image's captions a training batch uses, chosen for a whole batch at once.

Each image contributes ``seq_per_img`` label rows per epoch: a random subset of its captions when it has more, and
all of them plus extra rows drawn with replacement (shuffled) when it has fewer, so every caption is seen. The
choice is a pure function of ``(seed, epoch, image id)``: the same whatever batch, worker or process the image lands
in, so a resumed run and a ``data.cache`` run see exactly the captions the DataLoader path would. Randomness comes
from a counter-based hash (splitmix64) instead of one seeded generator per image, which cost ~0.1 ms an image:
at batch 250 that was tens of milliseconds of Python per step on the GPU's critical path.
"""
from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_PERMUTE, _EXTRA, _SHUFFLE = 1, 2, 3  # independent random streams per image


def _splitmix64(z: np.ndarray) -> np.ndarray:
    """One splitmix64 step on uint64 arrays (wrapping arithmetic is the algorithm's, not an overflow)."""
    z = z + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def hashed_uniform(seed: int, epoch: int, image_ids: np.ndarray, stream: int, slots: int) -> np.ndarray:
    """Uniform floats in [0, 1), [len(image_ids), slots]: a deterministic function of every argument and the slot."""
    with np.errstate(over="ignore"):
        key = _splitmix64(np.asarray([seed], dtype=np.int64).view(np.uint64))
        key = _splitmix64(key ^ np.asarray([epoch], dtype=np.int64).view(np.uint64))
        per_image = _splitmix64(key ^ np.asarray(image_ids, dtype=np.int64).view(np.uint64))[:, None]
        counters = (np.uint64(stream) << np.uint64(32)) | np.arange(slots, dtype=np.uint64)[None, :]
        bits = _splitmix64(per_image ^ _splitmix64(counters))
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53


def choose_caption_rows(counts: np.ndarray, seq_per_img: int, *, seed: int, epoch: int,
                        image_ids: np.ndarray) -> np.ndarray:
    """For images with ``counts`` [B] captions -> [B, seq_per_img] indices into each image's own captions.

    ``counts[b] >= seq_per_img``: distinct captions in random order. Fewer: every caption once, the rest drawn
    with replacement, in random order.
    """
    counts = np.asarray(counts, dtype=np.int64)
    if counts.size and counts.min() < 1:
        raise ValueError(f"image {int(np.asarray(image_ids)[counts.argmin()])} has no caption to train on")
    width = max(int(counts.max(initial=0)), seq_per_img)
    # A random permutation of each image's captions: sort random keys, the padding slots last.
    keys = hashed_uniform(seed, epoch, image_ids, _PERMUTE, width)
    keys[np.arange(width)[None, :] >= counts[:, None]] = np.inf
    permutation = np.argsort(keys, axis=1, kind="stable")[:, :seq_per_img]
    extra = (hashed_uniform(seed, epoch, image_ids, _EXTRA, seq_per_img) * counts[:, None]).astype(np.int64)
    short = np.arange(seq_per_img)[None, :] >= counts[:, None]  # slots beyond an image's own captions
    chosen = np.where(short, extra, permutation)
    # Images with fewer captions than slots: shuffle, so the repeated captions are not always last.
    order = np.argsort(hashed_uniform(seed, epoch, image_ids, _SHUFFLE, seq_per_img), axis=1, kind="stable")
    shuffled = np.take_along_axis(chosen, order, axis=1)
    return np.where((counts < seq_per_img)[:, None], shuffled, chosen)
