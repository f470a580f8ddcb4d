"""adm_lib.checkpoints (foundation): the checkpoint file and the run
folder: plain files written whole, pruned, damaged ones set aside, errors
that name the file, and one run at a time in a folder."""

from __future__ import annotations

import errno
import io
import itertools
import json
import os
import warnings

import pytest
import torch

from adm_lib import checkpoints as ck
from adm_lib import cli
from adm_lib import config as cf
from adm_lib import train as tr
from adm_lib.models import load_run
from tests.helpers import adm_train, config, steps_of

pytestmark = pytest.mark.usefixtures("one_thread")


def test_checkpoints_are_plain_and_pruned(data, tmp_path):
    out = tmp_path / "run"
    last = tr.train(config(data, steps=4, save_interval=1, keep_checkpoints=2),
                    out, progress=False)
    assert last == ck.checkpoint_path(out, 4)
    assert steps_of(out) == [3, 4]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step_00000003.pt", "step_00000004.pt"]
    state = torch.load(last, map_location="cpu", weights_only=True)
    assert set(state) == set(ck.CHECKPOINT_KEYS)
    assert state["format"] == ck.CHECKPOINT_FORMAT and state["step"] == 4
    # The same settings as config.json (whose lists JSON writes as lists).
    assert (json.loads(json.dumps(state["config"]))
            == json.loads((out / "config.json").read_text()))
    assert state["config"]["in_channels"] == 1  # resolved from the data
    assert state["config"]["num_classes"] == 4
    assert list(state["ema"]) == ["0.9999"]


