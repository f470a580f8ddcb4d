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
# # Training at scale
#
# Chapters 2 and 3 trained small models with a dozen lines of loop; the
# paper's ImageNet 64 model saw 1.1 billion images (540,000 steps of
# batch 2048, its Table 11). This chapter trains a model first (4.1),
# then builds what trained it: a run as one configuration (4.2), what a
# step draws (4.3), three objectives (4.4), mixed precision (4.5), the
# average of the weights (4.6), the loop (4.7), the classifier and
# upsampler (4.8), and a recipe for runs of minutes (4.9). What makes a
# run safe to stop, resume and share is the foundation's, explained in
# the [appendix on the engineering of runs](appendix_runs.html); longer
# runs are in the [appendix of measurements](appendix_measurements.html).

# %% tags=["parameters"]
# Smoke configuration: about a minute on a CPU. The longer CPU run
# (appendix M.3) and the full GPU run are
#   adm book run 4 -p train_steps 1500 -p classifier_steps 1000 \
#       -p batch_size 32 -p snapshot_every 250 -p eval_images 500 \
#       -p figures_dir FOLDER -p runs_dir build/chapter4_record
#   adm book run 4 -p device cuda -p train_steps 20000 \
#       -p classifier_steps 10000 -p batch_size 128 -p num_channels 64 \
#       -p snapshot_every 2000 -p eval_images 500
data: str = "mnist5k"  # a data-set name, or a folder, .zip or .npz
device: str = "auto"  # "auto" picks CUDA when there is a GPU
runs_dir: str = "build/chapter4"  # the chapter's run folders (emptied)
train_steps: int = 20  # of the diffusion model and the upsampler
classifier_steps: int = 20  # of the noisy classifier
eval_images: int = 64  # held-out images per evaluation (500: all)
batch_size: int = 16  # images per training step
num_channels: int = 32  # the networks' base width (a multiple of 32)
# The diffusion model and upsampler: 4.9's recipe for runs of minutes
# (predict x0 under L_simple, a short EMA)
settings: dict = {"lr": 1e-3, "num_res_blocks": 1, "predict_xstart": True,
                  "learn_sigma": False,
                  "ema_rate": "0.95"}  # changes to the MNIST preset
snapshot_every: int = 10  # steps between sample grids and evaluations
num_samples: int = 10  # images in each sample grid
sample_steps: str = "ddim10"  # the grids' respacing
figures_dir: str = ""  # if set, 4.8 also saves its figures there
seed: int = 0  # of every run

# %%
#| default_exp train

# %%
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import torch

from adm_lib.book import find_root
from adm_lib.checkpoints import read_metrics
from adm_lib.config import TrainConfig, make_config
from adm_lib.devices import resolve_device
from adm_lib.train import train

# Relative paths, the parameters' too, start at the book's root, as under
# `adm book run`, wherever the kernel starts (JupyterLab: in chapters/).
os.chdir(find_root())
device = str(resolve_device(device))
runs = Path(runs_dir)
shutil.rmtree(runs, ignore_errors=True)  # the chapter's runs start afresh

# %% [markdown]
# ## 4.1 A small model, trained first
#
# A run is a configuration and a folder. `make_config` takes a preset,
# one of the paper's models or here the MNIST one, with our changes;
# `train` trains it, writing checkpoints, a log and sample grids into the
# folder. `small`, used by every run of the chapter, scales the preset
# down and takes 4.9's recipe for runs of minutes. The sections below
# build `make_config` and `train`.

# %%
def small(kind: str, **fields: Any) -> TrainConfig:
    """The MNIST preset of `kind`, scaled down by the parameters cell."""
    # in_channels 0: the data's, so that colour data sets run too.
    base = {"data": data, "in_channels": 0, "device": device,
            "batch_size": batch_size,
            "num_channels": num_channels, "classifier_width": num_channels,
            "num_samples": num_samples, "sample_steps": sample_steps,
            "eval_images": eval_images, "seed": seed}
    return make_config(kind, "mnist", {**base, **fields})


