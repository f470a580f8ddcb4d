# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Appendix: the engineering of runs
#
# Chapter 4 teaches what a training run computes: the objectives, mixed
# precision, the EMA and the loop. This appendix is about what makes a run
# safe to start, stop, resume and share, and it checks each promise by
# running tiny runs on the CPU:
#
# * R.0 the foundation: the hand-written modules that keep the promises;
# * R.1 a configuration that cannot work is refused before its first step,
#   naming the setting;
# * R.2 the checkpoint file: its format, and writes that are whole or absent;
# * R.3 one run per folder;
# * R.4 a resumed run equals the uninterrupted one, bit for bit;
# * R.5 a damaged checkpoint is named, skipped and set aside, and a resume
#   with another configuration is refused;
# * R.6 two processes under `torchrun` equal one;
# * R.7 speed: `adm bench`, side by side with the reference, and the fast
#   path on CPUs and GPUs;
# * R.8 precision: the paper's fp16 with loss scaling, and why the book
#   defaults to bf16.
#
# Every code cell here uses the library: the foundation, chapter 4's
# modules (`adm_lib.config`, `adm_lib.train`, `adm_lib.runlog`,
# `adm_lib.models`) and `adm_lib.bench` in R.7; nothing is exported. The
# dated speed measurements are in the appendix of measurements (M.7).

# %% tags=["parameters"]
# A few tiny runs on the CPU, about a minute:
#   adm book run appendix_runs
# There is no larger run: the checks are of the machinery, not of a model.
data: str = "mnist5k"  # a data-set name, or a folder, .zip or .npz
runs_dir: str = "build/appendix_runs"  # the appendix's run folders (emptied)
batch_size: int = 16  # images per training step
num_channels: int = 32  # the networks' base width (a multiple of 32)
seed: int = 0  # of every run

# %%
import importlib
import os
import shutil
import subprocess
import sys
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from adm_lib.batches import draw_step
from adm_lib.book import Book, expected_modules, find_root
from adm_lib.checkpoints import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_KEYS,
    checkpoint_path,
    latest_checkpoint,
    lock_run,
    read_metrics,
)
from adm_lib.config import TrainConfig, config_from_dict, make_config
from adm_lib.diffusion import UniformSampler
from adm_lib.errors import TrainError
from adm_lib.files import write_atomic
from adm_lib.models import load_run
from adm_lib.train import train

# Relative paths, the parameters' too, start at the book's root, as under
# `adm book run`, wherever the kernel starts (JupyterLab: in chapters/).
os.chdir(find_root())
runs = Path(runs_dir)
shutil.rmtree(runs, ignore_errors=True)  # the appendix's runs start afresh
device = "cpu"  # the checks are exact on the CPU (R.4)


def small(kind: str, **settings: Any) -> TrainConfig:
    """The MNIST preset of `kind`, scaled down to seconds."""
    base = {"data": data, "in_channels": 0, "device": device,
            "batch_size": batch_size, "num_channels": num_channels,
            "classifier_width": num_channels, "num_samples": 4,
            "sample_steps": "ddim5", "seed": seed}
    return make_config(kind, "mnist", {**base, **settings})

