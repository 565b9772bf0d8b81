"""Training never destroys a run: reruns, divergence, errors inside a step, leftovers of killed writes, a missing
val split, and epoch averages that cover the whole epoch after a resume."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from butd.config import load_config
from butd.core.checkpoint import load_checkpoint
from butd.data.captions import CaptionData, write_data_dir
from butd.errors import ConfigError, DataError
from butd.train import loop
from butd.train.loop import NonFiniteLossError, TrainOptions, train
from butd.train.step import DivergenceError, DivergenceGuard, TrainingStepError
from train_fixtures import make_tiny_dataset, single_thread, tiny, tiny_config, xe_options as options  # noqa: F401 (fixtures)

pytestmark = pytest.mark.usefixtures("single_thread")
ROOT = Path(__file__).resolve().parents[1]


def crash_after_save(monkeypatch, *, at_iteration: int | None = None) -> None:
    """Make the loop's next checkpoint write (or the one of ``at_iteration``) complete, then "kill" the run."""
    real_save = loop.save_checkpoint

    def save_then_crash(path, payload):
        real_save(path, payload)
        if at_iteration is None or payload["iteration"] == at_iteration:
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(loop, "save_checkpoint", save_then_crash)


def snapshot(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(run_dir.iterdir()) if p.is_file()}


def test_rerun_over_a_finished_run_is_refused_and_changes_nothing(tiny, tmp_path):
    train(tiny_config("train.max_epochs=1"), options(tiny, tmp_path / "run"))
    before = snapshot(tmp_path / "run")
    with pytest.raises(ConfigError, match=r"already holds a run \(last.pt: xe, epoch 1\); continue it with --resume"):
        train(tiny_config("train.max_epochs=1"), options(tiny, tmp_path / "run"))
    assert snapshot(tmp_path / "run") == before
    # Resuming a finished run is harmless: nothing left to do, nothing rewritten.
    cfg = load_config(tmp_path / "run" / "config.yaml")
    result = train(cfg, options(tiny, tmp_path / "run", resume=True))
    assert result.state.epoch == 1
    assert snapshot(tmp_path / "run")["last.pt"] == before["last.pt"]


def test_rerun_over_an_interrupted_run_is_refused(tiny, tmp_path, monkeypatch):
    crash_after_save(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config("train.checkpoint_every_iters=2"), options(tiny, tmp_path / "run"))
    monkeypatch.undo()
    before = snapshot(tmp_path / "run")
    with pytest.raises(ConfigError, match="last.pt: xe, epoch 0.*--resume"):
        train(tiny_config(), options(tiny, tmp_path / "run"))
    assert snapshot(tmp_path / "run") == before


def test_a_run_dir_without_checkpoints_starts_over_with_clean_logs(tiny, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "iteration": 4, "CIDEr-D": 0.5}) + "\n")
    (run / "train_log.jsonl").write_text(json.dumps({"iteration": 1, "loss": 9.0}) + "\n")
    train(tiny_config("train.max_epochs=1"), options(tiny, run))
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1] and "CIDEr-D" in metrics[0] and metrics[0]["CIDEr-D"] != 0.5
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in log] == list(range(1, len(log) + 1))


def test_half_written_temporaries_are_removed_by_the_next_run(tiny, tmp_path):
    train(tiny_config("train.max_epochs=1"), options(tiny, tmp_path / "run"))
    stale = [tmp_path / "run" / ".last.pt.k1ll3d.tmp", tmp_path / "run" / ".best.pt.x.tmp",
             tmp_path / "run" / ".config.yaml.abc.tmp"]
    for path in stale:
        path.write_bytes(b"half a checkpoint")
    cfg = load_config(tmp_path / "run" / "config.yaml", ["train.max_epochs=2"])
    train(cfg, options(tiny, tmp_path / "run", resume=True))
    assert not any(path.exists() for path in stale)


def test_an_exploding_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tiny, tmp_path):
    train(tiny_config("train.max_epochs=1"), options(tiny, tmp_path / "run"))
    before = snapshot(tmp_path / "run")
    cfg = load_config(tmp_path / "run" / "config.yaml", ["train.max_epochs=3", "train.lr=1e6", "train.grad_clip=0"])
    with pytest.raises(DivergenceError, match=r"epoch 2, iteration \d+: the training loss exploded .* the "
                                              r"checkpoints in .* keep the model of iteration 4"):
        train(cfg, options(tiny, tmp_path / "run", resume=True))
    after = snapshot(tmp_path / "run")
    assert after["last.pt"] == before["last.pt"] and after["best.pt"] == before["best.pt"]


def test_divergence_guard_follows_the_running_level():
    guard = DivergenceGuard(factor=100.0)
    assert not any(guard.exploded(v) for v in (9.2, 8.7, 8.1, 7.9, 0.01, -0.5))  # ordinary values
    assert guard.exploded(1.0e4)
    assert not guard.exploded(50.0)  # below 100x a level that the explosion did not raise
    assert not DivergenceGuard(factor=0.0).exploded(1e30)  # off
    small = DivergenceGuard(factor=100.0)
    small.exploded(0.001)
    assert not small.exploded(5.0)  # near-zero SCST losses: the level's floor of 1 keeps fluctuations legal


def test_an_error_inside_a_step_is_one_line_naming_the_iteration(tiny, tmp_path, monkeypatch):
    def broken_step(self, closure=None):
        raise RuntimeError("value cannot be converted to type float without overflow\nmore detail")

    monkeypatch.setattr(torch.optim.Adam, "step", broken_step)
    with pytest.raises(TrainingStepError, match=r"^epoch 1, iteration 1: the training step failed \(RuntimeError: "
                                                r"value cannot be converted .* overflow\); no checkpoint was written"):
        train(tiny_config("train.max_epochs=1"), options(tiny, tmp_path / "run"))
    assert not (tmp_path / "run" / "last.pt").exists()


