"""The run directory (RUN_DIR) a training stage owns: what may start there, and what a killed run left behind.

A RUN_DIR that holds a run (a ``last.pt`` or ``best.pt``) is never trained over from scratch: it is continued with
``--resume RUN_DIR`` or another ``--output`` is chosen. A RUN_DIR whose earlier run stopped before writing its first
checkpoint holds only logs of steps that no checkpoint keeps; a new run starts over there and says so.
"""
from __future__ import annotations

from pathlib import Path

from butd.core.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from butd.core.files import remove_stale_temporaries
from butd.errors import ConfigError, DataError

CHECKPOINTS = ("last.pt", "best.pt")
RUN_FILES = ("config.yaml", "metrics.jsonl", "train_log.jsonl", *CHECKPOINTS)


def claim_run_dir(out: Path, *, resume: bool) -> list[str]:
    """Check that a stage may run in ``out``; returns notes for the user. ConfigError with one line otherwise.

    Also removes the temporary files that killed writes of the run's files left behind (safe: the caller is the
    only writer of ``out``).
    """
    notes = []
    removed = [p for name in RUN_FILES for p in remove_stale_temporaries(out / name)]
    if removed:
        notes.append(f"removed {len(removed)} half-written file(s) left by an interrupted run in {out}")
    if resume:
        return notes
    held = [name for name in CHECKPOINTS if (out / name).is_file()]
    if held:
        raise ConfigError(f"{out} already holds a run ({describe_run(out / held[0])}); continue it with "
                          f"--resume {out}, or pass another --output (nothing was changed)")
    leftovers = [name for name in RUN_FILES if (out / name).exists()]
    if leftovers:
        notes.append(f"{out} holds {', '.join(leftovers)} of a run that stopped before its first checkpoint; "
                     f"starting over there")
    return notes


def restore_best(out: Path, last: Checkpoint) -> bool:
    """If ``last`` (RUN_DIR/last.pt) is the run's best model but best.pt is missing or older (a kill between the two
    writes, which go last.pt first), copy it to best.pt. Returns whether it did."""
    score = last.val_metrics.get("CIDEr-D")
    if score is None or score != last.best_score:
        return False
    best = out / "best.pt"
    if best.is_file():
        try:
            if float(load_checkpoint(best).get("best_score", float("-inf"))) >= last.best_score:
                return False
        except DataError:
            pass  # an unreadable best.pt is replaced too
    save_checkpoint(best, last.to_payload())
    return True


def describe_run(path: Path) -> str:
    """``"last.pt: xe, epoch 3"``, or the file name alone when it cannot be read."""
    try:
        payload = load_checkpoint(path)
    except Exception:  # a damaged file still counts as a run not to overwrite
        return path.name
    return f"{path.name}: {payload['stage']}, epoch {payload.get('epoch', '?')}"