snapshots = {"save_interval": snapshot_every, "eval_interval": snapshot_every,
             "sample_interval": snapshot_every,
             "log_interval": max(1, snapshot_every // 5)}
started = time.perf_counter()
train(small("diffusion", steps=train_steps, **snapshots, **settings),
      runs / "diffusion")
print(f"trained in {time.perf_counter() - started:.0f} s: "
      + ", ".join(sorted(p.name for p in (runs / "diffusion").iterdir())))

# %%
# The grids, every `snapshot_every` steps: samples of the average of the
# weights (4.6), a column per class, from the same noise every time.
def show_grids(paths: list[Path], last_height: float = 1) -> plt.Figure:
    """The sample grids `paths`, one row each, titled by their step."""
    fig, axes = plt.subplots(
        len(paths), 1, squeeze=False,
        figsize=(6, 0.75 * (len(paths) - 1 + last_height) + 0.5),
        height_ratios=[1] * (len(paths) - 1) + [last_height])
    for ax, path in zip(axes[:, 0], paths, strict=True):
        ax.imshow(plt.imread(path), cmap="gray")
        ax.set_title(f"{path.parts[-3]}, step {int(path.stem[5:])}",
                     fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    return fig


grids = sorted((runs / "diffusion" / "samples").glob("step_*.png"))
show_grids(grids)
plt.show()
assert len(grids) == -(-train_steps // snapshot_every)

# %% [markdown]
# A few steps (this page's smoke configuration) give noise. The recorded
# run (1,500 steps of batch 32 on a 2-core CPU, appendix M.3) makes
# digits; its grids every 250 steps, then 4.8's upsampler (its 8-pixel
# inputs, its samples, the real images):
#
# ![Samples of the recorded CPU run every 250 steps, and the
# upsampler's](figures/04_cpu_run_samples.png)
#
# Most classes are recognisable by step 750; this noise still gives an
# unclear 2, 3 and 5 at step 1,500. One step of `train` (in brackets, the
# section that builds each part):

# %% jupyter={"source_hidden": true}
boxes = {  # name: (x, y, text), in axes units
    "data": (0.09, 0.78, "a batch $x_0$, labels $y$\n(4.3)"),
    "draws": (0.09, 0.30, "$t \\sim p_t$,  $\\epsilon \\sim N(0, I)$\n"
              "from (seed, step) (4.3)"),
    "noise": (0.34, 0.55, "q_sample (ch. 1):\n$x_t = \\sqrt{\\bar\\alpha_t}"
              "\\,x_0 + \\sqrt{1-\\bar\\alpha_t}\\,\\epsilon$"),
    "model": (0.56, 0.55, "network (ch. 3)\n$(x_t, t, y)$"),
    "simple": (0.80, 0.80, "mean: $L_{simple}$ (4.4)\n"
               "MSE of $\\epsilon$ or $x_0$"),
    "vlb": (0.80, 0.30, "variance: $\\lambda\\,L_{vlb}$ (4.4)\n"
            "mean's gradient stopped"),
    "step": (0.56, 0.08, "AdamW on $w_t\\,(L_{simple} + \\lambda\\,"
             "L_{vlb})$\n(4.7)"),
    "ema": (0.89, 0.08, "EMA $\\bar\\theta \\leftarrow r\\bar\\theta"
            " + (1-r)\\theta$\n(4.6)"),
}
arrows = [("data", "noise"), ("draws", "noise"), ("noise", "model"),
          ("model", "simple"), ("model", "vlb"), ("simple", "step"),
          ("vlb", "step"), ("step", "ema"), ("step", "draws")]
fig, ax = plt.subplots(figsize=(9, 4))
ax.set(xlim=(0, 1), ylim=(-0.05, 0.95))
ax.axis("off")
drawn = {name: ax.text(x, y, text, ha="center", va="center", fontsize=8.5,
                       bbox={"boxstyle": "round,pad=0.5", "fc": "#eef3fb",
                             "ec": "#3b5b92"})
         for name, (x, y, text) in boxes.items()}
fig.canvas.draw()  # the boxes' sizes, for the arrows' ends
for a, b in arrows:
    ax.annotate("", xy=(0.5, 0.5), xycoords=drawn[b], xytext=(0.5, 0.5),
                textcoords=drawn[a], arrowprops={
                    "arrowstyle": "-|>", "color": "#333",
                    "patchA": drawn[a].get_bbox_patch(),
                    "patchB": drawn[b].get_bbox_patch(),
                    "connectionstyle": "arc3,rad=-0.3"
                    if (a, b) == ("step", "draws") else "arc3"})
ax.text(0.27, 0.12, "the loss-aware $p_t$ learns\nfrom each step's $L_t$",
        fontsize=7.5, ha="center", color="#555")
ax.set_title("One training step of a diffusion model", fontsize=9)
plt.show()
assert set(drawn) == {name for pair in arrows for name in pair}

# %% [markdown]
# With learned variances the loss is the hybrid
# $L_\text{simple} + \lambda L_\text{vlb}$ (chapter 2), in which
# $L_\text{vlb}$ sees the predicted mean as a constant: the bound trains
# only the variance, the mean learns from $L_\text{simple}$ alone.
# $w_t = 1 / (T p_t)$ keeps the loss's expectation that of uniform $t$,
# whatever $p_t$ the timestep sampler draws from (exercise 3).
#
# ## 4.2 A run is a configuration
#
# What a run computes is one dataclass, `TrainConfig`, saved in the run
# folder and in every checkpoint, so a checkpoint rebuilds its network
# (`load_run`, chapter 5). The fields from `device` on only steer the run
# and may change when it is resumed (`RUN_FIELDS`); every other field
# must match its checkpoint's.

# %%
#| export config
"""A training run's configuration: its fields, the paper's presets, the
checks of every value, and the network and diffusion it builds."""
import importlib.util
import math
import tomllib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

from torch import nn

from adm_lib.assets import asset
from adm_lib.devices import MEMORY_FORMATS, PRECISIONS
from adm_lib.diffusion import GaussianDiffusion, space_timesteps
from adm_lib.errors import TrainError
from adm_lib.forward import BETA_SCHEDULES, get_named_beta_schedule
from adm_lib.unet import POOLS, EncoderUNetModel, SuperResModel, UNetModel
from adm_lib.values import (
    MAX_SEED,
    Rule,
    check_rules,
    check_types,
    coerce_settings,
    one_of,
    settings_from_dict,
)

KINDS = ("diffusion", "classifier", "upsampler")
SCHEDULE_SAMPLERS = ("uniform", "loss-second-moment")

# %%
#| export config
@dataclass
class TrainConfig:
    """Everything that defines a training run; saved in every checkpoint."""

    kind: str = "diffusion"  # diffusion | classifier | upsampler
    # Data. 0 for in_channels or num_classes: take it from the data.
    data: str = "mnist5k"
    val_data: str = ""  # classifier held-out set; "" splits off val_fraction
    val_fraction: float = 0.1
    image_size: int = 32  # the upsampler's output size
    small_size: int = 8  # the upsampler's input size
    # Upsampler conditioning augmentation (chapter 7): noise the low-res
    # input to a random step up to this one; 0: none (the reference).
    low_res_noise: int = 0
    in_channels: int = 0
    num_classes: int = 0
    class_cond: bool = True
    # Classifier-free guidance (chapter 6): this share of labels becomes
    # the extra "null" label num_classes, so one model is both
    # conditional and unconditional.
    label_dropout: float = 0.0
    random_flip: bool = False
    # Architecture and diffusion: the reference's flags, same meanings.
    num_channels: int = 32
    num_res_blocks: int = 2
    # Channel multipliers per resolution, () for the reference's default
    # for the image size (CHANNEL_MULT); attention at these resolutions.
    channel_mult: tuple[float, ...] = (1, 2, 2)
    attention_resolutions: tuple[int, ...] = (8,)
    num_heads: int = 4
    num_head_channels: int = 32
    num_heads_upsample: int = -1
    dropout: float = 0.0
    use_scale_shift_norm: bool = True
    resblock_updown: bool = True
    use_new_attention_order: bool = False
    use_checkpoint: bool = False
    rescale_residual: bool = False  # the paper's ablation; not a ref. flag
    classifier_width: int = 32
    classifier_depth: int = 2
    classifier_attention_resolutions: tuple[int, ...] = (8,)
    classifier_use_scale_shift_norm: bool = True
    classifier_resblock_updown: bool = True
    classifier_pool: str = "attention"
    diffusion_steps: int = 1000
    noise_schedule: str = "cosine"
    learn_sigma: bool = True
    use_kl: bool = False
    predict_xstart: bool = False
    rescale_learned_sigmas: bool = False
    # Optimisation. batch_size is global: all ranks, all micro-batches.
    steps: int = 2000
    batch_size: int = 64
    microbatch: int = 0  # per-rank chunk; 0: the whole per-rank batch
    lr: float = 2e-4
    weight_decay: float = 0.0
    lr_anneal_steps: int = 0  # linear decay to 0 over this many steps
    grad_clip: float = 0.0  # max gradient norm; 0: no clipping
    ema_rate: tuple[float, ...] = (0.9999,)  # the first is "ema"
    ema_warmup: bool = True
    schedule_sampler: str = "uniform"
    precision: str = "auto"  # bf16 where native (GPU, new CPUs), else fp32
    compile: bool = False  # torch.compile the network for training
    noised: bool = True  # classifier: train on noised images
    clean_fraction: float = 0.0  # classifier: share of noise-free images
    seed: int = 0  # 0 to MAX_SEED = 2**64 - 1
    # Run control: these may change when a run is resumed.
    device: str = "auto"
    # The layout of images and convolution weights (app. R.7); auto:
    # channels_last on a GPU, contiguous elsewhere.
    memory_format: str = "auto"
    deterministic: bool = False  # bit-exact on a GPU too, slower (app. R.4)
    num_workers: int = 0
    log_interval: int = 50
    save_interval: int = 500
    keep_checkpoints: int = 3
    sample_interval: int = 500  # 0: no grids, not even at the end
    num_samples: int = 16
    sample_steps: str = "ddim50"  # respacing of the grids' sampler
    eval_interval: int = 500  # 0: no held-out evaluation
    eval_images: int = 1000
    max_nonfinite: int = 10  # non-finite steps in a row before stopping
    tensorboard: bool = False

# %%
#| export config
RUN_FIELDS = frozenset({
    "data", "val_data", "steps", "device", "num_workers", "log_interval",
    "save_interval", "keep_checkpoints", "sample_interval", "num_samples",
    "sample_steps", "eval_interval", "eval_images", "max_nonfinite",
    "tensorboard", "compile", "memory_format", "deterministic",
})

# %% [markdown]
# The paper's models are presets: the architecture of the flags the
# reference released each with (a test checks them), the optimisation of
# the paper's Tables 11 to 13 (classifiers: the reference's weight decay
# and annealing). They are data, `adm_lib/assets/presets.toml`, each
# preset the fields it changes, listed at the end of this section.
# `cifar10` is the reference's measured run (`shared/baselines`), `mnist`
# fits a CPU. The reference's classifiers train on random crops of 80 to
# 100% of each image, ours on the centre.

# %%
#| export config
CHANNEL_MULT: dict[int, tuple[float, ...]] = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
}
SUPER_RES_CHANNEL_MULT: dict[int, tuple[float, ...]] = {
    512: (1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    64: (1, 2, 3, 4),
}


def _read_presets() -> dict[str, dict[str, dict[str, Any]]]:
    """The presets of adm_lib/assets/presets.toml, as TrainConfig's types."""
    table = tomllib.loads(asset("presets.toml").read_text())
    bases, defaults = table.pop("bases"), asdict(TrainConfig())
    presets: dict[str, dict[str, dict[str, Any]]] = {}
    for kind, named in table.items():
        for name, own in named.items():
            shared = [bases[b] for b in own.pop("base", [])]
            settings = {k: v for d in (*shared, own) for k, v in d.items()}
            presets.setdefault(kind, {})[name] = coerce_settings(
                settings, defaults, TrainError)
    return presets


PRESETS = _read_presets()

# %% [markdown]
# `make_config(kind, preset, overrides)` checks each override's name (a
# typo gets the nearest names) and converts it to its field's type (the
# foundation's `adm_lib.values`). `validate` names the first value that
# cannot work, alone or with others, so no run fails after its first step
# for want of a check (appendix R.1 shows the refusals).

# %%
#| export config
def make_config(kind: str = "diffusion", preset: str | None = None,
                overrides: Mapping[str, Any] | None = None,
                base: TrainConfig | None = None) -> TrainConfig:
    """A preset (default "mnist"), or `base`, with `overrides` applied."""
    if kind not in KINDS:
        raise TrainError(f"kind must be one of {', '.join(KINDS)}, "
                         f"not {kind!r}")
    if base is None:
        presets = PRESETS[kind]
        name = preset or "mnist"
        if name not in presets:
            raise TrainError(f"no {kind} preset {name!r}; presets: "
                             f"{', '.join(presets)}")
        base = TrainConfig(kind=kind, **presets[name])
    if "kind" in (overrides or {}):
        raise TrainError("kind is not a setting: it is make_config's "
                         "first argument")
    defaults = asdict(TrainConfig())
    del defaults["kind"]
    changes = coerce_settings(overrides or {}, defaults, TrainError)
    config = replace(base, **changes)
    validate(config)
    return config


def config_from_dict(settings: Mapping[str, Any]) -> TrainConfig:
    """The config a checkpoint or `config.json` stores, older ones too."""
    # Older runs hold lists as strings ("1,2,2"), which `coerce` reads.
    return settings_from_dict(TrainConfig, settings, TrainError)

# %%
#| export config
def validate(config: TrainConfig) -> None:
    """Raise TrainError naming the first setting that cannot work."""
    check_types(config, TrainError)
    check_rules(config, RULES, TrainError)
    if config.label_dropout and (config.kind == "classifier"
                                 or not config.class_cond):
        raise TrainError("label_dropout needs a class-conditional diffusion "
                         "model or upsampler (class_cond=true)")
    if config.kind == "upsampler" and config.small_size >= config.image_size:
        raise TrainError(f"small_size={config.small_size} must be below "
                         f"image_size={config.image_size}")
    if config.low_res_noise and config.kind != "upsampler":
        raise TrainError("low_res_noise is an upsampler's setting (its "
                         f"conditioning augmentation), not a {config.kind}'s")
    if not 0 <= config.low_res_noise < config.diffusion_steps:
        raise TrainError(f"low_res_noise={config.low_res_noise}: expected a "
                         f"step from 0 (none) to diffusion_steps - 1 = "
                         f"{config.diffusion_steps - 1}")
    if config.kind != "classifier" and config.num_samples < 1:
        raise TrainError(f"num_samples={config.num_samples} must be >= 1: "
                         f"a {config.kind}'s grids show that many samples")
    _check_network(config)
    _check_sample_steps(config)
    if config.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise TrainError("tensorboard=true needs the tensorboard package: "
                         "pip install tensorboard")

# %%
#| export config
_POSITIVE = ("steps", "batch_size", "image_size", "small_size",
             "log_interval", "save_interval", "keep_checkpoints",
             "max_nonfinite", "diffusion_steps", "num_res_blocks",
             "classifier_depth", "num_heads")
_NON_NEGATIVE = ("microbatch", "weight_decay", "grad_clip", "num_workers",
                 "lr_anneal_steps", "num_samples", "eval_images",
                 "num_classes", "sample_interval", "eval_interval")
_LISTS = ("channel_mult", "attention_resolutions",
          "classifier_attention_resolutions")
# Each field's value alone, checked in this order.
RULES: tuple[Rule, ...] = (
    *(one_of(name, allowed) for name, allowed in {
        "kind": KINDS, "precision": PRECISIONS,
        "schedule_sampler": SCHEDULE_SAMPLERS,
        "noise_schedule": tuple(BETA_SCHEDULES), "classifier_pool": POOLS,
        "in_channels": (0, 1, 3), "memory_format": MEMORY_FORMATS}.items()),
    (_POSITIVE, lambda v: v >= 1, " must be >= 1"),
    (_NON_NEGATIVE, lambda v: v >= 0, " must be >= 0"),
    (("seed",), lambda v: 0 <= v <= MAX_SEED, ": expected 0 to 2**64 - 1 "
     f"= {MAX_SEED}, the seeds torch's generators take"),
    (("num_head_channels", "num_heads_upsample"),
     lambda v: v == -1 or v >= 1, ": expected -1 (see num_heads) or >= 1"),
    (("clean_fraction",), lambda v: 0 <= v <= 1, " must be in [0, 1]"),
    (("val_fraction",), lambda v: 0 < v < 1, " must be in (0, 1)"),
    (("label_dropout", "dropout"), lambda v: 0 <= v < 1,
     " must be in [0, 1)"),
    (("lr", "weight_decay", "grad_clip"), math.isfinite, " is not finite"),
    (("lr",), lambda v: v > 0, " must be > 0"),
    (_LISTS, lambda v: all(0 < x < math.inf for x in v),
     ": expected positive numbers, such as (16, 8)"),
    (("ema_rate",), lambda v: v and all(0 < r < 1 for r in v),
     ": expected one or more rates in (0, 1), such as (0.9999,)"),
)

# %%
#| export config
def channel_mults(config: TrainConfig) -> tuple[float, ...]:
    """The network's channel multipliers, one per resolution."""
    if config.channel_mult:
        return config.channel_mult
    # () is the reference's default for the image size (ImageNet's sizes).
    table = (SUPER_RES_CHANNEL_MULT if config.kind == "upsampler"
             else CHANNEL_MULT)
    if config.image_size not in table:
        raise TrainError(
            f"channel_mult=() (the reference's default for the image size) "
            f"exists for a {config.kind} of image_size "
            f"{', '.join(map(str, sorted(table)))}, not "
            f"{config.image_size}: set channel_mult, such as (1, 2, 2)")
    return table[config.image_size]


def _check_network(config: TrainConfig) -> None:
    """The network builds: its sizes halve evenly, widths and heads fit."""
    mults = channel_mults(config)
    shown = f"channel_mult {','.join(f'{m:g}' for m in mults)}"
    halvings = len(mults) - 1
    if config.image_size % 2 ** halvings:
        raise TrainError(
            f"image_size={config.image_size} must be divisible by "
            f"{2 ** halvings}: {shown} halves it {halvings} times")
    sizes = [config.image_size // 2 ** k for k in range(len(mults))]
    classifier = config.kind == "classifier"
    width_name = "classifier_width" if classifier else "num_channels"
    width = getattr(config, width_name)
    chans = [int(m * width) for m in mults]
    if any(c < 32 or c % 32 for c in chans):  # GroupNorm's 32 groups
        raise TrainError(
            f"{width_name}={width}: the channels at each resolution "
            f"({width_name} x {shown}: {', '.join(map(str, chans))}) must "
            "be multiples of 32, the groups of the GroupNorm layers")
    name = ("classifier_attention_resolutions" if classifier
            else "attention_resolutions")
    attention = getattr(config, name)
    for res in attention:
        if res not in sizes:
            raise TrainError(
                f"{name}={attention}: {res} is not one of the "
                f"network's resolutions ({', '.join(map(str, sizes))}, for "
                f"image_size={config.image_size} and {shown})")
    # Attention layers: at those resolutions, and in the middle block.
    widths = [chans[sizes.index(r)] for r in attention] + [chans[-1]]
    listed = ", ".join(map(str, sorted(set(widths))))
    if classifier:  # the reference's classifiers: heads of 64 channels
        if any(c % 64 for c in widths):
            raise TrainError(
                f"classifier_width={width}: the classifier's attention "
                f"layers have {listed} channels, which must be multiples "
                "of its heads' 64")
        return
    heads = {"num_head_channels": (config.num_head_channels, widths)}
    if config.num_head_channels == -1:  # a number of heads instead
        heads = {"num_heads": (config.num_heads, widths),
                 "num_heads_upsample": (config.num_heads_upsample,
                                        widths[:-1])}
    for name, (value, layers) in heads.items():
        if value != -1 and any(c % value for c in layers):
            raise TrainError(
                f"{name}={value} does not divide the channels of the "
                "attention layers "
                f"({', '.join(map(str, sorted(set(layers))))})")


def _check_sample_steps(config: TrainConfig) -> None:
    """sample_steps is a respacing of diffusion_steps ("" keeps them all)."""
    if config.kind == "classifier" or not config.sample_steps:
        return
    try:
        kept = space_timesteps(config.diffusion_steps, config.sample_steps)
        problem = "it keeps no step"
    except ValueError as err:
        kept, problem = [], str(err)
    if not kept:
        raise TrainError(
            f"sample_steps={config.sample_steps!r}: {problem}; expected a "
            f"respacing of diffusion_steps={config.diffusion_steps}, such "
            "as ddim50, 250 or 10,15,20")


# %% [markdown]
# A configuration builds its network, with chapter 3's classes (the
# reference's arguments, plus the ablation `rescale_residual`), and its
# diffusion, with chapter 2's: `use_kl` trains on the rescaled bound, the
# hybrid weights the bound's terms by $1/T$, or 0.001 with
# `rescale_learned_sigmas`. An attention resolution, in pixels as the
# reference's flags give it, reaches the network as the factor by which
# that level has been down-sampled.

# %%
#| export config
def unet_arguments(config: TrainConfig) -> dict[str, Any]:
    """The constructor arguments of a diffusion model's or upsampler's UNet."""
    labels = config.num_classes + (1 if config.label_dropout else 0)
    return {
        "image_size": config.image_size, "in_channels": config.in_channels,
        "model_channels": config.num_channels,
        "out_channels": config.in_channels * (2 if config.learn_sigma else 1),
        "num_res_blocks": config.num_res_blocks,
        "attention_resolutions": tuple(
            config.image_size // r for r in config.attention_resolutions),
        "dropout": config.dropout, "channel_mult": channel_mults(config),
        # label_dropout's null label is one more class (chapter 6)
        "num_classes": labels if config.class_cond else None,
        "use_checkpoint": config.use_checkpoint, "num_heads": config.num_heads,
        "num_head_channels": config.num_head_channels,
        "num_heads_upsample": config.num_heads_upsample,
        "use_scale_shift_norm": config.use_scale_shift_norm,
        "resblock_updown": config.resblock_updown,
        "rescale_residual": config.rescale_residual,
    }

# %%
#| export config
def build_model(config: TrainConfig) -> nn.Module:
    """The network `config` trains: a UNet, classifier or upsampler."""
    if config.in_channels < 1 or (config.num_classes < 1 and (
            config.class_cond or config.kind == "classifier")):
        raise TrainError("in_channels or num_classes is 0 (\"from the "
                         "data\"): resolve_config the config first")
    try:
        return _network(config)
    except (ValueError, AssertionError) as err:
        raise TrainError(f"cannot build the {config.kind}: {err}") from None


def _network(config: TrainConfig) -> nn.Module:
    if config.kind == "classifier":
        return EncoderUNetModel(
            image_size=config.image_size, in_channels=config.in_channels,
            model_channels=config.classifier_width,
            out_channels=config.num_classes,
            num_res_blocks=config.classifier_depth,
            attention_resolutions=tuple(
                config.image_size // r
                for r in config.classifier_attention_resolutions),
            channel_mult=channel_mults(config),
            num_head_channels=64,  # the reference's classifiers
            use_scale_shift_norm=config.classifier_use_scale_shift_norm,
            resblock_updown=config.classifier_resblock_updown,
            pool=config.classifier_pool)
    if config.kind == "upsampler":
        return SuperResModel(**unet_arguments(config),
                             low_res_level=config.low_res_noise > 0)
    return UNetModel(**unet_arguments(config),
                     use_new_attention_order=config.use_new_attention_order)


def build_diffusion(config: TrainConfig) -> GaussianDiffusion:
    """The diffusion `config` trains with (a classifier's: its noising)."""
    learned = config.learn_sigma
    loss = "kl" if config.use_kl else "hybrid" if learned else "simple"
    return GaussianDiffusion(
        get_named_beta_schedule(config.noise_schedule,
                                config.diffusion_steps),
        mean_type="x0" if config.predict_xstart else "eps",
        var_type="learned_range" if learned else "fixed_large",
        loss=loss,
        lambda_vlb=(0.001 if config.rescale_learned_sigmas
                    else 1 / config.diffusion_steps))

# %%
# The presets, counted for 3-channel images on PyTorch's `meta` device,
# which allocates no memory: even the 559M-parameter ImageNet 512 model
# costs nothing. The counts equal the paper's (296M for ImageNet 64; 65M,
# 43M, 54M and 54M for its classifiers).
def preset_row(kind: str, name: str) -> tuple:
    config = make_config(kind, name)
    config = replace(config, in_channels=config.in_channels or 3,
                     num_classes=config.num_classes or 10)
    with torch.device("meta"):
        params = sum(p.numel() for p in build_model(config).parameters())
    size = (f"{config.small_size}->{config.image_size}"
            if kind == "upsampler" else str(config.image_size))
    return (kind, name, size, f"{params / 1e6:.1f}M", config.batch_size,
            config.lr, config.steps)


rows = [preset_row(kind, name) for kind in KINDS for name in PRESETS[kind]]
print(f"{'kind':<11}{'preset':<17}{'size':>8}{'params':>9}{'batch':>7}"
      f"{'lr':>8}{'steps':>10}")
for kind, name, size, params, batch, lr, steps in rows:
    print(f"{kind:<11}{name:<17}{size:>8}{params:>9}{batch:>7}{lr:>8.0e}"
          f"{steps:>10,}")
counts = {(k, n): p for k, n, _, p, *_ in rows}
assert [counts["diffusion", "imagenet64"],
        counts["classifier", "imagenet128"]] == ["295.9M", "42.6M"]

# %% [markdown]
# ## 4.3 What a step draws
#
# The reference draws its batches from a shuffling loader and its
# timesteps, noise and dropout from the global generator, so a resumed
# run, or one on more GPUs, draws other numbers than the run it
# continues. Here a step's draws are a function of `(seed, step)` alone.
# With global batch size $B$, step $s$'s batch is the slice
# $[sB, (s+1)B)$ of an endless sequence of seeded shuffles of the data
# (the foundation's `BatchOrder`), of which rank $r$ of $W$ reads rows
# $[rB/W, (r+1)B/W)$ (`RankBatches`): step 7's batch does not depend on
# steps 0 to 6 having been drawn, and two ranks' shares make it whole:

# %%
from adm_lib.data import BatchOrder, RankBatches

order = BatchOrder(torch.arange(50), batch_size=8, seed=seed)
fresh = BatchOrder(torch.arange(50), batch_size=8, seed=seed)
for step in range(7):
    order(step)
halves = [next(iter(RankBatches(fresh, rank, 2, start=7)))
          for rank in range(2)]
print("step 7:", order(7).tolist(), "ranks:", halves)
assert order(7).tolist() == fresh(7).tolist() == halves[0] + halves[1]

# %% [markdown]
# The rest comes from generators seeded by `(seed, step)`: the few
# numbers per image (timesteps, flips, the classifier's noise-free picks,
# the labels dropped for classifier-free guidance) for the whole batch,
# and the noise row by row from `(seed, step, i)` (`row_noise`), so a
# rank draws only its own rows. Only dropout uses PyTorch's global
# generator, whose state every checkpoint keeps.

# %%
#| export batches
"""What each training step draws, from (seed, step) alone: its timesteps,
noise and flips; and the data a run opens."""
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

from adm_lib.config import TrainConfig
from adm_lib.data import ImageDataset, count_classes, open_run_data
from adm_lib.diffusion import UniformSampler
from adm_lib.errors import TrainError
from adm_lib.seeds import row_noise, step_seed


@dataclass
class StepDraws:
    """A step's random draws for some rows of its batch (see `draw_step`)."""

    t: Tensor
    weights: Tensor
    noise: Tensor
    flip: Tensor
    clean: Tensor
    drop: Tensor
    low_res_t: Tensor  # upsampler augmentation: step, and noise (or N x 0)
    low_res_noise: Tensor

    def rows(self, rows: slice) -> "StepDraws":
        """The draws of some of these rows."""
        return StepDraws(*(getattr(self, f.name)[rows]
                           for f in fields(self)))


def draw_step(config: TrainConfig, sampler: UniformSampler, step: int,
              shape: tuple[int, ...], device: torch.device,
              stream: int = 0, rows: slice = slice(None)) -> StepDraws:
    """The draws of `rows` of a batch; `stream` 0 trains, 1 evaluates."""
    n = config.batch_size
    g = torch.Generator().manual_seed(step_seed(config.seed, 2, stream, step))
    t, weights = sampler.sample(n, "cpu", g)
    flip = (torch.rand(n, generator=g) < 0.5) & config.random_flip
    clean = torch.rand(n, generator=g) < config.clean_fraction
    clean |= not config.noised
    drop = torch.rand(n, generator=g) < config.label_dropout
    mine = range(n)[rows]
    noise = row_noise((config.seed, 3, stream, step), mine, shape, device)
    low_res_t = torch.zeros(n, dtype=torch.long)
    low_res_noise = torch.empty((len(mine), 0), device=device)
    if config.low_res_noise:  # its own streams: the others stay as they are
        aug_g = torch.Generator().manual_seed(
            step_seed(config.seed, 4, stream, step))
        low_res_t = torch.randint(config.low_res_noise + 1, (n,),
                                  generator=aug_g)
        small = (shape[0], config.small_size, config.small_size)
        low_res_noise = row_noise((config.seed, 11, stream, step), mine,
                                  small, device)
    # non_blocking: a blocking copy to a GPU waits for its queue to empty.
    t, weights, flip, clean, drop, low_res_t = (
        x[rows].to(device, non_blocking=True)
        for x in (t, weights, flip, clean, drop, low_res_t))
    return StepDraws(t, weights, noise, flip, clean, drop, low_res_t,
                     low_res_noise)

# %% [markdown]
# The data come from the foundation's `load_dataset` at the configured
# size; `in_channels` and `num_classes` of 0 are taken from them, so the
# saved configuration is complete. A classifier holds out images to
# measure its accuracy on; the other kinds train on all of them.

# %%
#| export batches
def open_data(config: TrainConfig, source: str | None = None) -> ImageDataset:
    """The data set `source` (default `config.data`) at the config's size."""
    return open_run_data(config.data if source is None else source,
                         config.image_size, config.in_channels)


def resolve_config(config: TrainConfig, data: ImageDataset) -> TrainConfig:
    """`config` with in_channels and num_classes taken from the data."""
    classes = config.num_classes
    if config.kind == "classifier" or config.class_cond:
        if data.labels is None:
            raise TrainError(
                f"{data.source} has no labels, and a "
                + ("classifier needs them" if config.kind == "classifier"
                   else "class-conditional model needs them: set "
                   "class_cond=false for an unconditional one"))
        classes = count_classes(data, config.num_classes)
        if config.kind == "classifier" and classes < 2:
            raise TrainError(f"{data.source} has one class: nothing to "
                             "classify")
    if config.kind == "upsampler" and config.num_samples > len(data):
        raise TrainError(f"num_samples={config.num_samples}: the grids "
                         f"upsample that many of {data.source}'s "
                         f"{len(data)} images")
    return replace(config, in_channels=config.in_channels or data.channels,
                   num_classes=classes)


def split_data(config: TrainConfig, data: ImageDataset
               ) -> tuple[ImageDataset, Tensor, ImageDataset, Tensor]:
    """Training and held-out images: (set, indices) twice."""
    # Held-out images in a seeded order: the first few (grids, evaluation)
    # are a fair sample even of a sorted data set.
    g = torch.Generator().manual_seed(step_seed(config.seed, 6))
    perm = torch.randperm(len(data), generator=g)
    if config.kind != "classifier":
        return data, torch.arange(len(data)), data, perm
    if config.val_data:
        val = open_data(config, config.val_data)
        return data, torch.arange(len(data)), val, torch.randperm(
            len(val), generator=g)
    held = max(1, round(len(data) * config.val_fraction))
    if held >= len(data):
        raise TrainError(f"{data.source} has {len(data)} images: too few "
                         f"to hold out val_fraction={config.val_fraction}")
    return data, perm[held:].sort().values, data, perm[:held]

# %% [markdown]
# ## 4.4 Three objectives
#
# The three kinds of model differ only in their per-image loss:
#
# * a **diffusion model** minimises chapter 2's `training_losses`, the
#   hybrid $L_\text{simple} + \lambda L_\text{vlb}$ or $L_\text{simple}$.
#   With `label_dropout` $> 0$ that share of its labels becomes an extra
#   "null" label, `num_classes`, so it also learns the unconditional
#   model that classifier-free guidance needs (chapter 6);
# * an **upsampler** (chapter 7) minimises the same loss, given the
#   batch's images area-down-sampled, as the reference makes them;
# * a **noisy classifier** (chapter 6) minimises the cross-entropy of the
#   label given $x_t$ at a random $t$: guidance needs
#   $\nabla_{x_t} \log p(y \mid x_t)$ at every noise level.
#   `clean_fraction` shows a share of the images noise-free, and
#   `noised=false` all of them: the plain classifier.

# %%
#| export objectives
"""The per-image losses of the three kinds of model: a diffusion model, an
upsampler and a noisy classifier."""
import torch
import torch.nn.functional as F
from torch import Tensor

from adm_lib.batches import StepDraws
from adm_lib.config import TrainConfig
from adm_lib.diffusion import GaussianDiffusion, Model, training_losses


def diffusion_terms(config: TrainConfig, diffusion: GaussianDiffusion,
                    model: Model, x: Tensor, y: Tensor,
                    draws: StepDraws) -> dict[str, Tensor]:
    """Per-image loss terms of a diffusion model or an upsampler."""
    kwargs = {}
    if config.class_cond:
        kwargs["y"] = torch.where(draws.drop, config.num_classes, y)
    if config.kind == "upsampler":
        low_res = F.interpolate(x, config.small_size, mode="area")
        if config.low_res_noise:  # conditioning augmentation (chapter 7)
            low_res = diffusion.q_sample(low_res, draws.low_res_t,
                                         draws.low_res_noise)
            kwargs["low_res_t"] = diffusion.model_timesteps(draws.low_res_t)
        kwargs["low_res"] = low_res
    return training_losses(diffusion, model, x, draws.t, kwargs, draws.noise)


def classifier_terms(config: TrainConfig, diffusion: GaussianDiffusion,
                     model: Model, x: Tensor, y: Tensor,
                     draws: StepDraws) -> dict[str, Tensor]:
    """Cross-entropy and top-1/top-5 hits of a classifier on noised x."""
    clean = draws.clean
    x_t = torch.where(clean[:, None, None, None], x,
                      diffusion.q_sample(x, draws.t, draws.noise))
    t = torch.where(clean, torch.zeros_like(draws.t), draws.t)
    logits = model(x_t, diffusion.model_timesteps(t))
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    return {
        "loss": F.cross_entropy(logits, y, reduction="none"),
        "acc@1": (top[:, 0] == y).float(),
        "acc@5": (top == y[:, None]).any(dim=1).float(),
    }

# %% [markdown]
# ## 4.5 Mixed precision
#
# The paper's models were trained in 16-bit floating point with loss
# scaling: the reference's `--use_fp16 True`, in the commands it released
# them with. Its `fp16_util.py` stores the UNet's convolution weights in
# float16, keeps a float32 master copy of every weight for AdamW, and
# multiplies the loss by a scale $2^{\ell}$ before the backward pass,
# dividing the gradients by it before the step. The scale starts at
# $2^{20}$; a step whose gradient overflows is skipped and halves it
# ($\ell \leftarrow \ell - 1$), and every other step raises $\ell$ by
# 0.001, doubling the scale every 1,000 steps.
#
# The scale is there because float16 has 10 mantissa bits but a narrow
# range: gradients below about $6 \times 10^{-8}$ become zero, and values
# above 65,504 overflow. bfloat16 has float32's exponent range with 7
# mantissa bits, so it needs no scale. The relative error of storing a
# value in each format:

# %%
values = torch.logspace(-12, 6, 400, dtype=torch.float64)
fig, ax = plt.subplots(figsize=(6, 2.6))
for dtype in (torch.float16, torch.bfloat16):
    stored = values.to(dtype).double()
    error = ((stored - values).abs() / values).clamp(max=1)
    ax.loglog(values, error.clamp(min=1e-8), label=str(dtype)[6:])
ax.set(xlabel="|value|", ylabel="relative error (1 = lost)")
ax.legend()
plt.show()
tiny, big = torch.tensor(1e-8), torch.tensor(1e5)
assert tiny.half() == 0 != tiny.bfloat16() and torch.isinf(big.half())
assert (tiny * 2**16).half() != 0  # what the loss scaler is for

# %% [markdown]
# This book computes in 16 bits with PyTorch's autocast: the weights,
# AdamW and the diffusion arithmetic stay in float32, the convolutions and
# matrix products run in 16 bits, and the network's output returns to
# float32 before the loss, whose log-likelihood terms lose too much in 16
# bits. `precision="fp16"` adds PyTorch's loss scaler (the same rule, from
# $2^{16}$, doubling after 2,000 steps without an overflow), `"bf16"`
# needs none, and `"auto"`, the default, is bf16 where the device computes
# in it natively (GPUs since Ampere, CPUs with AVX-512-BF16 or AMX) and
# float32 elsewhere: emulated bf16 is several times slower. Ampere and
# Hopper tensor cores run fp16 and bf16 at the same peak, so bf16's gain
# is its range: no scale to tune, no step lost to an overflow. The loop's
# module starts here, importing every piece it puts together (precision's
# from the foundation's `adm_lib.devices`, appendix R.7):

# %%
#| export
"""The training loop: mixed precision, the EMA of the weights, gradient
accumulation and its application, and `train`."""
import contextlib
import copy
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from adm_lib.batches import (
    StepDraws,
    draw_step,
    open_data,
    resolve_config,
    split_data,
)
from adm_lib.checkpoints import (
    MetricsLog,
    checkpoint_path,
    pack_checkpoint,
    truncate_metrics,
    unpack_checkpoint,
)
from adm_lib.config import (
    RUN_FIELDS,
    TrainConfig,
    build_diffusion,
    build_model,
    config_from_dict,
    validate,
)
from adm_lib.data import DataError, ImageDataset, rank_loader, worker_error
from adm_lib.devices import (
    attention_kernels,
    autocast_model,
    fast_backends,
    memory_format,
    resolve_precision,
)
from adm_lib.diffusion import (
    GaussianDiffusion,
    LossAwareSampler,
    UniformSampler,
)
from adm_lib.errors import TrainError
from adm_lib.files import save_png
from adm_lib.objectives import classifier_terms, diffusion_terms
from adm_lib.ranks import Ranks, data_parallel, micro_sync, sum_ranks
from adm_lib.runlog import evaluate_classifier, sample_grid
from adm_lib.runs import (
    StepResult,
    exclude_pause,
    gather_steps,
    prepare_run,
    run_session,
    save_run,
    seed_dropout,
    skip_step,
)
from adm_lib.viz import to_uint8

# %% [markdown]
# Does bf16 change what a run learns? Two runs of the demo's model from
# one seed, in float32 and in bf16, see the same batches, timesteps and
# noise, so their per-step losses pair up and the batch-to-batch spread
# cancels from the gap. Over 400 steps at batch 4 this paired test sees
# bf16's rounding (one window of 100 steps 3.1 standard errors off), but
# every window's gap is under 0.7% of the loss, of either sign
# (appendix M.2). The rest of the fast path on a GPU, and bit-exact GPU
# runs, are the foundation's (appendix R.4 and R.7).
#
# ## 4.6 The exponential moving average
#
# The reference keeps $\bar\theta \leftarrow r\bar\theta + (1-r)\theta$ with
# $r = 0.9999$ from the first step, so after $n$ steps the average still
# holds $r^n$ of the random initialisation. We use the warm-up of
# TensorFlow's `ExponentialMovingAverage` (chapter 2's small loop had it
# inline): at update $n$ the decay is $\min\big(r, \frac{1+n}{10+n}\big)$,
# which averages roughly the last tenth of a short run and reaches $r$
# after about $10/(1-r)$ steps.

# %%
#| export
def ema_decay(rate: float, updates: int, warmup: bool = True) -> float:
    """The EMA decay at update number `updates` (0 for the first)."""
    return min(rate, (1 + updates) / (10 + updates)) if warmup else rate


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module,
               decay: float | Tensor) -> None:
    """ema <- decay * ema + (1 - decay) * model; `decay` may be a tensor."""
    ema_params = list(ema.parameters())
    params = [p.detach() for p in model.parameters()]
    # ema + (1 - decay)(model - ema), spelled out: lerp takes no tensor
    # weight, and a Python number made from one would wait for the device.
    delta = torch._foreach_sub(params, ema_params)
    torch._foreach_mul_(delta, 1 - decay)
    torch._foreach_add_(ema_params, delta)

# %%
# How much of the random initialisation each average still holds after
# $n$ steps, $\prod_{k<n} d_k$: without a warm-up it is $r^n$, which for the
# reference's measured CIFAR-10 run (rate 0.9995, 2,994 steps; see
# `shared/baselines`) is about a fifth, and its samples were pure noise.
# With the warm-up it is below $10^{-6}$ after 100 steps.
steps = np.arange(1, 100_001)
fig, ax = plt.subplots(figsize=(6, 2.6))
for rate in (0.9999, 0.9995):
    for warmup in (False, True):
        decays = [ema_decay(rate, k, warmup) for k in range(len(steps))]
        kept = np.exp(np.cumsum(np.log(decays)))
        ax.loglog(steps, np.maximum(kept, 1e-12),
                  label=f"r={rate}" + (", warm-up" if warmup else ""))
ax.set(xlabel="step n", ylabel="share of the initial weights")
ax.legend(fontsize=7)
plt.show()
reference_run = 0.9995 ** 2994
warm = np.prod([ema_decay(0.9995, k) for k in range(100)])
print(f"no warm-up, 2,994 steps: {reference_run:.3f}; "
      f"warm-up, 100 steps: {warm:.1e}")
assert 0.2 < reference_run < 0.25 and warm < 1e-6

# %% [markdown]
# ## 4.7 The loop
#
# What a run carries from step to step, and a checkpoint saves with every
# rank's random state, is `TrainState`: the network, its EMAs, AdamW, the
# fp16 loss scaler, the timestep sampler and the step. A resumed run must
# compute what it did: `config_mismatch` names the fields, `RUN_FIELDS`
# aside, that differ from the checkpoint's. The file itself, written whole
# or not at all, is the foundation's (appendix R.2).

# %%
#| export
def config_mismatch(saved: Mapping[str, Any],
                    config: TrainConfig) -> list[str]:
    """The fields (other than RUN_FIELDS) that differ from a checkpoint's."""
    try:
        before = asdict(config_from_dict(saved))
    except TrainError as err:
        return [str(err)]
    return [f"{k}: checkpoint {before[k]!r}, now {v!r}"
            for k, v in asdict(config).items()
            if k not in RUN_FIELDS and before[k] != v]


@dataclass
class TrainState:
    """What a checkpoint holds besides the config: all a run needs to go on."""

    model: nn.Module
    ema: dict[float, nn.Module]
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    sampler: UniformSampler
    step: int = 0
    nonfinite: int = 0  # non-finite steps in a row

    @classmethod
    def create(cls, config: TrainConfig,
               device: torch.device) -> "TrainState":
        """A fresh state: seeded initial weights, AdamW, EMA copies."""
        torch.manual_seed(config.seed)
        layout = memory_format(config.memory_format, device)
        model = build_model(config).to(device, memory_format=layout)
        ema = {rate: copy.deepcopy(model).requires_grad_(False).eval()
               for rate in config.ema_rate}
        # Fused: one kernel for all parameters' updates, not one per tensor,
        # and a step it can skip on the device (`apply_gradients`).
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=config.lr,
            weight_decay=config.weight_decay, fused=True)
        precision = resolve_precision(config.precision, device)
        scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        aware = config.schedule_sampler == "loss-second-moment"
        sampler = (LossAwareSampler if aware else UniformSampler)(
            config.diffusion_steps)
        return cls(model, ema, optimizer, scaler, sampler)

    def state_dict(self, config: TrainConfig,
                   rng: list[dict[str, Tensor]]) -> dict[str, Any]:
        """A checkpoint's contents (plain tensors and containers)."""
        sampler = (self.sampler.state_dict()
                   if isinstance(self.sampler, LossAwareSampler) else {})
        return pack_checkpoint(self.step, asdict(config), self.model,
                               self.ema, self.optimizer, self.scaler,
                               sampler, rng, self.nonfinite)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore everything but the RNG from a checkpoint."""
        unpack_checkpoint(state, self.model, self.ema, self.optimizer,
                          self.scaler)
        if isinstance(self.sampler, LossAwareSampler):
            self.sampler.load_state_dict(state["sampler"])
        self.step, self.nonfinite = state["step"], state["nonfinite"]


# %% [markdown]
# One step on each rank: read the rank's rows of the batch and the step's
# draws, flip the chosen images, set the learning rate (annealed linearly,
# like the reference's classifiers'), accumulate gradients, then apply them.
# `accumulate_gradients` splits the rows into micro-batches of
# `microbatch` images, for batches that do not fit in memory; each adds
# its share of the gradient, so the step's is the same however the batch
# is split (under DDP only the last all-reduces, appendix R.6).

# %%
#| export
def accumulate_gradients(config: TrainConfig, diffusion: GaussianDiffusion,
                         model: nn.Module, state: TrainState, x: Tensor,
                         y: Tensor, draws: StepDraws, device: torch.device
                         ) -> tuple[Tensor, dict[str, Tensor]]:
    """Forward and backward over micro-batches; the rank's loss and terms."""
    objective = (classifier_terms if config.kind == "classifier"
                 else diffusion_terms)
    precision = resolve_precision(config.precision, device)
    run = autocast_model(model, precision, device)
    share = len(x)
    micro = config.microbatch or share
    loss_sum, parts = torch.zeros((), device=device), []
    for start in range(0, share, micro):
        rows = slice(start, start + micro)
        last = start + micro >= share
        with micro_sync(model, last), attention_kernels(config.deterministic):
            terms = objective(config, diffusion, run, x[rows], y[rows],
                              draws.rows(rows))
            if config.kind != "classifier":  # importance-weighted, as logged
                raw = terms["loss"].detach()
                terms = {k: v * draws.weights[rows] for k, v in terms.items()}
                terms["raw_loss"] = raw
            loss = terms["loss"].sum() / share
            state.scaler.scale(loss).backward()
        loss_sum += loss.detach()
        parts.append({k: v.detach() for k, v in terms.items()})
    return loss_sum, {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


# %% [markdown]
# Applying them: unscale (fp16), measure or clip the norm, then step AdamW
# and the EMAs. The fused AdamW skips its update when its `found_inf`
# flag is set, which is how the fp16 loss scaler skips an overflowing
# step; we set it for every non-finite step, and give the EMAs a decay
# of 1 for it, on the device, so the host never waits (appendix R.7).
# One step, `train_step`, is what `adm train` repeats and what `adm bench`
# times. Its batch arrives as uint8 pixels and becomes floats in $[-1, 1]$
# on the device. It returns a `StepResult`, still on the device.

# %%
#| export
def apply_gradients(config: TrainConfig, state: TrainState, loss: Tensor,
                    ranks: Ranks) -> tuple[Tensor, Tensor]:
    """Clip, step AdamW and the EMAs; (loss finite, norm) on the device."""
    state.scaler.unscale_(state.optimizer)
    params = [p for p in state.model.parameters() if p.grad is not None]
    if config.grad_clip:
        norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    # The gradient norm is global already (DDP averaged the gradients).
    loss_ok = torch.isfinite(sum_ranks(ranks, loss.clone()))
    ok = loss_ok & torch.isfinite(norm)
    # What GradScaler.step does for a fused optimizer, but for a
    # non-finite loss too: the update kernel returns early when set.
    state.optimizer.found_inf = (~ok).float()
    state.optimizer.step()
    for rate, ema in state.ema.items():
        decay = ema_decay(rate, state.step, config.ema_warmup)
        update_ema(ema, state.model, torch.where(ok, decay, 1.0))
    state.scaler.update()
    state.optimizer.zero_grad(set_to_none=True)
    return loss_ok, norm


def learning_rate(config: TrainConfig, step: int) -> float:
    """The base rate, annealed linearly to 0 over lr_anneal_steps if set."""
    if not config.lr_anneal_steps:
        return config.lr
    return config.lr * max(0.0, 1 - step / config.lr_anneal_steps)


def train_step(config: TrainConfig, diffusion: GaussianDiffusion,
               model: nn.Module, state: TrainState, pixels: Tensor,
               y: Tensor, rows: slice, ranks: Ranks) -> StepResult:
    """One optimisation step on the rank's uint8 images."""
    device = ranks.device
    x = pixels.to(device, non_blocking=True).float() / 127.5 - 1
    x = x.contiguous(memory_format=memory_format(config.memory_format,
                                                 device))
    y = y.to(device, non_blocking=True)
    shape = (config.in_channels, config.image_size, config.image_size)
    draws = draw_step(config, state.sampler, state.step, shape, device,
                      rows=rows)
    x = torch.where(draws.flip[:, None, None, None], x.flip(3), x)
    lr = learning_rate(config, state.step)
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    loss, terms = accumulate_gradients(config, diffusion, model, state,
                                       x, y, draws, device)
    loss_ok, norm = apply_gradients(config, state, loss, ranks)
    state.step += 1
    return StepResult(state.step - 1, loss_ok, norm, draws.t, terms)

# %% [markdown]
# Every `log_interval` steps rank 0 averages the window into one line of
# `metrics.jsonl`: each loss term overall and by timestep quartile, the
# gradient norm, the learning rate, the speed and the skipped steps.
# Every `sample_interval` steps and at the end it draws a grid from the
# first EMA; a classifier instead reports held-out loss and top-1 and
# top-5 accuracy, raw and EMA, every `eval_interval` steps (0: never).
# Both use the same noise at every call, so they are comparable over
# training.

# %%
#| export runlog
"""A run's look at its model: sample grids, and a classifier's held-out
scores."""
from collections import defaultdict
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import default_collate

from adm_lib.batches import draw_step
from adm_lib.config import TrainConfig
from adm_lib.data import ImageDataset
from adm_lib.diffusion import (
    GaussianDiffusion,
    Model,
    UniformSampler,
    ddim_sample_loop,
    p_sample_loop,
    respace,
)
from adm_lib.objectives import classifier_terms
from adm_lib.seeds import step_seed


@torch.no_grad()
def sample_grid(config: TrainConfig, diffusion: GaussianDiffusion,
                model: Model, data: ImageDataset, indices: Tensor,
                device: torch.device) -> Tensor:
    """Fixed-noise samples for a grid (upsamplers: low-res, sample, truth)."""
    n = config.num_samples
    shape = (n, config.in_channels, config.image_size, config.image_size)
    g = torch.Generator(device).manual_seed(step_seed(config.seed, 5))
    noise = torch.randn(shape, generator=g, device=device)
    kwargs: dict[str, Tensor] = {}
    labels = torch.arange(n, device=device) % max(config.num_classes, 1)
    if config.kind == "upsampler":
        chosen = indices[:n].tolist()
        truth = torch.stack([data[i][0] for i in chosen]).to(device)
        labels = torch.tensor([data[i][1] for i in chosen], device=device)
        kwargs["low_res"] = F.interpolate(truth, config.small_size,
                                          mode="area")
        if config.low_res_noise:  # real inputs: shown to it as clean
            kwargs["low_res_t"] = torch.zeros(n, dtype=torch.long,
                                              device=device)
    if config.class_cond:
        kwargs["y"] = labels
    loop = (ddim_sample_loop if config.sample_steps.startswith("ddim")
            else p_sample_loop)
    spaced = respace(diffusion, config.sample_steps)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda"
                               else []):
        images = loop(spaced, model, noise, model_kwargs=kwargs)
    if config.kind == "upsampler":
        low = F.interpolate(kwargs["low_res"], config.image_size,
                            mode="nearest")
        images = torch.cat([low, images, truth])
    return images


@torch.no_grad()
def evaluate_classifier(config: TrainConfig, diffusion: GaussianDiffusion,
                        model: Model, data: ImageDataset, indices: Tensor,
                        device: torch.device) -> dict[str, float]:
    """Loss and top-1/top-5 accuracy on held-out images at seeded t."""
    chosen = indices[:config.eval_images or len(indices)]
    sampler = UniformSampler(diffusion.num_timesteps)
    eval_config = replace(config, batch_size=len(chosen), random_flip=False)
    shape = (config.in_channels, config.image_size, config.image_size)
    totals: dict[str, float] = defaultdict(float)
    for start in range(0, len(chosen), config.batch_size):
        rows = slice(start, start + config.batch_size)
        x, y = default_collate([data[i] for i in chosen[rows].tolist()])
        draws = draw_step(eval_config, sampler, 0, shape, device, stream=1,
                          rows=rows)
        terms = classifier_terms(config, diffusion, model, x.to(device),
                                 y.to(device), draws)
        for name, values in terms.items():
            totals[name] += values.sum().item()
    return {name: total / len(chosen) for name, total in totals.items()}

# %% [markdown]
# `train` puts the pieces together. What keeps a run safe to stop, resume
# and share is the foundation's ([appendix R](appendix_runs.html)): the
# run folder's lock and checks (`prepare_run`), checkpoints with every
# rank's random state (`save_run`), the ranks under `torchrun`, and
# reading the steps' results from the device only now and then
# (`gather_steps`). Two optional hooks serve later chapters: `init` loads
# a fine-tuned run's first weights into its fresh model and EMAs
# (`adm_lib.finetune`), and a `Watch` looks at the EMA every `interval`
# steps and at the end (FID while training: `adm_lib.evaluation`).

# %%
#| export
Init = Callable[[TrainConfig, nn.Module, list[nn.Module]], None]


class Watch(Protocol):
    """A look at the EMA every `interval` steps and at the end (rank 0)."""

    interval: int

    def __call__(self, config: TrainConfig, diffusion: GaussianDiffusion,
                 ema: nn.Module, data: ImageDataset, out: Path,
                 log: MetricsLog, step: int, device: torch.device) -> None:
        """Look at `ema` after `step` steps; log what it finds."""


def train(config: TrainConfig, out: str | os.PathLike, *,
          resume: bool = False, progress: bool = True,
          init: Init | None = None, watch: Watch | None = None) -> Path:
    """Train `config` in the run folder `out`; the last checkpoint's path.

    With `resume`, a run continues from its newest readable checkpoint as
    if never stopped; without it, `out` must hold no checkpoint.
    """
    validate(config)
    with run_session(config.device) as (ranks, held):
        return _train(config, Path(out), resume, progress, ranks, held,
                      init, watch)


def snapshot(config: TrainConfig, diffusion: GaussianDiffusion,
             state: TrainState, data: ImageDataset, indices: Tensor,
             out: Path, log: MetricsLog, device: torch.device) -> None:
    """Rank 0's look at the model: a sample grid, or held-out accuracy."""
    precision = resolve_precision(config.precision, device)
    ema = state.ema[config.ema_rate[0]]
    if config.kind == "classifier":
        state.model.eval()
        record = {"step": state.step}
        for prefix, net in (("val_", state.model), ("ema_val_", ema)):
            run = autocast_model(net, precision, device)
            scores = evaluate_classifier(config, diffusion, run, data,
                                         indices, device)
            record.update({prefix + k: v for k, v in scores.items()})
        state.model.train()
        log.append(record)
        return
    run = autocast_model(ema, precision, device)
    images = sample_grid(config, diffusion, run, data, indices, device)
    n = config.num_samples
    columns = (config.num_classes if config.class_cond
               and 1 < config.num_classes <= n else math.ceil(n ** 0.5))
    if config.kind == "upsampler":
        columns = n
    save_png(out / "samples" / f"step_{state.step:08d}.png",
             to_uint8(images), columns)

# %% [markdown]
# Before the first step the loop opens the data, builds the state and
# restores the newest checkpoint, if any. Then it reads each step's rows
# and takes the step. The steps' results wait on the device until the
# loop next logs, saves or looks at the model (every step with the
# loss-aware sampler, which learns from each before drawing the next);
# then `record_steps` reads them and judges each step as it would have
# been judged alone: a skipped step is counted and named, too many in a
# row stop the run, and the loss-aware sampler learns from each kept
# step's losses.

# %%
#| export
def _restore(config: TrainConfig, out: Path, resume: bool, ranks: Ranks,
             held: contextlib.ExitStack, init: Init | None = None
             ) -> tuple[TrainState, Path | None]:
    """The run's state, fresh or the newest checkpoint's; that checkpoint."""
    if config.batch_size % ranks.world_size:
        raise TrainError(f"batch_size={config.batch_size} does not split "
                         f"evenly over {ranks.world_size} processes")
    # Built before the run folder is touched: a setting that cannot work
    # (a network too large for the memory, say) leaves no folder behind.
    state = TrainState.create(config, ranks.device)
    if init is not None:  # fine-tuning: a fresh state from its weights
        init(config, state.model, list(state.ema.values()))
    found = prepare_run(out, asdict(config), config.steps, resume, ranks,
                        held, lambda saved: config_mismatch(saved, config))
    if found:
        state.load_state_dict(found[1])
    seed_dropout(config.seed, ranks, found)
    return state, found and found[0]

# %%
#| export
def _train(config: TrainConfig, out: Path, resume: bool, progress: bool,
           ranks: Ranks, held: contextlib.ExitStack,
           init: Init | None = None, watch: Watch | None = None) -> Path:
    """The loop of `train`, once the process group is up."""
    device = ranks.device
    fast_backends(device, config.precision, config.deterministic)
    data = open_data(config)
    config = resolve_config(config, data)
    data, train_idx, val_data, val_idx = split_data(config, data)
    diffusion = build_diffusion(config)
    state, last = _restore(config, out, resume, ranks, held, init)
    model = state.model
    if ranks.world_size > 1:
        model = data_parallel(model, device)
    # Compiled for the steps only: checkpoints keep the plain module's keys.
    run = torch.compile(model) if config.compile else model
    loader, sampler = rank_loader(
        data, train_idx, config.batch_size, config.seed, ranks.rank,
        ranks.world_size, state.step, config.num_workers,
        pin_memory=device.type == "cuda")
    log = None
    if ranks.main:
        log = MetricsLog(out / "metrics.jsonl", config.diffusion_steps,
                         out / "tensorboard" if config.tensorboard else None)
        truncate_metrics(log.path, state.step)
        (out / "samples").mkdir(exist_ok=True)
    look_every = (config.eval_interval if config.kind == "classifier"
                  else config.sample_interval)
    every = [n for n in (config.log_interval, config.save_interval,
                         look_every) if n]
    if isinstance(state.sampler, LossAwareSampler):
        every = [1]
    bar = tqdm(total=config.steps, initial=state.step, unit="step",
               desc=f"train {config.kind}",
               disable=not (progress and ranks.main))
    batches, pending = iter(loader), []
    while state.step < config.steps:
        try:
            pixels, y = next(batches)
        except DataError as err:
            raise DataError(worker_error(err)) from None
        pending.append(train_step(config, diffusion, run, state, pixels, y,
                                  sampler.rows, ranks))
        bar.update()
        done = state.step == config.steps
        if done or any(state.step % n == 0 for n in every):
            record_steps(config, state, pending, ranks, log, last)
            pending.clear()
        pause = time.perf_counter()
        if log and (state.step % config.log_interval == 0
                    or done and log.steps):
            record = log.write(state.step,
                               lr=learning_rate(config, state.step - 1))
            bar.set_postfix(loss=f"{record.get('loss', math.nan):.4g}",
                            img_s=f"{record['images_per_s']:.0f}")
        if state.step % config.save_interval == 0 or done:
            last = save_run(out, lambda rng: state.state_dict(config, rng),
                            state.step, config.keep_checkpoints, ranks)
        if log and look_every and (state.step % look_every == 0 or done):
            snapshot(config, diffusion, state, val_data, val_idx, out, log,
                     device)
        if log and watch and (state.step % watch.interval == 0 or done):
            watch(config, diffusion, state.ema[config.ema_rate[0]], data,
                  out, log, state.step, device)
        exclude_pause(bar, log, time.perf_counter() - pause)
    bar.close()
    return last if last is not None else checkpoint_path(out, state.step)

# %%
#| export
def record_steps(config: TrainConfig, state: TrainState,
                 results: list[StepResult], ranks: Ranks,
                 log: MetricsLog | None, last: Path | None) -> None:
    """Log the steps' global-batch terms; count and report skipped ones."""
    for step, loss_ok, norm, t, terms in gather_steps(results, ranks):
        # With fp16, a gradient that overflowed under a finite loss is the
        # scaler's: it lowers its scale, and the step is not counted.
        if not loss_ok or not (math.isfinite(norm)
                               or state.scaler.is_enabled()):
            state.nonfinite += 1
            skip_step(state.nonfinite, config.max_nonfinite, step, norm,
                      last)
            if log:
                log.skip()
            continue
        state.nonfinite = 0
        # The loss-aware sampler learns from unweighted losses (a
        # classifier's are never weighted).
        raw = terms.pop("raw_loss", terms["loss"])
        if isinstance(state.sampler, LossAwareSampler):
            state.sampler.update(t, raw)
        if log:
            log.add(t, terms, norm)

# %% [markdown]
# ## 4.8 Three models
#
# The diffusion model of 4.1 has two companions, runs of the same loop: a
# noisy classifier, which chapter 6 guides it with, and an 8 to 32 pixel
# upsampler, chapter 7's second stage. The upsampler takes 4.1's recipe
# too (`-p settings "{}"` gives the preset's: $\epsilon$, learned
# variances), the classifier its preset's, its learning rate annealed to
# zero.

# %%
started = time.perf_counter()
train(small("classifier", steps=classifier_steps,
            lr_anneal_steps=classifier_steps, **snapshots),
      runs / "classifier")
train(small("upsampler", steps=train_steps, **snapshots, **settings),
      runs / "upsampler")
print(f"two runs: {time.perf_counter() - started:.0f} s")
metrics = {kind: read_metrics(runs / kind) for kind in KINDS}
steps = {"diffusion": train_steps, "upsampler": train_steps,
         "classifier": classifier_steps}
assert all(metrics[k][-1]["step"] == steps[k] for k in KINDS)

# %% [markdown]
# The diffusion model's $L_\text{simple}$ by quartile of $t$. What is
# hard depends on the target. Predicting $x_0$, the noisiest quartile
# (q3) is hardest: there $x_t$ says little about the image, and the best
# guess is a blurred average of digits. Predicting $\epsilon$ it is the
# other way round: at high noise the best guess of $\epsilon$ is nearly
# $x_t$ itself, and the least noisy quartile (q0) is the hard one.

# %%
def curves(ax, records: list[dict], keys: list[str], title: str) -> None:
    """Plot the records' `keys` against their steps."""
    for key in keys:
        points = [(r["step"], r[key]) for r in records if key in r]
        ax.plot(*zip(*points, strict=True), label=key)
    ax.set(title=title, xlabel="step")
    ax.legend(fontsize=7)


quartiles = [f"mse_q{q}" for q in range(4)]
fig, axes = plt.subplots(1, 3, figsize=(11, 3))
curves(axes[0], metrics["diffusion"], quartiles, "diffusion: mse by quartile")
axes[0].set_yscale("log")
curves(axes[1], metrics["classifier"],
       ["loss", "val_acc@1", "ema_val_acc@1"], "noisy classifier")
curves(axes[2], metrics["upsampler"], quartiles, "upsampler: mse by quartile")
axes[2].set_yscale("log")
fig.tight_layout()
if figures_dir:
    fig.savefig(Path(figures_dir) / "04_cpu_run_curves.png", dpi=120)
plt.show()
assert metrics["diffusion"][-1]["mse"] < metrics["diffusion"][0]["mse"]
evaluations = [r for r in metrics["classifier"] if "val_acc@1" in r]
assert len(evaluations) == -(-classifier_steps // snapshot_every)
assert all(0 <= r["ema_val_acc@5"] <= 1 for r in evaluations)

# %%
# The upsampler's last grid: its 8-pixel inputs, its samples, and the
# real images (with `figures_dir` set, under 4.1's grids, as recorded).
up = sorted((runs / "upsampler" / "samples").glob("step_*.png"))[-1]
fig = show_grids([*grids, up] if figures_dir else [up], last_height=3)
if figures_dir:
    fig.savefig(Path(figures_dir) / "04_cpu_run_samples.png", dpi=120)
plt.show()
assert up.exists()

# %% [markdown]
# In the recorded run (appendix M.3) the diffusion model's loss in $x_0$
# falls from 0.203 to 0.050, 0.133 in the noisiest quartile against
# 0.0049 in the least noisy; the upsampler, which sees its 8-pixel input,
# has a sixth of that loss at q3; the classifier puts 77.2% of 500
# held-out noised images (EMA: 77.4%, each $\pm$ 1.9 points) in the
# right class.
#
# ![Loss curves of the recorded CPU run](figures/04_cpu_run_curves.png)
#
# ## 4.9 A recipe for minutes
#
# The paper's recipe (predict $\epsilon$, learn the variances, an EMA at
# 0.9999) is made for hundreds of thousands of steps; with a few hundred,
# `adm demo`'s digits sat on grey backgrounds, mostly not of the class
# asked for. Recipes were measured as the demo uses them (MNIST-5k, batch
# 32, learning rate $10^{-3}$, 200 samples per checkpoint scored by
# chapter 5's MNIST network: the share in the class asked for, $\pm$ 2 to
# 3.5 points; appendix M.5 has the study, M.8 the error bars):
#
# * **Predict $x_0$ under $L_\text{simple}$.** At 400 steps: 76.5% in
#   class, against 16.0% for the paper's recipe and 15.0% for $x_0$ with
#   learned variances ($61.5 \pm 3.9$ points); early on the
#   $L_\text{vlb}$ term dominated, and the mean fitted worse with it.
# * **Guide ancestrally.** With a noisy classifier at scale 1, 25 DDIM
#   steps put 48.5% in class, 25 ancestral steps 95.0%
#   ($46.5 \pm 3.9$): DDIM's first step, at the cosine schedule's clipped
#   $\beta_T$, moves $x$ by $1{,}326\,g$ for the classifier's gradient $g$
#   (chapter 6.1).
# * **A leaner network** (one-convolution resampling, 32 channels at
#   $16 \times 16$) learned as much per step ($3.5 \pm 3.1$ points ahead)
#   in 0.60 of the time.
# * **Not settled:** the EMA at 0.95 ($4.5 \pm 3.1$ points above the raw
#   weights; 0.999: $2.5 \pm 3.2$) and the learning rate
#   ($2 \times 10^{-3}$: $5.0 \pm 3.6$ behind). The demo keeps both.
#
# Together, with a 400-step classifier, 800 steps in bf16 put 95.0% of
# the guided digits in class, four training seeds' means $\pm 0.8$ points
# apart; bf16 learned what float32 did ($2.0 \pm 1.8$ points apart) three
# times faster a step, so a CPU without it trains 350 steps, about five
# minutes. No conclusion rests on FID, which at $n = 200$ has a floor.
#
# ![The demo's guided accuracy and FID against training minutes, in
# bf16](figures/04_demo_curve_bf16.png)
#
# ## Summary
#
# * A run is one `TrainConfig` and a folder; the paper's models are
#   presets, with the reference's released flags and the optimisation of
#   the paper's Tables 11 to 13; `train` trains one.
# * A step's draws are a function of `(seed, step)`, so a resumed or
#   split run draws what the uninterrupted one does.
# * The three kinds of model differ only in their per-image loss.
# * bf16 autocast needs no loss scale, keeps the losses within 0.7% of
#   float32's, and is the default where the device computes in it.
# * The EMA's warm-up makes short runs' averages usable.
# * For runs of minutes, predict $x_0$ under $L_\text{simple}$ and guide
#   ancestrally.
#
# Chapter 5 loads runs back (`load_run`), trains chapter 3's ablations
# with this loop and measures them; chapter 6 guides a class-conditional
# model with a noisy classifier it trains.
#
# ## Exercises
#
# 1. **The EMA's warm-up and rate.** Show that while
#    $\frac{1+k}{10+k} < r$ the warm-up keeps $1 / \binom{n+9}{9}$ of the
#    initial weights after $n$ updates, and predict the update at which
#    `ema_decay` first returns $r$, for 0.9999 and the demo's 0.95. Past
#    its warm-up an EMA gives the weights of $k$ steps ago the weight
#    $(1-r) r^k$: predict how many of an 800-step run's last steps carry
#    half of its average at each rate. Check all three.
# 2. **The hybrid's $\lambda$.** `training_losses` adds
#    $\lambda T \cdot L_t$ to each image's $L_\text{simple}$, where $L_t$ is
#    the sampled step's term of the bound. Predict that weight for
#    $T = 1000$ and $T = 4000$, with `rescale_learned_sigmas` (the paper's
#    $\lambda = 0.001$) and without (the reference's default), and predict
#    which of the network's outputs, the mean's channels or the
#    variance's, receive a gradient from $L_t$. Check both.
# 3. **The loss-aware sampler.** `LossAwareSampler` draws $t$ with
#    $p_t \propto \sqrt{E[L_t^2]}$ and weights each loss by
#    $w_t = 1/(T p_t)$. Show that the weighted loss has the expectation of
#    uniform sampling. For four steps whose losses are always 8, 4, 2 and
#    1, predict $p_t$ and the variance of the weighted loss against
#    uniform sampling's, then check.
# 4. **fp16 and bf16.** From float16's 5 exponent and 10 mantissa bits,
#    derive its largest finite value and its smallest positive
#    (subnormal) one; then bfloat16's, from 8 and 7. Check them with
#    `torch.finfo` and by casting powers of two, and find them on the plot
#    of 4.5.

# %% [markdown] jupyter={"source_hidden": true} tags=["solution"]
# **Solution 1.** While the warm-up rules, the decay at update $k$ is
# $\frac{1+k}{10+k}$, and the product telescopes in blocks of nine:
# $\prod_{k<n} \frac{k+1}{k+10} = \frac{n!\,9!}{(n+9)!} =
# 1/\binom{n+9}{9}$. The decay reaches $r$ at $n \ge \frac{10r - 1}{1 - r}$:
# update 170 for 0.95, 89,990 for 0.9999, far beyond the MNIST preset's
# 5,000 steps. The last $k$ steps carry $1 - r^k$ of the average, half at
# $k = \ln 2 / (1 - r)$: 13.9 steps at 0.95, 6,931 at 0.9999. But within
# 800 updates the warm-up's decay stays below any rate above
# $801/810 = 0.989$, so all such rates give one average, half of it from
# the last 60 steps: an 800-step run cannot use 0.9999 as such.

# %% jupyter={"source_hidden": true} tags=["solution"]
from math import comb

from adm_lib.train import ema_decay


def ema_weights(rate: float, n: int) -> np.ndarray:
    """The weight of each update's weights in the average after n."""
    decays = np.array([ema_decay(rate, k) for k in range(n)])
    later = np.append(np.cumprod(decays[::-1])[::-1][1:], 1.0)
    return (1 - decays) * later


first = {r: next(n for n in range(200_000) if ema_decay(r, n) == r)
         for r in (0.95, 0.9999)}
halves = {r: int(np.searchsorted(np.cumsum(ema_weights(r, 800)[::-1]),
                                 0.5)) + 1 for r in (0.9999, 0.95)}
print("first update at the rate:", first, "; half of the average from "
      "the last steps:", halves)
assert first == {0.95: 170, 0.9999: 89_990}
assert np.isclose(warm, 1 / comb(109, 9), rtol=1e-9)
assert halves == {0.9999: 60, 0.95: 14}  # ln 2 / 0.05 = 13.9
assert np.allclose(ema_weights(0.99, 800), ema_weights(0.9999, 800))

# %% [markdown] jupyter={"source_hidden": true} tags=["solution"]
# **Solution 2.** The weight is `lambda_vlb` $\times T$: 1 at any $T$ with
# the reference's default $\lambda = 1/T$; $T/1000$ with the paper's
# $\lambda = 0.001$ (1 at $T = 1000$, 4 at $T = 4000$), which keeps the
# bound's share of the loss, $T$ times the mean $L_t$, fixed as $T$ grows.
# The bound sees the mean through a stop-gradient, so only the variance's
# channels get its gradient: $\lambda$ sets how fast the variance learns.

# %% jupyter={"source_hidden": true} tags=["solution"]
from adm_lib.config import build_diffusion
from adm_lib.diffusion import training_losses

for steps in (1000, 4000):
    for rescale in (False, True):
        diffusion = build_diffusion(make_config("diffusion", "mnist", {
            "diffusion_steps": steps, "rescale_learned_sigmas": rescale}))
        weight = diffusion.lambda_vlb * diffusion.num_timesteps
        print(f"T = {steps}, rescale {rescale}: weight {weight:g}")
        assert np.isclose(weight, steps / 1000 if rescale else 1)
output = torch.zeros(2, 2, 8, 8, requires_grad=True)  # mean, variance
terms = training_losses(diffusion, lambda x, t: output,
                        torch.zeros(2, 1, 8, 8), torch.tensor([10, 900]),
                        noise=torch.randn(2, 1, 8, 8))
terms["vb"].sum().backward()
assert output.grad[:, 0].abs().max() == 0 < output.grad[:, 1].abs().max()

# %% [markdown] jupyter={"source_hidden": true} tags=["solution"]
# **Solution 3.** $E_{t \sim p}[w_t L_t] = \sum_t p_t L_t / (T p_t) =
# \frac1T \sum_t L_t$, the uniform expectation, for any $p$ with no zero.
# With losses 8, 4, 2, 1 every time, $\sqrt{E[L_t^2]} = L_t$, so
# $p = (8, 4, 2, 1)/15$ (and a 0.1% share of uniform), and
# $w_t L_t = 15/4$ at every $t$: almost no variance, where uniform
# sampling's is 7.2: fewer draws of the steps whose loss is small.

# %% jupyter={"source_hidden": true} tags=["solution"]
from adm_lib.diffusion import LossAwareSampler

losses = torch.tensor([8.0, 4.0, 2.0, 1.0])
aware = LossAwareSampler(4, history_per_term=2)
for _ in range(2):
    aware.update(torch.arange(4), losses)
p = aware.weights() / aware.weights().sum()
t, w = aware.sample(100_000, generator=torch.Generator().manual_seed(seed))
weighted = (w * losses[t]).double()
print("p_t:", p.round(4), f"weighted loss: mean {weighted.mean():.3f}, "
      f"variance {weighted.var():.4f}; uniform: "
      f"{losses.var(correction=0):.2f}")
assert np.allclose(p, 0.999 * losses.numpy() / 15 + 0.001 / 4)
assert abs(weighted.mean() - 3.75) < 0.01 and weighted.var() < 0.01

# %% [markdown] jupyter={"source_hidden": true} tags=["solution"]
# **Solution 4.** A normal float is $1.f \times 2^{e - b}$ with bias
# $b = 2^{E-1} - 1$ for $E$ exponent bits, the largest exponent field
# reserved for infinities. float16 ($E = 5$, $b = 15$, 10 mantissa bits):
# largest $(2 - 2^{-10}) \times 2^{15} = 65{,}504$, smallest subnormal
# $2^{-14-10} = 2^{-24} \approx 6.0 \times 10^{-8}$. bfloat16 ($E = 8$,
# $b = 127$, 7 bits): largest $(2 - 2^{-7}) \times 2^{127} \approx
# 3.39 \times 10^{38}$, smallest subnormal $2^{-126-7} = 2^{-133} \approx
# 9.2 \times 10^{-41}$: on the plot float16's curve jumps to 1 (lost)
# below $6 \times 10^{-8}$ and above 65,504, bfloat16's stays at $2^{-8}$.

# %% jupyter={"source_hidden": true} tags=["solution"]
for dtype, big, tiny in ((torch.float16, (2 - 2**-10) * 2**15, 2.0**-24),
                         (torch.bfloat16, (2 - 2**-7) * 2**127, 2.0**-133)):
    assert torch.finfo(dtype).max == big
    assert torch.tensor(tiny).to(dtype) == tiny
    assert torch.tensor(tiny / 2).to(dtype) == 0  # a tie, rounded to even
print(f"largest: float16 {torch.finfo(torch.float16).max:g}, bfloat16 "
      f"{torch.finfo(torch.bfloat16).max:.3g}")
