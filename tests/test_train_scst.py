"""The SCST stage: baselines, rewards, the policy-gradient loss, fresh optimizer, exact resume, and that SCST after
XE raises its reward and keeps (in practice raises) test CIDEr-D on the COCO-proxy."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from butd.config import load_config
from butd.data.captions import CaptionData, tokenize
from butd.data.dataset import CaptionDataset, build_loader
from butd.data.store import FeatureStore
from butd.decoding import DecodeOptions, greedy_decode
from butd.inference import decode_images
from butd.metrics import CiderD
from butd.core.checkpoint import load_checkpoint
from butd.models import load_model
from butd.train.loop import TrainOptions, train
from butd.train.rewards import CaptionReward, bleu4, greedy_baseline, mean_baseline
from butd.train.scst import ScstObjective, policy_gradient_loss
from train_fixtures import make_tiny_dataset, single_thread, tiny_config  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def tiny_xe(single_thread, tmp_path_factory):
    """A tiny dataset and an XE run (1 epoch) to start SCST from."""
    root = tmp_path_factory.mktemp("tiny_scst")
    data_dir, features = make_tiny_dataset(root)
    train(tiny_config("train.max_epochs=1"), TrainOptions(stage="xe", data_dir=data_dir, features=features,
                                                          output=root / "xe"))
    return data_dir, features, root / "xe" / "best.pt"


def scst_options(tiny_xe, output: Path, **kw) -> TrainOptions:
    data_dir, features, init = tiny_xe
    return TrainOptions(stage="scst", data_dir=data_dir, features=features, output=output, init=init, **kw)


def test_mean_baseline_is_the_mean_of_the_other_samples():
    rewards = torch.tensor([[1.0, 2.0, 6.0], [0.0, 0.0, 3.0]])
    assert mean_baseline(rewards).tolist() == [[4.0, 3.5, 1.5], [1.5, 1.5, 0.0]]
    assert torch.allclose((rewards - mean_baseline(rewards)).sum(dim=1), torch.zeros(2) * 1.5)  # zero-sum advantage
    with pytest.raises(ValueError, match="num_samples >= 2"):
        mean_baseline(torch.ones(2, 1))
    assert greedy_baseline(torch.tensor([0.5, 2.0]), 3).tolist() == [[0.5] * 3, [2.0] * 3]


def test_policy_gradient_loss_sums_logprobs_to_the_end_token_and_normalises_by_tokens():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -9.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # row 2 ended (<eos>) at step 2
    advantage = torch.tensor([2.0, -1.0])
    loss = policy_gradient_loss(logprobs, mask, advantage)
    assert loss.item() == pytest.approx(-(2.0 * -6.0 + -1.0 * -1.0) / 5)
    loss.backward()
    # Descent raises the log-prob of the better-than-baseline sample and lowers the other; padding gets nothing.
    assert (logprobs.grad[0] < 0).all() and (logprobs.grad[1, :2] > 0).all() and logprobs.grad[1, 2] == 0


def test_bleu4_on_token_ids():
    ref = [[5, 6, 7, 8, 9]]
    assert bleu4([5, 6, 7, 8, 9], ref) == pytest.approx(1.0)
    assert 0 < bleu4([5, 6, 7, 9], ref) < bleu4([5, 6, 7, 8], ref) < 1
    assert bleu4([], ref) == 0.0 and bleu4([11, 12], ref) == 0.0


def test_reward_counts_the_end_token_and_adds_weighted_bleu(tiny_xe):
    data = CaptionData.load(tiny_xe[0])
    image_id = int(data.split_ids("train")[0])
    words = [int(w) for w in data.labels(image_id)[0] if w != 0]
    ended = torch.tensor([words + [2, 0]])
    cut = torch.tensor([words])  # ran out of steps: no <eos>
    ids = torch.tensor([image_id])
    with_eos = CaptionReward.from_caption_data(data, count_eos=True)
    assert with_eos(ids, ended).item() > with_eos(ids, cut).item()  # ending the sentence is rewarded
    words_only = CaptionReward.from_caption_data(data, count_eos=False)
    assert words_only(ids, ended).item() == pytest.approx(words_only(ids, cut).item())
    plus_bleu = CaptionReward.from_caption_data(data, count_eos=True, bleu_weight=0.5)
    assert plus_bleu(ids, ended).item() == pytest.approx(with_eos(ids, ended).item() + 0.5 * 1.0)


class _FakeData:
    """Just what CaptionReward.from_caption_data reads: a vocabulary size, a split, label rows."""

    def __init__(self, labels: dict[int, list[list[int]]]) -> None:
        self.vocab, self._labels = [None] * 20, labels

    def split_ids(self, split):
        return np.array(sorted(self._labels))

    def labels(self, image_id):
        return np.array(self._labels[image_id])


def test_unk_in_a_caption_never_matches_the_references_unknown_words():
    reward = CaptionReward.from_caption_data(_FakeData({1: [[5, 3, 7, 8], [5, 3, 7, 8]], 2: [[9, 10, 11, 0]] * 2}))
    ids = torch.tensor([1, 1])
    with_unk, other_word = reward(ids, torch.tensor([[5, 3, 7, 8, 2], [5, 12, 7, 8, 2]])).tolist()
    assert with_unk == pytest.approx(other_word)  # <unk> earns what any non-matching word earns
    known = CaptionReward.from_caption_data(_FakeData({1: [[5, 6, 7, 8]] * 2, 2: [[9, 10, 11, 0]] * 2}))
    assert known(ids[:1], torch.tensor([[5, 6, 7, 8, 2]])).item() > with_unk


def test_greedy_baseline_is_the_reward_of_the_eval_mode_greedy_caption(tiny_xe):
    data = CaptionData.load(tiny_xe[0])
    model = load_model(tiny_xe[2]).model.train()
    reward = CaptionReward.from_caption_data(data)
    batch = next(iter(build_loader(CaptionDataset(data, tiny_xe[1], "train"), batch_size=4, shuffle=False,
                                   num_workers=0, seed=0, epoch=0)))
    out = ScstObjective(model, reward, num_samples=3, baseline="greedy", max_length=8)(batch)
    assert model.training  # restored after the eval-mode greedy pass
    model.eval()
    with torch.no_grad():
        greedy = greedy_decode(model, model.encode(batch.features, batch.region_mask), max_length=8, suppress_unk=True)
    assert out.stats["baseline"].item() == pytest.approx(reward(batch.image_ids, greedy.tokens).mean().item())
    assert 0.0 <= out.stats["frac_better"].item() <= 1.0


def losses(run_dir: Path) -> dict[int, float]:
    return {r["iteration"]: r["loss"] for r in map(json.loads, (run_dir / "train_log.jsonl").read_text().splitlines())}


def test_scst_keeps_init_weights_starts_a_fresh_optimizer_and_resumes_exactly(tiny_xe, tmp_path):
    untrained = train(tiny_config("train.max_epochs=0"), scst_options(tiny_xe, tmp_path / "zero"))
    xe_weights = load_checkpoint(tiny_xe[2])["model"]
    assert all(torch.equal(untrained.model.state_dict()[k], v) for k, v in xe_weights.items())

    straight = train(tiny_config("train.lr=1e-3"), scst_options(tiny_xe, tmp_path / "straight"))
    payload = load_checkpoint(tmp_path / "straight" / "last.pt")
    assert payload["stage"] == "scst"
    steps = {int(s["step"]) for s in payload["optimizer"]["state"].values()}
    assert steps == {straight.state.iteration}  # Adam's count starts at the SCST stage, not carried from XE
    metrics = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert {"train_reward", "train_baseline", "train_frac_better", "CIDEr-D"} <= set(metrics[-1])

    train(tiny_config("train.lr=1e-3", "train.max_epochs=1"), scst_options(tiny_xe, tmp_path / "split"))
    cfg = load_config(tmp_path / "split" / "config.yaml", ["train.max_epochs=2"])
    resumed = train(cfg, scst_options(tiny_xe, tmp_path / "split", resume=True))
    assert losses(tmp_path / "split") == pytest.approx(losses(tmp_path / "straight"), abs=1e-6)
    for name, value in straight.model.state_dict().items():
        assert torch.allclose(resumed.model.state_dict()[name], value, atol=1e-6), name


# --- COCO-proxy: SCST after XE learns ----------------------------------------------------------------------------

PROXY_IMAGES = 1000  # 800 train, 100 val, 100 test
XE_OVERRIDES = ("train.max_epochs=6", "train.lr=4e-3", "train.warmup_iters=100")
# 4 epochs at 5e-4 rather than 2 at 2e-4: with the shorter schedule the test CIDEr-D gain ranged from -0.007 to
# +0.070 across seeds and thread counts, too little to assert (docs/training.md, "SCST test: spread ...").
SCST_OVERRIDES = ("train.max_epochs=4", "train.lr=5e-4")


@pytest.fixture(scope="module")
def proxy_xe(single_thread, tmp_path_factory):
    """A small COCO-proxy (real COCO captions, synthetic features) and an XE run on it, fixed seeds."""
    from butd.data.prep.coco_source import load_coco_captions, read_karpathy_split
    from butd.data.prep.prepro import prepro_karpathy
    from butd.data.proxy.generator import ProxyConfig, make_proxy_dataset

    root = tmp_path_factory.mktemp("proxy")
    make_proxy_dataset(load_coco_captions(None), read_karpathy_split(None), root / "proxy",
                       ProxyConfig(num_images=PROXY_IMAGES, seed=0, boxes=(10, 20)))
    prepro_karpathy(root / "proxy" / "dataset_coco.json", root / "data", min_count=3)
    options = TrainOptions(stage="xe", data_dir=root / "data", features=root / "proxy" / "features.lmdb",
                           output=root / "xe")
    train(proxy_config(*XE_OVERRIDES), options)
    return options


def proxy_config(*overrides: str):
    return load_config(None, [
        "model.rnn_size=96", "model.att_hid_size=48", "model.input_encoding_size=96", "model.dropout=0.1",
        "data.num_workers=0", "data.max_boxes=12", "train.batch_size=10", "train.device=cpu",
        "train.tensorboard=false", "train.log_every=5", "train.lr_decay_every=0", "train.seed=0",
        "eval.batch_size=100", *RAW_DECODING, *overrides])


# The raw policy, as sampled and decoded before the decoding rules: this test is about SCST's optimisation (its
# gain here is mostly unlearning <unk>, which suppression in decoding gives for free; docs/training.md).
RAW_DECODING = ("scst.suppress_unk=false", "eval.suppress_unk=false", "eval.decoding_constraint=false",
                "eval.block_trigrams=false")


def split_cider(run: Path, options: TrainOptions, split: str = "test") -> float:
    """CIDEr-D (beam 1) of the run's best checkpoint on a split (its references are the CIDEr-D corpus)."""
    data = CaptionData.load(options.data_dir)
    loaded = load_model(run / "best.pt")
    ids = [int(i) for i in data.split_ids(split)]
    results = decode_images(loaded.model, FeatureStore(options.features), ids, data.vocab,
                            options=DecodeOptions.from_config(loaded.config.eval).with_overrides(beam_size=1),
                            max_boxes=loaded.config.data.max_boxes)
    gts = {i: [" ".join(tokenize(r)) for r in data.references(i)] for i in ids}
    return CiderD().compute_score(gts, {i: [results[i].caption] for i in ids})[0]



