"""adm_lib.train (chapter 4): `adm train`'s config, loop, checkpoints, resume.

Every run here is tiny (8x8 grey images, a 32-channel UNet, a few steps) so
the file runs in well under a minute on a 2-core CPU. Every run uses one
thread: the subprocesses' (the kill test, torchrun) and this one's.
"""

from __future__ import annotations

import dataclasses
import errno
import importlib.util
import io
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image

from adm_lib import batches as bt
from adm_lib import checkpoints as ck
from adm_lib import cli
from adm_lib import config as cf
from adm_lib import objectives as ob
from adm_lib import runlog as rl
from adm_lib import train as tr
from adm_lib.diffusion import UniformSampler
from adm_lib.unet import EncoderUNetModel, SuperResModel, UNetModel
from adm_lib.values import MAX_SEED

ROOT = Path(__file__).resolve().parents[1]
BASELINES = ROOT.parent / "shared" / "baselines" / "reference_h100.json"
TIMING = {"steps_per_s", "images_per_s"}  # wall-clock: differs run to run
CPU = torch.device("cpu")

# A model that builds and steps in milliseconds: 8x8 images, channel_mult
# 1,2 (resolutions 8 and 4), attention at 4x4.
TINY = {
    "image_size": 8, "small_size": 4, "num_channels": 32,
    "num_res_blocks": 1, "channel_mult": "1,2", "attention_resolutions": "4",
    "num_head_channels": 32, "classifier_width": 32, "classifier_depth": 1,
    "classifier_attention_resolutions": "4", "diffusion_steps": 50,
    "batch_size": 4, "steps": 2, "sample_steps": "ddim2", "num_samples": 4,
    "num_workers": 0, "device": "cpu", "log_interval": 1,
    "save_interval": 1000, "sample_interval": 1000, "eval_interval": 1000,
    "eval_images": 8, "val_fraction": 0.25,
    # The tolerances below are float32's; "auto" would train in bf16 on a
    # CPU with native bf16.
    "precision": "fp32",
}
# Dropout and the loss-aware sampler: the RNG and the sampler's history must
# both come back on resume. Two diffusion steps fill the sampler's history
# (10 losses per t) within the first few steps, so its weights then matter.
RESUMABLE = {
    "dropout": 0.1, "schedule_sampler": "loss-second-moment",
    "diffusion_steps": 2, "batch_size": 8, "steps": 6, "save_interval": 1,
    "keep_checkpoints": 10,
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread here too: on a busy 2-core machine, two threads
    that spin-wait for each other make a step ten times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 grey 8x8 images in 4 classes, as an .npz (arr_0, arr_1)."""
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    rng = np.random.default_rng(0)
    labels = np.arange(24) % 4
    base = rng.integers(0, 256, (4, 8, 8))
    noise = rng.integers(-40, 41, (24, 8, 8))
    images = np.clip(base[labels] + noise, 0, 255).astype(np.uint8)
    np.savez(path, images, labels)
    return path


def config(data: Path, kind: str = "diffusion", **overrides) -> cf.TrainConfig:
    """A tiny config of `kind` on the fixture's data."""
    return cf.make_config(kind, overrides={**TINY, "data": str(data),
                                           **overrides})


def set_args(values: dict) -> list[str]:
    """`--set k=v` arguments for the CLI."""
    args = []
    for key, value in values.items():
        text = str(value).lower() if isinstance(value, bool) else str(value)
        args += ["--set", f"{key}={text}"]
    return args


def env() -> dict[str, str]:
    """A subprocess environment: one thread, this checkout importable."""
    path = os.pathsep.join(filter(None, [str(ROOT),
                                         os.environ.get("PYTHONPATH")]))
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "PYTHONPATH": path}


def metrics(out: Path) -> list[dict]:
    """A run's metric records without the wall-clock fields."""
    return [{k: v for k, v in r.items() if k not in TIMING}
            for r in rl.read_metrics(out)]


def weights(out: Path, which: str = "ema") -> dict[str, torch.Tensor]:
    """The weights of a run's newest checkpoint: EMA, "model" (raw), a rate."""
    return ck.load_run(out, which).model.state_dict()


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor],
                atol: float = 0.0) -> None:
    """Same keys; tensors bit-identical (atol 0) or close."""
    assert a.keys() == b.keys()
    for name in a:
        if atol:
            torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0,
                                       msg=name)
        else:
            assert torch.equal(a[name], b[name]), name


def steps_of(out: Path) -> list[int]:
    """The steps of the checkpoint files in a run folder."""
    return [int(p.stem.split("_")[1])
            for p in sorted((out / "checkpoints").glob("step_*.pt"))]


