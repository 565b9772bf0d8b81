#!/usr/bin/env python
"""XE training-step throughput on synthetic data: ms/iteration, images/s, the implied Karpathy-train epoch time.

  python benchmarks/train_xe.py --device cuda --batch-size 100 [--precision bf16] [--iters 50 --warmup 10]
  python benchmarks/train_xe.py --device cuda --batch-size 10 --runner cuda_graph --compare-runners
  python benchmarks/train_xe.py --device cpu --batch-size 4 --iters 3 --warmup 1 --rnn-size 64 --att-hid-size 32 \
      --input-encoding-size 64 --feature-dim 256 --vocab-size 1000      # a quick CPU smoke run

Defaults are the full model (rnn 1000, att 512, emb 1000, 36 x 2048 regions, vocab 9,487, 5 captions/image,
captions with COCO's length distribution). The step is exactly the training loop's, through the runner that
``train.step_runner`` names (``--runner``): ``eager`` is ``butd.train.step.train_step`` (autocast forward, finite
checks, backward, value clipping, Adam; fused on CUDA as in the loop) with the packed XE path (``train.packed_xe``);
``static`` is the sync-free fixed-shape step and ``cuda_graph`` the same step replayed as a CUDA graph
(``butd.train.graph_step``), both reading their values back every 50 steps as the loop does by default. The timed
span ends when every step's values are on the host. ``--compare-runners`` also times the other runners and
``--compare-plain`` the plain padded loop in the same process (``runners.<kind>.speedup_vs_main``: how many times
faster that runner is than ``--runner``). Prints one JSON line. The warm-up (default 5)
covers the graph capture (3 uncaptured steps, then the capture).
Reference (self-critical.pytorch on one H200, 2026-12-04): 48.7 ms/iteration at batch 10, 73.0 ms at batch 100.
"""
from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch

from butd.config import load_config
from butd.data.dataset import Batch
from butd.models import build_model
from butd.train.distributed import DistContext
from butd.train.runner import RUNNERS, EagerRunner, StepRunner, deferred_runner
from butd.train.static_xe import StaticXeObjective
from butd.train.step import DivergenceGuard
from butd.train.xe import XeObjective

KARPATHY_TRAIN_IMAGES = 113_287


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """Model, data and timing flags shared with benchmarks/train_scst.py."""
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=("fp32", "bf16"), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--batch-size", type=int, default=100, help="images per iteration")
    p.add_argument("--iters", type=int, default=30, help="timed iterations")
    p.add_argument("--warmup", type=int, default=5, help="untimed iterations first")
    p.add_argument("--rnn-size", type=int, default=1000)
    p.add_argument("--att-hid-size", type=int, default=512)
    p.add_argument("--input-encoding-size", type=int, default=1000)
    p.add_argument("--feature-dim", type=int, default=2048)
    p.add_argument("--num-boxes", type=int, default=36)
    p.add_argument("--vocab-size", type=int, default=9487)
    p.add_argument("--seq-per-img", type=int, default=5)
    p.add_argument("--max-length", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true", help="torch.compile the decoder step (train.compile); the "
                   "warm-up iterations absorb the compile time, so give it --warmup 5 or more")


def build(args: argparse.Namespace) -> tuple[torch.nn.Module, DistContext, bool]:
    """The captioner on the device, a single-process context, and whether bf16 autocast is on."""
    torch.manual_seed(args.seed)
    cfg = load_config(None, [f"model.rnn_size={args.rnn_size}", f"model.att_hid_size={args.att_hid_size}",
                             f"model.input_encoding_size={args.input_encoding_size}",
                             f"model.feature_dim={args.feature_dim}"])
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    model = build_model(cfg.model, args.vocab_size).to(device).train()
    if args.compile:
        model.compile_advance()
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    return model, DistContext(rank=0, world_size=1, local_rank=0, device=device), precision == "bf16"


# Words per caption in the Karpathy train split after truncation to 16 words (80,047 captions of the 20,000-image
# COCO-proxy subset, real COCO captions): mean 10.4 words, so 11.4 tokens with <eos>. Padding to the longest caption
# of a batch (usually 17 tokens) makes about a third of a padded batch padding, which the packed XE path skips.
COCO_CAPTION_WORDS = {7: 0.008, 8: 0.168, 9: 0.217, 10: 0.215, 11: 0.155, 12: 0.097, 13: 0.056, 14: 0.032,
                      15: 0.018, 16: 0.034}


