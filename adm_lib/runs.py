"""A run that every rank agrees on: its folder, its checkpoints, its steps.

Foundation (hand-written; the runs appendix checks it). `prepare_run`: rank 0
takes the folder's lock, clears what a killed run left half-written, and
picks the checkpoint to resume from; the other ranks load the one it
picked. `seed_dropout` gives each rank the global generator its step
draws dropout from, fresh or the checkpoint's; `save_run` writes a
checkpoint with every rank's generator. `gather_steps` reads the steps'
results, which wait on the device, at once and from every rank;
`skip_step` reports a step that was not finite. `run_session` sets up and
closes a run's ranks; `exclude_pause` keeps the time a run spends not training
out of its rates. Apart from `adm_lib.checkpoints` so that reading a
checkpoint needs no ranks.
"""

import contextlib
import json
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from tqdm.auto import tqdm

from adm_lib.checkpoints import (
    MetricsLog,
    checkpoint_path,
    latest_checkpoint,
    lock_run,
    read_checkpoint,
    save_checkpoint,
)
from adm_lib.errors import TrainError
from adm_lib.files import write_atomic
from adm_lib.ranks import Ranks, from_rank0, gather_rows, setup_ranks
from adm_lib.seeds import rng_state, set_rng_state, step_seed

__all__ = ["run_session", "prepare_run", "seed_dropout", "save_run",
           "StepResult", "gather_steps", "skip_step", "exclude_pause"]


@contextlib.contextmanager
def run_session(device: str) -> Iterator[tuple[Ranks, contextlib.ExitStack]]:
    """A run's ranks, their process group destroyed at the end, and the stack
    that will hold its folder's lock (`prepare_run`)."""
    ranks = setup_ranks(device)
    try:
        with contextlib.ExitStack() as held:
            yield ranks, held
    finally:
        if ranks.owns_group:
            dist.destroy_process_group()


def prepare_run(out: Path, settings: Mapping[str, Any], steps: int,
                resume: bool, ranks: Ranks, held: contextlib.ExitStack,
                mismatch: Callable[[Mapping[str, Any]], list[str]]
                ) -> tuple[Path, dict[str, Any]] | None:
    """Lock and check the run folder; the checkpoint to resume from, if any.

    Rank 0 takes the folder's lock into `held`, and picks the newest
    readable checkpoint; every rank loads that one, so a file cut short by
    a kill is skipped the same way everywhere. `settings` are written to
    `config.json`; `mismatch(saved settings)` names the fields a resume may
    not change, and `steps` is where the run is to end.
    """
    found, problem = None, None
    if ranks.main:
        try:
            out.mkdir(parents=True, exist_ok=True)
            held.enter_context(lock_run(out))
            for tmp in [*out.glob(".*.tmp"), *out.glob("*/.*.tmp")]:
                tmp.unlink()  # a killed run's: no one else writes here
            found = latest_checkpoint(out)
            files = sorted((out / "checkpoints").glob("step_*.pt"))
            step = found[1]["step"] if found else 0
            if files and not found:
                problem = (f"no checkpoint in {out / 'checkpoints'} can be "
                           f"read ({', '.join(p.name for p in files)}): "
                           "move them away to start a new run there")
            elif found and not resume:
                problem = (f"{out} already holds a run (checkpoint at step "
                           f"{step}): resume it (resume=True), or choose "
                           "another folder")
            elif found and (diff := mismatch(found[1]["config"])):
                problem = (f"the config does not match {found[0]}:\n  "
                           + "\n  ".join(diff))
            elif step > steps:
                problem = (f"{out} is at step {step}, past steps={steps}: "
                           "pass more steps to go on; the run is unchanged")
            else:
                if resume and not found:
                    warnings.warn(f"nothing to resume in {out} (no "
                                  "checkpoint): starting a new run",
                                  stacklevel=4)
                write_atomic(out / "config.json", lambda f: f.write(
                    json.dumps(dict(settings), indent=2).encode()))
        except (OSError, TrainError) as err:
            problem = (str(err) if isinstance(err, TrainError) else
                       f"cannot use {out}: {err.strerror or err}")
    problem, path = from_rank0(ranks, problem, found and found[0])
    if path and not ranks.main:
        found = (path, read_checkpoint(path))
    if problem:
        raise TrainError(problem)
    return found


