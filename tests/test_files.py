"""adm_lib.files (foundation): atomic writes, weights-only loads and the
run-folder lock, portable to a platform without fcntl."""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys

import pytest

from adm_lib import files
from adm_lib.errors import TrainError
from tests.helpers import ROOT, env


def test_write_atomic_leaves_nothing_when_saving_fails(tmp_path):
    path = tmp_path / "file.bin"
    path.write_bytes(b"old")

    def fail(f):
        f.write(b"new, but half")
        raise OSError(errno.EIO, "I/O error")

    with pytest.raises(TrainError, match=re.escape(f"cannot write {path}")):
        files.write_atomic(path, fail)
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.bin"]
    files.write_atomic(path, lambda f: f.write(b"new"))
    assert path.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.bin"]


def test_write_atomic_cleans_up_after_any_exception(tmp_path):
    path = tmp_path / "file.bin"

    def fail(f):
        f.write(b"half")
        raise RuntimeError("cannot pickle this")

    with pytest.raises(RuntimeError):
        files.write_atomic(path, fail)
    assert list(tmp_path.iterdir()) == []


def test_write_atomic_names_its_temporary_file_by_process(tmp_path):
    names = []
    files.write_atomic(tmp_path / "file.bin", lambda f: names.append(f.name))
    assert names == [str(tmp_path / f".file.bin.{os.getpid()}.tmp")]


class Busy(Exception):
    """What the test's lock raises for a holder."""


def test_the_lock_refuses_a_second_holder(tmp_path):
    path = tmp_path / ".lock"
    with files.hold_lock(path, Busy):
        assert path.read_text() == str(os.getpid())
        # Another open file of the same path, as another process has: the
        # lock belongs to the open file, so this process is refused too.
        with pytest.raises(Busy) as busy, files.hold_lock(path, Busy):
            pass
        assert str(busy.value) == str(os.getpid())  # the holder, named
        assert path.read_text() == str(os.getpid())  # and left alone
    assert path.read_text() == ""
    with files.hold_lock(path, Busy):  # released: the next one takes it
        assert path.read_text() == str(os.getpid())


# A platform without fcntl (Windows): `import fcntl` raises ImportError.
WITHOUT_FCNTL = """
import sys
sys.modules["fcntl"] = None
try:
    import fcntl
except ImportError:
    pass
else:
    sys.exit("fcntl was not hidden")
import adm_lib.files, adm_lib.checkpoints, adm_lib.train
print(adm_lib.files.fcntl)
"""


def test_the_foundation_imports_without_fcntl():
    done = subprocess.run([sys.executable, "-c", WITHOUT_FCNTL], cwd=ROOT,
                          env=env(), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "None\n"  # and the lock would take msvcrt's