@pytest.fixture(scope="module")
def reference(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 6-step run of RESUMABLE, a checkpoint every step."""
    out = tmp_path_factory.mktemp("reference") / "run"
    tr.train(config(data, **RESUMABLE), out, progress=False)
    return out


# --- resume -----------------------------------------------------------------


def test_resume_reproduces_the_uninterrupted_run(data, reference, tmp_path):
    out = tmp_path / "run"
    tr.train(config(data, **{**RESUMABLE, "steps": 4}), out, progress=False)
    saved = ck.read_checkpoint(ck.checkpoint_path(out, 4))
    # The sampler's history is full: its (non-uniform) weights pick the t of
    # the steps after the resume, so a lost history would change them.
    assert (saved["sampler"]["counts"] == 10).all()
    assert saved["sampler"]["history"].std() > 0
    tr.train(config(data, **RESUMABLE), out, resume=True, progress=False)

    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4, 5, 6]
    assert metrics(out) == metrics(reference)
    assert_same(weights(out, "model"), weights(reference, "model"))
    assert_same(weights(out), weights(reference))  # the EMA
    ours = ck.read_checkpoint(ck.checkpoint_path(out, 6))
    theirs = ck.read_checkpoint(ck.checkpoint_path(reference, 6))
    for a, b in zip(ours["optimizer"]["state"].values(),
                    theirs["optimizer"]["state"].values(), strict=True):
        assert torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    assert torch.equal(ours["sampler"]["history"],
                       theirs["sampler"]["history"])


def test_resume_allows_run_fields_and_refuses_other_changes(data, reference,
                                                            tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    before = (out / "config.json").read_text()
    with pytest.raises(cf.TrainError) as err:
        tr.train(config(data, **{**RESUMABLE, "lr": 1e-3, "dropout": 0.0}),
                 out, resume=True, progress=False)
    message = str(err.value)
    assert "does not match" in message and "step_00000006.pt" in message
    assert "lr: checkpoint 0.0002, now 0.001" in message
    assert "dropout: checkpoint 0.1, now 0.0" in message
    assert "seed" not in message  # only the fields that differ
    assert (out / "config.json").read_text() == before

    # A fresh run into a folder with checkpoints must be asked for.
    with pytest.raises(cf.TrainError, match=r"already holds a run .*--resume"):
        tr.train(config(data, **RESUMABLE), out, progress=False)
    assert steps_of(out) == steps_of(reference)

    # RUN_FIELDS may change: go on for 2 more steps, logging every 2.
    assert {"steps", "log_interval", "save_interval"} <= cf.RUN_FIELDS
    tr.train(config(data, **{**RESUMABLE, "steps": 8, "log_interval": 2,
                             "save_interval": 4}),
             out, resume=True, progress=False)
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4, 5, 6, 8]
    assert steps_of(out)[-1] == 8
    assert json.loads((out / "config.json").read_text())["steps"] == 8


def test_truncated_newest_checkpoint_is_named_and_skipped(data, reference,
                                                          tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    newest = ck.checkpoint_path(out, 6)
    with open(newest, "r+b") as f:
        f.truncate(newest.stat().st_size // 2)

    with pytest.warns(UserWarning, match=re.escape(str(newest))):
        path, state = ck.latest_checkpoint(out)
    assert path == ck.checkpoint_path(out, 5) and state["step"] == 5
    with pytest.raises(cf.TrainError, match="not a readable checkpoint"):
        ck.read_checkpoint(newest)
    with pytest.warns(UserWarning, match="step_00000006.pt"):
        assert ck.load_run(out).step == 5

    # Resuming redoes step 6 from step 5 and lands on the reference.
    with pytest.warns(UserWarning, match="step_00000006.pt"):
        tr.train(config(data, **RESUMABLE), out, resume=True, progress=False)
    assert ck.read_checkpoint(newest)["step"] == 6
    assert metrics(out) == metrics(reference)
    assert_same(weights(out, "model"), weights(reference, "model"))
    assert_same(weights(out), weights(reference))


KILLER = '''
"""Run `adm train`, SIGKILLing this process half-way through save KILL_AT."""
import io, os, signal, sys

import torch

from adm_lib import cli
from adm_lib import batches as bt
from adm_lib import checkpoints as ck
from adm_lib import config as cf
from adm_lib import objectives as ob
from adm_lib import runlog as rl
from adm_lib import train as tr

kill_at, saves = int(os.environ.get("KILL_AT_SAVE", "0")), 0
real_save, real_read = torch.save, ck.read_checkpoint


def save(obj, f, *args, **kwargs):
    global saves
    saves += 1
    if saves == kill_at:  # half the bytes reach the temporary file
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        f.flush()
        os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    real_save(obj, f, *args, **kwargs)


def read(path, mmap=False):
    if not mmap:  # rotation's probes map the tensors; a resume reads them
        print(f"read {path}", flush=True)
    return real_read(path, mmap=mmap)


torch.save, ck.read_checkpoint = save, read
sys.exit(cli.main(sys.argv[1:]))
'''


def test_killed_mid_save_resumes_from_the_last_whole_checkpoint(data,
                                                                 tmp_path):
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    settings = {**TINY, **RESUMABLE, "steps": 5}

    def adm(out: Path, *extra: str, kill_at: int = 0) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, str(script), "train", "diffusion", "--out",
             str(out), "--quiet", *extra],
            env={**env(), "KILL_AT_SAVE": str(kill_at)}, cwd=ROOT,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    runs = [adm(killed, "--data", str(data), *set_args(settings), kill_at=3),
            adm(whole, "--data", str(data), *set_args(settings))]
    try:
        (_, killed_err), (_, whole_err) = (p.communicate(timeout=120)
                                            for p in runs)
    finally:
        for p in runs:
            p.kill()
    assert runs[0].returncode == -signal.SIGKILL, killed_err
    assert runs[1].returncode == 0, whole_err

    # The temporary file carries the killed process's id.
    partial = killed / "checkpoints" / f".step_00000003.pt.{runs[0].pid}.tmp"
    assert partial.exists() and partial.stat().st_size > 0
    assert steps_of(killed) == [1, 2]
    # Its lock went with it: the file is there, unlocked, and the resume
    # below takes it (and deletes the temporary file under it).
    assert (killed / ".lock").read_text() == str(runs[0].pid)
    # Step 3 was logged before its save was killed: the resume rewrites it.
    assert [r["step"] for r in metrics(killed)] == [1, 2, 3]

    resume = adm(killed, "--resume")  # the config comes from config.json
    try:
        out, err = resume.communicate(timeout=120)
    finally:
        resume.kill()
    assert resume.returncode == 0, err
    reads = [line for line in out.splitlines() if line.startswith("read ")]
    assert reads == [f"read {ck.checkpoint_path(killed, 2)}"]  # 2 steps lost
    assert "checkpoint:" in out and "step_00000005.pt" in out

    assert not list((killed / "checkpoints").glob("*.tmp"))
    assert steps_of(killed) == [1, 2, 3, 4, 5]  # keep_checkpoints=10
    for step in steps_of(killed):
        ck.read_checkpoint(ck.checkpoint_path(killed, step))
    assert metrics(killed) == metrics(whole)
    assert_same(weights(killed, "model"), weights(whole, "model"))
    assert_same(weights(killed), weights(whole))


# --- data-parallel ----------------------------------------------------------


def test_two_processes_match_one(data, tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    settings = {**TINY, "batch_size": 8, "steps": 3, "dropout": 0.0,
                "schedule_sampler": "loss-second-moment"}
    two, one = tmp_path / "two", tmp_path / "one"
    torchrun = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone",
         "--nproc_per_node", "2", "-m", "adm_lib.cli", "train", "diffusion",
         "--out", str(two), "--data", str(data), "--quiet",
         *set_args(settings)],
        env=env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    try:
        tr.train(config(data, **settings), one, progress=False)
        output, _ = torchrun.communicate(timeout=150)
    finally:
        torchrun.kill()
    assert torchrun.returncode == 0, output
    assert output.count("checkpoint:") == 1  # rank 0 reports, only

    ours, theirs = metrics(two), metrics(one)
    assert [r["step"] for r in ours] == [r["step"] for r in theirs] == [1, 2, 3]
    for a, b in zip(ours, theirs, strict=True):
        assert a.keys() == b.keys()
        for key in ("loss", "mse", "vb", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), (a["step"], key)
    assert_same(weights(two, "model"), weights(one, "model"), atol=1e-4)
    assert_same(weights(two), weights(one), atol=1e-4)
    saved = ck.read_checkpoint(ck.checkpoint_path(two, 3))
    assert len(saved["rng"]) == 2  # every rank's dropout RNG


# --- failures ----------------------------------------------------------------


def nan_terms(monkeypatch: pytest.MonkeyPatch,
              bad: Callable[[int], bool]) -> None:
    """Make diffusion_terms' loss NaN on the calls (0, 1...) `bad` picks."""
    real, calls = ob.diffusion_terms, []

    def terms(*args):
        out = real(*args)
        calls.append(None)
        if bad(len(calls) - 1):
            out = {**out, "loss": out["loss"] * float("nan")}
        return out

    monkeypatch.setattr(tr, "diffusion_terms", terms)


def test_a_non_finite_step_is_skipped(data, tmp_path, monkeypatch):
    nan_terms(monkeypatch, lambda call: call == 1)
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match=r"step 1: non-finite .*step skipped"):
        tr.train(config(data, steps=4, save_interval=1, keep_checkpoints=10),
                 out, progress=False)
    records = metrics(out)
    assert [r["skipped"] for r in records] == [0, 1, 0, 0]
    assert "loss" not in records[1] and np.isfinite(records[2]["loss"])

    ckpt = [ck.read_checkpoint(ck.checkpoint_path(out, s)) for s in (1, 2, 3)]
    assert [c["nonfinite"] for c in ckpt] == [0, 1, 0]
    assert_same(ckpt[1]["model"], ckpt[0]["model"])  # step 2 changed nothing
    assert_same(ckpt[1]["ema"]["0.9999"], ckpt[0]["ema"]["0.9999"])
    for a, b in zip(ckpt[1]["optimizer"]["state"].values(),
                    ckpt[0]["optimizer"]["state"].values(), strict=True):
        assert torch.equal(a["exp_avg"], b["exp_avg"])
    changed = [not torch.equal(ckpt[2]["model"][k], ckpt[1]["model"][k])
               for k in ckpt[1]["model"]]
    assert any(changed)  # and training went on


def test_non_finite_every_step_stops_the_run(data, tmp_path, monkeypatch):
    nan_terms(monkeypatch, lambda call: True)
    out = tmp_path / "run"
    with (pytest.warns(UserWarning, match="non-finite"),
          pytest.raises(cf.TrainError) as err):
        tr.train(config(data, steps=20, save_interval=1, max_nonfinite=3),
                 out, progress=False)
    message = str(err.value)
    assert "3 steps in a row" in message and "the last at step 2" in message
    assert "step_00000002.pt" in message  # the newest checkpoint, named
    assert steps_of(out) == [1, 2]