# %% [markdown]
# ## R.0 The foundation
#
# The book's library is generated from its chapters: chapter 2's
# diffusion, chapter 3's networks, chapter 4's configuration and loop.
# Beneath it lie hand-written modules that no chapter exports, because
# what they get right is about files, processes and machines rather than
# about diffusion; they import nothing of the book's library, so a
# chapter, an app or a test can use them without loading the training
# loop. This appendix explains them and checks what they promise.
#
# * `errors`: `TrainError`, the one error a run or a setting raises,
#   naming the setting;
# * `devices`: the device, the precision ("auto"), autocast, TF32 and
#   cuDNN's autotuner, determinism and the memory layout, which training
#   and sampling share and which depend on the machine (R.4, R.7);
# * `seeds`: `step_seed`, one 64-bit seed per purpose and step, and the
#   global generators' state, on which exact resume and the independence
#   from the number of ranks rest (R.4, R.6);
# * `files`: `write_atomic`, `safe_load`, `save_png` and `hold_lock`:
#   files whole or absent, loads that run no code, one process per folder,
#   on Linux, macOS and Windows (R.2, R.3);
# * `checkpoints`: the checkpoint file and the run folder (save and
#   rotate, read, the newest readable, `lock_run`); a checkpoint is a dict
#   of tensors, and what its settings mean is chapter 4's (R.2, R.5);
# * `ranks`: `torchrun`'s ranks: the process group, gathering rows, rank
#   0's decisions (R.6);
# * `data`: data sets (folders, zips, `.npz`, the embedded MNIST).
#
# Their public names, and a check that importing all of them, in a fresh
# process, loads none of the modules the chapters export:

# %%
FOUNDATION = ("errors", "devices", "seeds", "files", "checkpoints", "ranks",
              "data")
for name in FOUNDATION:
    module = importlib.import_module(f"adm_lib.{name}")
    public = getattr(module, "__all__", None) or [
        n for n, v in vars(module).items() if not n.startswith("_")
        and getattr(v, "__module__", None) == module.__name__]
    print(f"{name:<12}{', '.join(public)}")
generated = {path.stem for path in expected_modules(Book.load())}
probe = ("import sys; import " + ", ".join(f"adm_lib.{n}" for n in FOUNDATION)
         + "; print(' '.join(m for m in sys.modules"
         " if m.startswith('adm_lib.')))")
loaded = subprocess.run([sys.executable, "-c", probe], check=True,
                        capture_output=True, text=True).stdout.split()
print("loaded:", ", ".join(sorted(loaded)))
assert not {m.removeprefix("adm_lib.") for m in loaded} & generated

# %% [markdown]
# ## R.1 Refused before the first step
#
# `make_config` converts and checks every override, and `validate` every
# value alone and together; `train` validates again. Each refusal names the
# setting, its value and what would do. A few of them:

# %%
bad = {
    "num_chanels": 64,  # a typo
    "steps": "1.5e3x",
    "image_size": 30,  # the network halves it twice
    "attention_resolutions": "7",
    "num_channels": 48,  # GroupNorm's 32 groups
    "sample_steps": "ddim2000",
    "label_dropout": 1.0,
}
messages = {}
for key, value in bad.items():
    try:
        small("diffusion", **{key: value})
    except TrainError as err:
        messages[key] = str(err)
for key, message in messages.items():
    print(f"{key}: {message[:100]}")
assert list(messages) == list(bad)
assert "did you mean num_channels" in messages["num_chanels"]
assert all(message.startswith(key) or key == "num_chanels"
           for key, message in messages.items())

# %% [markdown]
# ## R.2 The checkpoint file
#
# A checkpoint holds everything a run needs to go on (chapter 4's
# `TrainState`), and four rules make it trustworthy:
#
# * **Atomic writes.** `write_atomic` writes to a temporary file, forces
#   it to disk (`fsync`) and renames it into place; a rename is atomic, so
#   a kill or a full disk at any moment leaves either the new file or the
#   old ones, never half a checkpoint under a checkpoint's name; a write
#   that fails stops the run with one line naming the file.
# * **Safe loads.** `torch.load(..., weights_only=True)` unpickles tensors
#   and plain containers only, so a checkpoint cannot run code. A file
#   that does not load (cut short by a file system that broke the rule
#   above, say) is named in a warning and the one before it is used
#   (R.5). Errors never pass on torch's advice to load such a file with
#   `weights_only` off.
# * **Rotation by what reads.** The run keeps the `keep_checkpoints`
#   newest files that read: the one just written and the newest others.
#   A damaged one is renamed `step_....pt.damaged`, never deleted: counted
#   by name, a damaged newer file would outlive the good ones, and a
#   resume would find none.
# * **Checked resumes.** A resumed run compares its configuration with
#   the checkpoint's and names every field that differs; only chapter 4's
#   `RUN_FIELDS` may (R.5). A resume that finds checkpoints but can read
#   none of them is refused, naming them, rather than starting afresh over
#   the run's metrics; one that finds no checkpoint at all says so, then
#   starts a new run; one whose `steps` are behind the checkpoint's step
#   is refused, and leaves `config.json` as it was.
#
# The file is a `torch.save` of plain tensors and containers. It carries
# a format string, the step, the whole configuration (so
# `load_run` rebuilds the network with no flag retyped), the weights, each
# EMA, AdamW's state, the loss scaler, the timestep sampler's history,
# every rank's random state and the count of non-finite steps in a row:

