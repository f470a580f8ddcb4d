"""The checkpoint file and the run folder.

Foundation (hand-written; the runs appendix checks each guarantee). A run
folder holds `config.json`, `checkpoints/step_NNNNNNNN.pt` (written
atomically, the newest `keep` readable ones kept, damaged ones set aside),
`metrics.jsonl`, `samples/` and `.lock`, which one process at a time holds.
A checkpoint is a dict of tensors and plain values (`CHECKPOINT_KEYS`),
loaded with weights_only=True; `metrics.jsonl` holds one JSON record per
logged window, read back by `read_metrics` whatever a kill left. What the
settings mean is the book's library's business (`adm_lib.config`); here
they are a plain dict.
"""

import contextlib
import json
import os
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from adm_lib.devices import follow_layouts
from adm_lib.errors import TrainError
from adm_lib.files import hold_lock, safe_load, write_atomic

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_KEYS",
    "checkpoint_path",
    "pack_checkpoint",
    "unpack_checkpoint",
    "save_checkpoint",
    "rotate_checkpoints",
    "read_checkpoint",
    "latest_checkpoint",
    "read_weights",
    "lock_run",
    "term_sums",
    "MetricsLog",
    "read_metrics",
    "truncate_metrics",
]

CHECKPOINT_FORMAT = "adm-book/train-checkpoint/1"
CHECKPOINT_KEYS = ("format", "step", "config", "model", "ema", "optimizer",
                   "scaler", "sampler", "rng", "nonfinite")


def checkpoint_path(out: Path, step: int) -> Path:
    """Where the checkpoint of `step` lives in the run folder `out`."""
    return out / "checkpoints" / f"step_{step:08d}.pt"


def pack_checkpoint(step: int, settings: dict[str, Any], model: nn.Module,
                    ema: dict[float, nn.Module], optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler, sampler: dict[str, Any],
                    rng: list[dict[str, Tensor]], nonfinite: int) -> dict[str, Any]:
    """A checkpoint's contents (`CHECKPOINT_KEYS`): plain tensors and values."""
    return {
        "format": CHECKPOINT_FORMAT,
        "step": step,
        "config": settings,
        "model": model.state_dict(),
        "ema": {str(r): m.state_dict() for r, m in ema.items()},
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "sampler": sampler,
        "rng": rng,
        "nonfinite": nonfinite,
    }


def unpack_checkpoint(state: dict[str, Any], model: nn.Module,
                      ema: dict[float, nn.Module],
                      optimizer: torch.optim.Optimizer,
                      scaler: torch.amp.GradScaler) -> None:
    """Load a checkpoint's weights, averages, AdamW and loss scale in place.

    Each tensor goes where its parameter is: its device, its dtype and, for
    AdamW's moments, its memory layout, which a resume may change.
    """
    model.load_state_dict(state["model"])
    for rate, average in ema.items():
        average.load_state_dict(state["ema"][str(rate)])
    optimizer.load_state_dict(state["optimizer"])
    follow_layouts(optimizer)
    if state["scaler"]:
        scaler.load_state_dict(state["scaler"])


def save_checkpoint(out: Path, state: dict[str, Any], keep: int) -> Path:
    """Write `state` atomically; then keep `keep` checkpoints (rotate)."""
    path = checkpoint_path(out, state["step"])
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda f: torch.save(state, f))
    rotate_checkpoints(path, keep)
    return path


def rotate_checkpoints(written: Path, keep: int) -> None:
    """Keep `written` and the `keep` - 1 newest readable other checkpoints.

    Older readable ones are deleted; damaged ones are set aside as
    `*.damaged` with a warning. A file is probed with its tensors mapped,
    not read, so a rotation costs little however large the checkpoints.
    """
    others = sorted(set(written.parent.glob("step_*.pt")) - {written},
                    reverse=True)
    kept = 1
    for path in others:
        try:
            read_checkpoint(path, mmap=True)
        except TrainError as err:
            aside = path.with_name(f"{path.name}.damaged")
            path.replace(aside)
            warnings.warn(f"{err}; set aside as {aside.name}", stacklevel=2)
            continue
        if kept < keep:
            kept += 1
        else:
            path.unlink()