def test_unwritable_run_folder_names_the_path(data, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    out = blocker / "run"
    with pytest.raises(cf.TrainError, match=re.escape(f"cannot use {out}")):
        tr.train(config(data), out, progress=False)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root ignores folder permissions")
def test_read_only_parent_folder_names_the_path(data, tmp_path):
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        with pytest.raises(cf.TrainError, match=re.escape(str(parent / "run"))):
            tr.train(config(data), parent / "run", progress=False)
    finally:
        parent.chmod(0o700)


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
    assert ck.load_run(out).step == 2


# --- settings ----------------------------------------------------------------


def test_unknown_setting_suggests_and_lists(tmp_path, capsys):
    with pytest.raises(cf.TrainError) as err:
        cf.make_config(overrides={"lrr": 1})
    message = str(err.value)
    assert "unknown setting 'lrr'" in message and "did you mean lr" in message
    assert "valid settings: data, val_data" in message
    assert "batch_size" in message and "kind," not in message

    out = tmp_path / "run"
    argv = ["train", "diffusion", "--out", str(out), "--quiet"]
    assert cli.main([*argv, "--set", "lrr=1"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("adm train: unknown setting 'lrr'")
    assert "did you mean lr" in captured.err
    assert not out.exists()  # nothing started

    assert cli.main([*argv, "--set", "batch_size=abc"]) == 1
    assert "batch_size='abc': expected int" in capsys.readouterr().err
    assert cli.main([*argv, "--preset", "imagenet1024"]) == 1
    assert ("no diffusion preset 'imagenet1024'; presets: mnist, cifar10, "
            "imagenet64") in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        cli.main([*argv, "--set", "lr"])
    assert exit_.value.code == 2
    assert "expected KEY=VALUE, got 'lr'" in capsys.readouterr().err


@pytest.mark.parametrize(("key", "value", "message"), [
    ("batch_size", "abc", "batch_size='abc': expected int"),
    ("batch_size", "8.5", "batch_size='8.5': expected int"),
    ("batch_size", 8.5, "batch_size=8.5: expected int"),
    ("lr", "fast", "lr='fast': expected float"),
    ("class_cond", "maybe", "class_cond='maybe': expected bool"),
    ("batch_size", "0", "batch_size=0 must be >= 1"),
    ("microbatch", "-1", "microbatch=-1 must be >= 0"),
    ("precision", "fp8", "precision='fp8': expected one of auto, fp32"),
    ("ema_rate", "0.9,1.5", "ema_rate='0.9,1.5': expected rates in (0, 1)"),
])
def test_bad_values_are_named(key, value, message):
    with pytest.raises(cf.TrainError, match=re.escape(message)):
        cf.make_config(overrides={key: value})


def test_values_are_coerced_to_the_field_types():
    c = cf.make_config("classifier", "mnist", {
        "batch_size": "16", "steps": "1e3", "lr": "1e-4", "random_flip": "yes",
        "class_cond": "0", "ema_rate": "0.999,0.9999", "microbatch": 4.0})
    assert (c.batch_size, c.steps, c.lr) == (16, 1000, 1e-4)
    assert (c.random_flip, c.class_cond, c.microbatch) == (True, False, 4)
    assert type(c.steps) is int and type(c.lr) is float
    assert cf.ema_rates(c) == [0.999, 0.9999]
    assert c.weight_decay == 0.05 and c.kind == "classifier"  # the preset's
    base = replace(c, seed=7)
    assert cf.make_config("classifier", overrides={"lr": 1}, base=base).seed == 7
    with pytest.raises(cf.TrainError, match="kind must be one of"):
        cf.make_config("gan")
    with pytest.raises(cf.TrainError, match="presets: mnist, cifar10"):
        cf.make_config("upsampler", "imagenet64")


def test_non_integer_exponent_strings_are_refused():
    with pytest.raises(cf.TrainError, match="expected int"):
        cf.make_config(overrides={"microbatch": "2.5e0"})


def test_kind_is_not_suggested_for_kind():
    with pytest.raises(cf.TrainError) as err:
        cf.make_config(overrides={"kind": "classifier"})
    assert "did you mean kind" not in str(err.value)
    assert "first argument" in str(err.value)


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_non_finite_lr_is_refused(value):
    with pytest.raises(cf.TrainError, match="lr="):
        cf.make_config(overrides={"lr": value})


# --- micro-batches, precision --------------------------------------------------


def test_micro_batches_give_the_whole_batch_gradient(data, tmp_path):
    c = config(data, batch_size=8, dropout=0.0)
    dataset = bt.open_data(c)
    c = bt.resolve_config(c, dataset)
    diffusion = cf.build_diffusion(c)
    x = torch.stack([dataset[i][0] for i in range(8)])
    y = torch.tensor([dataset[i][1] for i in range(8)])
    grads, losses = [], []
    for micro in (0, 3):
        state = tr.TrainState.create(replace(c, microbatch=micro), CPU)
        draws = bt.draw_step(c, state.sampler, 0, tuple(x.shape[1:]), CPU)
        loss, terms = tr.accumulate_gradients(
            replace(c, microbatch=micro), diffusion, state.model, state, x, y,
            draws, CPU)
        assert terms["loss"].shape == (8,)
        grads.append([p.grad for p in state.model.parameters()])
        losses.append(loss)
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=0)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)

    # End to end: one AdamW step lands on the same weights.
    runs = {m: tmp_path / f"micro{m}" for m in (0, 3)}
    for micro, out in runs.items():
        tr.train(config(data, batch_size=8, microbatch=micro, steps=1), out,
                 progress=False)
    whole, split = metrics(runs[0])[0], metrics(runs[3])[0]
    for key in ("loss", "mse", "vb", "grad_norm"):
        assert split[key] == pytest.approx(whole[key], rel=1e-5)
    assert_same(weights(runs[3], "model"), weights(runs[0], "model"),
                atol=1e-6)


def autocast_works(dtype: torch.dtype) -> bool:
    """Whether this torch runs a conv under CPU autocast at `dtype`."""
    try:
        with torch.autocast("cpu", dtype=dtype):
            out = torch.nn.functional.conv2d(torch.ones(1, 1, 3, 3),
                                             torch.ones(1, 1, 3, 3))
        return out.dtype == dtype
    except (RuntimeError, TypeError):
        return False


@pytest.mark.parametrize(("precision", "dtype"), [("bf16", torch.bfloat16),
                                                  ("fp16", torch.float16)])
def test_mixed_precision_on_cpu(data, tmp_path, precision, dtype):
    if not autocast_works(dtype):
        pytest.skip(f"CPU autocast at {dtype} is not supported here")
    out = tmp_path / "run"
    tr.train(config(data, precision=precision), out, progress=False)
    records = metrics(out)
    assert [r["step"] for r in records] == [1, 2]
    assert all(np.isfinite(r["loss"]) and r["skipped"] == 0 for r in records)
    scaler = ck.read_checkpoint(ck.checkpoint_path(out, 2))["scaler"]
    if precision == "fp16":
        assert scaler["scale"] > 0  # GradScaler on, its state saved
    else:
        assert not scaler
    assert (out / "samples" / "step_00000002.png").exists()


@pytest.mark.parametrize("native", [True, False])
def test_resolve_precision(monkeypatch, capsys, native):
    # "auto" is bf16 only where it is native: emulated bf16 is slower.
    monkeypatch.setattr(tr, "native_bf16", lambda device: native)
    tr._say_fp32.cache_clear()
    want = "bf16" if native else "fp32"
    for device in (CPU, torch.device("cuda", 0)):
        assert tr.resolve_precision("auto", device) == want
    for precision in ("fp32", "bf16", "fp16"):
        assert tr.resolve_precision(precision, CPU) == precision
    said = capsys.readouterr().err
    # Said once per device type, and only when it falls back.
    assert said.count("no native bfloat16") == (0 if native else 2)
    tr.resolve_precision("auto", CPU)
    assert "bfloat16" not in capsys.readouterr().err


def test_native_bf16_matches_the_cpu_flags():
    flags = open("/proc/cpuinfo").read() if os.path.exists(
        "/proc/cpuinfo") else ""
    if not flags:
        pytest.skip("no /proc/cpuinfo to read the CPU's flags from")
    has = any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))
    assert tr.native_bf16(CPU) == has


