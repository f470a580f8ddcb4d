"""Files that are whole or absent, loads that run no code, and locks.

Foundation (hand-written; the runs appendix checks each guarantee):
`write_atomic` (a kill or a full disk leaves the previous file intact),
`safe_load` (torch.load with weights_only=True and a one-line reason when a
file does not load), `save_png` (an image grid, atomically) and `hold_lock`
(one process at a time in a folder, on Linux, macOS and Windows).
"""

import contextlib
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from PIL import Image

from adm_lib.errors import TrainError
from adm_lib.viz import pixel_grid

try:  # POSIX: an flock, dropped by the system when its holder dies
    import fcntl
except ImportError:  # Windows: msvcrt's byte-range lock, imported there
    fcntl = None

__all__ = ["write_atomic", "safe_load", "save_png", "hold_lock"]


def write_atomic(path: Path, save: Callable[[Any], None]) -> None:
    """Write a file by `save(f)` so that it is either whole or absent.

    The bytes go to a temporary file in the same folder, are flushed to
    disk (fsync), and only then renamed over `path`: a kill or a full disk
    at any moment leaves the previous file intact. The temporary file is
    named after the process, so two writers never write into one.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            save(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _sync_folder(path.parent)
    except (OSError, RuntimeError) as err:  # torch.save's: RuntimeError
        tmp.unlink(missing_ok=True)
        raise TrainError(f"cannot write {path}: {_write_failure(err)}; "
                         "earlier files there are intact") from None
    except BaseException:  # a failing save(), Ctrl-C: no litter either
        tmp.unlink(missing_ok=True)
        raise


def _sync_folder(folder: Path) -> None:
    """fsync a folder so that a rename in it survives a power cut (POSIX;
    Windows cannot open a folder, and its renames are journalled)."""
    if os.name == "nt":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_failure(err: Exception) -> str:
    """Why a write failed, in one line: the system's reason if it gave one.

    torch.save turns a failed write (a full disk, say) into a RuntimeError
    of its own, "[enforce fail at inline_container.cc:...] ...", raised
    while handling the OSError that says what happened.
    """
    cause: BaseException | None = err
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    if cause is not None:
        return cause.strerror or str(cause)
    return (str(err).strip() or type(err).__name__).splitlines()[0]


def safe_load(source: str | os.PathLike | IO[bytes],
              mmap: bool = False) -> Any:
    """torch.load of tensors and plain containers only, on the CPU.

    A file that does not load raises ValueError saying why (the caller
    names the file): torch's reason, less its advice to load with
    weights_only=False, which would run the file's code. With `mmap` (a
    path only), tensors are mapped from the file rather than read.
    """
    try:
        return torch.load(source, map_location="cpu", weights_only=True,
                          mmap=mmap)
    except FileNotFoundError:
        raise
    except Exception as err:  # truncated zip, bad pickle, disk error...
        reason = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
        if "Weights only load failed" in reason:
            found = re.search(
                r"WeightsUnpickler error: (.*?)(?: Please use|\n|$)", reason)
            reason = ("it holds objects other than tensors and plain "
                      "containers, which adm_lib does not load"
                      + (f" ({found.group(1).strip()})" if found else ""))
        else:
            reason = f"{type(err).__name__}: {reason.strip()}"
        raise ValueError(reason) from None


def save_png(path: Path, pixels: np.ndarray, columns: int) -> Path:
    """Write uint8 N x H x W x C images as one grid PNG, atomically."""
    grid = pixel_grid(pixels, columns)
    picture = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    write_atomic(path, lambda f: picture.save(f, format="PNG"))
    return path


def _try_lock(f: IO[str]) -> bool:
    """Take an exclusive lock on the open file `f` without waiting."""
    if fcntl is not None:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True
    import msvcrt  # Windows: a lock on the file's first byte

    f.seek(0)
    try:
        msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
    except OSError:
        return False
    return True


def _holder(f: IO[str]) -> str:
    """The pid the lock's holder wrote, if it can be read (Windows's locks
    keep others from reading the locked byte)."""
    try:
        f.seek(0)
        return f.read().strip() or "unknown"
    except OSError:
        return "unknown"


@contextlib.contextmanager
def hold_lock(path: Path, busy: Callable[[str], Exception]) -> Iterator[None]:
    """Hold an exclusive lock on `path`, or raise `busy(pid of its holder)`.

    The lock belongs to the open file, so the system drops it when the
    process ends however it ends: a killed run can be resumed at once.
    The file holds the holder's pid while it runs, for the message.
    """
    with open(path, "a+") as f:
        if not _try_lock(f):
            raise busy(_holder(f)) from None
        f.truncate(0)
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            f.truncate(0)
