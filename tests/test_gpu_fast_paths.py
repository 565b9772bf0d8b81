"""The GPU fast paths on CUDA: packed XE, the compiled decoder step, bf16, the fused Adam step, and the sync-free
step runners (train.step_runner static and cuda_graph: no host sync, the captured graph equal to the uncaptured step).

Skipped without CUDA (CI has none); a session with a GPU runs them before taking any benchmark figure:
``pytest -q tests/test_gpu_fast_paths.py``. The CPU equivalents are in tests/test_packed.py, tests/test_graph_step.py
and tests/test_step_runners.py.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch

from butd.config.defaults import ModelConfig
from butd.data.dataset import Batch
from butd.models import build_model
from butd.train.distributed import DistContext
from butd.train.loop import TrainOptions, train
from butd.metrics import TensorCiderD
from butd.train.rewards import CaptionReward
from butd.train.runner import DeferredRunner, deferred_runner
from butd.train.static_scst import StaticScstObjective
from butd.train.static_xe import StaticXeObjective
from butd.train.step import DivergenceGuard, train_step
from butd.train.xe import XeObjective
from test_packed import FEAT, VOCAB, batch
from train_fixtures import make_tiny_dataset, tiny_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def tiny_model(device: str = "cuda", **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(feature_dim=FEAT, rnn_size=32, att_hid_size=16, input_encoding_size=24, dropout=0.0,
                      **overrides)
    return build_model(cfg, VOCAB).to(device).train()


def xe_loss_and_grads(model, packed: bool, bf16: bool = False):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        loss = XeObjective(model, packed=packed)(batch().to("cuda")).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", ["updown", "showtell", "showattendtell"])
def test_packed_equals_plain_on_cuda(name):
    model = tiny_model(name=name)
    plain_loss, plain_grads = xe_loss_and_grads(model, packed=False)
    packed_loss, packed_grads = xe_loss_and_grads(model, packed=True)
    torch.testing.assert_close(packed_loss, plain_loss, rtol=1e-5, atol=1e-5)
    for name_, grad in plain_grads.items():
        torch.testing.assert_close(packed_grads[name_], grad, rtol=1e-4, atol=1e-5, msg=name_)


def test_packed_bf16_stays_close_to_fp32():
    model = tiny_model()
    fp32_loss, _ = xe_loss_and_grads(model, packed=True)
    bf16_loss, grads = xe_loss_and_grads(model, packed=True, bf16=True)
    assert abs(bf16_loss.item() - fp32_loss.item()) < 0.02 * fp32_loss.item()
    assert all(torch.isfinite(g).all() for g in grads.values())


def test_inductor_compiled_step_equals_eager_on_cuda():
    model = tiny_model()
    eager_loss, eager_grads = xe_loss_and_grads(model, packed=True)
    model.compile_advance()  # inductor, the train.compile path
    compiled_loss, compiled_grads = xe_loss_and_grads(model, packed=True)
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-4, atol=1e-5)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-3, atol=1e-5, msg=name)


def test_fused_adam_step_matches_the_cpu_step():
    """The loop's CUDA optimiser (fused Adam) takes the same step as the CPU one (foreach Adam)."""
    ctx_gpu = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cuda"))
    ctx_cpu = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    gpu, cpu = tiny_model("cuda"), tiny_model("cpu")
    for model, ctx, fused in ((gpu, ctx_gpu, True), (cpu, ctx_cpu, False)):
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=fused)
        for _ in range(3):
            _, good = train_step(XeObjective(model), model, optimizer, batch().to(ctx.device), ss_prob=0.0,
                                 grad_clip=0.1, bf16=False, ctx=ctx)
            assert good
    for (name, p_gpu), p_cpu in zip(gpu.named_parameters(), cpu.parameters()):
        torch.testing.assert_close(p_gpu.cpu(), p_cpu, rtol=1e-4, atol=1e-5, msg=name)


