"""The end-to-end demo on the embedded COCO-proxy (real COCO captions, synthetic region features).

Builds the proxy subset, preprocesses its captions, trains XE then SCST, evaluates both checkpoints on the proxy's
test split with beam search and prints the leaderboard table side by side with a few captions next to their
references. Every step is one of the project's command-line tools, so the demo also shows how to run them. A step
whose output already exists is skipped, so a killed demo resumes where it stopped. OUTPUT/summary.json keeps each
step's wall-clock seconds and both stages' test metrics (benchmarks/full_scale.py reads it).

Every step runs with one CPU thread (``--threads`` changes it): results depend on the thread count, and one thread
gives the same numbers on every run and is not slowed down by other processes on the cores.

    python tools/demo.py --output demo_output [--num-images 2000] [--config configs/demo.yaml]
                         [--scst-config configs/demo_scst.yaml] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from butd.config import load_config
from butd.core.checkpoint import load_checkpoint
from butd.core.files import write_atomic
from butd.core.threads import parse_threads, thread_environment
from butd.errors import ButdError
from butd.evaluate import format_leaderboard
from butd.metrics.repetition import repetition_report

TOOLS = Path(__file__).resolve().parent
ROOT = TOOLS.parent


def run_step(title: str, args: list[str], *, done: Path | bool, env: dict[str, str]) -> float | None:
    """Run one tool (with environment ``env``) unless it is ``done`` (a path that exists, or True); fail loudly with
    the tool's own message. Returns the step's wall-clock seconds, or ``None`` when it was already done."""
    if done is True or (isinstance(done, Path) and done.exists()):
        print(f"[demo] {title}: already done" + (f" ({done})" if isinstance(done, Path) else ""), flush=True)
        return None
    print(f"[demo] {title}: {' '.join(args)}", flush=True)
    start = time.perf_counter()
    result = subprocess.run([sys.executable, *args], cwd=ROOT, env=env)
    if result.returncode != 0:
        raise SystemExit(f"[demo] {title} failed (exit code {result.returncode})")
    seconds = time.perf_counter() - start
    print(f"[demo] {title}: {seconds:.0f} s", flush=True)
    return seconds


def proxy_complete(proxy: Path) -> bool:
    """The proxy generator marks its info.json complete only after the last feature record (a killed run resumes)."""
    info = proxy / "info.json"
    return info.is_file() and bool(json.loads(info.read_text()).get("complete"))


def train_args(run_dir: Path, fresh: list[str], common: list[str], stage: str) -> tuple[list[str], bool]:
    """The train.py arguments of a stage and whether it is already finished: a run directory holding a checkpoint
    is resumed (train.py refuses to start over it), a finished one is skipped."""
    last = run_dir / "last.pt"
    if not last.is_file():
        return [str(TOOLS / "train.py"), *fresh, *common, "--stage", stage, "--output", str(run_dir)], False
    max_epochs = load_config(run_dir / "config.yaml").train.max_epochs
    finished = load_checkpoint(last)["epoch"] >= max_epochs
    return [str(TOOLS / "train.py"), "--resume", str(run_dir), *common, "--stage", stage], finished


def write_summary(path: Path, summary: dict) -> None:
    """This run's step times (``null``: done by an earlier run) and test metrics, written atomically."""
    previous = json.loads(path.read_text()) if path.exists() else {}
    for title, value in (previous.get("step_seconds") or {}).items():
        if summary["step_seconds"].get(title) is None:  # keep the time measured when the step really ran
            summary["step_seconds"][title] = value
    write_atomic(path, json.dumps(summary, indent=2) + "\n")


def read_captions(eval_dirs: dict[str, Path]) -> dict[str, dict[int, dict]]:
    """Each stage's ``captions_test.jsonl`` rows by image id."""
    per_stage = {}
    for stage, directory in eval_dirs.items():
        lines = (directory / "captions_test.jsonl").read_text().splitlines()
        per_stage[stage] = {row["image_id"]: row for row in map(json.loads, lines)}
    return per_stage


def show_repetition(per_stage: dict[str, dict[int, dict]]) -> dict[str, dict]:
    """Print, per stage, how many test captions contain <unk> or repeat a word or a bigram; returns the counts."""
    reports = {stage: repetition_report(row["caption"] for row in rows.values()) for stage, rows in per_stage.items()}
    for stage, report in reports.items():
        print(f"{stage:>4} test captions: {report.summary()}")
    return {stage: report.to_json() for stage, report in reports.items()}