# %%
train(small("diffusion", steps=2, save_interval=2), runs / "file",
      progress=False)
path = checkpoint_path(runs / "file", 2)
state = torch.load(path, weights_only=True)
print(path.name, f"{path.stat().st_size / 1e6:.1f} MB:",
      ", ".join(state))
print("format:", state["format"], "| step:", state["step"],
      "| EMA rates:", list(state["ema"]))
assert tuple(state) == CHECKPOINT_KEYS
assert state["format"] == CHECKPOINT_FORMAT and state["step"] == 2
assert load_run(runs / "file").config == config_from_dict(state["config"])

# %% [markdown]
# Every file of a run is written by `write_atomic`: to a temporary file,
# forced to disk, then renamed into place. A write that fails half-way
# (a full disk: an `OSError`, or from `torch.save` a `RuntimeError` of its
# zip writer) leaves the old file as it was, no temporary file behind, and
# one line naming the file:

# %%
target = runs / "file" / "note.txt"
write_atomic(target, lambda f: f.write(b"first"))


def fail_half_way(f: Any) -> None:
    f.write(b"sec")
    raise OSError(28, "No space left on device")


try:
    write_atomic(target, fail_half_way)
except TrainError as err:
    print(err)
assert target.read_bytes() == b"first"
assert not list(target.parent.glob(".*.tmp"))

# %% [markdown]
# ## R.3 One run per folder
#
# A run holds an exclusive lock on the folder's `.lock` file for its
# whole life (`lock_run`, an `flock` on Linux and macOS, a byte-range lock
# on Windows). The system drops the lock with the process, however it
# ends, so a killed run can be resumed at once; temporary files carry
# their process's id, and the ones a killed run left behind are deleted
# under the next run's lock. A second run on the same folder stops at
# once and names the process that holds it, instead of interleaving its
# metrics with the first's (here the lock is held by this very process,
# as a running run would hold it):

# %%
with lock_run(runs / "file"):
    try:
        train(small("diffusion", steps=4), runs / "file", resume=True,
              progress=False)
    except TrainError as err:
        held = str(err)
print(held)
assert f"pid {os.getpid()}" in held

# %% [markdown]
# ## R.4 Exact resume
#
# One run trains 8 steps straight; another trains 5,
# stops, and is resumed to 8. With dropout and the loss-aware sampler
# both consuming randomness and state, the two runs log the same losses
# and end with bit-identical weights.
#
# These checks run on the CPU, whose kernels are deterministic. On a GPU
# a resumed run matches an uninterrupted one only to round-off by
# default: the new process's cuDNN autotuner may pick other convolution
# algorithms, cuBLAS may split a product's sums differently, and some
# backward kernels (convolution weights, fused attention) add with
# atomics, in whatever order the threads arrive. `deterministic=true`
# (`adm_lib.devices.fast_backends` and `attention_kernels`) removes all
# three: deterministic algorithms only (an op without one raises rather
# than run, and Inductor stops autotuning under `compile=true`);
# `CUBLAS_WORKSPACE_CONFIG=:4096:8` unless set, without which cuBLAS may
# split a product's sums differently (PyTorch sizes cuBLAS's workspace
# at its first product, so `train` sets it first thing, and a process
# that has already multiplied on the GPU must set it in its
# environment); no cuDNN autotuner; and attention's backward in the
# plain math kernels. The classifier's adaptive average pool, whose CUDA
# backward has no deterministic kernel, needs nothing: to 1x1, PyTorch
# computes it as a mean. What it promises is
# bit-identical runs on the same kind of GPU, the same number of
# processes and the same PyTorch, CUDA and cuDNN: a resume on another
# GPU, on the CPU or in another `memory_format` runs other kernels and
# matches to round-off (the optimiser's moments follow the weights'
# layout on load, so such a resume is correct, not exact). It costs
# speed, and the math attention's memory; by how much, and the
# bit-identity itself, have not been measured here, for want of a GPU.