def checkpoint_bytes(step: int) -> bytes:
    """A small file that reads as a checkpoint of `step`."""
    state = {k: {} for k in ck.CHECKPOINT_KEYS}
    state.update(format=ck.CHECKPOINT_FORMAT, step=step,
                 model={"w": torch.full((4,), float(step))})
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def damaged_bytes(step: int) -> bytes:
    """A file that does not read as a checkpoint, damaged one of three ways."""
    whole = checkpoint_bytes(step)
    other = io.BytesIO()
    torch.save({"step": step}, other)  # a torch file, not a checkpoint
    return (whole[:len(whole) // 2], b"\0" * 100, other.getvalue())[step % 3]


def test_rotation_keeps_every_readable_checkpoint_it_should(tmp_path,
                                                            monkeypatch):
    # Every mix of absent, readable and damaged files at steps 1 to 4, a
    # checkpoint written at step 2 (amid them, over one) or 5 (the newest),
    # and every keep up to more than there are files.
    monkeypatch.setattr(os, "fsync", lambda fd: None)  # speed: not tested
    good = {step: checkpoint_bytes(step) for step in range(1, 6)}
    bad = {step: damaged_bytes(step) for step in range(1, 6)}
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    cases = 0
    for mix in itertools.product("-gd", repeat=4):
        files = {step: (good if kind == "g" else bad)[step]
                 for step, kind in zip(range(1, 5), mix, strict=True)
                 if kind != "-"}
        for written, keep in itertools.product((2, 5), range(1, 5)):
            for path in folder.iterdir():
                path.unlink()
            for step, content in files.items():
                ck.checkpoint_path(tmp_path, step).write_bytes(content)
            readable = sorted((s for s, c in files.items()
                               if c == good[s] and s != written),
                              reverse=True)
            damaged = [s for s, c in files.items()
                       if c == bad[s] and s != written]
            state = torch.load(io.BytesIO(good[written]),
                               weights_only=True)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                ck.save_checkpoint(tmp_path, state, keep)
            kept = sorted([written, *readable[:keep - 1]])
            case = f"files {mix}, written {written}, keep {keep}"
            assert steps_of(tmp_path) == kept, case
            for step in kept:  # each whole, and as it was
                path = ck.checkpoint_path(tmp_path, step)
                assert path.read_bytes() == good[step], case
            for step in damaged:  # set aside, not lost
                path = ck.checkpoint_path(tmp_path, step)
                aside = path.with_name(path.name + ".damaged")
                assert aside.read_bytes() == bad[step], case
            assert len(caught) == len(damaged), case
            assert all("set aside as" in str(w.message) for w in caught)
            assert (len(list(folder.iterdir()))
                    == len(kept) + len(damaged)), case  # nothing else
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # nothing damaged is left
                path, found = ck.latest_checkpoint(tmp_path)
            assert found["step"] == max(kept), case  # a resume takes it
            cases += 1
    assert cases == 3 ** 4 * 2 * 4


def test_read_checkpoint_rejects_other_files(tmp_path):
    with pytest.raises(cf.TrainError, match="no checkpoint at"):
        ck.read_checkpoint(tmp_path / "absent.pt")
    other = tmp_path / "other.pt"
    torch.save({"format": "something else", "step": 1}, other)
    with pytest.raises(cf.TrainError, match="not an adm train checkpoint"):
        ck.read_checkpoint(other)
    with pytest.raises(cf.TrainError, match="holds no checkpoint"):
        load_run(tmp_path)


class Pickled:
    """Not a tensor: a checkpoint holding one needs code to load."""


def test_checkpoint_errors_never_advise_weights_only_false(data, tmp_path):
    path = ck.checkpoint_path(tmp_path / "run", 1)
    path.parent.mkdir(parents=True)
    torch.save({"format": ck.CHECKPOINT_FORMAT, "model": Pickled()}, path)
    with pytest.raises(cf.TrainError) as err:
        ck.read_checkpoint(path)
    message = str(err.value)
    assert "holds objects other than tensors" in message
    assert "Pickled" in message  # what it holds, named
    with pytest.warns(UserWarning) as caught:
        assert ck.latest_checkpoint(tmp_path / "run") is None
    texts = [message, *(str(w.message) for w in caught)]
    for text in texts:
        assert "weights_only=False" not in text
        assert "weights_only` set to `False`" not in text
        assert "trust" not in text  # nor the rest of torch's advice


# --- a full disk -----------------------------------------------------------------


class FullDisk(io.RawIOBase):
    """A file that takes `room` bytes, then fails as a full disk does."""

    def __init__(self, f, room: int) -> None:
        self.f, self.room = f, room

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        if len(b) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(b)
        return self.f.write(b)


ENFORCE = ("[enforce fail at inline_container.cc:603] . PytorchStreamWriter "
           "failed writing file data/0: file write failed")


def full_disk(save, obj, f):
    """torch.save into a disk that fills up: torch's own RuntimeError."""
    save(obj, FullDisk(f, 1000))


def enforce_fail(save, obj, f):
    """torch's RuntimeError with no OSError under it."""
    f.write(b"half a checkpoint")
    raise RuntimeError(ENFORCE)


def os_error(save, obj, f):
    """An OSError from the write itself (a flush, say)."""
    f.write(b"half a checkpoint")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize(("fail", "reason"), [
    (full_disk, "No space left on device"), (os_error, "No space left"),
    (enforce_fail, ENFORCE)])
def test_disk_full_names_the_file_and_keeps_the_last_checkpoint(
        data, tmp_path, monkeypatch, fail, reason):
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if obj["step"] == 3:
            fail(real_save, obj, f)
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    out = tmp_path / "run"
    newest = ck.checkpoint_path(out, 3)
    with pytest.raises(cf.TrainError) as err:
        tr.train(config(data, steps=4, save_interval=1), out, progress=False)
    assert str(err.value).startswith(f"cannot write {newest}: {reason}")
    assert str(err.value).endswith("; earlier files there are intact")
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step_00000001.pt", "step_00000002.pt"]  # no temporary file either
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        path, state = ck.latest_checkpoint(out)
    assert path == ck.checkpoint_path(out, 2) and state["step"] == 2
    assert load_run(out).step == 2


# --- one run at a time -------------------------------------------------------------


def test_a_second_run_on_a_folder_in_use_is_refused(data, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    with ck.lock_run(out):  # as a run in another process holds it
        assert (out / ".lock").read_text() == str(os.getpid())
        assert cli.main(adm_train(out, data)) == 1
        assert capsys.readouterr().err == (
            f"adm train: {out} is in use by another run (pid {os.getpid()}): "
            "wait for it to end, or choose another folder\n")
        assert not (out / "metrics.jsonl").exists()
        assert not (out / "config.json").exists()
    # The lock ends with its holder; the next run takes it and cleans up
    # what a killed process left behind.
    stale = out / "checkpoints" / ".step_00000002.pt.99999.tmp"
    stale.parent.mkdir()
    stale.write_bytes(b"half")
    assert cli.main(adm_train(out, data)) == 0
    assert (out / ".lock").read_text() == ""
    assert not stale.exists() and steps_of(out) == [2]


def test_a_packed_checkpoint_unpacks_into_fresh_objects():
    def parts(seed: int):
        torch.manual_seed(seed)
        model = torch.nn.Linear(3, 2)
        ema = {0.9: torch.nn.Linear(3, 2), 0.99: torch.nn.Linear(3, 2)}
        optimizer = torch.optim.AdamW(model.parameters())
        model(torch.ones(1, 3)).sum().backward()
        optimizer.step()
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** seed)
        return model, ema, optimizer, scaler

    model, ema, optimizer, scaler = parts(1)
    packed = ck.pack_checkpoint(7, {"lr": 1.0}, model, ema, optimizer, scaler,
                                {}, [], 0)
    assert tuple(packed) == ck.CHECKPOINT_KEYS
    assert packed["format"] == ck.CHECKPOINT_FORMAT and packed["step"] == 7
    other = parts(2)
    ck.unpack_checkpoint(packed, *other)
    for a, b in [(model, other[0]), *((ema[r], other[1][r]) for r in ema)]:
        assert all(torch.equal(x, y) for x, y in
                   zip(a.state_dict().values(), b.state_dict().values(),
                       strict=True))
    moments = [s["exp_avg"] for s in other[2].state_dict()["state"].values()]
    assert all(torch.equal(x, y["exp_avg"]) for x, y in
               zip(moments, optimizer.state_dict()["state"].values(),
                   strict=True))
    assert other[3].get_scale() == scaler.get_scale()