@pytest.mark.slow
def test_xe_learns_on_the_proxy(proxy_xe):
    scores = [json.loads(line)["CIDEr-D"] for line in (proxy_xe.output / "metrics.jsonl").read_text().splitlines()]
    assert scores[-1] > scores[0] + 0.05, scores  # the first epoch is still on the unigram plateau (about 0)


@pytest.mark.slow
def test_scst_after_xe_raises_its_reward_and_keeps_test_cider_on_the_proxy(proxy_xe, tmp_path):
    options = TrainOptions(stage="scst", data_dir=proxy_xe.data_dir, features=proxy_xe.features,
                           output=tmp_path / "scst", init=proxy_xe.output / "best.pt")
    train(proxy_config(*SCST_OVERRIDES), options)
    rewards = [json.loads(line)["train_reward"] for line in (options.output / "metrics.jsonl").read_text().splitlines()]
    xe_score, scst_score = split_cider(proxy_xe.output, proxy_xe), split_cider(options.output, options)
    # Bounds from 12 runs (seeds 0-5, 1 and 2 torch threads; docs/training.md, "SCST test: spread across seeds and
    # threads"): the mean sampled reward of the last epoch was 1.53x to 1.93x the first epoch's (SCST broken on
    # purpose: 0.015x with the reward negated, 0.97x with the baseline equal to the reward), and test CIDEr-D
    # (beam 1, 100 images) rose by +0.019 to +0.126: too noisy for a tight bound, it must not fall by 0.03 or more.
    assert rewards[-1] > 1.2 * rewards[0], rewards
    assert scst_score > xe_score - 0.03, (xe_score, scst_score)