# %%
check = {"steps": 8, "save_interval": 4, "log_interval": 1,
         "sample_interval": 0, "dropout": 0.1, "device": "cpu",
         "schedule_sampler": "loss-second-moment"}
whole = small("diffusion", **check)
train(whole, runs / "whole", progress=False)
train(replace(whole, steps=5), runs / "split", progress=False)
train(whole, runs / "split", resume=True, progress=False)


def weights(run: Path, which: str) -> list[Tensor]:
    return list(load_run(run, which).model.parameters())


same = all(torch.equal(p, q) for which in ("model", "ema")
           for p, q in zip(weights(runs / "whole", which),
                           weights(runs / "split", which), strict=True))
logged = [[r["loss"] for r in read_metrics(runs / name)]
          for name in ("whole", "split")]
print(f"identical weights: {same}; identical losses: "
      f"{logged[0] == logged[1]}")
assert same and logged[0] == logged[1] and len(logged[0]) == 8

# %% [markdown]
# ## R.5 A damaged checkpoint
#
# Cut the newest checkpoint short, as a file
# system that ignores `fsync` might after a crash: it is named, and the
# one before it is used. A resume from there that keeps one checkpoint
# keeps the one it writes, and sets the damaged one aside rather than
# count it. And a resume with a different learning rate is refused,
# naming the field:

# %%
newest = checkpoint_path(runs / "split", 8)
newest.write_bytes(newest.read_bytes()[:1000])
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    path, state = latest_checkpoint(runs / "split")
print(str(caught[0].message)[:110], "...")
print("resumes from", path.name)
assert state["step"] == 5 and newest.name in str(caught[0].message)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    train(replace(whole, steps=6, keep_checkpoints=1), runs / "split",
          resume=True, progress=False)
kept = sorted(p.name for p in (runs / "split" / "checkpoints").iterdir())
print("kept:", ", ".join(kept))
assert kept == ["step_00000006.pt", "step_00000008.pt.damaged"]
try:
    train(replace(whole, lr=1e-3), runs / "split", resume=True)
except TrainError as err:
    refusal = str(err)
print(refusal)
assert "lr: checkpoint 0.0002, now 0.001" in refusal

# %% [markdown]
# The run folder as R.2 to R.5 left it, drawn from the folder itself (the
# tree on the left lists what is on disk), beside the path every file
# takes: written aside, forced to disk, renamed into place, and, for a
# checkpoint, rotated by what reads.

# %% jupyter={"source_hidden": true}
import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

folder = runs / "split"
entries = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                 if p.is_file())
fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8),
                                  width_ratios=[1, 2.2])
left.text(0, 1, f"{folder.as_posix()}/\n" + "\n".join(
    f"  {name}" for name in entries), va="top", family="monospace",
    fontsize=9)
