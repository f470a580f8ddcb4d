"""adm_lib.train (chapter 4): the training step and loop, and resuming a
run exactly: after a stop, a kill mid-save, a damaged checkpoint, on other
ranks or layouts; and a run that cannot start or go on, named.

Every run here is tiny (tests/helpers.py) so the file runs in well under a
minute on a 2-core CPU. Every run uses one thread: the subprocesses' (the
kill test, torchrun) and this one's.
"""

from __future__ import annotations

import io
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
from PIL import Image

from adm_lib import batches as bt
from adm_lib import checkpoints as ck
from adm_lib import cli, ranks
from adm_lib import config as cf
from adm_lib import objectives as ob
from adm_lib import train as tr
from adm_lib.models import load_run
from adm_lib.unet import SuperResModel
from adm_lib.values import MAX_SEED
from tests.helpers import (
    CPU,
    RESUMABLE,
    ROOT,
    TINY,
    adm_train,
    assert_same,
    config,
    damage,
    env,
    metrics,
    set_args,
    steps_of,
    weights,
)

pytestmark = pytest.mark.usefixtures("one_thread")


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
    with pytest.raises(cf.TrainError, match=r"already holds a run .*resume=True"):
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
        assert load_run(out).step == 5

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
from adm_lib import ranks
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


@pytest.mark.slow
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


@pytest.mark.slow
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



def test_a_deterministic_run_trains(data, backends, tmp_path):
    c = config(data, deterministic=True, microbatch=2,
               memory_format="channels_last")
    tr.train(c, tmp_path / "run", progress=False)
    assert torch.are_deterministic_algorithms_enabled()
    losses = [r["loss"] for r in ck.read_metrics(tmp_path / "run")]
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
        ddp = ranks.data_parallel(torch.nn.Linear(2, 2), CPU)
        assert ddp.gradient_as_bucket_view
        compiled = torch.compile(ddp)  # wraps it; compiles only when run
        for model in (ddp, compiled):
            with ranks.micro_sync(model, last=False):
                assert not ddp.require_backward_grad_sync
            with ranks.micro_sync(model, last=True):
                assert ddp.require_backward_grad_sync
        with ranks.micro_sync(torch.nn.Linear(2, 2), last=False):
            pass  # no DDP, nothing to skip
    finally:
        dist.destroy_process_group()



# --- damaged checkpoints, runs of each kind ---------------------------------


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



@pytest.mark.parametrize("settings", [
    {"schedule_sampler": "loss-second-moment", "clean_fraction": 0.5},
    {"noised": False},
])
def test_classifier_timestep_options(data, tmp_path, settings):
    out = tmp_path / "run"
    tr.train(config(data, "classifier", steps=3, **settings), out,
             progress=False)
    assert [r["step"] for r in metrics(out) if "acc@1" in r] == [1, 2, 3]



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
    run = load_run(out)
    assert isinstance(run.model, SuperResModel)
    assert (run.config.image_size, run.config.small_size) == (8, 4)
    saved = ck.read_checkpoint(ck.checkpoint_path(out, 2))
    assert_same(run.model.state_dict(), saved["ema"]["0.9999"])
    assert_same(weights(out, "model"), saved["model"])
    out_ = run.model(torch.zeros(1, 1, 8, 8), torch.zeros(1),
                     low_res=torch.zeros(1, 1, 4, 4), y=torch.zeros(1).long())
    assert out_.shape == (1, 2, 8, 8)  # learned sigma



# --- EMA ------------------------------------------------------------------------


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



# --- bad input, as a hostile but realistic user gives it ------------------------


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
