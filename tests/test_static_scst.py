"""The sync-free SCST step (train.step_runner=static, scst stage) takes the eager step.

From the same random state: the full-length decoders give the eager decoders' captions padded to the full length;
the fixed-shape objective gives the eager loss, statistics and gradients (mean and greedy baselines, every model);
the sync-free step makes the eager updates over several steps; nothing inside it reads a tensor on the host; and a
static SCST stage runs through the training loop from an XE run.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from butd.config.defaults import ModelConfig
from butd.core.tokens import EOS
from butd.decoding import greedy_decode, sample
from butd.decoding.fixed_length import greedy_to_length, sample_to_length
from butd.metrics import TensorCiderD
from butd.models import build_model
from butd.train.distributed import DistContext
from butd.train.graph_step import SyncFreeStep, adopt_optimizer
from butd.train.loop import TrainOptions, train
from butd.train.rewards import CaptionReward
from butd.train.runner import deferred_runner
from butd.train.scst import ScstObjective
from butd.train.static_scst import StaticScstObjective
from butd.train.step import DivergenceGuard, train_step
from test_packed import FEAT, VOCAB, batch
from train_fixtures import make_tiny_dataset, single_thread, tiny_config  # noqa: F401 (fixture)

CPU = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
MODELS = ["updown", "showtell", "showattendtell"]
MAX_LENGTH = 7
ADAM_EPS = 1e-4  # see tests/test_graph_step.py: a zero gradient's rounding noise must not become a step


def tiny_model(name: str = "updown", *, eos_bias: float = 0.0) -> torch.nn.Module:
    """A random tiny captioner; ``eos_bias`` raises <eos>'s logit so that captions end early (the eager decoders then
    stop before the full length and trim columns, which the full-length ones must match)."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name, feature_dim=FEAT, rnn_size=16, att_hid_size=8, input_encoding_size=10,
                                    dropout=0.0), VOCAB).train()
    with torch.no_grad():
        model.logit.bias[EOS] += eos_bias
    return model


def reward() -> CaptionReward:
    """CIDEr-D against three references per image of the test batches (images 0..2), words 4..14."""
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(2, 6, (3, 3), generator=g).tolist()
    refs = {i: [torch.randint(4, VOCAB, (n,), generator=g).tolist() for n in lengths[i]] for i in range(3)}
    return CaptionReward(cider=TensorCiderD(references=refs))


@pytest.mark.parametrize("eos_bias", [0.0, 2.0])
def test_full_length_sampling_draws_the_eager_samples(eos_bias):
    model = tiny_model(eos_bias=eos_bias)
    regions = model.encode(batch().features, batch().region_mask)
    for options in ({}, {"temperature": 0.7, "top_k": 5}):
        torch.manual_seed(3)
        eager = sample(model, regions, num_samples=4, max_length=MAX_LENGTH, **options)
        torch.manual_seed(3)
        full = sample_to_length(model, regions, num_samples=4, max_length=MAX_LENGTH, **options)
        steps = eager.tokens.shape[1]
        assert full.tokens.shape == (12, MAX_LENGTH) and steps <= MAX_LENGTH
        assert torch.equal(full.tokens[:, :steps], eager.tokens) and full.tokens[:, steps:].eq(0).all()
        torch.testing.assert_close(full.token_logprobs, F.pad(eager.token_logprobs, (0, MAX_LENGTH - steps)))
        assert torch.equal(full.mask, F.pad(eager.mask, (0, MAX_LENGTH - steps)))


@pytest.mark.parametrize("eos_bias", [0.0, 2.0])
def test_full_length_greedy_is_the_eager_greedy_caption(eos_bias):
    model = tiny_model("showattendtell", eos_bias=eos_bias).eval()
    regions = model.encode(batch().features, batch().region_mask)
    eager = greedy_decode(model, regions, max_length=MAX_LENGTH).tokens
    full = greedy_to_length(model, regions, max_length=MAX_LENGTH)
    assert torch.equal(full, F.pad(eager, (0, MAX_LENGTH - eager.shape[1])))


