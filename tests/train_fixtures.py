"""Tiny learnable datasets and configs shared by the training tests (imported by tests/test_train_*.py etc.).

A tiny dataset has a few image "classes": every region feature of an image is its class prototype plus noise, and
its captions are drawn from the class's sentences, so a small captioner can learn it in seconds on a CPU.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from butd.config import Config, load_config
from butd.data.captions import EncodedCaptions, Vocabulary, write_data_dir
from butd.data.store import FeatureRecord, FeatureWriter
from butd.train.setup import TrainOptions

SENTENCES = (
    ("a dog runs on the grass", "a brown dog playing in a field", "the dog is running outside"),
    ("a man rides a red bike", "a person riding a bicycle on the street", "a man on a bike"),
    ("a plate of food on a table", "a table with a pizza on it", "food on a white plate"),
    ("a cat sleeps on the bed", "a cat lying on a bed", "the cat is sleeping"),
)
MAX_LENGTH = 8
FEATURE_DIM = 16


@pytest.fixture(scope="module")
def single_thread():
    """Tiny models train fastest on one thread, and the suite must not oversubscribe a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(single_thread, tmp_path_factory):
    """The tiny dataset of a test module: (data_dir, features)."""
    return make_tiny_dataset(tmp_path_factory.mktemp("tiny"))


def xe_options(tiny, output: Path, **kw) -> TrainOptions:
    """An XE stage on the tiny dataset writing to ``output``."""
    return TrainOptions(stage="xe", data_dir=tiny[0], features=tiny[1], output=output, **kw)


def make_tiny_dataset(root: Path, *, num_images: int = 24, seed: int = 0, vocab_extra: tuple[str, ...] = (),
                      missing_features: tuple[int, ...] = ()) -> tuple[Path, Path]:
    """Write DATA_DIR and FEATS.lmdb under ``root``; returns (data_dir, features). Splits: 2/3 train, rest val/test.

    Images have 3 to 7 captions (fewer and more than the usual seq_per_img) and 3 to 6 regions.
    """
    rng = np.random.default_rng(seed)
    words = sorted({w for group in SENTENCES for s in group for w in s.split()} | set(vocab_extra))
    vocab = Vocabulary(words=["<pad>", "<bos>", "<eos>", "<unk>", *words])
    prototypes = rng.normal(size=(len(SENTENCES), FEATURE_DIM)).astype(np.float32) * 2
    image_ids = np.arange(1, num_images + 1, dtype=np.int64) * 7  # ids that are not dataset indices
    rows, lengths, starts, counts, references = [], [], [], [], {}
    data_dir, features = root / "data", root / "feats.lmdb"
    with FeatureWriter(features, dtype="float32") as writer:
        for n, image_id in enumerate(image_ids):
            cls = n % len(SENTENCES)
            caps = [SENTENCES[cls][int(k)] for k in rng.integers(0, 3, size=3 + n % 5)]
            references[int(image_id)] = [c.capitalize() + "." for c in caps]
            starts.append(len(rows))
            counts.append(len(caps))
            for cap in caps:
                ids = vocab.encode(cap.split())[:MAX_LENGTH]
                rows.append(ids + [0] * (MAX_LENGTH - len(ids)))
                lengths.append(len(ids))
            if int(image_id) in missing_features:
                continue
            k = 3 + n % 4
            feats = prototypes[cls] + 0.3 * rng.normal(size=(k, FEATURE_DIM)).astype(np.float32)
            boxes = np.tile(np.array([[0, 0, 10, 10]], np.float32), (k, 1)) + np.arange(k, dtype=np.float32)[:, None]
            writer.put(FeatureRecord(image_id=int(image_id), features=feats, boxes=boxes, image_w=64, image_h=48))
    captions = EncodedCaptions(image_ids=image_ids, caption_start=np.array(starts, np.int64),
                               caption_count=np.array(counts, np.int32), labels=np.array(rows, np.int32),
                               lengths=np.array(lengths, np.int32))
    n_train = num_images * 2 // 3
    n_val = (num_images - n_train) // 2
    splits = {"train": image_ids[:n_train].tolist(), "val": image_ids[n_train:n_train + n_val].tolist(),
              "test": image_ids[n_train + n_val:].tolist()}
    write_data_dir(data_dir, vocab=vocab, captions=captions, splits=splits, references=references,
                   info={"format_version": 1, "vocab_size": len(vocab), "max_length": MAX_LENGTH})
    return data_dir, features


def tiny_config(*overrides: str) -> Config:
    """A model and schedule small enough to train a few epochs of the tiny dataset in seconds on one CPU core."""
    return load_config(None, [
        f"model.feature_dim={FEATURE_DIM}", "model.rnn_size=32", "model.att_hid_size=16",
        "model.input_encoding_size=32", "model.dropout=0.2",
        "data.num_workers=0", "train.batch_size=4", "train.seq_per_img=3", "train.max_epochs=2", "train.lr=5e-3",
        "train.device=cpu", "train.tensorboard=false", "train.log_every=1", "train.seed=3",
        "scst.num_samples=3", "scst.max_length=8", "eval.max_length=8", "eval.batch_size=8", *overrides])