def test_memory_format_auto_follows_the_device_and_choices_override():
    cuda = torch.device("cuda", 0)
    assert tr.memory_format("auto", CPU) == torch.contiguous_format
    assert tr.memory_format("auto", cuda) == torch.channels_last
    for device in (CPU, cuda):
        assert tr.memory_format("contiguous", device) == torch.contiguous_format
        assert tr.memory_format("channels_last", device) == torch.channels_last
    assert {"memory_format", "deterministic"} <= cf.RUN_FIELDS


def test_memory_format_setting_lays_out_the_model_and_the_batch(data):
    c = config(data, memory_format="channels_last", in_channels=3,
               num_classes=4)
    state = tr.TrainState.create(c, CPU)
    convs = [p for p in state.model.parameters() if p.dim() == 4]
    # (A 1x1 weight is both layouts at once.)
    assert all(p.is_contiguous(memory_format=torch.channels_last)
               for p in convs)
    assert any(not p.is_contiguous() for p in convs)
    seen = []
    state.model.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    pixels = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    tr.train_step(c, cf.build_diffusion(c), state.model, state, pixels,
                  torch.zeros(4, dtype=torch.long), slice(0, 4),
                  tr.Ranks(0, 1, CPU, False))
    assert seen[0].is_contiguous(memory_format=torch.channels_last)
    assert not seen[0].is_contiguous()


@pytest.fixture
def backends(monkeypatch):
    """Put back the global backend flags that fast_backends sets."""
    # monkeypatch cannot undo torch.backends' attributes: save them by hand.
    flags = [(torch.backends.cuda.matmul, "allow_tf32"),
             (torch.backends.cudnn, "allow_tf32"),
             (torch.backends.cudnn, "benchmark")]
    saved = [getattr(obj, name) for obj, name in flags]
    deterministic = torch.are_deterministic_algorithms_enabled()
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "")  # undone at the end
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    yield
    for (obj, name), value in zip(flags, saved, strict=True):
        setattr(obj, name, value)
    torch.use_deterministic_algorithms(deterministic)


def tf32() -> tuple[bool, bool]:
    return (torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cudnn.allow_tf32)


@pytest.mark.parametrize("first", ["fp32", "bf16"])
def test_tf32_only_for_16_bit_runs(data, backends, first):
    # fast_backends reads only the device's type, so a CUDA device object
    # works without a GPU. Each precision after the other: a previous
    # run's setting must not leak into the next.
    cuda = torch.device("cuda", 0)
    order = ["fp32", "bf16", "fp16", "fp32"]
    if first == "bf16":
        order = order[1:] + ["bf16"]
    for precision in order:
        tr.fast_backends(cuda, precision)
        assert tf32() == ((precision != "fp32"),) * 2, precision
        assert torch.backends.cudnn.benchmark


def test_fast_backends_change_nothing_on_a_cpu(data, backends):
    before = tf32(), torch.backends.cudnn.benchmark
    tr.fast_backends(CPU, "bf16")
    assert (tf32(), torch.backends.cudnn.benchmark) == before
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ


def test_deterministic_sets_what_bit_exact_gpu_runs_need(data, backends):
    cuda = torch.device("cuda", 0)
    tr.fast_backends(cuda, "auto", deterministic=True)
    assert torch.are_deterministic_algorithms_enabled()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert not torch.backends.cudnn.benchmark
    with tr.attention_kernels(config(data, deterministic=True)):
        assert torch.backends.cuda.math_sdp_enabled()
        assert not (torch.backends.cuda.flash_sdp_enabled()
                    or torch.backends.cuda.mem_efficient_sdp_enabled()
                    or torch.backends.cuda.cudnn_sdp_enabled())
    assert torch.backends.cuda.flash_sdp_enabled()  # only inside
    # A non-deterministic run in the same process undoes it, but leaves a
    # workspace setting alone (cuBLAS read it once, at its first call).
    tr.fast_backends(cuda, "auto")
    assert not torch.are_deterministic_algorithms_enabled()
    assert torch.backends.cudnn.benchmark
    # A workspace size the user chose is kept.
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":16:8"
    tr.fast_backends(cuda, "auto", deterministic=True)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


def test_a_deterministic_run_trains(data, backends, tmp_path):
    c = config(data, deterministic=True, microbatch=2,
               memory_format="channels_last")
    tr.train(c, tmp_path / "run", progress=False)
    assert torch.are_deterministic_algorithms_enabled()
    losses = [r["loss"] for r in rl.read_metrics(tmp_path / "run")]
    assert len(losses) == c.steps and all(map(np.isfinite, losses))


@pytest.mark.parametrize("saved, loaded", [("contiguous", "channels_last"),
                                           ("channels_last", "contiguous")])
def test_a_resume_across_layouts_updates_as_if_never_stopped(
        data, saved, loaded):
    # A GPU run's checkpoint (channels_last) resumed on a CPU (contiguous),
    # or the other way: the fused AdamW pairs each weight with its moments
    # by position in memory, so moments in the other layout update the
    # wrong weights (off by up to about lr). lr 0.1 makes that plain.
    def state(layout: str) -> tr.TrainState:
        c = config(data, lr=0.1, memory_format=layout, in_channels=1,
                   num_classes=4)
        return tr.TrainState.create(c, CPU)

    def step(s: tr.TrainState, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        for p in s.model.parameters():  # each gradient in its weight's layout
            p.grad = torch.empty_like(p).copy_(
                torch.randn(p.shape, generator=g))
        s.optimizer.step()

    whole = state(saved)
    step(whole, 1)
    buffer = io.BytesIO()
    torch.save(whole.state_dict(config(data), []), buffer)
    buffer.seek(0)
    resumed = state(loaded)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    step(whole, 2)
    step(resumed, 2)
    layout = torch.channels_last if loaded == "channels_last" else None
    for p, q in zip(whole.model.parameters(), resumed.model.parameters(),
                    strict=True):
        if layout and p.dim() == 4:
            assert q.is_contiguous(memory_format=layout)
        # The same elementwise arithmetic on the same values, whatever
        # the layout: equal but for the last bit of a vectorised tail.
        torch.testing.assert_close(q, p, rtol=0, atol=1e-6)


def test_micro_batches_skip_the_all_reduce_under_compile_too():
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        ddp = tr.data_parallel(torch.nn.Linear(2, 2), CPU)
        assert ddp.gradient_as_bucket_view
        compiled = torch.compile(ddp)  # wraps it; compiles only when run
        for model in (ddp, compiled):
            with tr.micro_sync(model, last=False):
                assert not ddp.require_backward_grad_sync
            with tr.micro_sync(model, last=True):
                assert ddp.require_backward_grad_sync
        with tr.micro_sync(torch.nn.Linear(2, 2), last=False):
            pass  # no DDP, nothing to skip
    finally:
        dist.destroy_process_group()


# --- checkpoints and runs of each kind ------------------------------------------


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
    assert state["config"] == json.loads((out / "config.json").read_text())
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


def test_resume_over_a_damaged_newer_checkpoint_loses_nothing(
        data, reference, tmp_path):
    # The run stopped after step 4; step 4's file is damaged, step 2's
    # good. A resume that keeps one checkpoint goes on from step 2.
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    for step in (1, 3, 5, 6):
        ck.checkpoint_path(out, step).unlink()
    newest = ck.checkpoint_path(out, 4)
    damage(newest)
    damaged = newest.read_bytes()
    with pytest.warns(UserWarning) as caught:
        tr.train(config(data, **{**RESUMABLE, "steps": 3,
                                 "keep_checkpoints": 1}),
                 out, resume=True, progress=False)
    said = [str(w.message) for w in caught]
    assert len(said) == 2 and all(str(newest) in m for m in said)
    assert said[0].endswith("trying the one before it")
    assert said[1].endswith("set aside as step_00000004.pt.damaged")
    assert steps_of(out) == [3]
    aside = newest.with_name("step_00000004.pt.damaged")
    assert aside.read_bytes() == damaged
    # The next resume finds step 3 and lands on the uninterrupted run.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tr.train(config(data, **{**RESUMABLE, "keep_checkpoints": 1}), out,
                 resume=True, progress=False)
    assert steps_of(out) == [6]
    assert metrics(out) == metrics(reference)
    assert_same(weights(out, "model"), weights(reference, "model"))
    assert_same(weights(out), weights(reference))