left.set_title("The run folder after R.5 (on disk)")
left.axis("off")
STEPS = [  # x, y, label
    (0.9, 2.2, "save at step N\n(rank 0)"),
    (3.5, 2.2, "write_atomic:\n.step_N.pt.PID.tmp\n+ fsync"),
    (6.1, 2.2, "rename into place:\ncheckpoints/\nstep_N.pt"),
    (8.7, 2.2, "rotate: keep the\nkeep_checkpoints\nnewest that read"),
    (8.7, 0.3, "unreadable:\nrenamed .damaged,\nnever deleted"),
    (6.1, 0.3, "resume: newest\nreadable, settings\nchecked (R.5)"),
]
for x, y, label in STEPS:
    right.add_patch(FancyBboxPatch((x - 0.95, y - 0.6), 1.9, 1.2,
                                   boxstyle="round,pad=0.05",
                                   facecolor="#dbe9f6", edgecolor="black"))
    right.text(x, y, label, ha="center", va="center", fontsize=8)
for (x0, y0, _), (x1, y1, _) in zip(STEPS, STEPS[1:], strict=False):
    if y0 == y1:
        start, end = (x0 + 1.05 * np.sign(x1 - x0), y0), (
            x1 - 1.05 * np.sign(x1 - x0), y1)
    else:
        start, end = (x0, y0 - 0.65), (x1, y1 + 0.65)
    right.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>",
                                    mutation_scale=12, color="black"))
right.text(3.5, 3.1, "a kill here leaves the old files whole",
           ha="center", fontsize=8, style="italic")
right.set(xlim=(-0.2, 9.8), ylim=(-0.5, 3.4),
          title="Where each checkpoint goes")
right.axis("off")
fig.tight_layout()
plt.show()
assert {"config.json", "metrics.jsonl", "checkpoints/step_00000006.pt",
        "checkpoints/step_00000008.pt.damaged"} <= set(entries)

# %% [markdown]
# ## R.6 Two processes equal one
#
# The reference launches one process per GPU with MPI. PyTorch's own
# launcher, `torchrun`, does the same without an MPI installation, and its
# rendezvous spans machines:
#
# ```sh
# torchrun --nproc_per_node 8 -m adm_lib.cli train diffusion \
#     --preset imagenet64 --data /data/imagenet64 --out runs/in64
# # on each of 2 machines, with the first one's address:
# torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d \
#     --rdzv_endpoint HOST:29500 -m adm_lib.cli train diffusion ...
# ```
#
# Each process reads `RANK` and `WORLD_SIZE` from the environment, joins
# the process group (NCCL between GPUs, gloo between CPU processes;
# `adm_lib.ranks`) and wraps the network in `DistributedDataParallel`,
# which averages the gradients across processes during the backward pass
# (the gradients are views of its all-reduce buckets, so nothing is
# copied between the two). The global batch is split evenly, each rank
# reading its rows (chapter 4.3). Rank 0 alone logs, draws sample grids
# and writes checkpoints; on several machines the run folder must be on a
# shared file system, since every rank loads the checkpoint rank 0 picks.
#
# A step's draws do not depend on how many processes share it. Each of two
# ranks draws the noise of its own four rows of a batch of 8, and nothing
# more, and they are the rows of one process's draw:

# %%
eight = small("diffusion", batch_size=8)
uniform = UniformSampler(eight.diffusion_steps)
whole_draw = draw_step(eight, uniform, 7, (1, 32, 32), torch.device("cpu"))
shares = [draw_step(eight, uniform, 7, (1, 32, 32), torch.device("cpu"),
                    rows=slice(4 * rank, 4 * rank + 4)) for rank in range(2)]
print("noise per rank:", [tuple(s.noise.shape) for s in shares])
for name in ("t", "noise", "flip"):
    joined = torch.cat([getattr(s, name) for s in shares])
    assert torch.equal(joined, getattr(whole_draw, name)), name

# %% [markdown]
# Then whole runs: the same 6 steps, once in one process and
# once in two processes under `torchrun` (gloo, on the CPU), through the
# `adm train` command. The losses agree, and the weights to float32
# round-off (the two processes sum their gradients in another order):