def seed_dropout(seed: int, ranks: Ranks,
                 found: tuple[Path, Mapping[str, Any]] | None) -> None:
    """Seed this rank's global generator (dropout's), or restore the
    checkpoint's state of it if the checkpoint has one per rank."""
    torch.manual_seed(step_seed(seed, 10, ranks.rank))
    if not found:
        return
    last, saved = found
    if len(saved["rng"]) == ranks.world_size:
        set_rng_state(saved["rng"][ranks.rank], ranks.device)
    else:
        warnings.warn(f"{last} was written by {len(saved['rng'])} "
                      f"processes, not {ranks.world_size}: dropout will draw "
                      "new random numbers", stacklevel=4)


def save_run(out: Path, contents: Callable[[list[dict[str, Tensor]]],
                                           dict[str, Any]],
             step: int, keep: int, ranks: Ranks) -> Path:
    """Rank 0 writes `contents(every rank's RNG state)` as the checkpoint of
    `step`, keeping `keep`; a failure is raised on every rank."""
    rng = [rng_state(ranks.device)]
    if ranks.world_size > 1:
        rng = [None] * ranks.world_size
        dist.all_gather_object(rng, rng_state(ranks.device))
    problem = None
    if ranks.main:
        try:
            save_checkpoint(out, contents(rng), keep)
        except TrainError as err:
            problem = str(err)
    problem, = from_rank0(ranks, problem)
    if problem:
        raise TrainError(problem)
    return checkpoint_path(out, step)


@dataclass
class StepResult:
    """What one step leaves for the log, still on the device."""

    step: int
    loss_ok: Tensor  # the global batch's loss is finite
    grad_norm: Tensor
    t: Tensor  # the rank's timesteps, and its per-image terms
    terms: dict[str, Tensor]


def gather_steps(results: list[StepResult], ranks: Ranks
                 ) -> list[tuple[int, bool, float, Tensor, dict[str, Tensor]]]:
    """Per step: (step, loss finite, gradient norm, the global batch's
    timesteps and terms), read from the device and every rank at once."""
    if not results:
        return []
    names = sorted(results[0].terms)  # t (exact in float32), the terms
    rows = torch.stack([torch.stack([r.t.float()] + [r.terms[k].float()
                                                     for k in names], 1)
                        for r in results], 1)  # rows x steps x columns
    table = gather_rows(ranks, rows).cpu()
    flags = torch.stack([torch.stack([r.loss_ok.float(), r.grad_norm])
                         for r in results]).cpu().tolist()
    gathered = []
    for result, (loss_ok, norm), step in zip(results, flags, table.unbind(1),
                                             strict=True):
        t, *values = step.unbind(1)
        gathered.append((result.step, bool(loss_ok), norm, t.long(),
                         dict(zip(names, values, strict=True))))
    return gathered


def skip_step(in_a_row: int, limit: int, step: int, norm: float,
              last: Path | None) -> None:
    """Warn of a skipped step, the `in_a_row`th; stop the run at `limit`."""
    where = (f"the newest checkpoint, {last}, is intact" if last
             else "no checkpoint was written yet")
    if in_a_row >= limit:
        raise TrainError(
            f"{in_a_row} steps in a row (the last at step {step}) "
            "had a non-finite loss or gradient: lower lr, set grad_clip, "
            f"or check the data; {where}")
    warnings.warn(f"step {step}: non-finite loss or gradient (norm "
                  f"{norm}); step skipped ({in_a_row} in a row, "
                  f"stopping at {limit})", stacklevel=3)


def exclude_pause(bar: tqdm, log: MetricsLog | None, seconds: float) -> None:
    """Leave `seconds` spent not training out of the bar's and log's rates."""
    if log:
        log.started += seconds
    if not bar.disable:  # tqdm's own clock, as its unpause() moves it
        bar.start_t += seconds
        bar.last_print_t += seconds