def test_write_atomic_leaves_nothing_when_saving_fails(tmp_path):
    path = tmp_path / "file.bin"
    path.write_bytes(b"old")

    def fail(f):
        f.write(b"new, but half")
        raise OSError(errno.EIO, "I/O error")

    with pytest.raises(cf.TrainError, match=re.escape(f"cannot write {path}")):
        ck.write_atomic(path, fail)
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.bin"]
    ck.write_atomic(path, lambda f: f.write(b"new"))
    assert path.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.bin"]


def test_write_atomic_cleans_up_after_any_exception(tmp_path):
    path = tmp_path / "file.bin"

    def fail(f):
        f.write(b"half")
        raise RuntimeError("cannot pickle this")

    with pytest.raises(RuntimeError):
        ck.write_atomic(path, fail)
    assert list(tmp_path.iterdir()) == []


def test_read_checkpoint_rejects_other_files(tmp_path):
    with pytest.raises(cf.TrainError, match="no checkpoint at"):
        ck.read_checkpoint(tmp_path / "absent.pt")
    other = tmp_path / "other.pt"
    torch.save({"format": "something else", "step": 1}, other)
    with pytest.raises(cf.TrainError, match="not an adm train checkpoint"):
        ck.read_checkpoint(other)
    with pytest.raises(cf.TrainError, match="holds no checkpoint"):
        ck.load_run(tmp_path)


