"""What a run reports: a tqdm bar, TensorBoard scalars, ``metrics.jsonl`` and ``train_log.jsonl`` in RUN_DIR.

``metrics.jsonl`` has one JSON object per validation (``epoch``, ``iteration``, ``stage``, the metrics under the names
``tools/eval.py`` prints, e.g. ``CIDEr-D``, and the epoch's training averages). ``train_log.jsonl`` has one object
every ``train.log_every`` iterations (``iteration``, ``epoch``, ``lr``, ``loss`` and the step's statistics). On resume
both files drop the lines written after the checkpoint, so a crashed-and-resumed run logs each iteration once.
Only rank 0 creates a logger that writes; the others get a silent one.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from butd.core.files import write_atomic

METRICS_FILE = "metrics.jsonl"
TRAIN_LOG_FILE = "train_log.jsonl"


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf
    return value


def truncate_jsonl(path: Path, *, max_iteration: int) -> None:
    """Keep only the lines of ``path`` whose ``iteration`` is at most ``max_iteration`` (atomic rewrite)."""
    if not path.is_file():
        return
    kept = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            # A line cut short by a crash mid-write: it belongs to the lost part of the run.
            print(f"{path}:{number}: dropping an unreadable line written before the crash", file=sys.stderr)
            continue
        if int(record.get("iteration", 0)) <= max_iteration:
            kept.append(line)
    write_atomic(path, "".join(f"{line}\n" for line in kept))


class RunLogger:
    """Writes a run's progress; a disabled logger (ranks other than 0) does nothing."""

    def __init__(self, run_dir: str | Path, *, enabled: bool = True, tensorboard: bool = True,
                 resume_iteration: int | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.writer = None
        self.notes: list[str] = []
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume_iteration is not None:
            for name in (METRICS_FILE, TRAIN_LOG_FILE):
                truncate_jsonl(self.run_dir / name, max_iteration=resume_iteration)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:
                self.notes.append(f"TensorBoard logging is off: {error} (pip install tensorboard)")
            else:
                self.writer = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=resume_iteration)

    def progress(self, *, total: int, initial: int, desc: str) -> tqdm:
        """A tqdm bar over one epoch's batches (disabled off rank 0)."""
        return tqdm(total=total, initial=initial, desc=desc, disable=not self.enabled, dynamic_ncols=True,
                    leave=False)

    def log_train(self, *, iteration: int, epoch: int, values: dict[str, float]) -> None:
        """One line of ``train_log.jsonl`` and the TensorBoard scalars ``train/<name>``."""
        if not self.enabled:
            return
        record = {"iteration": iteration, "epoch": epoch, **{k: _jsonable(v) for k, v in values.items()}}
        self._append(TRAIN_LOG_FILE, record)
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(f"train/{name}", value, iteration)

    def log_validation(self, record: dict[str, Any]) -> None:
        """One line of ``metrics.jsonl``; numeric entries also go to TensorBoard as ``val/<name>``."""
        if not self.enabled:
            return
        self._append(METRICS_FILE, {k: _jsonable(v) for k, v in record.items()})
        if self.writer is not None:
            for name, value in record.items():
                if isinstance(value, float) and name not in ("epoch", "iteration"):
                    self.writer.add_scalar(f"val/{name}", value, record["iteration"])
            self.writer.flush()

    def message(self, text: str) -> None:
        """A line for the user, printed above the progress bar."""
        if self.enabled:
            tqdm.write(text)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def _append(self, name: str, record: dict[str, Any]) -> None:
        with open(self.run_dir / name, "a") as handle:
            handle.write(json.dumps(record) + "\n")


class StepMeter:
    """Averages of the step values over the current log window (plus images/s) and over the whole epoch.

    The epoch's part is kept as sums (``epoch_sums``: each value's sum plus the step count under ``STEPS``), which
    a mid-epoch checkpoint saves, so that a resumed epoch's averages still cover every step of the epoch.
    """

    STEPS = "__steps__"

    def __init__(self, epoch_sums: dict[str, float] | None = None) -> None:
        self.count = 0
        self.images = 0
        self.window: dict[str, list[float]] = {}
        self.epoch_sums: dict[str, float] = dict(epoch_sums or {})
        self.started = time.perf_counter()

    def add(self, values: dict[str, float], images: int) -> None:
        self.count += 1
        self.images += images
        self.epoch_sums[self.STEPS] = self.epoch_sums.get(self.STEPS, 0.0) + 1
        for name, value in values.items():
            self.window.setdefault(name, []).append(value)
            self.epoch_sums[name] = self.epoch_sums.get(name, 0.0) + value

    def window_summary(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        out = {name: sum(v) / len(v) for name, v in self.window.items()}
        out["images_per_s"] = self.images / elapsed
        self.window, self.images, self.started = {}, 0, time.perf_counter()
        return out

    def epoch_summary(self, prefix: str = "") -> dict[str, float]:
        steps = self.epoch_sums.get(self.STEPS, 0.0)
        if not steps:
            return {}
        return {f"{prefix}{name}": total / steps for name, total in self.epoch_sums.items() if name != self.STEPS}