def show_examples(per_stage: dict[str, dict[int, dict]], count: int) -> None:
    """Print a few test images' captions from every stage next to their first two references."""
    first = next(iter(per_stage.values()))
    for image_id in sorted(first)[:count]:
        print(f"\nimage {image_id}")
        for stage, rows in per_stage.items():
            print(f"  {stage:>4}: {rows[image_id]['caption']}")
        for reference in first[image_id]["references"][:2]:
            print(f"   ref: {reference}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=ROOT / "demo_output", help="working directory of the demo")
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml", help="XE configuration")
    parser.add_argument("--scst-config", type=Path, default=ROOT / "configs" / "demo_scst.yaml",
                        help="SCST configuration (builds on the XE one with a lower learning rate)")
    parser.add_argument("--num-images", default="2000", help="COCO-proxy images (or 'all')")
    parser.add_argument("--beam-size", type=int, default=3, help="beam width for the test-split evaluation")
    parser.add_argument("--examples", type=int, default=5, help="captions to show next to their references")
    parser.add_argument("--threads", default="1",
                        help="CPU threads of every step (default 1: the same numbers on every run, whatever the load)")
    args = parser.parse_args(argv)
    try:
        threads = parse_threads(args.threads, source="--threads")
    except ButdError as error:
        parser.error(str(error))
    env = thread_environment(threads)

    out = args.output.resolve()
    proxy, data, feats = out / "proxy", out / "data", out / "proxy" / "features.lmdb"
    xe_run, scst_run = out / "runs" / "xe", out / "runs" / "scst"
    print("[demo] COCO-proxy: real COCO captions with SYNTHETIC region features (real language, synthetic vision)")
    print(f"[demo] {threads} CPU thread{'s' if threads > 1 else ''} per step (--threads)", flush=True)
    seconds: dict[str, float | None] = {}  # per step; None: done by an earlier run
    seconds["proxy dataset"] = run_step(
        "proxy dataset", [str(TOOLS / "make_proxy_dataset.py"), "--output", str(proxy), "--num-images",
                          args.num_images], done=proxy_complete(proxy), env=env)
    seconds["caption preprocessing"] = run_step(
        "caption preprocessing", [str(TOOLS / "prepro_captions.py"), "--input", str(proxy / "dataset_coco.json"),
                                  "--output", str(data)], done=data / "info.json", env=env)
    common = ["--data", str(data), "--features", str(feats)]
    xe_args, xe_done = train_args(xe_run, ["--config", str(args.config)], common, "xe")
    seconds["XE training"] = run_step("XE training", xe_args, done=xe_done, env=env)
    scst_args, scst_done = train_args(scst_run, ["--config", str(args.scst_config), "--init", str(xe_run / "best.pt")],
                                      common, "scst")
    seconds["SCST training"] = run_step("SCST training", scst_args, done=scst_done, env=env)
    eval_dirs = {"XE": out / "eval" / "xe", "SCST": out / "eval" / "scst"}
    for (stage, directory), run in zip(eval_dirs.items(), (xe_run, scst_run)):
        seconds[f"{stage} evaluation"] = run_step(
            f"{stage} evaluation", [str(TOOLS / "eval.py"), "--checkpoint", str(run / "best.pt"), *common,
                                    "--split", "test", "--beam-size", str(args.beam_size), "--output",
                                    str(directory)], done=directory / "metrics.json", env=env)

    rows = {stage: json.loads((d / "metrics.json").read_text()) for stage, d in eval_dirs.items()}
    num_images = rows["XE"]["num_images"]
    print(f"\nCOCO-proxy test split ({num_images} images, beam {args.beam_size}; synthetic features, real captions)")
    print(format_leaderboard(rows))
    per_stage = read_captions(eval_dirs)
    repetition = show_repetition(per_stage)
    write_summary(out / "summary.json", {"num_images": args.num_images, "beam_size": args.beam_size,
                                         "threads": threads, "step_seconds": seconds, "test_metrics": rows,
                                         "test_captions": repetition})
    show_examples(per_stage, args.examples)


if __name__ == "__main__":
    main()