def test_read_metrics_survives_a_cut_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 1, "loss": 0.5}\n{"step": 2, "lo')
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a kill's cut line is no news
        records = rl.read_metrics(tmp_path)
    assert records == [{"step": 1, "loss": 0.5}]


# Lines a run never writes: no step, not an object, a step not an integer,
# not JSON, empty.
NOT_RECORDS = ["{}", '{"loss": 0.5}', "[1, 2]", "3", '"step"', "null",
               '{"step": "2"}', '{"step": 1.5}', '{"step": true}',
               '{"step": null}', "not json", '{"step": 2', ""]


@pytest.mark.parametrize("line", NOT_RECORDS)
def test_a_metrics_line_that_is_not_a_record_is_named_and_kept(tmp_path,
                                                               line):
    path = tmp_path / "metrics.jsonl"
    records = [{"step": step, "loss": 1 / step} for step in (1, 2, 3)]
    lines = [json.dumps(r) for r in records]
    path.write_text("\n".join([lines[0], line, *lines[1:]])
                    + '\n{"step": 4, "lo')  # and a kill's cut line
    named = (f"{path} line 2 is not a metrics record (a JSON object with "
             "an integer step): skipped")
    with pytest.warns(UserWarning) as caught:
        assert rl.read_metrics(tmp_path) == records
    assert [str(w.message) for w in caught] == [named]
    # A resume from step 2 drops the records after it, and keeps the line.
    with pytest.warns(UserWarning) as caught:
        rl.truncate_metrics(path, 2)
    assert [str(w.message) for w in caught] == [named]
    assert path.read_text() == "\n".join([lines[0], line, lines[1]]) + "\n"


@pytest.mark.parametrize("settings", [
    {"schedule_sampler": "loss-second-moment", "clean_fraction": 0.5},
    {"noised": False},
])
def test_classifier_timestep_options(data, tmp_path, settings):
    out = tmp_path / "run"
    tr.train(config(data, "classifier", steps=3, **settings), out,
             progress=False)
    assert [r["step"] for r in metrics(out) if "acc@1" in r] == [1, 2, 3]


def test_classifier_run(data, tmp_path):
    out = tmp_path / "run"
    tr.train(config(data, "classifier", steps=2, ema_rate="0.9999,0.99"), out,
             progress=False)
    records = rl.read_metrics(out)
    train_records = [r for r in records if "acc@1" in r]
    evals = [r for r in records if "val_acc@1" in r]
    assert [r["step"] for r in train_records] == [1, 2]
    assert [r["step"] for r in evals] == [2]
    for key in ("val_loss", "val_acc@1", "val_acc@5", "ema_val_acc@1",
                "ema_val_acc@5"):
        assert 0 <= evals[0][key] and np.isfinite(evals[0][key])
    assert 0 <= evals[0]["val_acc@1"] <= evals[0]["val_acc@5"] == 1.0  # 4 classes
    assert not (out / "samples" / "step_00000002.png").exists()

    saved = ck.read_checkpoint(ck.checkpoint_path(out, 2))
    run = ck.load_run(out)
    assert isinstance(run.model, EncoderUNetModel)
    assert run.config == cf.TrainConfig(**saved["config"])
    assert run.step == 2 and run.path == ck.checkpoint_path(out, 2)
    assert not run.model.training
    assert_same(run.model.state_dict(), saved["ema"]["0.9999"])
    assert_same(weights(out, "model"), saved["model"])
    assert_same(weights(out, "0.99"), saved["ema"]["0.99"])
    assert_same(ck.load_run(run.path, "0.9999").model.state_dict(),
                saved["ema"]["0.9999"])
    with pytest.raises(cf.TrainError, match="weights='0.5': .* has ema, model, "
                       "0.9999, 0.99"):
        ck.load_run(out, "0.5")
    logits = run.model(torch.zeros(2, 1, 8, 8), torch.zeros(2))
    assert logits.shape == (2, 4)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_a_rank_draws_only_its_rows_as_the_whole_batch_draws_them(
        data, world):
    """Split a batch of 12 over `world` ranks: each draws its rows' noise
    and nothing more, and together they are the single process's draw."""
    c = config(data, "upsampler", batch_size=12, low_res_noise=30,
               random_flip=True, clean_fraction=0.5)
    shape = (1, c.image_size, c.image_size)
    sampler = UniformSampler(c.diffusion_steps)
    whole = bt.draw_step(c, sampler, 5, shape, CPU)
    share = 12 // world
    parts = [bt.draw_step(c, sampler, 5, shape, CPU,
                          rows=slice(r * share, (r + 1) * share))
             for r in range(world)]
    for field in dataclasses.fields(whole):
        mine = [getattr(p, field.name) for p in parts]
        assert all(len(m) == share for m in mine), field.name
        torch.testing.assert_close(torch.cat(mine), getattr(whole, field.name),
                                   rtol=0, atol=0)


def test_row_noise_is_independent_standard_normal_noise():
    """Rows seeded by consecutive words share nothing: the mean squared
    correlation of two rows of d numbers is 1/(d-1) for independent noise
    (one degree of freedom goes to each row's mean)."""
    rows, d = 400, 64
    noise = bt.row_noise((0, 3, 0, 7), range(rows), (d,), CPU).double()
    n = noise.numel()
    assert abs(noise.mean()) < 5 / n**0.5
    assert abs(noise.var() - 1) < 5 * (2 / n) ** 0.5
    r = torch.corrcoef(noise)[~torch.eye(rows, dtype=torch.bool)]
    # r^2 of independent rows: mean 1/(d-1), variance about 2/d^2.
    pairs = rows * (rows - 1) / 2
    assert abs(r.pow(2).mean() - 1 / (d - 1)) < 5 * (2 / d**2 / pairs) ** 0.5
    other = bt.row_noise((0, 3, 0, 8), range(rows), (d,), CPU).double()
    across = torch.corrcoef(torch.cat([noise, other]))[:rows, rows:]
    assert (abs(across.pow(2).mean() - 1 / (d - 1))
            < 5 * (2 / d**2 / rows**2) ** 0.5)


def test_augmented_upsampler_trains_on_noised_inputs(data, tmp_path):
    """low_res_noise: each image's low-res input noised to its own drawn
    step s <= S (seeded), the network told s; it learns the level's MLP."""
    c = config(data, "upsampler", steps=1, low_res_noise=30)
    shape = (1, c.image_size, c.image_size)
    sampler = UniformSampler(c.diffusion_steps)
    draws = bt.draw_step(c, sampler, 7, shape, torch.device("cpu"))
    again = bt.draw_step(c, sampler, 7, shape, torch.device("cpu"))
    assert_same(vars(draws), vars(again))
    assert draws.low_res_noise.shape == (c.batch_size, 1, c.small_size,
                                         c.small_size)
    assert 0 <= draws.low_res_t.min() and draws.low_res_t.max() <= 30
    assert len(set(draws.low_res_t.tolist())) > 1  # one draw per image
    # Without augmentation the other draws are the same numbers.
    plain = bt.draw_step(config(data, "upsampler", steps=1), sampler, 7,
                         shape, torch.device("cpu"))
    torch.testing.assert_close(draws.noise, plain.noise, rtol=0, atol=0)
    assert plain.low_res_noise.numel() == 0
    out = tmp_path / "run"
    tr.train(c, out, progress=False)
    run = ck.load_run(out)
    assert run.config.low_res_noise == 30
    assert hasattr(run.model, "low_res_embed")
    seen = {}

    def spy(model, x, t, low_res, y=None, low_res_t=None):
        seen.update(low_res=low_res, low_res_t=low_res_t)
        return model(x, t, low_res, y, low_res_t)

    x = torch.rand(c.batch_size, *shape) * 2 - 1
    y = torch.zeros(c.batch_size, dtype=torch.long)
    model = run.model
    ob.diffusion_terms(c, run.diffusion,
                    lambda *a, **k: spy(model, *a, **k), x, y, draws)
    clean = F.interpolate(x, c.small_size, mode="area")
    torch.testing.assert_close(seen["low_res_t"], draws.low_res_t)
    torch.testing.assert_close(seen["low_res"], run.diffusion.q_sample(
        clean, draws.low_res_t, draws.low_res_noise))
    with pytest.raises(ValueError, match="low_res_t"):
        model(x, torch.zeros(c.batch_size), clean, y)  # level not given
    for kind, level, message in [("diffusion", 5, "upsampler's setting"),
                                 ("upsampler", -1, "low_res_noise=-1"),
                                 ("upsampler", 50, "diffusion_steps - 1")]:
        with pytest.raises(cf.TrainError, match=message):
            config(data, kind, low_res_noise=level)


@pytest.mark.parametrize("kind", ["diffusion", "classifier"])
def test_interval_zero_draws_no_grid_and_scores_nothing(data, tmp_path, kind):
    out = tmp_path / "run"
    tr.train(config(data, kind, steps=2, sample_interval=0, eval_interval=0),
             out, progress=False)
    assert not list((out / "samples").iterdir())
    assert not any("val_loss" in r for r in metrics(out))
    assert [r["step"] for r in metrics(out)] == [1, 2]


def test_the_progress_bar_counts_steps_not_grids(data, tmp_path,
                                                 monkeypatch):
    bars, real_snapshot = [], tr.snapshot

    class Bar(tr.tqdm):
        """The loop's bar, with how long it was open and what it timed."""

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.opened = self._time()
            bars.append(self)

        def close(self) -> None:
            self.open_for = self._time() - self.opened
            self.timed = self.format_dict["elapsed"]
            super().close()

    def slow_snapshot(*args) -> None:
        time.sleep(0.25)  # a grid that takes its time to draw
        real_snapshot(*args)

    monkeypatch.setattr(tr, "tqdm", Bar)
    monkeypatch.setattr(tr, "snapshot", slow_snapshot)
    tr.train(config(data, steps=2, sample_interval=1), tmp_path / "run")
    bar, = bars
    assert bar.n == 2 and len(list((tmp_path / "run" / "samples").iterdir()))
    assert bar.open_for - bar.timed >= 0.5  # both grids: not steps


def test_upsampler_run(data, tmp_path):
    out = tmp_path / "run"
    tr.train(config(data, "upsampler", steps=2), out, progress=False)
    assert [r["step"] for r in metrics(out)] == [1, 2]
    png = out / "samples" / "step_00000002.png"
    with Image.open(png) as image:
        # low-res, samples and truth: 3 rows of num_samples 8x8 images
        assert image.size == (4 * 10 + 2, 3 * 10 + 2)
        assert image.mode == "L"
    run = ck.load_run(out)
    assert isinstance(run.model, SuperResModel)
    assert (run.config.image_size, run.config.small_size) == (8, 4)
    saved = ck.read_checkpoint(ck.checkpoint_path(out, 2))
    assert_same(run.model.state_dict(), saved["ema"]["0.9999"])
    assert_same(weights(out, "model"), saved["model"])
    out_ = run.model(torch.zeros(1, 1, 8, 8), torch.zeros(1),
                     low_res=torch.zeros(1, 1, 4, 4), y=torch.zeros(1).long())
    assert out_.shape == (1, 2, 8, 8)  # learned sigma


def test_diffusion_run_loads_as_a_unet(reference):
    run = ck.load_run(reference, "model")
    assert isinstance(run.model, UNetModel)
    assert run.diffusion.num_timesteps == RESUMABLE["diffusion_steps"]
    assert run.config.dropout == 0.1 and run.step == 6
    samples = reference / "samples"
    assert sorted(p.name for p in samples.iterdir()) == ["step_00000006.png"]


# --- EMA and presets --------------------------------------------------------------


def test_ema_decay_warms_up():
    for n in [0, 1, 2, 9, 10, 100, 1000, 9990, 10_000, 99_999]:
        expected = min(0.9999, (1 + n) / (10 + n))
        assert tr.ema_decay(0.9999, n) == pytest.approx(expected, abs=0)
        assert tr.ema_decay(0.9999, n, warmup=False) == 0.9999
    assert tr.ema_decay(0.9999, 0) == pytest.approx(0.1)
    assert tr.ema_decay(0.5, 10) == 0.5


def test_first_ema_update_uses_the_warm_up_decay(data, reference):
    """After step 1: ema = 0.1 * initial + 0.9 * model (decay 1/10)."""
    c = bt.resolve_config(config(data, **RESUMABLE),
                          bt.open_data(config(data, **RESUMABLE)))
    initial = tr.TrainState.create(c, CPU).model.state_dict()
    step1 = ck.read_checkpoint(ck.checkpoint_path(reference, 1))
    ema, model = step1["ema"]["0.9999"], step1["model"]
    moved = 0
    for name, value in ema.items():
        if not value.is_floating_point():
            continue
        expected = 0.1 * initial[name] + 0.9 * model[name]
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
        moved += not torch.equal(initial[name], model[name])
    assert moved > 0


def param_count(kind: str, preset: str) -> int:
    """Parameters of a preset's network, built on the meta device."""
    c = cf.make_config(kind, preset)
    with torch.device("meta"):
        model = cf.build_model(c)
    return sum(p.numel() for p in model.parameters())


def test_imagenet_diffusion_presets_match_the_reference_builds():
    expected = {"imagenet64": 295_904_454, "imagenet128": 421_529_606}
    if BASELINES.exists():  # the measured reference runs, where present
        rows = json.loads(BASELINES.read_text())
        recorded = {r["config"]: r["params"] for r in rows if "params" in r}
        for name, count in expected.items():
            if name in recorded:
                assert recorded[name] == count
    for name, count in expected.items():
        c = cf.make_config("diffusion", name)
        assert (c.in_channels, c.num_classes, c.class_cond) == (3, 1000, True)
        assert param_count("diffusion", name) == count


@pytest.mark.parametrize(("size", "millions"), [(64, 65), (128, 43), (256, 54),
                                                (512, 54)])
def test_imagenet_classifier_presets_match_table_12(size, millions):
    assert round(param_count("classifier", f"imagenet{size}") / 1e6) == millions


def test_tensorboard_is_optional_and_named_when_missing(data, tmp_path):
    settings = replace(config(data), tensorboard=True)
    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(cf.TrainError, match="pip install tensorboard"):
            cf.validate(settings)
        assert not (tmp_path / "run").exists()
        return
    tr.train(settings, tmp_path / "run", progress=False)
    assert any((tmp_path / "run" / "tensorboard").iterdir())


# --- bad input, as a hostile but realistic user gives it ------------------------


def adm_train(out: Path, data: Path, *extra: str,
              settings: dict | None = None) -> list[str]:
    """`adm train diffusion` in this process, tiny: its argv."""
    return ["train", "diffusion", "--out", str(out), "--data", str(data),
            "--quiet", *set_args({**TINY, **(settings or {})}), *extra]


def damage(path: Path) -> None:
    """Cut a file to half its size, as a crash on a lax file system might."""
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def test_resume_refuses_when_no_checkpoint_can_be_read(data, reference,
                                                       tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    for step in steps_of(out):
        damage(ck.checkpoint_path(out, step))
    before = {name: (out / name).read_text()
              for name in ("metrics.jsonl", "config.json")}
    for resume in (True, False):
        with (pytest.warns(UserWarning, match="not a readable checkpoint"),
              pytest.raises(cf.TrainError) as err):
            tr.train(config(data, **RESUMABLE), out, resume=resume,
                     progress=False)
        message = str(err.value)
        assert "no checkpoint in" in message and "can be read" in message
        assert "step_00000001.pt" in message
        assert "step_00000006.pt" in message
    with pytest.warns(UserWarning):
        assert cli.main(["train", "diffusion", "--out", str(out), "--resume",
                         "--quiet"]) == 1
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("adm train: no checkpoint in")
    after = {name: (out / name).read_text() for name in before}
    assert after == before  # the metrics survive: nothing started afresh


def test_resume_of_a_folder_without_a_run_says_so_and_starts(data, tmp_path):
    out = tmp_path / "new"
    with pytest.warns(UserWarning, match=re.escape(
            f"nothing to resume in {out} (no checkpoint): starting a new run")):
        tr.train(config(data), out, resume=True, progress=False)
    assert steps_of(out) == [2]


def test_resume_behind_the_run_is_refused_and_changes_nothing(data, reference,
                                                             tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert cli.main(["train", "diffusion", "--out", str(out), "--resume",
                     "--steps", "4", "--quiet"]) == 1
    captured = capsys.readouterr()
    assert captured.err == (f"adm train: {out} is at step 6, past steps=4: "
                            "pass more steps to go on; the run is unchanged\n")
    after = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after.keys() - {".lock"} == before.keys() - {".lock"}
    assert all(after[k] == before[k] for k in before if k != ".lock")
    assert json.loads((out / "config.json").read_text())["steps"] == 6


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


def test_write_atomic_names_its_temporary_file_by_process(tmp_path):
    names = []
    ck.write_atomic(tmp_path / "file.bin", lambda f: names.append(f.name))
    assert names == [str(tmp_path / f".file.bin.{os.getpid()}.tmp")]


@pytest.fixture(scope="module")
def rgb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 colour 8x8 images in 4 classes, as an .npz."""
    path = tmp_path_factory.mktemp("rgb") / "rgb.npz"
    images = np.random.default_rng(1).integers(0, 256, (12, 8, 8, 3))
    np.savez(path, images.astype(np.uint8), np.arange(12) % 4)
    return path


def test_data_whose_channels_differ_from_in_channels_is_refused(rgb, data,
                                                                capsys,
                                                                tmp_path):
    c = config(rgb)  # the mnist preset: in_channels=1
    with pytest.raises(cf.TrainError, match=re.escape(
            f"data '{rgb}' has colour images (3 channel(s)) but "
            "in_channels=1: set in_channels=3, or 0 to take the data's")):
        bt.open_data(c)
    out = tmp_path / "run"
    assert cli.main(adm_train(out, rgb)) == 1
    assert "but in_channels=1" in capsys.readouterr().err
    assert not out.exists()
    resolved = bt.resolve_config(replace(c, in_channels=0),
                                 bt.open_data(replace(c, in_channels=0)))
    assert resolved.in_channels == 3
    with pytest.raises(cf.TrainError, match="has greyscale images"):
        bt.open_data(config(data, in_channels=3))


def test_a_label_far_above_the_others_is_refused(tmp_path):
    path = tmp_path / "typo.npz"
    labels = np.arange(12) % 4
    labels[7] = 1_000_000
    np.savez(path, np.zeros((12, 8, 8), np.uint8), labels)
    c = config(path)
    dataset = bt.open_data(c)
    with pytest.raises(cf.TrainError, match=re.escape(
            f"{path}[7] has label 1000000, but {path} has 5 distinct labels: "
            "that makes a 1000001-class model; if that is meant, set "
            "num_classes=1000001")):
        bt.resolve_config(c, dataset)
    meant = bt.resolve_config(replace(c, num_classes=1_000_001), dataset)
    assert meant.num_classes == 1_000_001  # set explicitly: accepted
    labels[7] = 9  # 10 classes, 5 seen: a subset, not a typo
    np.savez(path, np.zeros((12, 8, 8), np.uint8), labels)
    assert bt.resolve_config(c, bt.open_data(c)).num_classes == 10


def test_a_worker_data_error_is_one_line(tmp_path, capsys):
    folder = tmp_path / "digits"
    for k in range(8):
        (folder / str(k % 2)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8), 16 * k, np.uint8)).save(
            folder / str(k % 2) / f"{k}.png")
    bad = folder / "1" / "7.png"
    bad.write_bytes(bad.read_bytes()[:45])  # the header survives, not pixels
    out = tmp_path / "run"
    argv = adm_train(out, folder, settings={"num_workers": 1, "steps": 20,
                                            "batch_size": 8})
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"adm train: cannot read image {bad}: ")
    assert err.count("\n") == 1 and "Traceback" not in err


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


# Every field of TrainConfig, with a value that cannot work: (kind, value).
BAD_SETTINGS = {
    "kind": ("diffusion", "gan"), "val_fraction": ("classifier", 1.0),
    "image_size": ("diffusion", 33), "small_size": ("upsampler", 0),
    "low_res_noise": ("upsampler", 1000),
    "in_channels": ("diffusion", 2), "num_classes": ("diffusion", -1),
    "class_cond": ("diffusion", "maybe"),
    "label_dropout": ("diffusion", 1.0), "random_flip": ("diffusion", 1),
    "num_channels": ("diffusion", 48), "num_res_blocks": ("diffusion", 0),
    "channel_mult": ("diffusion", "a,b"),
    "attention_resolutions": ("diffusion", "5"),
    "num_heads": ("diffusion", 0), "num_head_channels": ("diffusion", 48),
    "num_heads_upsample": ("diffusion", 0), "dropout": ("diffusion", 1.0),
    "use_scale_shift_norm": ("diffusion", "x"),
    "resblock_updown": ("diffusion", "x"),
    "use_new_attention_order": ("diffusion", "x"),
    "use_checkpoint": ("diffusion", "x"),
    "classifier_width": ("classifier", 48),
    "classifier_depth": ("classifier", 0),
    "classifier_attention_resolutions": ("classifier", "16,5"),
    "classifier_use_scale_shift_norm": ("classifier", "x"),
    "classifier_resblock_updown": ("classifier", "x"),
    "classifier_pool": ("classifier", "max"),
    "diffusion_steps": ("diffusion", 0), "noise_schedule": ("diffusion", "x"),
    "learn_sigma": ("diffusion", "x"), "use_kl": ("diffusion", "x"),
    "predict_xstart": ("diffusion", "x"),
    "rescale_learned_sigmas": ("diffusion", "x"),
    "rescale_residual": ("diffusion", "x"),
    "steps": ("diffusion", 0), "batch_size": ("diffusion", 0),
    "microbatch": ("diffusion", -1), "lr": ("diffusion", 0.0),
    "weight_decay": ("diffusion", float("nan")),
    "lr_anneal_steps": ("diffusion", -1), "grad_clip": ("diffusion", -1.0),
    "ema_rate": ("diffusion", "0.9,x"), "ema_warmup": ("diffusion", "x"),
    "schedule_sampler": ("diffusion", "x"), "precision": ("diffusion", "x"),
    "noised": ("classifier", "x"), "clean_fraction": ("classifier", 2.0),
    "seed": ("diffusion", -1), "num_workers": ("diffusion", -1),
    "log_interval": ("diffusion", 0), "save_interval": ("diffusion", 0),
    "keep_checkpoints": ("diffusion", 0),
    "sample_interval": ("diffusion", -1), "num_samples": ("diffusion", 0),
    "sample_steps": ("diffusion", "ddim999"),
    "eval_interval": ("classifier", -1), "eval_images": ("classifier", -1),
    "max_nonfinite": ("diffusion", 0), "tensorboard": ("diffusion", "x"),
    "compile": ("diffusion", "yes"),
    "memory_format": ("diffusion", "nhwc"),
    "deterministic": ("diffusion", "yes"),
}
# Checked when the run starts, before its first step (see the tests above
# and below): where the data are, and which device.
CHECKED_AT_START = {"data", "val_data", "device"}


def test_every_setting_has_a_check():
    names = [f.name for f in dataclasses.fields(cf.TrainConfig)]
    assert sorted(BAD_SETTINGS.keys() | CHECKED_AT_START) == sorted(names)


@pytest.mark.parametrize("name", sorted(BAD_SETTINGS))
def test_each_bad_setting_is_named(name, tmp_path):
    kind, value = BAD_SETTINGS[name]
    good = cf.make_config(kind, overrides=TINY)
    cf.validate(good)
    with pytest.raises(cf.TrainError) as err:
        cf.validate(replace(good, **{name: value}))
    assert f"{name}=" in str(err.value) or f"{name} must" in str(err.value)
    with pytest.raises(cf.TrainError, match=re.escape(str(err.value))):
        tr.train(replace(good, **{name: value}), tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("setting", "message"), [
    ("image_size=33", "image_size=33 must be divisible by 4: channel_mult "
     "1,2,2 halves it 2 times"),
    ("sample_steps=abc", "sample_steps='abc': respacing spec 'abc' is not a "
     "step count"),
    ("channel_mult=a,b", "channel_mult='a,b': expected positive integers"),
    ("attention_resolutions=5", "attention_resolutions='5': 5 is not one of "
     "the network's resolutions (32, 16, 8,"),
    ("num_channels=48", "num_channels=48: the channels at each resolution"),
    ("in_channels=2", "in_channels=2: expected one of 0, 1, 3"),
    ("seed=1e30", "seed=1000000000000000019884624838656: expected 0 to "
     "2**64 - 1 = 18446744073709551615"),
    (f"seed={2**64}", f"seed={2**64}: expected 0 to 2**64 - 1"),
    ("seed=-1", "seed=-1: expected 0 to 2**64 - 1"),
])
def test_adm_train_names_a_bad_setting_before_any_work(tmp_path, capsys,
                                                       setting, message):
    out = tmp_path / "run"
    assert cli.main(["train", "diffusion", "--out", str(out), "--quiet",
                     "--set", setting]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"adm train: {message}"), err
    assert err.count("\n") == 1 and not out.exists()


def test_the_largest_seed_trains(data, tmp_path):
    # Every generator a run seeds takes it: the initial weights', the
    # data loader's, and those of each step's draws and of the grid.
    out = tmp_path / "run"
    tr.train(config(data, seed=MAX_SEED, steps=1, sample_interval=1), out,
             progress=False)
    assert steps_of(out) == [1] and any((out / "samples").iterdir())
    with pytest.raises(cf.TrainError, match=re.escape(
            f"seed={MAX_SEED + 1}: expected 0 to 2**64 - 1")):
        config(data, seed=MAX_SEED + 1)


def raises(error: type[BaseException]) -> Callable[..., None]:
    """A stand-in for a function: it raises `error`."""
    def fail(*args, **kwargs) -> None:
        raise error("cannot be done")
    return fail


@pytest.mark.parametrize(("settings", "broken"), [
    ({"in_channels": 3}, None),  # the data's channels
    ({"num_classes": 2}, None),  # the data's labels
    ({"kind": "classifier", "val_fraction": 0.99}, None),  # its size
    ({}, ("build_model", MemoryError)),  # a network too large, say
    ({}, ("build_diffusion", cf.TrainError)),
    ({}, ("manual_seed", ValueError)),  # a seed no generator takes
])
def test_a_run_that_cannot_start_leaves_no_new_folder(data, tmp_path,
                                                      monkeypatch, settings,
                                                      broken):
    if broken:
        name, error = broken
        owner = torch if name == "manual_seed" else tr
        monkeypatch.setattr(owner, name, raises(error))
    out = tmp_path / "new" / "run"
    with pytest.raises((cf.TrainError, MemoryError, ValueError)):
        tr.train(config(data, **settings), out, progress=False)
    assert not (tmp_path / "new").exists()


def test_a_device_that_is_not_one_is_named_before_any_work(data, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(cf.TrainError, match="device='gpu' is not a device"):
        tr.train(config(data, device="gpu"), out, progress=False)
    assert not out.exists()


# --- no host sync between log intervals ---------------------------------------

# Reading a tensor into Python (a number, a bool, a list, a CPU copy) makes
# the host wait for the device to finish all it was given. (`.numpy()` is
# not among them: it refuses a GPU tensor, and the sampler's draws are
# made on the host.)
HOST_READS = ("item", "tolist", "cpu", "__bool__", "__float__", "__int__",
              "__index__")


def steps_and_reads(data: Path, monkeypatch: pytest.MonkeyPatch,
                    device: torch.device, **overrides
                    ) -> tuple[list[str], Callable[[], None]]:
    """The tensor reads of three train_steps, and a call recording them."""
    cfg = config(data, grad_clip=1.0, device=str(device), in_channels=1,
                 num_classes=4, **overrides)
    state = tr.TrainState.create(cfg, device)
    diffusion = cf.build_diffusion(cfg)
    ranks = tr.Ranks(0, 1, device, False)
    pixels = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    y = torch.arange(4) % 4
    reads: list[str] = []
    with monkeypatch.context() as patch:
        for name in HOST_READS:
            real = getattr(torch.Tensor, name)

            def read(self, *args, _name=name, _real=real, **kwargs):
                reads.append(_name)
                return _real(self, *args, **kwargs)

            patch.setattr(torch.Tensor, name, read)
        results = [tr.train_step(cfg, diffusion, state.model, state, pixels,
                                 y, slice(0, 4), ranks) for _ in range(3)]
    return reads, lambda: tr.record_steps(cfg, state, results, ranks, None,
                                          None)


@pytest.mark.parametrize("overrides", [
    {}, {"kind": "classifier"}, {"precision": "bf16"},
    {"learn_sigma": False, "predict_xstart": True}])
def test_steps_read_nothing_back_until_recorded(data, monkeypatch, overrides):
    reads, record = steps_and_reads(data, monkeypatch, CPU, **overrides)
    assert reads == []
    record()  # the recording reads them, once


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_steps_never_sync_a_gpu(data, monkeypatch):
    # The first step is the warm-up: the model's move to the GPU and the
    # schedule tables' one upload are blocking copies, by design. Every
    # later step runs under the sync debug mode, which raises on a sync.
    real_step, done = tr.train_step, []

    def checked_step(*args, **kwargs):
        if done:
            torch.cuda.set_sync_debug_mode("error")
        done.append(True)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(tr, "train_step", checked_step)
    try:
        reads, record = steps_and_reads(data, monkeypatch, torch.device("cuda"))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert reads == [] and len(done) == 3
    record()
