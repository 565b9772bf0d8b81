"""benchmarks/full_scale.py end to end on a tiny COCO-proxy on CPU: the same steps as the full-scale GPU run
(proxy, prepro, XE, SCST, beam-3 evaluation of both stages), its one JSON line, and resuming a finished run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = {"model": "model:\n  rnn_size: 32\n  att_hid_size: 16\n  input_encoding_size: 32\n",
        "train": "train:\n  max_epochs: 1\n  batch_size: 20\n  tensorboard: false\n"}


def run_benchmark(output: Path, xe: Path, scst: Path) -> tuple[dict, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "full_scale.py"), "--output", str(output),
                           "--num-images", "120", "--config", str(xe), "--scst-config", str(scst)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stdout


def test_full_scale_benchmark_runs_every_stage_and_resumes(tmp_path):
    xe, scst = tmp_path / "xe.yaml", tmp_path / "scst.yaml"
    xe.write_text(f"_BASE_: {ROOT / 'configs' / 'demo.yaml'}\n{TINY['model']}{TINY['train']}")
    scst.write_text(f"_BASE_: {xe}\ntrain:\n  lr: 1.0e-4\n  warmup_iters: 0\n")
    result, stdout = run_benchmark(tmp_path / "run", xe, scst)

    assert result["benchmark"] == "full_scale" and result["device"] == "cpu"
    assert "COCO-proxy test split" in stdout and "CIDEr-D" in stdout  # the leaderboard table was printed
    assert set(result["step_seconds"]) == {"proxy dataset", "caption preprocessing", "XE training", "SCST training",
                                           "XE evaluation", "SCST evaluation"}
    assert all(v > 0 for v in result["step_seconds"].values())
    # Each figure is rounded to 0.1 s on its own, so the sum of the rounded parts may differ by 0.1.
    assert result["xe_plus_scst_s"] == pytest.approx(result["step_seconds"]["XE training"]
                                                     + result["step_seconds"]["SCST training"], abs=0.11)
    for stage in ("xe", "scst"):
        summary = result["stages"][stage]
        assert summary["epochs"] == 1 and summary["train_s_per_epoch"] > 0 and summary["peak_gpu_mem_gib"] is None
        assert 0 <= summary["val_cider_d_last"] <= summary["val_cider_d_best"]
    assert result["test_images"] > 0
    for stage in ("XE", "SCST"):
        assert set(result["test_metrics"][stage]) >= {"BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D", "SPICE"}

    # A second call finds every step done, runs nothing and reports the times measured the first time.
    again, stdout = run_benchmark(tmp_path / "run", xe, scst)
    assert stdout.count("already done") == 6
    assert again["step_seconds"] == result["step_seconds"] and again["test_metrics"] == result["test_metrics"]
