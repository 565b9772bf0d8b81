"""Everything a training stage needs before its first step, built in one place: ``prepare_run``.

In order: the run directory is claimed, seeds are set, the data is loaded and checked (features for every train and
val image, a val split to validate on), the weights come from a run to resume, an earlier stage (``--init``) or
nowhere, the stage's objective and optimizer are built, and the RNGs are restored last when resuming. The caller's
configuration is never modified: a run started with ``--init`` gets a copy whose model section is the checkpoint's.
"""
from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from butd.config import Config, config_from_dict, save_config
from butd.core.checkpoint import Checkpoint
from butd.core.devices import uses_bf16
from butd.data.captions import CaptionData
from butd.data.dataset import CaptionDataset, require_features
from butd.errors import ConfigError, DataError
from butd.models import build_model, load_state_checked
from butd.train import distributed as dist
from butd.train.logging import RunLogger
from butd.train.rewards import CaptionReward
from butd.train.rng import restore_rng_state
from butd.train.run_dir import claim_run_dir, restore_best
from butd.train.runner import StepRunner, build_runner, check_step_runner
from butd.train.scst import ScstObjective
from butd.train.static_scst import StaticScstObjective
from butd.train.static_xe import StaticXeObjective
from butd.train.step import DivergenceGuard
from butd.train.xe import XeObjective

STAGES = ("xe", "scst")


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
    epoch_sums: dict[str, float] = field(default_factory=dict)  # the epoch's step values so far (StepMeter)
    saved_iteration: int | None = None  # iteration of the newest checkpoint on disk (None: none yet)

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint) -> TrainState:
        return cls(epoch=checkpoint.epoch, iteration=checkpoint.iteration, batch_in_epoch=checkpoint.batch_in_epoch,
                   best_score=float(checkpoint.best_score), val_metrics=dict(checkpoint.val_metrics),
                   bad_steps_total=checkpoint.bad_steps, epoch_sums=dict(checkpoint.epoch_sums),
                   saved_iteration=checkpoint.iteration)


@dataclass
class Run:
    """One training stage, ready for its first (or next) step."""

    cfg: Config  # the stage's configuration (model section from --init when given)
    options: TrainOptions
    ctx: dist.DistContext
    data: CaptionData
    train_set: CaptionDataset
    val_ids: np.ndarray
    model: nn.Module  # the captioner, unwrapped
    step_fn: nn.Module  # the objective, DDP-wrapped when distributed
    optimizer: torch.optim.Optimizer
    state: TrainState
    logger: RunLogger
    guard: DivergenceGuard
    bf16: bool
    runner: StepRunner  # takes the steps (train.step_runner)

    @property
    def out(self) -> Path:
        return Path(self.options.output)


