"""The training loop with train.step_runner=static matches the eager loop: the same logged losses and weights, bad
steps skipped and counted the same, divergence stopping the run without a checkpoint, exact resume; and the
runners that cannot run here are refused in one line before any work."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from butd.config import load_config
from butd.errors import ConfigError
from butd.train.distributed import DistContext
from butd.train.loop import NonFiniteLossError, TrainOptions, train
from butd.train.runner import check_step_runner
from butd.train.static_xe import StaticXeObjective
from butd.train.step import DivergenceError
from train_fixtures import make_tiny_dataset, single_thread, tiny_config  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("single_thread")
# No dropout (the two objectives draw their masks in different orders); batches of 3 images leave a partial batch
# of 1 at the end of each epoch; values are read back every 4 steps, across the epoch's end.
SAME = ("model.dropout=0.0", "train.batch_size=3", "train.log_every=4")


@pytest.fixture(scope="module")
def tiny(single_thread, tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("tiny"))


def options(tiny, output: Path, **kw) -> TrainOptions:
    return TrainOptions(stage="xe", data_dir=tiny[0], features=tiny[1], output=output, **kw)


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_close_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-5, msg=name)


def test_static_runner_trains_like_the_eager_loop(tiny, tmp_path):
    eager = train(tiny_config(*SAME), options(tiny, tmp_path / "eager"))
    static = train(tiny_config(*SAME, "train.step_runner=static"), options(tiny, tmp_path / "static"))
    assert static.state.iteration == eager.state.iteration == 12
    eager_log, static_log = (jsonl(tmp_path / run / "train_log.jsonl") for run in ("eager", "static"))
    assert [r["iteration"] for r in static_log] == [r["iteration"] for r in eager_log] == [4, 8, 12]
    for mine, theirs in zip(static_log, eager_log):
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-5) and mine["lr"] == theirs["lr"]
    eager_metrics, static_metrics = (jsonl(tmp_path / run / "metrics.jsonl") for run in ("eager", "static"))
    for mine, theirs in zip(static_metrics, eager_metrics):
        assert mine["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-5)
    assert_close_weights(eager.model, static.model)


def test_static_runner_resumes_exactly(tiny, tmp_path):
    cfg = tiny_config(*SAME, "train.step_runner=static", "train.max_epochs=1")
    train(cfg, options(tiny, tmp_path / "split"))
    straight = train(tiny_config(*SAME, "train.step_runner=static"), options(tiny, tmp_path / "straight"))
    resumed = train(load_config(tmp_path / "split" / "config.yaml", ["train.max_epochs=2"]),
                    options(tiny, tmp_path / "split", resume=True))
    losses = {run: [(r["iteration"], r["loss"]) for r in jsonl(tmp_path / run / "train_log.jsonl")]
              for run in ("split", "straight")}
    assert [i for i, _ in losses["split"]] == [i for i, _ in losses["straight"]] == [4, 8, 12]
    assert [v for _, v in losses["split"]] == pytest.approx([v for _, v in losses["straight"]], rel=1e-6)
    assert_close_weights(straight.model, resumed.model)


def poison(monkeypatch, bad_calls: set[int]) -> None:
    """A NaN loss from the static objective on the given calls."""
    calls = [0]
    real_forward = StaticXeObjective.forward

    def forward(self, batch, ss_prob=0.0):
        out = real_forward(self, batch, ss_prob)
        calls[0] += 1
        if calls[0] in bad_calls:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(StaticXeObjective, "forward", forward)


def test_bad_steps_are_skipped_and_counted_when_read_back(tiny, tmp_path, monkeypatch, capsys):
    poison(monkeypatch, {2, 3})
    result = train(tiny_config(*SAME, "train.step_runner=static"), options(tiny, tmp_path / "run"))
    assert result.state.bad_steps_total == 2 and result.state.bad_steps_in_row == 0
    assert all(bool(torch.isfinite(p).all()) for p in result.model.parameters())
    assert "iteration 2: non-finite loss or gradient, step skipped (1 in a row" in capsys.readouterr().out
    assert jsonl(tmp_path / "run" / "metrics.jsonl")[-1]["bad_steps"] == 2


def test_too_many_bad_steps_stop_at_read_back_without_touching_the_checkpoint(tiny, tmp_path, monkeypatch):
    train(tiny_config(*SAME, "train.step_runner=static", "train.max_epochs=1"), options(tiny, tmp_path / "run"))
    before = (tmp_path / "run" / "last.pt").read_bytes()
    poison(monkeypatch, set(range(1, 100)))
    cfg = load_config(tmp_path / "run" / "config.yaml", ["train.max_epochs=2", "train.max_bad_steps=3",
                                                          "train.log_every=50"])
    with pytest.raises(NonFiniteLossError, match=r"3 non-finite losses/gradients in a row .* epoch 2, iteration 9; "
                                                 r"stopping: the checkpoints in .* keep the model of iteration 6"):
        train(cfg, options(tiny, tmp_path / "run", resume=True))
    assert (tmp_path / "run" / "last.pt").read_bytes() == before


def test_an_exploding_loss_stops_the_static_run_and_keeps_the_last_good_checkpoint(tiny, tmp_path):
    train(tiny_config(*SAME, "train.step_runner=static", "train.max_epochs=1"), options(tiny, tmp_path / "run"))
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").glob("*.pt")}
    cfg = load_config(tmp_path / "run" / "config.yaml", ["train.max_epochs=3", "train.lr=1e6", "train.grad_clip=0"])
    with pytest.raises(DivergenceError, match=r"epoch 2, iteration \d+: the training loss exploded .* the "
                                              r"checkpoints in .* keep the model of iteration 6"):
        train(cfg, options(tiny, tmp_path / "run", resume=True))
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").glob("*.pt")} == before


CPU = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


@pytest.mark.parametrize("overrides, stage, message", [
    (["train.step_runner=cuda_graph"], "xe", "train.step_runner=cuda_graph needs a CUDA device .* use "
                                             "train.step_runner=static"),
    (["train.step_runner=static", "scst.bleu_weight=0.5"], "scst", "rewards CIDEr-D on the device; "
                                                                    "scst.bleu_weight > 0 computes BLEU on the host"),
    (["train.step_runner=static", "train.scheduled_sampling_start=0"], "xe", "has no scheduled sampling"),
])
def test_runners_that_cannot_run_are_refused_in_one_line(overrides, stage, message):
    with pytest.raises(ConfigError, match=message):
        check_step_runner(tiny_config(*overrides), CPU, stage)
    check_step_runner(tiny_config(), CPU, stage)  # eager runs everything


def test_the_train_tool_refuses_cuda_graph_on_cpu_before_writing_anything(tiny, tmp_path):
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        train(tiny_config("train.step_runner=cuda_graph"), options(tiny, tmp_path / "run"))
    assert not (tmp_path / "run").exists()