def read_checkpoint(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """Load a training checkpoint (weights_only), or a clear TrainError.

    With `mmap`, the tensors are mapped from the file, not read.
    """
    path = Path(path)
    try:
        state = safe_load(path, mmap=mmap)
    except FileNotFoundError:
        raise TrainError(f"no checkpoint at {path}") from None
    except ValueError as err:  # truncated zip, bad pickle, disk error...
        raise TrainError(f"{path} is not a readable checkpoint "
                         f"({err})") from None
    missing = ([k for k in CHECKPOINT_KEYS if k not in state]
               if isinstance(state, dict) else ["everything"])
    if missing or state["format"] != CHECKPOINT_FORMAT:
        raise TrainError(f"{path} is not an adm train checkpoint "
                         f"(missing {', '.join(missing) or 'format'})")
    return state


def latest_checkpoint(out: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest readable checkpoint of a run; unreadable ones are named."""
    for path in sorted((out / "checkpoints").glob("step_*.pt"), reverse=True):
        try:
            return path, read_checkpoint(path)
        except TrainError as err:
            warnings.warn(f"{err}; trying the one before it", stacklevel=2)
    return None


def read_weights(path: str | os.PathLike, weights: str = "ema"
                 ) -> tuple[Path, dict[str, Any], dict[str, Tensor]]:
    """A run folder's newest checkpoint (or a checkpoint file), and its
    `weights`: "ema" (the first EMA rate), an EMA rate such as "0.9999", or
    "model" for the raw weights. Returns (its path, its contents, them)."""
    path = Path(path)
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise TrainError(f"{path} holds no checkpoint")
        path, state = found
    else:
        state = read_checkpoint(path)
    first = next(iter(state["ema"]))
    choices = {"ema": state["ema"][first], "model": state["model"],
               **state["ema"]}
    if weights not in choices:
        raise TrainError(f"weights={weights!r}: {path} has "
                         f"{', '.join(choices)}")
    return path, state, choices[weights]


def lock_run(out: Path) -> contextlib.AbstractContextManager[None]:
    """Hold the run folder's lock, `out/.lock`, or name who holds it."""
    return hold_lock(out / ".lock", lambda holder: TrainError(
        f"{out} is in use by another run (pid {holder}): wait for it to "
        "end, or choose another folder"))


def _lines(path: Path) -> list[tuple[str, dict[str, float] | None]]:
    """The lines of a JSONL log, each with its record (None: not one).

    A last line cut short by a kill, or still being written, is left out;
    any other line that is not a record is named in a warning.
    """
    text = path.read_text()
    lines = text.splitlines()
    found = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError:
            if number == len(lines) and not text.endswith("\n"):
                break  # cut short: the line had not ended
            record = None
        if not (isinstance(record, dict)
                and type(record.get("step")) is int):
            warnings.warn(f"{path} line {number} is not a metrics record "
                          "(a JSON object with an integer step): skipped",
                          stacklevel=3)
            record = None
        found.append((line, record))
    return found


def read_metrics(out: str | os.PathLike) -> list[dict[str, float]]:
    """The records of a run's metrics.jsonl, in order."""
    path = Path(out) / "metrics.jsonl"
    if not path.exists():
        raise TrainError(f"no metrics at {path}: has the run started?")
    return [record for _, record in _lines(path) if record is not None]


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the records of the JSONL file `path` after `step`.

    Lines that are not records stay as they are: nothing is lost.
    """
    if not path.exists():
        return
    kept = "".join(line + "\n" for line, record in _lines(path)
                   if record is None or record["step"] <= step)
    write_atomic(path, lambda f: f.write(kept.encode()))


def term_sums(t: Tensor, terms: dict[str, Tensor],
              num_timesteps: int) -> dict[str, tuple[float, int]]:
    """Sum and count of each term, overall and by quartile of t (`_q0`...)."""
    quartile = 4 * t.long() // num_timesteps
    counts = torch.bincount(quartile, minlength=4).tolist()
    sums = {}
    for name, values in terms.items():
        sums[name] = (values.sum().item(), len(values))
        by_quartile = torch.bincount(quartile, values.double(), minlength=4)
        for q, (total, count) in enumerate(zip(by_quartile.tolist(), counts,
                                               strict=True)):
            if count:
                sums[f"{name}_q{q}"] = (total, count)
    return sums

class MetricsLog:
    """Averages each window of steps into one JSONL record (rank 0 only).

    Like the reference, every loss term is also logged by timestep quartile
    (`mse_q0` is the mean over t < T/4), which shows where the model is
    still learning.
    """

    def __init__(self, path: Path, num_timesteps: int,
                 tensorboard: Path | None = None) -> None:
        self.path, self.num_timesteps = path, num_timesteps
        self.writer = None
        if tensorboard is not None:  # validate() checked it is installed
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(tensorboard)
        self.reset()

    def reset(self) -> None:
        """Start a new window."""
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self.steps = self.skipped = self.images = 0
        self.started = time.perf_counter()

    def add(self, t: Tensor, terms: dict[str, Tensor],
            grad_norm: float) -> None:
        """Add one step's gathered per-image terms at timesteps t."""
        for name, (total, count) in term_sums(t, terms,
                                              self.num_timesteps).items():
            self.sums[name] += total
            self.counts[name] += count
        self.sums["grad_norm"] += grad_norm
        self.counts["grad_norm"] += 1
        self.steps, self.images = self.steps + 1, self.images + len(t)

    def skip(self) -> None:
        """Count a step skipped for a non-finite loss."""
        self.skipped += 1

    def write(self, step: int, **extra: float) -> dict[str, float]:
        """Append the window's record (and `extra`), then start a new one."""
        seconds = time.perf_counter() - self.started
        record = {"step": step, **extra}
        record.update({k: self.sums[k] / self.counts[k]
                       for k in sorted(self.sums)})
        record.update(skipped=self.skipped,
                      steps_per_s=self.steps / seconds,
                      images_per_s=self.images / seconds)
        self.append(record)
        self.reset()
        return record

    def append(self, record: dict[str, float]) -> None:
        """Append a record to the JSONL file (and TensorBoard)."""
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step":
                    self.writer.add_scalar(key, value, record["step"])
            self.writer.flush()
