"""The training loop shared by both stages: ``train(cfg, options)``.

Read it top to bottom: set up (data, model, the stage's objective, optimizer, resume), then epochs of steps, each
epoch ending with validation and checkpoints. The stage only chooses the objective: :class:`XeObjective`
(teacher-forced cross-entropy) or :class:`ScstObjective` (self-critical policy gradient).
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from butd.config import Config, TrainConfig, config_from_dict, config_to_dict, save_config
from butd.data.captions import CaptionData
from butd.data.dataset import Batch, CaptionDataset, build_loader, require_features
from butd.errors import ButdError, ConfigError
from butd.models import build_model, load_state_checked
from butd.train import distributed as dist
from butd.train.checkpoint import (capture_rng_state, check_vocabulary, load_checkpoint, restore_rng_state,
                                   save_checkpoint)
from butd.train.logging import RunLogger, StepMeter
from butd.train.rewards import CaptionReward
from butd.train.scst import ScstObjective
from butd.train.validate import validate
from butd.train.xe import XeObjective, scheduled_sampling_prob

STAGES = ("xe", "scst")


class NonFiniteLossError(ButdError, RuntimeError):
    """Training produced ``train.max_bad_steps`` non-finite losses or gradients in a row."""


@dataclass
class TrainOptions:
    """What ``tools/train.py`` passes besides the configuration."""

    stage: str  # "xe" | "scst"
    data_dir: Path
    features: Path
    output: Path  # RUN_DIR
    resume: bool = False  # continue from RUN_DIR/last.pt
    init: Path | None = None  # start from these weights (SCST: the XE run's best.pt)


@dataclass
class TrainState:
    """Where training stands; saved in every checkpoint."""

    epoch: int = 0  # epochs completed (the epoch in progress has this 0-based index)
    iteration: int = 0  # batches consumed in this stage, skipped ones included
    batch_in_epoch: int = 0  # batches of the current epoch already consumed
    best_score: float = -math.inf  # best validation CIDEr-D so far
    val_metrics: dict[str, float] = field(default_factory=dict)
    bad_steps_in_row: int = 0
    bad_steps_total: int = 0


@dataclass
class TrainResult:
    model: nn.Module  # the trained captioner (unwrapped), on its device, train mode
    state: TrainState
    run_dir: Path


def train(cfg: Config, options: TrainOptions) -> TrainResult:
    """Run (or resume) one training stage; writes RUN_DIR/{config.yaml, last.pt, best.pt, metrics.jsonl}."""
    if options.stage not in STAGES:
        raise ConfigError(f"unknown stage {options.stage!r} (use xe or scst)")
    # Joins the process group torchrun describes (or the one already joined) and stays in it: re-creating a group
    # on the same port within one process can hang, so leaving it is the caller's (tools/train.py's) business.
    ctx = dist.setup_distributed(cfg.train.device)
    return _train(cfg, options, ctx)


def _train(cfg: Config, options: TrainOptions, ctx: dist.DistContext) -> TrainResult:
    tc = cfg.train
    out = Path(options.output)
    _seed_everything(tc.seed + ctx.rank)
    if ctx.device.type == "cuda":
        torch.set_float32_matmul_precision("high")

    # Data: every image of the splits we use must have features before any time is spent training.
    data = CaptionData.load(options.data_dir)
    train_set = CaptionDataset(data, options.features, "train", seq_per_img=tc.seq_per_img, seed=tc.seed,
                               max_boxes=cfg.data.max_boxes)
    require_features(train_set.store, data, ("train", "val"))

    # Where the weights come from: a run to resume, an earlier stage (--init), or fresh.
    resumed = _load_start(out / "last.pt", data, options, "resume") if options.resume else None
    initial = _load_start(options.init, data, options, "init") if options.init and not resumed else None
    notes = []
    if initial is not None:
        init_model = config_from_dict({"model": initial["config"]["model"]}).model  # the weights fix the shapes
        if init_model != cfg.model:
            notes.append(f"model section taken from {options.init} (it differs from the config's)")
        cfg.model = init_model
    model = build_model(cfg.model, len(data.vocab))
    if resumed or initial:
        start = resumed or initial
        load_state_checked(model, start["model"], source=out / "last.pt" if resumed else options.init,
                           checkpoint_model_name=start.get("model_name"))
    model.to(ctx.device).train()
    if tc.compile:
        model.compile_advance()

    # The stage's objective, wrapped whole by DDP so gradients sync however the step uses the model.
    objective = _make_objective(options.stage, model, cfg, data, ctx.device)
    step_fn = DistributedDataParallel(objective) if ctx.distributed else objective
    # The fused CUDA kernel updates every parameter in one launch (the foreach default needs several per tensor list).
    optimizer = torch.optim.Adam(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay,
                                 fused=ctx.device.type == "cuda")
    state = TrainState()
    if resumed:
        optimizer.load_state_dict(resumed["optimizer"])
        for group in optimizer.param_groups:  # the saved flag is the writing machine's; keep this device's choice
            group["fused"] = ctx.device.type == "cuda"
        state = _state_from(resumed)
    if cfg.data.cache != "none":
        if cfg.data.cache == "gpu" and ctx.device.type != "cuda":
            raise ConfigError("data.cache=gpu needs a CUDA device (use data.cache=memory on CPU)")
        train_set.use_cache(ctx.device if cfg.data.cache == "gpu" else "cpu")
    val_ids = data.split_ids("val")[: tc.val_max_images or None]
    bf16 = tc.precision == "bf16" or (tc.precision == "auto" and ctx.device.type == "cuda")

    logger = RunLogger(out, enabled=ctx.is_main, tensorboard=tc.tensorboard,
                       resume_iteration=state.iteration if resumed else None)
    for note in notes + logger.notes:
        logger.message(note)
    if ctx.is_main:
        save_config(cfg, out / "config.yaml")
    if resumed:
        _restore_rng(resumed, state, ctx)  # last: nothing below may draw from the RNGs before the first step

    def checkpoint(best: bool) -> None:
        payload = _payload(cfg, options.stage, model, optimizer, state, data, ctx)
        if ctx.is_main:
            _require_finite(model, out)
            if best:
                save_checkpoint(out / "best.pt", payload)
            save_checkpoint(out / "last.pt", payload)
        dist.barrier(ctx)  # no rank runs ahead (e.g. into the next stage) before the files exist

    lr = learning_rate(tc, epoch=state.epoch, iteration=state.iteration)
    while state.epoch < tc.max_epochs:
        epoch = state.epoch
        ss_prob = scheduled_sampling_prob(epoch, start=tc.scheduled_sampling_start,
                                          increase_every=tc.scheduled_sampling_increase_every,
                                          increase_prob=tc.scheduled_sampling_increase_prob,
                                          max_prob=tc.scheduled_sampling_max_prob)
        loader = build_loader(train_set, batch_size=tc.batch_size, shuffle=True, num_workers=cfg.data.num_workers,
                              seed=tc.seed, epoch=epoch, start_batch=state.batch_in_epoch, rank=ctx.rank,
                              world_size=ctx.world_size, pin_memory=ctx.device.type == "cuda")
        bar = logger.progress(total=state.batch_in_epoch + len(loader), initial=state.batch_in_epoch,
                              desc=f"{options.stage} epoch {epoch + 1}/{tc.max_epochs}")
        meter = StepMeter()
        epoch_start = time.perf_counter()
        for batch in loader:
            batch = batch.to(ctx.device, non_blocking=True)
            lr = learning_rate(tc, epoch=epoch, iteration=state.iteration)
            for group in optimizer.param_groups:
                group["lr"] = lr
            values, good = train_step(step_fn, model, optimizer, batch, ss_prob=ss_prob, grad_clip=tc.grad_clip,
                                      bf16=bf16, ctx=ctx)
            state.iteration += 1
            state.batch_in_epoch += 1
            if good:
                state.bad_steps_in_row = 0
                meter.add(values, len(batch))
            else:
                state.bad_steps_in_row += 1
                state.bad_steps_total += 1
                logger.message(f"iteration {state.iteration}: non-finite loss or gradient, step skipped "
                               f"({state.bad_steps_in_row} in a row, {state.bad_steps_total} in total)")
                if state.bad_steps_in_row >= tc.max_bad_steps:
                    raise NonFiniteLossError(
                        f"{state.bad_steps_in_row} non-finite losses/gradients in a row (train.max_bad_steps) at "
                        f"epoch {epoch + 1}, iteration {state.iteration}; stopping without touching the checkpoints "
                        f"in {out}. Lower train.lr, add train.warmup_iters, or check the features for NaN/inf.")
            bar.update(1)
            if state.iteration % tc.log_every == 0 and meter.count:
                summary = meter.window_summary()
                bar.set_postfix({k: f"{v:.3g}" for k, v in summary.items()})
                logger.log_train(iteration=state.iteration, epoch=epoch, values={**summary, "lr": lr})
            if tc.checkpoint_every_iters and state.iteration % tc.checkpoint_every_iters == 0:
                checkpoint(best=False)
        bar.close()
        train_seconds = time.perf_counter() - epoch_start  # this epoch's steps (of this process, after a resume)

        state.epoch += 1
        state.batch_in_epoch = 0
        best = False
        if state.epoch % tc.val_every_epochs == 0 or state.epoch == tc.max_epochs:
            if ctx.is_main:
                metrics = validate(model, train_set.store, data, val_ids, cfg.eval, device=ctx.device, bf16=bf16,
                                   max_boxes=cfg.data.max_boxes)
                state.val_metrics = metrics
                best = metrics["CIDEr-D"] > state.best_score  # NaN never compares greater
                state.best_score = max(state.best_score, metrics["CIDEr-D"])
                logger.log_validation({"epoch": state.epoch, "iteration": state.iteration, "stage": options.stage,
                                       **metrics, **meter.epoch_summary(prefix="train_"),
                                       "lr": lr, "bad_steps": state.bad_steps_total,
                                       "train_seconds": round(train_seconds, 2), **_peak_memory(ctx.device)})
                logger.message(f"{options.stage} epoch {state.epoch}: val CIDEr-D {metrics['CIDEr-D']:.4f}"
                               f"{' (best)' if best else ''}, train loss "
                               f"{meter.epoch_summary().get('loss', math.nan):.4f}")
            dist.barrier(ctx)
        checkpoint(best=best)
    logger.close()
    return TrainResult(model=model, state=state, run_dir=out)


def learning_rate(tc: TrainConfig, *, epoch: int, iteration: int) -> float:
    """Step decay (``lr_decay_rate`` every ``lr_decay_every`` epochs) with an optional linear warm-up."""
    lr = tc.lr
    if tc.lr_decay_every > 0:
        lr *= tc.lr_decay_rate ** (epoch // tc.lr_decay_every)
    if tc.warmup_iters > 0 and iteration < tc.warmup_iters:
        lr *= (iteration + 1) / tc.warmup_iters
    return lr


def _make_objective(stage: str, model: nn.Module, cfg: Config, data: CaptionData, device: torch.device) -> nn.Module:
    if stage == "xe":
        return XeObjective(model, label_smoothing=cfg.train.label_smoothing, packed=cfg.train.packed_xe)
    reward = CaptionReward.from_caption_data(data, split="train", count_eos=cfg.scst.count_eos,
                                             bleu_weight=cfg.scst.bleu_weight, device=device)
    return ScstObjective(model, reward, num_samples=cfg.scst.num_samples, baseline=cfg.scst.baseline,
                         max_length=cfg.scst.max_length, temperature=cfg.scst.temperature,
                         suppress_unk=cfg.scst.suppress_unk)


def _load_start(path: Path | None, data: CaptionData, options: TrainOptions, why: str) -> dict[str, Any]:
    payload = load_checkpoint(path)
    check_vocabulary(payload, data.vocab, source=path, data_dir=options.data_dir)
    if why == "resume" and payload["stage"] != options.stage:
        raise ConfigError(f"{path} is a {payload['stage']} checkpoint; resume it with --stage {payload['stage']}")
    return payload


def _state_from(payload: dict[str, Any]) -> TrainState:
    return TrainState(epoch=int(payload["epoch"]), iteration=int(payload["iteration"]),
                      batch_in_epoch=int(payload["batch_in_epoch"]), best_score=float(payload["best_score"]),
                      val_metrics=dict(payload["val_metrics"]), bad_steps_total=int(payload.get("bad_steps", 0)))


def _payload(cfg: Config, stage: str, model: nn.Module, optimizer: torch.optim.Optimizer, state: TrainState,
             data: CaptionData, ctx: dist.DistContext) -> dict[str, Any]:
    """The checkpoint; every rank takes part (each rank's RNG state is gathered), rank 0 writes it."""
    rng = dist.gather_objects(capture_rng_state(), ctx)
    return {
        "format_version": 1, "stage": stage, "model_name": cfg.model.name, "model": model.state_dict(),
        "config": config_to_dict(cfg), "vocab": list(data.vocab.words), "optimizer": optimizer.state_dict(),
        # The schedule is a pure function of (epoch, iteration) and the config; this records where it stood.
        "scheduler": {"kind": "step_decay", "lr": optimizer.param_groups[0]["lr"]},
        "scaler": None,  # bf16 autocast needs no loss scaling
        "rng": rng[0], "rng_per_rank": rng, "world_size": ctx.world_size,
        "epoch": state.epoch, "iteration": state.iteration, "batch_in_epoch": state.batch_in_epoch,
        "best_score": state.best_score, "val_metrics": dict(state.val_metrics), "bad_steps": state.bad_steps_total,
    }


def _restore_rng(payload: dict[str, Any], state: TrainState, ctx: dist.DistContext) -> None:
    states = payload.get("rng_per_rank") or [payload["rng"]]
    if len(states) == ctx.world_size:
        restore_rng_state(states[ctx.rank])
    elif state.batch_in_epoch > 0:
        raise ConfigError(f"the checkpoint was written mid-epoch by {len(states)} processes; resume it with "
                          f"{len(states)} processes (now {ctx.world_size}) so the data order stays the same")
    else:
        _seed_everything(1_000_003 * state.epoch + ctx.rank)


def train_step(step_fn: nn.Module, model: nn.Module, optimizer: torch.optim.Optimizer, batch: Batch, *,
               ss_prob: float, grad_clip: float, bf16: bool, ctx: dist.DistContext) -> tuple[dict[str, float], bool]:
    """One optimisation step; returns the step's values (``loss`` and the objective's statistics) and whether
    the step was taken. A non-finite loss never reaches backward and non-finite gradients never reach the
    optimizer; the gradients are checked before clipping, since clipping would turn inf into a finite value."""
    with torch.autocast(device_type=ctx.device.type, dtype=torch.bfloat16, enabled=bf16):
        output = step_fn(batch, ss_prob)
    stacked = torch.stack([output.loss.detach().float(), *[v.float() for v in output.stats.values()]])
    values = dict(zip(["loss", *output.stats], stacked.tolist()))  # one host sync for all of them
    good = dist.all_ranks_true(math.isfinite(values["loss"]), ctx)  # all ranks skip together (DDP all-reduce)
    if good:
        output.loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        good = not grads or bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)))  # same on every rank
        if good:
            if grad_clip > 0:
                torch.nn.utils.clip_grad_value_(model.parameters(), grad_clip)
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return values, good


def _peak_memory(device: torch.device) -> dict[str, float]:
    """The stage's peak GPU memory so far (GiB), for the validation record; nothing on CPU."""
    if device.type != "cuda":
        return {}
    return {"peak_gpu_mem_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)}


def _require_finite(model: nn.Module, out: Path) -> None:
    for name, param in model.state_dict().items():
        if param.is_floating_point() and not bool(torch.isfinite(param).all()):
            raise NonFiniteLossError(f"parameter {name} is not finite; not overwriting the checkpoints in {out}")


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
