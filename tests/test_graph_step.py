"""The sync-free XE step (train.step_runner=static) takes the eager step: same loss, gradients and update.

The fixed-shape objective (butd.train.static_xe) runs every caption to the full label width; the sync-free step
(butd.train.graph_step) decides on the device whether to update. Against the eager reference (XeObjective on the
packed path and butd.train.step.train_step, with dropout off): equal losses, gradients and parameters after
several steps; a poisoned batch skipped the same way; an exploding loss stopping every update from its step on;
and no Python-level read of a tensor inside the step. The captured CUDA graph of the same step is checked in
tests/test_gpu_fast_paths.py.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from butd.config.defaults import ModelConfig
from butd.models import build_model
from butd.train.distributed import DistContext
from butd.train.graph_step import SyncFreeStep, adopt_optimizer, pad_regions
from butd.train.runner import deferred_runner, portable_optimizer_state
from butd.train.static_xe import StaticXeObjective, full_length_teacher_forcing
from butd.train.step import DivergenceError, DivergenceGuard, train_step
from butd.train.xe import StepOutput, XeObjective, teacher_forcing_pair
from test_packed import CASES, FEAT, VOCAB, batch

CPU = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
MODELS = ["updown", "showtell", "showattendtell"]
# Adam divides each gradient by its own running size (+ eps): a gradient that is zero up to rounding (the bias before
# Show and Tell's BatchNorm) turns its rounding noise into a step of about lr with the default eps of 1e-8. A larger
# eps keeps the comparison about the update both paths compute, not about the noise of a zero.
ADAM_EPS = 1e-4


def tiny_model(name: str = "updown", **overrides) -> nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(feature_dim=FEAT, rnn_size=16, att_hid_size=8, input_encoding_size=10, dropout=0.0,
                      **{**CASES.get(name, {"name": name}), **overrides})
    return build_model(cfg, VOCAB).train()


class Poisoned(nn.Module):
    """The objective, with its loss made NaN, its gradient NaN (finite loss) or exploded on demand."""

    def __init__(self, objective: nn.Module) -> None:
        super().__init__()
        self.objective = objective
        self.mode: str | None = None

    def forward(self, data, ss_prob: float = 0.0) -> StepOutput:
        out = self.objective(data)
        param = next(self.objective.model.parameters())
        if self.mode == "loss":
            out.loss = out.loss * float("nan")
        elif self.mode == "gradient":  # value unchanged, gradient 0 * inf = NaN
            out.loss = out.loss + 0.0 * torch.sqrt(param.sum() * 0.0)
        elif self.mode == "explode":
            out.loss = out.loss * 1e6
        return out


def test_full_length_pairs_are_the_trimmed_pairs_padded():
    labels = torch.tensor([[5, 6, 7, 0, 0, 0], [8, 0, 0, 0, 0, 0]])
    inputs, targets = full_length_teacher_forcing(labels)
    trimmed_inputs, trimmed_targets = teacher_forcing_pair(labels)
    assert inputs.shape == targets.shape == (2, 7)
    assert torch.equal(inputs[:, :4], trimmed_inputs) and torch.equal(targets[:, :4], trimmed_targets)
    assert targets[:, 4:].eq(0).all()


@pytest.mark.parametrize("case", sorted(CASES))
def test_static_objective_gives_the_eager_loss_and_gradients(case):
    model = tiny_model(case)
    data = batch()  # one caption of the full label width, ties, padded regions holding garbage
    results = []
    for objective in (XeObjective(model, label_smoothing=0.1), StaticXeObjective(model, label_smoothing=0.1)):
        model.zero_grad(set_to_none=True)
        out = objective(data)
        out.loss.backward()
        results.append((out, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (eager, eager_grads), (static, static_grads) = results
    torch.testing.assert_close(static.loss, eager.loss, rtol=1e-6, atol=1e-6)
    assert static.stats.keys() == eager.stats.keys()
    for name, grad in eager_grads.items():
        torch.testing.assert_close(static_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def run_both(name: str, modes: list[str | None], *, factor: float = 100.0, read_every: int = 100):
    """The same batches through the eager step and the deferred static runner; per step the eager
    (values, good) or the DivergenceError, the runner's outcomes, and the two models."""
    eager_model = tiny_model(name)
    static_model = copy.deepcopy(eager_model)
    eager_objective = Poisoned(XeObjective(eager_model))
    static_objective = Poisoned(StaticXeObjective(static_model))
    eager_optimizer = torch.optim.Adam(eager_model.parameters(), lr=1e-3, eps=ADAM_EPS)
    eager_guard = DivergenceGuard(factor=factor)
    runner = deferred_runner("static", objective=static_objective, model=static_model,
                             optimizer=torch.optim.Adam(static_model.parameters(), lr=1e-3, eps=ADAM_EPS),
                             grad_clip=0.1, bf16=False, guard=DivergenceGuard(factor=factor),
                             device=torch.device("cpu"), read_every=read_every, batch_size=3)
    eager_results, outcomes = [], []
    for i, mode in enumerate(modes):
        data = batch(seed=i)
        eager_objective.mode = static_objective.mode = mode
        try:
            eager_results.append(train_step(eager_objective, eager_model, eager_optimizer, data, ss_prob=0.0,
                                            grad_clip=0.1, bf16=False, ctx=CPU, guard=eager_guard))
        except DivergenceError as error:
            eager_results.append(error)
            eager_optimizer.zero_grad(set_to_none=True)
        outcomes += runner.step(data, lr=1e-3, ss_prob=0.0, iteration=i + 1)
    outcomes += runner.flush()
    return eager_results, outcomes, eager_model, static_model, runner


