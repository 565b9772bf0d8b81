"""The XE stage: the loss, the schedules, exact resume, NaN handling, feature checks and the command line."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from butd.config import load_config, save_config
from butd.data.captions import CaptionData
from butd.data.dataset import CaptionDataset, build_loader
from butd.errors import DataError
from butd.models import build_model
from butd.train import loop
from butd.train.loop import NonFiniteLossError, TrainOptions, learning_rate, train
from butd.train.xe import XeObjective, scheduled_sampling_prob, teacher_forcing_pair
from train_fixtures import make_tiny_dataset, single_thread, tiny, tiny_config, xe_options as options  # noqa: F401 (fixtures)

pytestmark = pytest.mark.usefixtures("single_thread")
ROOT = Path(__file__).resolve().parents[1]


def losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "train_log.jsonl").read_text().splitlines()
    return {r["iteration"]: r["loss"] for r in map(json.loads, lines)}


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(x, y, atol=1e-6, rtol=0), name


def test_teacher_forcing_pair_appends_eos_and_trims_padding():
    labels = torch.tensor([[5, 6, 7, 0, 0, 0], [8, 0, 0, 0, 0, 0]])
    inputs, targets = teacher_forcing_pair(labels)
    assert inputs.tolist() == [[1, 5, 6, 7], [1, 8, 0, 0]]
    assert targets.tolist() == [[5, 6, 7, 2], [8, 2, 0, 0]]
    full = torch.tensor([[5, 6, 7]])
    assert teacher_forcing_pair(full)[1].tolist() == [[5, 6, 7, 2]]  # a caption at max_length still ends


def test_xe_loss_is_the_mean_token_cross_entropy(tiny):
    data = CaptionData.load(tiny[0])
    cfg = tiny_config("model.dropout=0.0")
    model = build_model(cfg.model, len(data.vocab))
    batch = next(iter(build_loader(CaptionDataset(data, tiny[1], "train", seq_per_img=3), batch_size=4,
                                   shuffle=False, num_workers=0, seed=0, epoch=0)))
    out = XeObjective(model, label_smoothing=0.1)(batch)
    regions = model.encode(batch.features, batch.region_mask).repeat(3)
    inputs, targets = teacher_forcing_pair(batch.labels.reshape(12, -1))
    logits, _ = model(regions, inputs)
    keep = targets != 0
    expected = F.cross_entropy(logits[keep], targets[keep], label_smoothing=0.1)
    assert torch.allclose(out.loss, expected, atol=1e-6)
    # Scheduled sampling with a vanishing probability feeds the same words as teacher forcing.
    sampled = XeObjective(model, label_smoothing=0.1)(batch, ss_prob=1e-12)
    assert torch.allclose(sampled.loss, out.loss, atol=1e-6)
    # With probability 1 the model is fed its own samples, so the loss is computed on other inputs. A random model's
    # loss is near log V whatever it is fed (closeness would be a near-tie), but it differs in its bits unless every
    # one of the ~80 sampled words equals the reference word.
    fed, forced = XeObjective(model)(batch, ss_prob=1.0).loss, XeObjective(model)(batch).loss
    assert float(fed.detach()) != float(forced.detach())


def test_schedules():
    tc = load_config(None, ["train.lr=1.0", "train.lr_decay_every=3", "train.lr_decay_rate=0.5",
                            "train.warmup_iters=4"]).train
    assert learning_rate(tc, epoch=0, iteration=0) == pytest.approx(0.25)
    assert learning_rate(tc, epoch=2, iteration=10) == 1.0 and learning_rate(tc, epoch=3, iteration=10) == 0.5
    assert learning_rate(tc, epoch=6, iteration=10) == 0.25
    kw = dict(start=2, increase_every=2, increase_prob=0.1, max_prob=0.25)
    assert [scheduled_sampling_prob(e, **kw) for e in range(9)] == pytest.approx(
        [0, 0, 0, 0, 0.1, 0.1, 0.2, 0.2, 0.25])
    assert scheduled_sampling_prob(10, start=-1, increase_every=1, increase_prob=1, max_prob=1) == 0.0


def test_resume_at_epoch_end_and_mid_epoch_repeats_the_uninterrupted_losses(tiny, tmp_path, monkeypatch):
    straight = train(tiny_config(), options(tiny, tmp_path / "straight"))
    expected = losses(tmp_path / "straight")
    assert len(expected) == straight.state.iteration == 8

    # Stop after epoch 1, then resume for the second epoch with the saved config.
    train(tiny_config("train.max_epochs=1"), options(tiny, tmp_path / "split"))
    cfg = load_config(tmp_path / "split" / "config.yaml", ["train.max_epochs=2"])
    resumed = train(cfg, options(tiny, tmp_path / "split", resume=True))
    assert losses(tmp_path / "split") == pytest.approx(expected, abs=1e-6)
    assert_same_weights(resumed.model, straight.model)

    # Crash right after the mid-epoch checkpoint of iteration 6 (epoch 2, batch 2 of 4), then resume.
    real_save = loop.save_checkpoint

    def save_then_crash(path, payload):
        real_save(path, payload)
        if payload["iteration"] == 6:
            raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(loop, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config("train.checkpoint_every_iters=3"), options(tiny, tmp_path / "crash"))
    monkeypatch.undo()
    cfg = load_config(tmp_path / "crash" / "config.yaml")
    resumed = train(cfg, options(tiny, tmp_path / "crash", resume=True))
    assert losses(tmp_path / "crash") == pytest.approx(expected, abs=1e-6)
    assert_same_weights(resumed.model, straight.model)
    metrics = [json.loads(line) for line in (tmp_path / "crash" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2]


def poison(monkeypatch, bad_calls: set[int], *, gradient_only: bool = False) -> list[int]:
    """Make the XE objective return a NaN loss (or a finite loss with NaN gradients) on the given calls."""
    calls = [0]
    real_forward = XeObjective.forward

    def forward(self, batch, ss_prob=0.0):
        out = real_forward(self, batch, ss_prob)
        calls[0] += 1
        if calls[0] in bad_calls:
            if gradient_only:  # value 0, gradient 0 * inf = NaN
                param = next(self.model.parameters())
                out.loss = out.loss + 0.0 * torch.sqrt(param.sum() * 0.0)
            else:
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(XeObjective, "forward", forward)
    return calls


@pytest.mark.parametrize("gradient_only", [False, True])
def test_non_finite_steps_are_skipped_and_counted(tiny, tmp_path, monkeypatch, gradient_only):
    steps = [0]
    real_step = torch.optim.Adam.step
    monkeypatch.setattr(torch.optim.Adam, "step", lambda self, *a, **k: (steps.__setitem__(0, steps[0] + 1),
                                                                         real_step(self, *a, **k))[1])
    poison(monkeypatch, {2, 3}, gradient_only=gradient_only)
    result = train(tiny_config(), options(tiny, tmp_path / "run"))
    assert result.state.bad_steps_total == 2 and steps[0] == result.state.iteration - 2
    assert all(bool(torch.isfinite(p).all()) for p in result.model.parameters())
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["bad_steps"] == 2 and math.isfinite(metrics[-1]["train_loss"])


def test_too_many_bad_steps_abort_without_touching_the_checkpoint(tiny, tmp_path, monkeypatch):
    train(tiny_config("train.max_epochs=1"), options(tiny, tmp_path / "run"))
    before = (tmp_path / "run" / "last.pt").read_bytes()
    poison(monkeypatch, set(range(1, 100)))
    cfg = load_config(tmp_path / "run" / "config.yaml", ["train.max_epochs=2", "train.max_bad_steps=3"])
    with pytest.raises(NonFiniteLossError, match="3 non-finite losses/gradients in a row"):
        train(cfg, options(tiny, tmp_path / "run", resume=True))
    assert (tmp_path / "run" / "last.pt").read_bytes() == before


def test_missing_features_stop_training_before_it_starts(tmp_path):
    data_dir, features = make_tiny_dataset(tmp_path, missing_features=(21,))
    with pytest.raises(DataError, match=r"1 of the 16 train images .* \[21\]"):
        train(tiny_config(), TrainOptions(stage="xe", data_dir=data_dir, features=features, output=tmp_path / "r"))
    assert not (tmp_path / "r").exists()


def test_xe_learns_the_tiny_dataset(tiny, tmp_path):
    result = train(tiny_config("train.max_epochs=6", "train.lr=1e-2", "train.batch_size=2"),
                   options(tiny, tmp_path / "run"))
    scores = [json.loads(line)["CIDEr-D"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert scores[-1] > scores[0] + 0.5 and result.state.best_score == max(scores)


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_command_line_trains_and_resumes(tiny, tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    save_config(tiny_config("train.max_epochs=1"), config)
    run = tmp_path / "run"
    common = ["--stage", "xe", "--data", str(tiny[0]), "--features", str(tiny[1])]
    # Once as a real process (the installed package, no path tricks), then in-process for speed.
    first = subprocess.run([sys.executable, str(ROOT / "tools" / "train.py"), *common, "--config", str(config),
                            "--output", str(run)], capture_output=True, text=True, env={**os.environ,
                                                                                        "OMP_NUM_THREADS": "1"})
    assert first.returncode == 0, first.stderr
    assert "best val CIDEr-D" in first.stdout
    tool = load_tool("train")
    assert tool.main([*common, "--resume", str(run), "train.max_epochs=2"]) == 0
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2] and all("CIDEr-D" in m for m in metrics)
    assert load_config(run / "config.yaml").train.max_epochs == 2
    assert tool.main([*common, "--resume", str(run), "train.nonsense=1"]) == 1
    assert "unknown key train.nonsense" in capsys.readouterr().err
