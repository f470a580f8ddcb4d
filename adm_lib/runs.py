"""A run folder that every rank of a run agrees on: `prepare_run`.

Foundation (hand-written; the runs appendix checks it): rank 0 takes the
folder's lock, clears what a killed run left half-written, and picks the
checkpoint to resume from; the other ranks load the one it picked. Apart
from `adm_lib.checkpoints` so that reading a checkpoint needs no ranks.
"""

import contextlib
import json
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from adm_lib.checkpoints import latest_checkpoint, lock_run, read_checkpoint
from adm_lib.errors import TrainError
from adm_lib.files import write_atomic
from adm_lib.ranks import Ranks, from_rank0

__all__ = ["prepare_run"]


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
