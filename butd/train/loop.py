"""The training loop shared by both stages: ``train(cfg, options)``.

Read it top to bottom: ``prepare_run`` builds everything (butd/train/setup.py), then epochs of steps, each epoch
ending with validation and checkpoints. The stage only chooses the objective: :class:`XeObjective` (teacher-forced
cross-entropy) or :class:`ScstObjective` (self-critical policy gradient). A run stops with one line, and without
writing its weights, when the loss stays non-finite or explodes (butd/train/step.py).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from butd.config import Config, TrainConfig, config_to_dict
from butd.core.checkpoint import Checkpoint, save_checkpoint
from butd.data.dataset import build_loader
from butd.errors import ButdError
from butd.train import distributed as dist
from butd.train.logging import StepMeter
from butd.train.rng import capture_rng_state
from butd.train.runner import StepOutcome, portable_optimizer_state
from butd.train.setup import Run, TrainOptions, TrainState, prepare_run, seed_everything
from butd.train.step import DivergenceError, NonFiniteLossError, TrainingStepError, first_non_finite_parameter
from butd.train.validate import validate
from butd.train.xe import scheduled_sampling_prob

__all__ = ["NonFiniteLossError", "TrainOptions", "TrainResult", "TrainState", "learning_rate", "train",
           "seed_everything"]


@dataclass
class TrainResult:
    model: nn.Module  # the trained captioner (unwrapped), on its device, train mode
    state: TrainState
    run_dir: Path


def train(cfg: Config, options: TrainOptions) -> TrainResult:
    """Run (or resume) one training stage; writes RUN_DIR/{config.yaml, last.pt, best.pt, metrics.jsonl}."""
    # Joins the process group torchrun describes (or the one already joined) and stays in it: re-creating a group
    # on the same port within one process can hang, so leaving it is the caller's (tools/train.py's) business.
    ctx = dist.setup_distributed(cfg.train.device)
    run = prepare_run(cfg, options, ctx)
    while run.state.epoch < run.cfg.train.max_epochs:
        meter, train_seconds = train_epoch(run)
        end_epoch(run, meter, train_seconds)
    run.logger.close()
    if run.state.bad_steps_in_row:  # fewer than train.max_bad_steps, but nothing good came after them
        raise NonFiniteLossError(
            f"epoch {run.state.epoch}, iteration {run.state.iteration}: training ended after "
            f"{run.state.bad_steps_in_row} non-finite steps in a row (the model diverged); {_kept(run)}. "
            f"Lower train.lr or add train.warmup_iters")
    return TrainResult(model=run.model, state=run.state, run_dir=run.out)


def train_epoch(run: Run) -> tuple[StepMeter, float]:
    """The steps of one epoch (from ``state.batch_in_epoch`` on, after a resume); returns the epoch's meter and
    the seconds its steps took in this process."""
    tc, state, ctx = run.cfg.train, run.state, run.ctx
    epoch = state.epoch
    ss_prob = scheduled_sampling_prob(epoch, start=tc.scheduled_sampling_start,
                                      increase_every=tc.scheduled_sampling_increase_every,
                                      increase_prob=tc.scheduled_sampling_increase_prob,
                                      max_prob=tc.scheduled_sampling_max_prob)
    loader = build_loader(run.train_set, batch_size=tc.batch_size, shuffle=True, num_workers=run.cfg.data.num_workers,
                          seed=tc.seed, epoch=epoch, start_batch=state.batch_in_epoch, rank=ctx.rank,
                          world_size=ctx.world_size, pin_memory=ctx.device.type == "cuda")
    meter = StepMeter(epoch_sums=state.epoch_sums)  # a resumed epoch goes on from the checkpoint's sums
    epoch_start = time.perf_counter()
    # The bar closes also when a step stops the run, so the error line is not mixed into a half-drawn bar.
    with run.logger.progress(total=state.batch_in_epoch + len(loader), initial=state.batch_in_epoch,
                             desc=f"{run.options.stage} epoch {epoch + 1}/{tc.max_epochs}") as bar:
        for batch in loader:
            batch = batch.to(ctx.device, non_blocking=True)
            lr = learning_rate(tc, epoch=epoch, iteration=state.iteration)
            iteration = state.iteration + 1
            # A deferred runner (train.step_runner) returns its steps' outcomes later; the eager one at once.
            outcomes = _guarded(run, f"epoch {epoch + 1}, iteration {iteration}",
                                lambda: run.runner.step(batch, lr=lr, ss_prob=ss_prob, iteration=iteration))
            state.iteration += 1
            state.batch_in_epoch += 1
            _account(run, meter, outcomes)
            bar.update(1)
            log_due = state.iteration % tc.log_every == 0
            checkpoint_due = tc.checkpoint_every_iters and state.iteration % tc.checkpoint_every_iters == 0
            if log_due or checkpoint_due:
                _flush(run, meter)  # every step's values are in before they are logged or saved
            if log_due and meter.count:
                summary = meter.window_summary()
                bar.set_postfix({k: f"{v:.3g}" for k, v in summary.items()})
                run.logger.log_train(iteration=state.iteration, epoch=epoch, values={**summary, "lr": lr})
            if checkpoint_due:
                write_checkpoints(run, best=False)
        _flush(run, meter)
    return meter, time.perf_counter() - epoch_start


def end_epoch(run: Run, meter: StepMeter, train_seconds: float) -> None:
    """Validate (every ``train.val_every_epochs`` and after the last epoch), log, and write the checkpoints."""
    tc, state, ctx = run.cfg.train, run.state, run.ctx
    state.epoch += 1
    state.batch_in_epoch = 0
    state.epoch_sums = {}
    best = False
    if state.epoch % tc.val_every_epochs == 0 or state.epoch == tc.max_epochs:
        if ctx.is_main:
            metrics = validate(run.model, run.train_set.store, run.data, run.val_ids, run.cfg.eval,
                               device=ctx.device, bf16=run.bf16, max_boxes=run.cfg.data.max_boxes)
            state.val_metrics = metrics
            best = metrics["CIDEr-D"] > state.best_score  # NaN never compares greater
            state.best_score = max(state.best_score, metrics["CIDEr-D"])
            lr = learning_rate(tc, epoch=state.epoch - 1, iteration=max(state.iteration - 1, 0))
            run.logger.log_validation({"epoch": state.epoch, "iteration": state.iteration, "stage": run.options.stage,
                                       **metrics, **meter.epoch_summary(prefix="train_"), "lr": lr,
                                       "bad_steps": state.bad_steps_total, "train_seconds": round(train_seconds, 2),
                                       **_peak_memory(ctx.device)})
            run.logger.message(f"{run.options.stage} epoch {state.epoch}: val CIDEr-D {metrics['CIDEr-D']:.4f}"
                               f"{' (best)' if best else ''}, train loss "
                               f"{meter.epoch_summary().get('loss', math.nan):.4f}")
        dist.barrier(ctx)
    write_checkpoints(run, best=best)


def write_checkpoints(run: Run, *, best: bool) -> None:
    """``last.pt`` (and ``best.pt``); every rank takes part (each rank's RNG state is gathered), rank 0 writes.
    Nothing is written after a skipped step or with a non-finite weight: the files keep the last good model."""
    state = run.state
    if state.bad_steps_in_row:
        run.logger.message(f"iteration {state.iteration}: not writing checkpoints after a non-finite step; "
                           f"{_kept(run)}")
        return
    checkpoint = _checkpoint(run)
    if run.ctx.is_main:
        broken = first_non_finite_parameter(run.model)
        if broken is not None:
            raise NonFiniteLossError(f"iteration {state.iteration}: parameter {broken} is not finite; not "
                                     f"writing it: {_kept(run)}")
        # last.pt first: a kill between the two leaves a resumable run, whose resume restores best.pt (run_dir.py).
        save_checkpoint(run.out / "last.pt", checkpoint.to_payload())
        if best:
            save_checkpoint(run.out / "best.pt", checkpoint.to_payload())
    state.saved_iteration = state.iteration
    dist.barrier(run.ctx)  # no rank runs ahead (e.g. into the next stage) before the files exist


def learning_rate(tc: TrainConfig, *, epoch: int, iteration: int) -> float:
    """Step decay (``lr_decay_rate`` every ``lr_decay_every`` epochs) with an optional linear warm-up."""
    lr = tc.lr
    if tc.lr_decay_every > 0:
        lr *= tc.lr_decay_rate ** (epoch // tc.lr_decay_every)
    if tc.warmup_iters > 0 and iteration < tc.warmup_iters:
        lr *= (iteration + 1) / tc.warmup_iters
    return lr


def _guarded(run: Run, where: str, call: Callable[[], list[StepOutcome]]) -> list[StepOutcome]:
    """A runner call, with every failure turned into one line naming ``where`` and the kept checkpoint."""
    try:
        return call()
    except DivergenceError as error:
        raise _stopped_by_divergence(run, where, str(error)) from None
    except ButdError:
        raise
    except (RuntimeError, ValueError, ArithmeticError) as error:  # e.g. CUDA out of memory, an optimizer overflow
        detail = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise TrainingStepError(f"{where}: the training step failed ({type(error).__name__}: {detail}); "
                                f"{_kept(run)}") from error


def _stopped_by_divergence(run: Run, where: str, detail: str) -> DivergenceError:
    return DivergenceError(f"{where}: {detail}; stopping: {_kept(run)}. Lower train.lr or add train.warmup_iters")


def _flush(run: Run, meter: StepMeter) -> None:
    """Account for every step the runner has not reported yet (a deferred runner reads its values back here)."""
    where = f"epoch {run.state.epoch + 1}, iterations up to {run.state.iteration}"
    _account(run, meter, _guarded(run, where, run.runner.flush))


def _account(run: Run, meter: StepMeter, outcomes: list[StepOutcome]) -> None:
    """Steps in order: good ones join the meter, bad ones are counted (too many in a row stop the run), an
    exploded loss stops it."""
    state = run.state
    for outcome in outcomes:
        if outcome.divergence is not None:
            raise _stopped_by_divergence(run, f"epoch {state.epoch + 1}, iteration {outcome.iteration}",
                                         outcome.divergence)
        if outcome.good:
            state.bad_steps_in_row = 0
            meter.add(outcome.values, outcome.images)
        else:
            _count_bad_step(run, outcome.iteration)
    state.epoch_sums = meter.epoch_sums


def _count_bad_step(run: Run, iteration: int) -> None:
    state, tc = run.state, run.cfg.train
    state.bad_steps_in_row += 1
    state.bad_steps_total += 1
    run.logger.message(f"iteration {iteration}: non-finite loss or gradient, step skipped "
                       f"({state.bad_steps_in_row} in a row, {state.bad_steps_total} in total)")
    if state.bad_steps_in_row >= tc.max_bad_steps:
        raise NonFiniteLossError(
            f"{state.bad_steps_in_row} non-finite losses/gradients in a row (train.max_bad_steps) at epoch "
            f"{state.epoch + 1}, iteration {iteration}; stopping: {_kept(run)}. Lower train.lr, add "
            f"train.warmup_iters, or check the features for NaN/inf.")


def _kept(run: Run) -> str:
    """What the run directory still holds, for the last line of a stopped run."""
    saved = run.state.saved_iteration
    if saved is None:
        return f"no checkpoint was written to {run.out}"
    return f"the checkpoints in {run.out} keep the model of iteration {saved}"


def _checkpoint(run: Run) -> Checkpoint:
    """The run as a checkpoint; every rank takes part in gathering the RNG states."""
    cfg, state = run.cfg, run.state
    rng = dist.gather_objects(capture_rng_state(), run.ctx)
    return Checkpoint(
        stage=run.options.stage, model_name=cfg.model.name, model=run.model.state_dict(), config=config_to_dict(cfg),
        vocab=list(run.data.vocab.words), epoch=state.epoch, iteration=state.iteration,
        batch_in_epoch=state.batch_in_epoch, best_score=state.best_score, val_metrics=dict(state.val_metrics),
        bad_steps=state.bad_steps_total, optimizer=portable_optimizer_state(run.optimizer),
        # The schedule is a pure function of (epoch, iteration) and the config; this records where it stood.
        scheduler={"kind": "step_decay", "lr": float(run.optimizer.param_groups[0]["lr"])},
        scaler=None,  # bf16 autocast needs no loss scaling
        rng=rng[0], rng_per_rank=rng, world_size=run.ctx.world_size, epoch_sums=dict(state.epoch_sums))


def _peak_memory(device: torch.device) -> dict[str, float]:
    """The stage's peak GPU memory so far (GiB), for the validation record; nothing on CPU."""
    if device.type != "cuda":
        return {}
    return {"peak_gpu_mem_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)}