def prepare_run(cfg: Config, options: TrainOptions, ctx: dist.DistContext) -> Run:
    """Build a :class:`Run`; ConfigError / DataError (one line, naming the file or split) for bad input."""
    if options.stage not in STAGES:
        raise ConfigError(f"unknown stage {options.stage!r} (use xe or scst)")
    tc = cfg.train
    check_step_runner(cfg, ctx, options.stage)
    out = Path(options.output)
    notes = claim_run_dir(out, resume=options.resume) if ctx.is_main else []
    seed_everything(tc.seed + ctx.rank)
    if ctx.device.type == "cuda":
        torch.set_float32_matmul_precision("high")

    # Data: every image of the splits we use must have features before any time is spent training.
    data = CaptionData.load(options.data_dir)
    for split in ("train", "val"):
        if len(data.split_ids(split)) == 0:
            raise DataError(f"{data.data_dir}: the {split} split has no images; training needs train and val "
                            f"images (preprocess a caption file that assigns images to both)")
    train_set = CaptionDataset(data, options.features, "train", seq_per_img=tc.seq_per_img, seed=tc.seed,
                               max_boxes=cfg.data.max_boxes)
    require_features(train_set.store, data, ("train", "val"))

    # Where the weights come from: a run to resume, an earlier stage (--init), or fresh.
    resumed = _load_start(out / "last.pt", data, options, "resume") if options.resume else None
    if resumed is not None and ctx.is_main and restore_best(out, resumed):
        notes.append("best.pt restored from last.pt (the run was stopped between writing the two)")
    initial = _load_start(options.init, data, options, "init") if options.init and not resumed else None
    if initial is not None:
        init_model = config_from_dict({"model": initial.config["model"]}).model  # the weights fix the shapes
        if init_model != cfg.model:
            notes.append(f"model section taken from {options.init} (it differs from the config's)")
        cfg = dataclasses.replace(cfg, model=init_model)
    model = build_model(cfg.model, len(data.vocab))
    start = resumed or initial
    if start is not None:
        load_state_checked(model, start.model, source=out / "last.pt" if resumed else options.init,
                           checkpoint_model_name=start.model_name)
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
    if resumed is not None:
        optimizer.load_state_dict(resumed.optimizer)
        for group in optimizer.param_groups:  # the saved flag is the writing machine's; keep this device's choice
            group["fused"] = ctx.device.type == "cuda"
        state = TrainState.from_checkpoint(resumed)
    if cfg.data.cache != "none":
        if cfg.data.cache == "gpu" and ctx.device.type != "cuda":
            raise ConfigError("data.cache=gpu needs a CUDA device (use data.cache=memory on CPU)")
        train_set.use_cache(ctx.device if cfg.data.cache == "gpu" else "cpu")

    # A fresh start truncates the logs an earlier run left without any checkpoint (resume_iteration 0).
    logger = RunLogger(out, enabled=ctx.is_main, tensorboard=tc.tensorboard,
                       resume_iteration=state.iteration if resumed else (0 if notes else None))
    for note in notes + logger.notes:
        logger.message(note)
    if ctx.is_main:
        save_config(cfg, out / "config.yaml")
    guard, bf16 = DivergenceGuard(factor=tc.divergence_factor), uses_bf16(ctx.device, tc.precision)
    runner = build_runner(cfg, ctx, step_fn=step_fn, model=model, optimizer=optimizer, bf16=bf16, guard=guard)
    if resumed is not None:
        _restore_rng(resumed, state, ctx)  # last: nothing below may draw from the RNGs before the first step
    return Run(cfg=cfg, options=options, ctx=ctx, data=data, train_set=train_set,
               val_ids=data.split_ids("val")[: tc.val_max_images or None], model=model, step_fn=step_fn,
               optimizer=optimizer, state=state, logger=logger, guard=guard, bf16=bf16, runner=runner)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _make_objective(stage: str, model: nn.Module, cfg: Config, data: CaptionData, device: torch.device) -> nn.Module:
    if stage == "xe" and cfg.train.step_runner != "eager":  # fixed shapes, no host sync
        return StaticXeObjective(model, label_smoothing=cfg.train.label_smoothing)
    if stage == "xe":
        return XeObjective(model, label_smoothing=cfg.train.label_smoothing, packed=cfg.train.packed_xe)
    reward = CaptionReward.from_caption_data(data, split="train", count_eos=cfg.scst.count_eos,
                                             bleu_weight=cfg.scst.bleu_weight, device=device)
    scst = StaticScstObjective if cfg.train.step_runner != "eager" else ScstObjective  # static: samples to full length
    return scst(model, reward, num_samples=cfg.scst.num_samples, baseline=cfg.scst.baseline,
                max_length=cfg.scst.max_length, temperature=cfg.scst.temperature, suppress_unk=cfg.scst.suppress_unk)


def _load_start(path: Path | None, data: CaptionData, options: TrainOptions, why: str) -> Checkpoint:
    checkpoint = Checkpoint.load(path)
    checkpoint.check_vocabulary(data.vocab, source=path, data_dir=options.data_dir)
    if why == "resume" and checkpoint.stage != options.stage:
        raise ConfigError(f"{path} is a {checkpoint.stage} checkpoint; resume it with --stage {checkpoint.stage}")
    return checkpoint


def _restore_rng(checkpoint: Checkpoint, state: TrainState, ctx: dist.DistContext) -> None:
    states = checkpoint.rng_per_rank or [checkpoint.rng]
    if len(states) == ctx.world_size:
        restore_rng_state(states[ctx.rank])
    elif state.batch_in_epoch > 0:
        raise ConfigError(f"the checkpoint was written mid-epoch by {len(states)} processes; resume it with "
                          f"{len(states)} processes (now {ctx.world_size}) so the data order stays the same")
    else:
        seed_everything(1_000_003 * state.epoch + ctx.rank)