@pytest.mark.parametrize("lr", ["1e6", "1e30", "1e38"])
def test_the_train_tool_reports_a_diverging_run_in_one_line(tiny, tmp_path, capsys, lr):
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_tool", ROOT / "tools" / "train.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    config = tmp_path / "tiny.yaml"
    from butd.config import save_config

    save_config(tiny_config("train.max_epochs=2", "train.grad_clip=0"), config)
    code = tool.main(["--config", str(config), "--stage", "xe", "--data", str(tiny[0]), "--features", str(tiny[1]),
                      "--output", str(tmp_path / "run"), f"train.lr={lr}"])
    err = capsys.readouterr().err
    errors = [line for line in err.replace("\r", "\n").splitlines() if "error" in line.lower()]
    assert code != 0 and "Traceback" not in err
    assert len(errors) == 1 and errors[0].startswith("error: epoch "), errors
    assert not (tmp_path / "run" / "best.pt").exists() and not (tmp_path / "run" / "last.pt").exists()


def test_resumed_epoch_averages_cover_the_whole_epoch(tiny, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    train(tiny_config("train.max_epochs=1"), options(tiny, straight))
    crash_after_save(monkeypatch, at_iteration=2)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config("train.max_epochs=1", "train.checkpoint_every_iters=2"), options(tiny, tmp_path / "crash"))
    monkeypatch.undo()
    train(load_config(tmp_path / "crash" / "config.yaml"), options(tiny, tmp_path / "crash", resume=True))
    expected = json.loads((straight / "metrics.jsonl").read_text().splitlines()[-1])
    resumed = json.loads((tmp_path / "crash" / "metrics.jsonl").read_text().splitlines()[-1])
    assert math.isclose(resumed["train_loss"], expected["train_loss"], rel_tol=1e-6)


def test_a_data_dir_without_val_images_is_refused_before_training(tiny, tmp_path):
    data = CaptionData.load(tiny[0])
    ids = data.all_image_ids()
    no_val = tmp_path / "no_val"
    encoded = data._captions  # the same captions, only the splits change
    write_data_dir(no_val, vocab=data.vocab, captions=encoded,
                   splits={"train": ids.tolist(), "val": [], "test": []},
                   references={int(i): data.references(int(i)) for i in ids},
                   info={"format_version": 1, "vocab_size": len(data.vocab), "max_length": data.max_length})
    with pytest.raises(DataError, match=r"no_val: the val split has no images"):
        train(tiny_config(), TrainOptions(stage="xe", data_dir=no_val, features=tiny[1], output=tmp_path / "r"))
    assert not (tmp_path / "r").exists()


def test_a_run_that_ends_in_non_finite_steps_fails_and_keeps_its_checkpoints(tiny, tmp_path):
    train(tiny_config("train.max_epochs=1"), options(tiny, tmp_path / "run"))
    before = snapshot(tmp_path / "run")
    # lr 1e30: the first update makes the weights huge but finite; every later loss is non-finite (skipped), fewer
    # than train.max_bad_steps in a row before the run ends.
    cfg = load_config(tmp_path / "run" / "config.yaml", ["train.max_epochs=3", "train.lr=1e30"])
    with pytest.raises(NonFiniteLossError, match=r"training ended after \d+ non-finite steps in a row .* keep the "
                                                 r"model of iteration 4"):
        train(cfg, options(tiny, tmp_path / "run", resume=True))
    after = snapshot(tmp_path / "run")
    assert after["last.pt"] == before["last.pt"] and after["best.pt"] == before["best.pt"]


def test_the_demo_resumes_an_interrupted_stage_and_skips_a_finished_one(tiny, tmp_path, monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("demo_tool", ROOT / "tools" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    run = tmp_path / "run"
    args, finished = demo.train_args(run, ["--config", "c.yaml"], ["--data", "d"], "xe")
    assert not finished and args[-2:] == ["--output", str(run)] and "--resume" not in args
    crash_after_save(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config("train.max_epochs=2"), options(tiny, run))
    monkeypatch.undo()
    args, finished = demo.train_args(run, ["--config", "c.yaml"], ["--data", "d"], "xe")
    assert not finished and args[1:3] == ["--resume", str(run)] and "--config" not in args
    assert not (run / "best.pt").exists()  # killed after last.pt, before best.pt
    train(load_config(run / "config.yaml"), options(tiny, run, resume=True))
    assert demo.train_args(run, ["--config", "c.yaml"], ["--data", "d"], "xe")[1] is True
    assert (run / "best.pt").is_file()  # restored from last.pt at the resume, or written by the second epoch


def test_a_kill_between_last_and_best_loses_no_best_model(tiny, tmp_path, monkeypatch):
    run = tmp_path / "run"
    crash_after_save(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config("train.max_epochs=1"), options(tiny, run))
    monkeypatch.undo()
    assert (run / "last.pt").is_file() and not (run / "best.pt").exists()
    train(load_config(run / "config.yaml"), options(tiny, run, resume=True))  # nothing left to train
    best, last = load_checkpoint(run / "best.pt"), load_checkpoint(run / "last.pt")
    assert (best["epoch"], best["iteration"], best["best_score"]) == (last["epoch"], last["iteration"],
                                                                       last["best_score"])
    assert all(torch.equal(best["model"][k], v) for k, v in last["model"].items())