@pytest.mark.parametrize("eos_bias", [0.0, 2.0])
@pytest.mark.parametrize("baseline", ["mean", "greedy"])
@pytest.mark.parametrize("name", MODELS)
def test_static_objective_gives_the_eager_loss_and_gradients(name, baseline, eos_bias):
    model, scorer, data = tiny_model(name, eos_bias=eos_bias), reward(), batch()
    results = []
    for kind in (ScstObjective, StaticScstObjective):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        out = kind(model, scorer, num_samples=3, baseline=baseline, max_length=MAX_LENGTH)(data)
        out.loss.backward()
        results.append((out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (eager, eager_grads), (static, static_grads) = results
    assert eager.stats["reward"] > 0  # the reward is not trivially zero, so the loss has a gradient
    torch.testing.assert_close(static.loss, eager.loss, rtol=1e-6, atol=1e-7)
    assert static.stats.keys() == eager.stats.keys()
    for key, value in eager.stats.items():
        torch.testing.assert_close(static.stats[key], value, msg=key)
    assert static_grads.keys() == eager_grads.keys()
    for key, grad in eager_grads.items():
        torch.testing.assert_close(static_grads[key], grad, rtol=1e-5, atol=1e-7, msg=key)


def test_the_sync_free_scst_step_makes_the_eager_updates():
    eager_model, scorer = tiny_model(eos_bias=2.0), reward()
    static_model = copy.deepcopy(eager_model)
    eager_objective = ScstObjective(eager_model, scorer, num_samples=3, max_length=MAX_LENGTH)
    eager_optimizer = torch.optim.Adam(eager_model.parameters(), lr=1e-3, eps=ADAM_EPS)
    runner = deferred_runner("static", objective=StaticScstObjective(static_model, scorer, num_samples=3,
                                                                     max_length=MAX_LENGTH),
                             model=static_model, optimizer=torch.optim.Adam(static_model.parameters(), lr=1e-3,
                                                                            eps=ADAM_EPS),
                             grad_clip=0.1, bf16=False, guard=DivergenceGuard(), device=torch.device("cpu"),
                             read_every=10, batch_size=3)
    eager_values = []
    for i in range(4):
        data = batch(seed=i)
        torch.manual_seed(100 + i)  # the same draws for both (eager sampling may stop early and draw fewer)
        eager_values.append(train_step(eager_objective, eager_model, eager_optimizer, data, ss_prob=0.0,
                                       grad_clip=0.1, bf16=False, ctx=CPU)[0])
        torch.manual_seed(100 + i)
        runner.step(data, lr=1e-3, ss_prob=0.0, iteration=i + 1)
    outcomes = runner.flush()
    assert all(o.good for o in outcomes) and len(outcomes) == 4
    for values, outcome in zip(eager_values, outcomes):
        assert outcome.values == pytest.approx(values, rel=1e-5, abs=1e-6)
    for (key, x), y in zip(eager_model.state_dict().items(), static_model.state_dict().values()):
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-5, msg=key)


def test_the_scst_step_reads_nothing_back_from_a_tensor(monkeypatch):
    model = tiny_model("showattendtell")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    adopt_optimizer(optimizer, capture=False)
    step = SyncFreeStep(objective=StaticScstObjective(model, reward(), num_samples=3, baseline="greedy",
                                                      max_length=MAX_LENGTH),
                        model=model, optimizer=optimizer, grad_clip=0.1, bf16=False, guard=DivergenceGuard(),
                        capacity=2, device=torch.device("cpu"))

    def refuse(self, *args, **kwargs):
        raise AssertionError("a tensor value was read on the host inside the step")

    with monkeypatch.context() as patch:
        for method in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy"):
            patch.setattr(torch.Tensor, method, refuse)
        step(batch(seed=0))
        step(batch(seed=1))
    assert [r.good for r in step.read()] == [True, True]


@pytest.mark.usefixtures("single_thread")
def test_a_static_scst_stage_trains_through_the_loop(tmp_path):
    data_dir, features = make_tiny_dataset(tmp_path)
    train(tiny_config("train.max_epochs=1"), TrainOptions(stage="xe", data_dir=data_dir, features=features,
                                                          output=tmp_path / "xe"))
    cfg = tiny_config("train.step_runner=static", "train.log_every=3", "train.lr=1e-4")
    result = train(cfg, TrainOptions(stage="scst", data_dir=data_dir, features=features, output=tmp_path / "scst",
                                     init=tmp_path / "xe" / "best.pt"))
    log = [json.loads(line) for line in (tmp_path / "scst" / "train_log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in log] == [3, 6] and result.state.iteration == 8
    assert all(0 < r["sample_length"] <= 8 and r["reward"] >= 0 for r in log)
    assert Path(tmp_path / "scst" / "last.pt").is_file() and result.state.bad_steps_total == 0