# %%
def adm_train(out: Path, processes: int) -> None:
    """Run `adm train` on the chapter's data in `processes` processes."""
    launcher = ["-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={processes}"] if processes > 1 else []
    settings = {"batch_size": 8, "num_channels": num_channels,
                "in_channels": 0, "log_interval": 1, "sample_interval": 0,
                "device": "cpu", "seed": seed}
    command = [sys.executable, *launcher, "-m", "adm_lib.cli", "train",
               "diffusion", "--data", data, "--out", str(out), "--steps",
               "6", "--quiet"]
    for key, value in settings.items():
        command += ["--set", f"{key}={value}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(command, check=True, env=env, capture_output=True)


for processes in (1, 2):
    adm_train(runs / f"ranks{processes}", processes)
one, two = (read_metrics(runs / f"ranks{p}") for p in (1, 2))
gap = max((p - q).abs().max().item()
          for p, q in zip(weights(runs / "ranks1", "model"),
                          weights(runs / "ranks2", "model"), strict=True))
print("losses, 1 process: ", [round(r["loss"], 5) for r in one])
print("losses, 2 processes:", [round(r["loss"], 5) for r in two])
print(f"largest weight difference: {gap:.1e}")
assert np.allclose([r["loss"] for r in one], [r["loss"] for r in two],
                   rtol=1e-5)
assert gap < 1e-3

# %% [markdown]
# ## R.7 Speed: what `adm bench` measures
#
# A claim that one trainer is faster than another means little unless
# both ran the same work on the same machine at the same time. `adm bench`
# (hand-written tooling in `adm_lib/bench.py`) times chapter 4's
# `train_step`, the step `adm train` repeats (loss, backward, fused AdamW
# and the EMA at the run's precision), and chapter 6's `sample_batches`,
# the sampler of `adm sample`, on random data. Given a local checkout of
# the reference (`--reference PATH`), it builds the reference's network
# from the same flags, loads the same weights, and times its training
# step (its `TrainLoop.run_step`, without MPI or logging) and its
# `p_sample_loop` on the same batch, alternating with ours round by round,
# so that a busy machine slows both alike. A ratio is the median of the
# rounds' paired ratios, and the range shows how far single rounds
# strayed. The rates beside it are another statistic, each side's work
# over its own median round's seconds: on a quiet machine the two agree,
# and where rounds vary the ratio of the rates may not be the ratio
# printed (appendix M.7 has such a run). Here it is at
# toy size, to show the report:

# %%
from adm_lib.bench import bench_config, format_report, run_bench

toy = bench_config("demo", {"num_channels": 32, "channel_mult": "1,2",
                            "num_res_blocks": 1, "diffusion_steps": 50,
                            "attention_resolutions": "16",
                            "batch_size": 2}, device)
report = run_bench(toy, rounds=1, warmup=0, sample_steps="2",
                   progress=False)
print(format_report("demo (toy size)", report))
assert report["train"]["adm_lib"]["rate"] > 0
assert report["sample"]["adm_lib"]["rate"] > 0

# %% [markdown]
# Measured at full size on 2-core CPUs (appendix M.7, with the machines
# and days): in float32 ours and the reference's steps are equal within
# the noise of a shared machine (training 0.98x, sampling 0.97x, medians
# of 5 paired rounds; the ratios of the median rates, 1.16 and 1.13,
# differ from them because single rounds varied by 40%, and all four lie
# within the rounds' ranges), since both run the same oneDNN
# convolutions, which take three quarters of the time; where the CPU
# computes in bf16 natively (AVX-512-BF16 or AMX), ours trains about
# twice as fast (1.9x to 2.1x) under `precision="auto"`.
#
# On a GPU the fast path adds bf16 autocast, TF32, cuDNN's autotuner,
# channels_last, fused AdamW, uint8 batches normalised on the device,
# noise drawn by each rank for its own rows only (R.6), attention laid
# out for the fused kernels (chapter 3), steps that never make the host
# wait for the GPU between log intervals and, with `--set compile=true`,
# `torch.compile`. Three of them need a word. TF32 rounds a float32
# product's inputs to 10 mantissa bits, which loses nothing a bf16 or
# fp16 run kept, but `precision="fp32"` means IEEE float32, so there it
# is off. The `memory_format` setting's "auto" is channels_last on a GPU
# (each pixel's channels adjacent, the layout of cuDNN's fastest
# convolutions) and contiguous elsewhere; "contiguous" is there because
# CUDA's GroupNorm on our torch wants NCHW, so channels_last may pay a
# transpose around every norm, and only a measurement on the GPU says
# which layout wins. And the host: a GPU runs a step's kernels in the
# order the host queued them, and the host queues them far ahead as long
# as it never waits for a value; an `.item()`, a `bool()` of a tensor or
# a copy to the CPU each make it wait until the GPU has caught up, and
# then the GPU idles while the host queues the next kernels. So chapter
# 4's loop decides a skipped step on the device, keeps the steps' results
# there, and reads them only when it logs, saves or looks at the model (a
# test counts the values three steps read back, which must be none, and
# on a GPU, not yet lent, runs the two after a warm-up step under CUDA's
# sync debug mode).
#
# One script runs every GPU
# measurement (the released 64x64 model at batch 64 against the
# reference's own fp16 trainer, and its training step compiled; the 11M
# 32x32 model against the reference too; bf16 against fp32
# loss curves over 1,000 steps of the demo's model at its batch of 32;
# appendix M.2 has them from CPUs) in about 5 minutes, by
# estimate from the reference's H100 baselines. Each step runs on its own
# under a timeout, so one that fails loses only itself, and its status,
# seconds and numbers go into one JSON; a test runs every step at toy
# sizes on the CPU (`SIZE=toy`):
#
# ```sh
# bash scripts/gpu_check.sh   # results in build/gpu/
# ```
#
# No GPU has been lent to this project yet, so its table is not here.

# %% [markdown]
# ## R.8 Precision: the paper's fp16 and the book's bf16
#
# The paper trained its models in fp16 with loss scaling (the reference's
# `--use_fp16 True`): float16 weights in the network, a float32 master
# copy for AdamW, and the loss multiplied by a scale before the backward
# pass, so that small gradients do not flush to zero; a step whose
# gradients overflow is skipped and the scale halved (chapter 4.5 has
# the rule). float16 has 10 mantissa bits but a narrow range: its
# smallest normal number is $2^{-14} \approx 6 \times 10^{-5}$, its
# largest 65,504. bfloat16 keeps float32's range with 7 mantissa bits,
# so it needs no scale: no scale to tune, no step lost to an overflow,
# and a skipped step means a real non-finite loss, not a scale too high.
# On the GPUs the book targets (Ampere and Hopper) both run at the same
# tensor-core rate, so range is the reason, not speed; bf16's coarser
# rounding does not change what a run learns (chapter 4.5, appendix M.2:
# losses within 0.15 standard errors of float32's). So `precision="auto"`
# is bf16 where the device computes in it natively, float32 elsewhere,
# and `precision="fp16"` remains, with PyTorch's loss scaler, for GPUs
# without bf16 (before Ampere). fp16 has not run on a GPU here, for want
# of one. What each format does to a tiny gradient, a large activation,
# and a tiny gradient scaled by $2^{16}$ (the scaler's first scale):

# %%
values = torch.tensor([1e-8, 1e-4, 1e5])
scale = 2.0 ** 16
for dtype in (torch.float16, torch.bfloat16):
    stored = values.to(dtype).float()
    scaled = (values[:2] * scale).to(dtype).float() / scale
    print(f"{str(dtype):<15} stored {stored.tolist()}  scaled back "
          f"{scaled.tolist()}")
half = values.to(torch.float16)
assert half[0] == 0 and torch.isinf(half[2])  # underflow and overflow
assert (values[0] * scale).to(torch.float16) != 0  # the scale saves it
brain = values.to(torch.bfloat16)
assert brain[0] != 0 and torch.isfinite(brain[2])  # no scale needed

# %% [markdown]
# ## Summary
#
# * A configuration is checked whole before the first step, and every
#   refusal names the setting (R.1).
# * A checkpoint holds all a run needs to go on, readable with
#   `weights_only=True`; every file is written whole or not at all (R.2).
# * A folder holds one run at a time, and a kill frees it at once (R.3).
# * Exact resume, the skipping of a damaged checkpoint and the equality of
#   one and two processes hold on these tiny runs, so they hold by
#   construction, not by luck of scale (R.4 to R.6).
# * `adm bench` times the steps `adm train` and `adm sample` take, side by
#   side with the reference's; in float32 on a CPU they are equal, and the
#   gains are bf16 where it is native and the GPU fast path (R.7).
# * bf16 needs no loss scale, which the paper's fp16 did; it is the
#   default where the device computes in it natively (R.8).
# * The foundation that keeps these promises imports nothing of the
#   book's library (R.0).

# %% [markdown]
# ## Exercises
#
# 1. R.4's uninterrupted run trained 8 steps, saving every 4, with the
#    default `keep_checkpoints` of 3. Predict which files its
#    `checkpoints/` folder holds, then check.
# 2. R.6 split a batch of 8 over two ranks. Predict whether rank 1's rows
#    (4 to 7) change when the batch is split over four ranks of two rows
#    instead, then check with `draw_step`.
# 3. Predict the smallest power of two by which a loss must be scaled so
#    that a gradient of $10^{-9}$ is not flushed to zero in float16, and
#    the smallest that keeps it a normal number (full precision), then
#    check.

# %% [markdown] jupyter={"source_hidden": true} tags=["solution"]
# **Solution 1.** Saves happen at every multiple of `save_interval` and at
# the last step: steps 4 and 8. Both read, and two is under the limit of
# three, so both stay: `step_00000004.pt` and `step_00000008.pt`.

# %% jupyter={"source_hidden": true} tags=["solution"]
kept = sorted(p.name for p in (runs / "whole" / "checkpoints").iterdir())
print(kept)
assert kept == ["step_00000004.pt", "step_00000008.pt"]

# %% [markdown] jupyter={"source_hidden": true} tags=["solution"]
# **Solution 2.** They do not change: every row draws from its own
# generator, seeded by (seed, step, row), so which process draws a row
# does not matter. That is what makes two processes equal one.

# %% jupyter={"source_hidden": true} tags=["solution"]
quarters = [draw_step(eight, uniform, 7, (1, 32, 32), torch.device("cpu"),
                      rows=slice(2 * rank, 2 * rank + 2))
            for rank in range(4)]
joined = torch.cat([q.noise for q in quarters[2:]])
assert torch.equal(joined, shares[1].noise)
print("rows 4 to 7 are the same over two or four ranks")

# %% [markdown] jupyter={"source_hidden": true} tags=["solution"]
# **Solution 3.** float16's smallest subnormal is $2^{-24} \approx 6
# \times 10^{-8}$, and a value rounds to it from above half of it,
# $2^{-25}$: $10^{-9} \cdot 2^5 = 3.2 \times 10^{-8}$ is the first past
# it, so $2^5$. To be normal it must reach $2^{-14}$, which takes
# $2^{16}$: the scale PyTorch's scaler starts at.

# %% jupyter={"source_hidden": true} tags=["solution"]
gradient = torch.tensor(1e-9)
nonzero = next(k for k in range(40)
               if (gradient * 2.0 ** k).to(torch.float16) != 0)
normal = next(k for k in range(40) if gradient * 2.0 ** k
              >= torch.finfo(torch.float16).smallest_normal)
print(f"not flushed from 2^{nonzero}, normal from 2^{normal}")
assert (nonzero, normal) == (5, 16)
