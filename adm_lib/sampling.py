"""What `adm sample` does: load models, draw guided samples, write them.

Hand-written tooling around `adm_lib.guidance` (chapter 6). A model comes
from a run folder or checkpoint of `adm train`, or from a released
checkpoint of the reference with its flags (`adm_lib.compat`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from adm_lib.checkpoints import load_run
from adm_lib.compat import guided_diffusion as gd
from adm_lib.config import TrainError
from adm_lib.diffusion import GaussianDiffusion, respace
from adm_lib.guidance import (
    SAMPLERS,
    classifier_cond_fn,
    classifier_free_model,
    ignore_labels,
    sample_batches,
)
from adm_lib.metrics import write_batch
from adm_lib.runlog import save_png


class SampleError(ValueError):
    """Sampling cannot go ahead as asked; the message says why."""


@dataclass
class Loaded:
    """A network ready to sample with, and what it was trained on."""

    model: nn.Module
    diffusion: GaussianDiffusion
    image_size: int
    in_channels: int
    num_classes: int  # 0: unconditional (a model) or unknown
    respacing: str  # the respacing its flags ask for, if any
    null_label: int | None  # classifier-free guidance's label, if trained
    source: str


def load_network(path: str | os.PathLike, kind: str,
                 flags: str | None = None, weights: str = "ema",
                 device: str | torch.device = "cpu") -> Loaded:
    """A diffusion model or classifier: ours (a run), or the reference's.

    `kind` is "diffusion" or "classifier". With `flags`, `path` is a
    released checkpoint of the reference described by those flags.
    """
    path = Path(path)
    if flags is not None:
        return _load_reference(path, kind, flags, device)
    try:
        run = load_run(path, weights, device)
    except TrainError as err:
        hint = ("" if path.is_dir() else "; for a checkpoint of the "
                f"reference, pass its flags (--{_flag_option(kind)})")
        raise SampleError(f"{err}{hint}") from None
    config = run.config
    if config.kind != kind:
        raise SampleError(f"{path} is a {config.kind} run, not a {kind}"
                          + (" (an upsampler needs low-resolution inputs: see the "
                             "cascade in chapters/appendix_checkpoints.py)"
                             if config.kind == "upsampler" else ""))
    labelled = kind == "classifier" or config.class_cond
    return Loaded(run.model, run.diffusion, config.image_size,
                  config.in_channels, config.num_classes if labelled else 0,
                  "", config.num_classes if config.label_dropout else None,
                  f"{run.path} (step {run.step}, {weights} weights)")


def _flag_option(kind: str) -> str:
    return "model-flags" if kind == "diffusion" else "classifier-flags"


def _load_reference(path: Path, kind: str, flags: str,
                    device: str | torch.device) -> Loaded:
    try:
        f = gd.parse_flags(flags)
        respacing = f.pop("timestep_respacing", "")
        model = gd.load_checkpoint(path, f, "model" if kind == "diffusion"
                                   else "classifier")
        diffusion = gd.diffusion_from_flags(f)
    except (ValueError, FileNotFoundError) as err:
        raise SampleError(str(err)) from None
    labelled = kind == "classifier" or f["class_cond"]
    model.to(device).requires_grad_(False)
    return Loaded(model, diffusion, f["image_size"], f.get("in_channels", 3),
                  f.get("num_classes", gd.NUM_CLASSES) if labelled else 0,
                  respacing, None, f"{path} (reference flags)")


def check_options(classifier: object | None = None, *,
                  classifier_scale: float = 1.0, cfg_scale: float = 0.0,
                  sampler: str = "ddpm", eta: float = 0.0,
                  guide_at_mean: bool = False, num_samples: int = 16,
                  labels: str | None = None, batch_size: int = 64) -> None:
    """Raise SampleError naming the first option that cannot work.

    What `sample` takes, checked before any model is loaded; `classifier`
    is anything standing for one (a path, a network), or None.
    """
    if sampler not in SAMPLERS:
        raise SampleError(f"--sampler must be one of {', '.join(SAMPLERS)}")
    for flag, value in (("--classifier-scale", classifier_scale),
                        ("--cfg-scale", cfg_scale)):
        if not (math.isfinite(value) and value >= 0):
            raise SampleError(f"{flag} {value}: expected a finite number "
                              ">= 0")
    # eta 0 is DDIM, 1 the ancestral sampler's noise; above 1 the DDIM
    # step's square root goes negative (NaN samples).
    if not 0 <= eta <= 1:
        raise SampleError(f"--eta {eta}: expected a number in [0, 1]")
    for flag, value in (("--num-samples", num_samples),
                        ("--batch-size", batch_size)):
        if value < 1:
            raise SampleError(f"{flag} {value}: expected a number >= 1")
    if guide_at_mean and (classifier is None or sampler != "ddpm"):
        raise SampleError("--guide-at mean needs a classifier and the ddpm "
                          "sampler (Algorithm 1)")
    _label_list(labels)


def check_out(out: str | os.PathLike,
              columns: int | None = None) -> Path:
    """`out` as a writable .npz path, and `columns` positive, or SampleError."""
    out = Path(out)
    if out.suffix != ".npz":
        raise SampleError(f"--out {out}: the batch file must end in .npz")
    if out.is_dir():
        raise SampleError(f"--out {out} is a folder; name a file in it")
    if not out.parent.is_dir():
        raise SampleError(f"--out {out}: no folder {out.parent}")
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise SampleError(f"--out {out}: cannot write in {out.parent}")
    if columns is not None and columns < 1:
        raise SampleError(f"--grid-columns {columns}: expected a number "
                          ">= 1")
    return out


def _label_list(text: str | None) -> list[int] | None:
    """--labels as class numbers; None for "random" (or not given)."""
    if text in (None, "random"):
        return None
    try:
        chosen = [int(word) for word in text.split(",") if word.strip()]
    except ValueError:
        chosen = []
    if not chosen or min(chosen) < 0:
        raise SampleError(f"--labels {text!r}: expected 'random' or class "
                          "numbers such as 0,3,7")
    return chosen


def parse_labels(text: str | None, count: int, num_classes: int,
                 seed: int) -> torch.Tensor | None:
    """The labels of `count` samples: "random", or a list cycled through."""
    chosen = _label_list(text)
    if num_classes == 0:
        if chosen is not None:
            raise SampleError("--labels needs a class-conditional model or "
                              "a classifier")
        return None
    if chosen is None:
        g = torch.Generator().manual_seed(seed)
        return torch.randint(num_classes, (count,), generator=g)
    bad = [y for y in chosen if not 0 <= y < num_classes]
    if bad:
        raise SampleError(f"--labels: {bad} outside the model's "
                          f"{num_classes} classes (0 to {num_classes - 1})")
    return torch.tensor(chosen).repeat(math.ceil(count / len(chosen)))[:count]


def sample(model: Loaded, classifier: Loaded | None = None, *,
           classifier_scale: float = 1.0, cfg_scale: float = 0.0,
           sampler: str = "ddpm", respacing: str | None = None,
           eta: float = 0.0, guide_at_mean: bool = False,
           num_samples: int = 16, labels: str | None = None,
           batch_size: int = 64, device: str | torch.device = "cpu",
           seed: int = 0, progress: bool = False, precision: str = "auto",
           ) -> tuple[np.ndarray, np.ndarray | None]:
    """Samples of `model`, guided as asked; uint8 NHWC and labels.

    `precision` is the network's ("auto": bf16 where the device has it
    natively, else fp32; see chapter 4).
    """
    check_options(classifier, classifier_scale=classifier_scale,
                  cfg_scale=cfg_scale, sampler=sampler, eta=eta,
                  guide_at_mean=guide_at_mean, num_samples=num_samples,
                  labels=labels, batch_size=batch_size)
    net: Any = model.model
    num_classes = model.num_classes
    if classifier is not None:
        _check_pair(model, classifier)
        num_classes = classifier.num_classes
        if not model.num_classes:
            net = ignore_labels(net)
    if cfg_scale:
        if model.null_label is None:
            raise SampleError(f"--cfg-scale needs a model trained with label "
                              f"dropout (adm train ... --set "
                              f"label_dropout=0.1); {model.source} was not")
        net = classifier_free_model(net, cfg_scale, model.null_label)
    if respacing is None:
        respacing = model.respacing or default_respacing(
            sampler, model.diffusion.num_timesteps)
    try:
        spaced = respace(model.diffusion, respacing)
    except (ValueError, AssertionError) as err:
        raise SampleError(f"--respacing {respacing!r}: {err}") from None
    y = parse_labels(labels, num_samples, num_classes, seed)
    cond_fn = None
    if classifier is not None and classifier_scale:
        cond_fn = classifier_cond_fn(classifier.model, classifier_scale)
    shape = (model.in_channels, model.image_size, model.image_size)
    return sample_batches(spaced, net, num_samples, shape, y, batch_size,
                          device, seed, progress, precision,
                          sampler=sampler, cond_fn=cond_fn,
                          guide_at_mean=guide_at_mean, eta=eta)


def default_respacing(sampler: str, num_timesteps: int) -> str:
    """The paper's: 250 ancestral steps, or DDIM's 25 (fewer if T is)."""
    if sampler == "ddim":
        return "ddim25" if num_timesteps % 25 == 0 else str(
            min(25, num_timesteps))
    return str(min(250, num_timesteps))


def _check_pair(model: Loaded, classifier: Loaded) -> None:
    if classifier.image_size != model.image_size:
        raise SampleError(f"the classifier sees {classifier.image_size}px "
                          f"images, the model makes {model.image_size}px")
    if classifier.in_channels != model.in_channels:
        raise SampleError(f"the classifier takes {classifier.in_channels} "
                          f"channels, the model makes {model.in_channels}")
    if model.num_classes and classifier.num_classes != model.num_classes:
        raise SampleError(f"the model has {model.num_classes} classes, the "
                          f"classifier {classifier.num_classes}")
    steps = (model.diffusion.num_timesteps, classifier.diffusion.num_timesteps)
    if steps[0] != steps[1]:
        raise SampleError(f"the model diffuses over {steps[0]} steps, the "
                          f"classifier was trained on {steps[1]}")


def write_samples(out: str | os.PathLike, images: np.ndarray,
                  labels: np.ndarray | None,
                  columns: int | None = None) -> tuple[Path, Path]:
    """The batch file (.npz) and a PNG grid beside it."""
    out = check_out(out, columns)
    columns = columns or math.ceil(math.sqrt(len(images)))
    batch = write_batch(out, images, labels)
    return batch, save_png(out.with_suffix(".png"), images, columns)