class ScaledLoss(torch.nn.Module):
    """The static objective with its loss times ``scale``, a device tensor a captured graph reads at each replay:
    filling it with NaN poisons a step inside the graph."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.objective = StaticXeObjective(model)
        self.scale = torch.ones((), device="cuda")

    def forward(self, data: Batch, ss_prob: float = 0.0):
        out = self.objective(data)
        out.loss = out.loss * self.scale
        return out


def sync_free_runner(model: torch.nn.Module, kind: str, *, bf16: bool = False) -> DeferredRunner:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-4)  # eps: see tests/test_graph_step.py
    return deferred_runner(kind, objective=ScaledLoss(model), model=model, optimizer=optimizer,
                           grad_clip=0.1, bf16=bf16, guard=DivergenceGuard(), device=torch.device("cuda"),
                           read_every=50, batch_size=3, warmup=2)


def with_regions(data: Batch, count: int) -> Batch:
    """The batch cut to its first ``count`` regions (the collate of a batch with fewer regions)."""
    return Batch(image_ids=data.image_ids, features=data.features[:, :count].contiguous(),
                 boxes=data.boxes[:, :count].contiguous(), image_size=data.image_size,
                 region_mask=data.region_mask[:, :count].contiguous(), labels=data.labels)


def test_the_sync_free_step_never_waits_for_the_gpu():
    runner = sync_free_runner(tiny_model(name="showattendtell"), "static")
    batches = [batch(seed=i).to("cuda") for i in range(4)]  # moved before: a pageable copy would sync
    runner.step(batches[0], lr=1e-3, ss_prob=0.0, iteration=1)  # creates the optimizer state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call inside torch raises
    try:
        for i, data in enumerate(batches[1:], start=2):
            runner.step(data, lr=1e-3, ss_prob=0.0, iteration=i)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    outcomes = runner.flush()
    assert [o.iteration for o in outcomes] == [1, 2, 3, 4] and all(o.good for o in outcomes)


@pytest.mark.parametrize("name", ["updown", "showtell", "showattendtell"])
def test_the_captured_step_equals_the_uncaptured_one(name):
    """Warm-up, capture, replays with new inputs, a poisoned batch skipped inside the graph, a larger region count
    (padded batches, a second capture) and a partial batch (uncaptured): the same values and weights."""
    uncaptured_model = tiny_model(name=name)
    captured_model = copy.deepcopy(uncaptured_model)
    uncaptured, captured = sync_free_runner(uncaptured_model, "static"), sync_free_runner(captured_model, "cuda_graph")
    batches = [with_regions(batch(seed=i), 4) for i in range(5)]  # warm-up x2, capture, replay, poisoned replay
    batches += [batch(seed=i) for i in range(5, 8)]  # 6 regions: warm-up x2 and a second capture
    batches += [with_regions(batch(seed=8), 4), batch(seed=9, num_images=2)]  # padded to 6 and replayed; partial
    for i, data in enumerate(batches, start=1):
        for runner in (uncaptured, captured):
            runner.sync_free.objective.scale.fill_(float("nan") if i == 5 else 1.0)
            runner.step(data.to("cuda"), lr=1e-3, ss_prob=0.0, iteration=i)
    assert captured.captured is not None and captured.captured.captures == 2
    theirs, mine = uncaptured.flush(), captured.flush()
    assert [o.good for o in mine] == [o.good for o in theirs] == [True] * 4 + [False] + [True] * 5
    for a, b in zip(mine, theirs):
        if b.good:
            assert a.values == pytest.approx(b.values, rel=1e-5, abs=1e-6)
    for (key, x), y in zip(uncaptured_model.state_dict().items(), captured_model.state_dict().values()):
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-5, msg=key)


def test_the_captured_bf16_step_stays_close_to_fp32():
    losses = {}
    for bf16 in (False, True):
        runner = sync_free_runner(tiny_model(), "cuda_graph", bf16=bf16)
        for i in range(5):
            runner.step(batch(seed=i).to("cuda"), lr=1e-3, ss_prob=0.0, iteration=i + 1)
        losses[bf16] = [o.values["loss"] for o in runner.flush()]
    assert losses[True] == pytest.approx(losses[False], rel=0.02)


def test_the_training_loop_with_cuda_graph_logs_the_static_losses(tmp_path):
    data_dir, features = make_tiny_dataset(tmp_path)
    logs = {}
    for kind in ("static", "cuda_graph"):
        cfg = tiny_config("train.device=cuda", "train.precision=fp32", "model.dropout=0.0", "train.batch_size=3",
                          "train.log_every=4", f"train.step_runner={kind}")
        train(cfg, TrainOptions(stage="xe", data_dir=data_dir, features=features, output=tmp_path / kind))
        logs[kind] = [json.loads(line) for line in (tmp_path / kind / "train_log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in logs["cuda_graph"]] == [r["iteration"] for r in logs["static"]] == [4, 8, 12]
    for mine, theirs in zip(logs["cuda_graph"], logs["static"]):
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-4)


def scst_runner(model: torch.nn.Module, kind: str, baseline: str = "mean") -> DeferredRunner:
    references = {i: [[4 + (i + k) % 10, 5 + k, 6 + (i * k) % 8] for k in range(3)] for i in range(3)}
    reward = CaptionReward(cider=TensorCiderD(references=references, device="cuda"))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-4)
    return deferred_runner(kind, objective=StaticScstObjective(model, reward, num_samples=3, baseline=baseline,
                                                               max_length=7),
                           model=model, optimizer=optimizer, grad_clip=0.1, bf16=False, guard=DivergenceGuard(),
                           device=torch.device("cuda"), read_every=50, batch_size=3, warmup=2)


def test_the_sync_free_scst_step_never_waits_for_the_gpu():
    runner = scst_runner(tiny_model(), "static", baseline="greedy")
    batches = [batch(seed=i).to("cuda") for i in range(3)]
    runner.step(batches[0], lr=1e-3, ss_prob=0.0, iteration=1)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i, data in enumerate(batches[1:], start=2):
            runner.step(data, lr=1e-3, ss_prob=0.0, iteration=i)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert [o.good for o in runner.flush()] == [True, True, True]


@pytest.mark.parametrize("baseline", ["mean", "greedy"])
def test_the_captured_scst_step_samples_and_updates_like_the_uncaptured_one(baseline):
    """A replay draws from the default generator exactly as the uncaptured step does (PyTorch advances its offset by
    the graph's draws), so from the same seed: the same samples, rewards, loss and update."""
    uncaptured_model = tiny_model()
    captured_model = copy.deepcopy(uncaptured_model)
    uncaptured = scst_runner(uncaptured_model, "static", baseline)
    captured = scst_runner(captured_model, "cuda_graph", baseline)
    for i in range(6):  # warm-up x2, capture, three replays
        data = batch(seed=i).to("cuda")
        for runner in (uncaptured, captured):
            torch.manual_seed(100 + i)
            runner.step(data, lr=1e-3, ss_prob=0.0, iteration=i + 1)
    assert captured.captured is not None and captured.captured.captures == 1
    theirs, mine = uncaptured.flush(), captured.flush()
    assert all(o.good for o in theirs + mine) and len(mine) == 6
    for a, b in zip(mine, theirs):
        assert a.values == pytest.approx(b.values, rel=1e-5, abs=1e-6)
    for (key, x), y in zip(uncaptured_model.state_dict().items(), captured_model.state_dict().values()):
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-5, msg=key)
