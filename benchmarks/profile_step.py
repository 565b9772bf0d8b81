#!/usr/bin/env python
"""Where a training step spends its time: torch.profiler over a few XE or SCST steps, the top operators as JSON.

  python benchmarks/profile_step.py --stage xe --device cuda --batch-size 250 [--trace trace.json]
  python benchmarks/profile_step.py --stage xe --device cuda --batch-size 250 --runner cuda_graph
  python benchmarks/profile_step.py --stage scst --device cpu --batch-size 2 --iters 1 --warmup 1    # CPU smoke run

Same model, synthetic batch and step as benchmarks/train_xe.py / train_scst.py (the loop's step, through the
runner ``--runner`` names: ``train.step_runner``). Prints one JSON line: the device,
the settings, the profiled milliseconds per step, the number of kernel launches and CUDA-graph launches (CUDA) or
operator calls per step, and the ``--top`` operators by self time with their share of the total. ``--trace`` also
writes a Chrome trace (open it in chrome://tracing or Perfetto).
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from torch.profiler import ProfilerActivity, profile

from butd.train.rewards import CaptionReward
from butd.train.runner import RUNNERS
from butd.train.scst import ScstObjective
from train_scst import synthetic_references
from butd.train.static_scst import StaticScstObjective
from train_xe import add_model_arguments, build, stage_runner, synthetic_batch, warmup_steps, xe_runner


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.set_defaults(iters=5, warmup=3)
    p.add_argument("--stage", choices=("xe", "scst"), default="xe")
    p.add_argument("--plain", action="store_true", help="XE: profile the plain padded loop instead of packed")
    p.add_argument("--runner", choices=RUNNERS, default="eager", help="train.step_runner (cuda_graph: its warm-up "
                   "covers the capture)")
    p.add_argument("--top", type=int, default=15, help="operators to list")
    p.add_argument("--trace", default=None, help="also write a Chrome trace to this file")
    args = p.parse_args(argv)

    if args.runner != "eager" and args.plain:
        p.error("--plain is the eager padded XE loop: not with --runner static / cuda_graph")
    model, ctx, bf16 = build(args)
    if args.runner == "cuda_graph" and ctx.device.type != "cuda":
        p.error("--runner cuda_graph needs --device cuda")
    if args.stage == "xe":
        runner = xe_runner(args.runner, model, ctx, bf16, args, packed=not args.plain)
    else:
        from butd.metrics import TensorCiderD

        cider = TensorCiderD(references=synthetic_references(max(args.batch_size, 100), args.vocab_size, args.seed),
                             device=ctx.device)
        reward = CaptionReward(cider=cider)
        runner = stage_runner(args.runner, eager_objective=ScstObjective(model, reward, max_length=args.max_length),
                              static_objective=StaticScstObjective(model, reward, max_length=args.max_length),
                              model=model, ctx=ctx, bf16=bf16, args=args)
    batch = synthetic_batch(args, ctx.device, with_labels=args.stage == "xe")
    cuda = ctx.device.type == "cuda"
    iteration = 0

    def step() -> None:
        nonlocal iteration
        iteration += 1
        runner.step(batch, lr=1e-4, ss_prob=0.0, iteration=iteration)

    for _ in range(warmup_steps(runner, args)):
        step()
    runner.flush()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(args.iters):
            step()
        runner.flush()  # a deferred runner's values come back here
        if cuda:
            torch.cuda.synchronize()
        ms = (time.perf_counter() - start) * 1000 / args.iters
    events = prof.key_averages()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    total = sum(getattr(e, key) for e in events) or 1.0
    top = sorted(events, key=lambda e: getattr(e, key), reverse=True)[: args.top]
    graph_launches = sum(e.count for e in events if e.key == "cudaGraphLaunch")
    if cuda:
        launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cudaLaunchKernelExC"))
    else:
        launches = sum(e.count for e in events if e.key.startswith("aten::"))
    if args.trace:
        prof.export_chrome_trace(args.trace)
    print(json.dumps({
        "benchmark": "profile_step", "stage": args.stage, "runner": args.runner,
        "packed_xe": args.stage == "xe" and not args.plain and args.runner == "eager",
        "device": torch.cuda.get_device_name(ctx.device) if cuda else f"cpu ({torch.get_num_threads()} threads)",
        "precision": "bf16" if bf16 else "fp32", "batch_size": args.batch_size, "iters": args.iters,
        "profiled_ms_per_iter": round(ms, 2),
        ("kernel_launches_per_iter" if cuda else "aten_calls_per_iter"): round(launches / args.iters),
        **({"graph_launches_per_iter": round(graph_launches / args.iters, 2)} if cuda else {}),
        "top_ops": [{"op": e.key, "self_ms_per_iter": round(getattr(e, key) / 1000 / args.iters, 3),
                     "share": round(getattr(e, key) / total, 3), "calls_per_iter": round(e.count / args.iters, 1)}
                    for e in top],
        "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
