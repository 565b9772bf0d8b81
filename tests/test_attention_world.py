"""The attention world (butd.data.attention_world): what it writes, and that the attention decoders beat
Show-and-Tell on it (the ordering the COCO-proxy ablation in docs/results.md could not show)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from butd.config import load_config
from butd.data.attention_world import COLOURS, SHAPES, AttentionWorldConfig, describe, make_attention_world
from butd.data.captions import CaptionData
from butd.data.store import FeatureStore
from butd.errors import DataError
from butd.train.loop import TrainOptions, train
from train_fixtures import single_thread  # noqa: F401  (fixture)


def test_captions_name_each_object_with_its_colour_in_shape_order():
    assert describe([(1, 2), (0, 0)]) == f"a {COLOURS[0]} {SHAPES[0]} and a {COLOURS[1]} {SHAPES[2]}"


def test_world_is_written_once_fixed_by_its_seed_and_never_mixed(tmp_path):
    config = AttentionWorldConfig(num_images=40, seed=5)
    world = make_attention_world(tmp_path / "w", config)
    again = make_attention_world(tmp_path / "again", config)
    data = CaptionData.load(world.data_dir)
    assert {k: len(v) for k, v in json.loads((world.data_dir / "splits.json").read_text()).items()} == \
        {"train": 32, "val": 4, "test": 4}
    with FeatureStore(world.features) as store, FeatureStore(again.features) as other:
        for image_id in data.split_ids("train"):
            record = store[int(image_id)]
            assert config.regions[0] <= record.num_boxes <= config.regions[1]
            np.testing.assert_array_equal(record.features, other[int(image_id)].features)
            objects = len(data.references(int(image_id))[0].split(" and "))
            assert config.objects[0] <= objects <= config.objects[1]
    assert make_attention_world(tmp_path / "w", config) == world  # complete: found, not rewritten
    with pytest.raises(DataError, match="pick another output"):
        make_attention_world(tmp_path / "w", AttentionWorldConfig(num_images=40, seed=6))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("the user's")
    with pytest.raises(DataError, match="holds no attention world"):
        make_attention_world(tmp_path / "mine", config)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "the user's"


def best_val_cider(world, out, name: str, *extra: str) -> float:
    """XE-train ``name`` on the world at settings that suit it; the best val CIDEr-D (greedy) over the epochs."""
    cfg = load_config(None, [
        f"model.name={name}", "model.feature_dim=32", "model.rnn_size=64", "model.att_hid_size=32",
        "model.input_encoding_size=64", "model.dropout=0.0", "data.num_workers=0", "data.cache=memory",
        "train.batch_size=20", "train.seq_per_img=3", "train.max_epochs=6", "train.lr=1e-2", "train.lr_decay_every=0",
        "train.device=cpu", "train.tensorboard=false", "train.log_every=1000", "train.seed=3", "eval.batch_size=200",
        *extra])
    return train(cfg, TrainOptions(stage="xe", data_dir=world.data_dir, features=world.features,
                                   output=out)).state.best_score


def test_attention_decoders_beat_show_and_tell_on_the_attention_world(tmp_path, single_thread):  # noqa: F811
    # Measured (docs/results.md), best val CIDEr-D, seeds 1-3, one thread: Up-Down 2.5-4.4 after 5 epochs,
    # Show-Attend-Tell (lambda 0) 4.3-4.7 after 5, Show-and-Tell 1.1-1.5 after 5 or 7. The margin asked is 1.0.
    world = make_attention_world(tmp_path / "world", AttentionWorldConfig(num_images=1200))
    show_tell = best_val_cider(world, tmp_path / "showtell", "showtell")
    up_down = best_val_cider(world, tmp_path / "updown", "updown")
    # Show-Attend-Tell's doubly stochastic term asks every region for a total attention near 1: wrong for a world
    # where 1 to 3 of 8-30 regions matter, so it is off here.
    attend = best_val_cider(world, tmp_path / "sat", "showattendtell", "model.doubly_stochastic_weight=0")
    assert up_down > show_tell + 1.0, (up_down, show_tell)
    assert attend > show_tell + 1.0, (attend, show_tell)