def assert_same_parameters(a: nn.Module, b: nn.Module) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-5, msg=name)  # updates are ~1e-3


@pytest.mark.parametrize("name", MODELS)
def test_static_runner_takes_the_eager_steps(name):
    eager, outcomes, eager_model, static_model, _ = run_both(name, [None] * 4, read_every=3)
    assert [o.iteration for o in outcomes] == [1, 2, 3, 4] and all(o.good for o in outcomes)
    for (values, good), outcome in zip(eager, outcomes):
        assert good and outcome.values.keys() == values.keys()
        for key, value in values.items():
            assert outcome.values[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert_same_parameters(eager_model, static_model)


def test_outcomes_come_back_every_read_every_steps():
    *_, runner = run_both("updown", [])
    outcomes_per_call = [runner.step(batch(seed=i), lr=1e-3, ss_prob=0.0, iteration=i + 1) for i in range(100)]
    assert [len(o) for o in outcomes_per_call] == [0] * 99 + [100]  # read_every = 100: one read, one sync
    runner.step(batch(), lr=1e-3, ss_prob=0.0, iteration=101)
    assert [o.iteration for o in runner.flush()] == [101] and runner.flush() == []


@pytest.mark.parametrize("mode", ["loss", "gradient"])
@pytest.mark.parametrize("name", MODELS)
def test_a_poisoned_step_is_skipped_like_the_eager_one(name, mode):
    eager, outcomes, eager_model, static_model, runner = run_both(name, [None, mode, mode, None])
    assert [good for _, good in eager] == [o.good for o in outcomes] == [True, False, False, True]
    assert_same_parameters(eager_model, static_model)
    adam_steps = {float(s["step"]) for s in runner.sync_free.optimizer.state.values()}
    assert adam_steps == {2.0}  # the skipped steps were taken back, as the eager loop never took them


def test_an_exploding_loss_stops_every_update_from_its_step_on():
    eager, outcomes, eager_model, static_model, runner = run_both("updown", [None, None, "explode", None, None])
    assert isinstance(eager[2], DivergenceError)  # the eager loop stops here, before any update
    assert [o.good for o in outcomes] == [True, True, False]  # nothing after the explosion is reported
    assert outcomes[2].divergence is not None and "the training loss exploded to" in outcomes[2].divergence
    assert outcomes[2].values["loss"] == pytest.approx(float(str(eager[2]).split()[5]), rel=1e-3)
    model_after_two_steps = run_both("updown", [None, None])[3]
    assert_same_parameters(model_after_two_steps, static_model)  # steps 3-5 changed nothing
    assert runner.guard.level == pytest.approx(run_both("updown", [None, None])[4].guard.level, rel=1e-5)


def test_the_guard_factor_zero_lets_a_large_loss_through():
    _, outcomes, *_ = run_both("updown", [None, "explode", None], factor=0.0)
    assert [o.good for o in outcomes] == [True, True, True] and all(o.divergence is None for o in outcomes)


def test_the_step_reads_nothing_back_from_a_tensor(monkeypatch):
    """No Python-level read of a tensor value inside the step (on CUDA each would wait for the device; the CUDA
    test runs the step under torch.cuda.set_sync_debug_mode("error"), which also sees the reads inside torch)."""
    model = tiny_model("showattendtell")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    adopt_optimizer(optimizer, capture=False)
    step = SyncFreeStep(objective=StaticXeObjective(model), model=model, optimizer=optimizer, grad_clip=0.1,
                        bf16=False, guard=DivergenceGuard(), capacity=4, device=torch.device("cpu"))

    def refuse(self, *args, **kwargs):
        raise AssertionError("a tensor value was read on the host inside the step")

    with monkeypatch.context() as patch:
        for method in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy"):
            patch.setattr(torch.Tensor, method, refuse)
        step(batch(seed=0))
        step(batch(seed=1))
    records = step.read()
    assert len(records) == 2 and all(r.good for r in records) and records[1].level is not None


def test_padded_regions_change_nothing():
    model = tiny_model("showattendtell")
    data = batch()
    padded = pad_regions(data, data.features.shape[1] + 5)
    assert padded.region_mask.shape[1] == data.region_mask.shape[1] + 5 and not padded.region_mask[:, -5:].any()
    torch.testing.assert_close(StaticXeObjective(model)(padded).loss, StaticXeObjective(model)(data).loss)


def test_a_captured_optimizer_saves_a_state_any_runner_resumes():
    model = tiny_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    adopt_optimizer(optimizer, capture=True)  # what cuda_graph does: the rate in a tensor, capturable
    assert isinstance(optimizer.param_groups[0]["lr"], torch.Tensor)
    saved = portable_optimizer_state(optimizer)
    assert saved["param_groups"][0]["lr"] == pytest.approx(1e-3) and saved["param_groups"][0]["capturable"] is False
    assert isinstance(optimizer.param_groups[0]["lr"], torch.Tensor)  # the optimizer itself is unchanged