def synthetic_batch(args: argparse.Namespace, device: torch.device, *, with_labels: bool = True) -> Batch:
    """Random regions (all real) and random captions whose lengths follow COCO's (``COCO_CAPTION_WORDS``)."""
    b, n = args.batch_size, args.num_boxes
    labels = None
    if with_labels:
        words = torch.randint(4, args.vocab_size, (b, args.seq_per_img, args.max_length))
        choices = torch.tensor(list(COCO_CAPTION_WORDS)).clamp(max=args.max_length)
        pick = torch.multinomial(torch.tensor(list(COCO_CAPTION_WORDS.values())), b * args.seq_per_img,
                                 replacement=True)
        lengths = choices[pick].view(b, args.seq_per_img, 1)
        labels = words.masked_fill(torch.arange(args.max_length) >= lengths, 0)
    return Batch(image_ids=torch.arange(b), features=torch.randn(b, n, args.feature_dim),
                 boxes=torch.rand(b, n, 4) * 100, image_size=torch.full((b, 2), 100.0),
                 region_mask=torch.ones(b, n, dtype=torch.bool), labels=labels).to(device)


def eager_runner(step_fn: torch.nn.Module, model: torch.nn.Module, ctx: DistContext, bf16: bool) -> StepRunner:
    """The training loop's eager step (``train.step_runner=eager``), with the loop's optimizer: fused Adam on CUDA."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, fused=ctx.device.type == "cuda")
    return EagerRunner(step_fn=step_fn, model=model, optimizer=optimizer, grad_clip=0.1, bf16=bf16, ctx=ctx,
                       guard=DivergenceGuard())


def stage_runner(kind: str, *, eager_objective: torch.nn.Module, static_objective: torch.nn.Module,
                 model: torch.nn.Module, ctx: DistContext, bf16: bool, args: argparse.Namespace) -> StepRunner:
    """The step of ``train.step_runner=kind``, as the loop builds it: the eager objective for ``eager``, the
    fixed-shape one otherwise (values read back every 50 steps, the default ``train.log_every``)."""
    if kind == "eager":
        return eager_runner(eager_objective, model, ctx, bf16)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    return deferred_runner(kind, objective=static_objective, model=model, optimizer=optimizer, grad_clip=0.1,
                           bf16=bf16, guard=DivergenceGuard(), device=ctx.device, read_every=50,
                           batch_size=args.batch_size)


def xe_runner(kind: str, model: torch.nn.Module, ctx: DistContext, bf16: bool, args: argparse.Namespace,
              *, packed: bool = True) -> StepRunner:
    """The XE step of ``train.step_runner=kind``."""
    return stage_runner(kind, eager_objective=XeObjective(model, packed=packed),
                        static_objective=StaticXeObjective(model), model=model, ctx=ctx, bf16=bf16, args=args)


def warmup_steps(runner: StepRunner, args: argparse.Namespace) -> int:
    """``--warmup``, raised for a CUDA-graph runner so that its capture is not timed (uncaptured steps, capture)."""
    captured = getattr(runner, "captured", None)
    return args.warmup if captured is None else max(args.warmup, captured.warmup + 1)


def time_steps(runner: StepRunner, batch: Batch, args: argparse.Namespace, ctx: DistContext, bf16: bool) -> dict:
    """Run warmup + timed loop steps; the timing result as a dict (ms/iter, images/s, epoch time, memory). The
    timed span ends when every step's values are on the host (a deferred runner's read-back included)."""
    cuda = ctx.device.type == "cuda"
    iteration = 0

    def step() -> list:
        nonlocal iteration
        iteration += 1
        return runner.step(batch, lr=1e-4, ss_prob=0.0, iteration=iteration)

    for _ in range(warmup_steps(runner, args)):
        step()
    runner.flush()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    outcomes = []
    for _ in range(args.iters):
        outcomes += step()
    outcomes += runner.flush()
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.iters
    images_per_s = args.batch_size / seconds
    return {
        "device": torch.cuda.get_device_name(ctx.device) if cuda else f"cpu ({torch.get_num_threads()} threads)",
        "precision": "bf16" if bf16 else "fp32", "compile": args.compile, "batch_size": args.batch_size,
        "iters": args.iters,
        "ms_per_iter": round(seconds * 1000, 2), "images_per_s": round(images_per_s, 1),
        "karpathy_epoch_s": round(KARPATHY_TRAIN_IMAGES / images_per_s, 1),
        "peak_gpu_mem_gib": round(torch.cuda.max_memory_allocated(ctx.device) / 2**30, 2) if cuda else None,
        "skipped_steps": sum(not o.good for o in outcomes),
        "model": {"rnn_size": args.rnn_size, "att_hid_size": args.att_hid_size,
                  "input_encoding_size": args.input_encoding_size, "feature_dim": args.feature_dim,
                  "num_boxes": args.num_boxes, "vocab_size": args.vocab_size, "seq_per_img": args.seq_per_img},
        "torch": torch.__version__,
    }


SUMMARY = ("ms_per_iter", "images_per_s", "karpathy_epoch_s", "peak_gpu_mem_gib", "skipped_steps")


def add_runner_arguments(p: argparse.ArgumentParser) -> None:
    """``--runner`` and ``--compare-runners``, shared with benchmarks/train_scst.py."""
    p.add_argument("--runner", choices=RUNNERS, default="eager",
                   help="train.step_runner: eager (the default), static (fixed shapes, no host sync), "
                        "cuda_graph (static, each step replayed as one CUDA graph; CUDA only)")
    p.add_argument("--compare-runners", action="store_true",
                   help="also time the other runners in the same run (cuda_graph only on CUDA); each starts from "
                        "the weights the previous one left")


def check_runner_arguments(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.runner == "cuda_graph" and not args.device.startswith("cuda"):
        p.error("--runner cuda_graph needs --device cuda")
    if args.runner == "cuda_graph" and args.compile:
        p.error("--compile and --runner cuda_graph do not go together (train.step_runner=cuda_graph refuses it)")


def time_runners(make: Callable[[str], StepRunner], batch: Batch, args: argparse.Namespace, ctx: DistContext,
                 bf16: bool) -> dict:
    """``--runner``'s timing, and with ``--compare-runners`` the others' under ``runners`` (``speedup_vs_main``: how
    many times faster that runner is than ``--runner``; a runner that fails gets its one-line ``error`` instead, so
    the others' figures still come out)."""
    result = {"runner": args.runner, **time_steps(make(args.runner), batch, args, ctx, bf16)}
    if args.compare_runners:
        result["runners"] = {}
        for kind in RUNNERS:
            if kind == args.runner or (kind == "cuda_graph" and (ctx.device.type != "cuda" or args.compile)):
                continue
            try:
                timed = time_steps(make(kind), batch, args, ctx, bf16)
            except Exception as error:  # noqa: BLE001 (a benchmark reports, it does not stop)
                lines = str(error).strip().splitlines()
                result["runners"][kind] = {"error": f"{type(error).__name__}: {lines[0] if lines else ''}"}
                continue
            result["runners"][kind] = {k: timed[k] for k in SUMMARY}
            result["runners"][kind]["speedup_vs_main"] = round(result["ms_per_iter"] / timed["ms_per_iter"], 2)
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    add_runner_arguments(p)
    p.add_argument("--compare-plain", action="store_true",
                   help="also time the plain padded loop (train.packed_xe=false) in the same run")
    args = p.parse_args(argv)
    check_runner_arguments(p, args)
    model, ctx, bf16 = build(args)
    batch = synthetic_batch(args, ctx.device)
    result = {"benchmark": "train_xe", "packed_xe": args.runner == "eager",
              **time_runners(lambda kind: xe_runner(kind, model, ctx, bf16, args), batch, args, ctx, bf16)}
    if args.compare_plain:
        plain = time_steps(xe_runner("eager", model, ctx, bf16, args, packed=False), batch, args, ctx, bf16)
        result["plain"] = {k: plain[k] for k in SUMMARY}
        result["plain_over_this"] = round(plain["ms_per_iter"] / result["ms_per_iter"], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
