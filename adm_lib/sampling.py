"""What `adm sample` does: load models, draw guided samples, write them.

Hand-written tooling around `adm_lib.guidance` (chapter 6) and
`adm_lib.cascade` (chapter 7). A model comes from a run folder or
checkpoint of `adm train`, or from a released checkpoint of the reference
with its flags (`adm_lib.compat`).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from adm_lib import cascade as cs
from adm_lib import guidance
from adm_lib.compat import guided_diffusion as gd
from adm_lib.config import KINDS
from adm_lib.data import MAX_CLASSES, DataError, load_dataset
from adm_lib.devices import PRECISIONS
from adm_lib.diffusion import Model, respace
from adm_lib.errors import TrainError, with_article
from adm_lib.files import hold_lock, save_png
from adm_lib.guidance import (
    CondFn,
    classifier_cond_fn,
    classifier_free_model,
    ignore_labels,
    sample_batches,
)
from adm_lib.metrics import read_batch, write_batch
from adm_lib.models import TrainedModel, load_run
from adm_lib.solvers import ALL_SAMPLERS, SOLVERS, network_calls, solver_sample
from adm_lib.values import MAX_SEED, coerce, flag, option


class SampleError(ValueError):
    """Sampling cannot go ahead as asked; the message says why."""


# Algorithm 1 takes the gradient at the mean; `adm sample` says so, before
# any model loads, without a classifier too.
GUIDE_AT_MEAN = ("--guide-at mean needs a classifier and the ddpm sampler "
                 "(Algorithm 1)")
# default_respacing's
_STEPS = ("(default: 250 for ddpm, ddim25 for ddim, 20 for dpm++2m, 10 for "
          "heun)")


@dataclass(frozen=True)
class SampleOptions:
    """How `adm sample` draws: each field is one of its flags (values.flag),
    with its default, choices and help written here only. Each is checked
    once, as the options are made: a bad one raises SampleError naming its
    flag."""

    classifier_scale: float = option(
        1.0, "guidance scale s (default %(default)s)", metavar="S")
    cfg_scale: float = option(
        0.0, "classifier-free guidance w, for a model trained with "
        "label_dropout (default %(default)s: none)", metavar="W")
    sampler: str = option(
        "ddpm", "ancestral (Algorithm 1), DDIM (Algorithm 2), or chapter "
        "8's solvers DPM-Solver++(2M) and EDM's Heun (Algorithm 2's shift) "
        "(default %(default)s)", choices=ALL_SAMPLERS)
    respacing: str | None = option(
        None, f"steps to keep: 250, ddim25, 10,15,20 ... {_STEPS}",
        metavar="SPEC")
    # eta 0 is DDIM, 1 the ancestral sampler's noise; above 1 the DDIM
    # step's square root goes negative (NaN samples).
    eta: float = option(
        0.0, "DDIM's stochasticity, in every stage that samples with ddim "
        "(default %(default)s)")
    guide_at: str = option(
        "x_t", "where Algorithm 1 takes the classifier's gradient (default "
        "%(default)s, as the reference)", choices=("x_t", "mean"))
    num_samples: int = option(
        16, "samples to draw (default %(default)s)", metavar="N")
    labels: str | None = option(  # None: random, or the inputs' own
        None, "class labels, cycled through the samples (default random; "
        "with --low-res, the images' own)", metavar="random|Y,Y,...")
    upsampler_sampler: str = option(
        "ddpm", "the upsampler's sampler (default %(default)s)",
        choices=ALL_SAMPLERS)
    upsampler_respacing: str | None = option(
        None, f"the upsampler's steps {_STEPS}", metavar="SPEC")
    low_res_t: int | None = option(  # None: the cascade's default
        None, "step the upsampler's inputs are noised to, for one trained "
        "with low_res_noise (default: half of it; 0: none)", metavar="S")
    batch_size: int = option(
        64, "samples drawn at once; they do not depend on it (default "
        "%(default)s)", metavar="N")
    seed: int = option(
        0, f"seed of the noise and of random labels, 0 to {MAX_SEED} "
        "(default %(default)s)", least=0, limit=MAX_SEED + 1)
    precision: str = option(
        "auto", "the network's: %(default)s (default) is bf16 where the "
        "device has it natively, else fp32", choices=PRECISIONS)

    def __post_init__(self) -> None:
        """Raise SampleError naming the first option that cannot work."""
        for field in fields(self):
            value = getattr(self, field.name)
            choices = field.metadata.get("choices")
            if choices and value not in choices:
                raise SampleError(f"{flag(field.name)} {value!r}: expected "
                                  f"one of {', '.join(choices)}")
        for name in ("classifier_scale", "cfg_scale"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise SampleError(f"{flag(name)} {value}: expected a finite "
                                  "number >= 0")
        if not 0 <= self.eta <= 1:
            raise SampleError(f"--eta {self.eta}: expected a number in "
                              "[0, 1]")
        for name in ("num_samples", "batch_size"):
            if getattr(self, name) < 1:
                raise SampleError(f"{flag(name)} {getattr(self, name)}: "
                                  "expected a number >= 1")
        if not 0 <= self.seed <= MAX_SEED:
            raise SampleError(f"--seed {self.seed}: expected a whole number "
                              f"from 0 to {MAX_SEED}")
        if self.guide_at == "mean" and self.sampler != "ddpm":
            raise SampleError(GUIDE_AT_MEAN)
        for name in ("sampler", "upsampler_sampler"):
            if self.eta and getattr(self, name) in SOLVERS:
                raise SampleError(
                    f"--eta {self.eta:g}: {flag(name)} "
                    f"{getattr(self, name)} adds no noise (eta is DDIM's)")
        for name in ("respacing", "upsampler_respacing"):
            _check_spec(flag(name), getattr(self, name))
        _classes(self.labels)

    @property
    def classes(self) -> tuple[int, ...] | None:
        """--labels as class numbers; None for "random" (or not given)."""
        return _classes(self.labels)

    @property
    def guide_at_mean(self) -> bool:
        """Whether Algorithm 1 takes the gradient at the mean, not x_t."""
        return self.guide_at == "mean"


def _check_spec(name: str, spec: str | None) -> None:
    """Raise SampleError, naming `name`, for a respacing that cannot be
    one: not a spec of chapter 2's `space_timesteps`, or a count below 1.
    Whether the model's steps hold it is checked once it has loaded."""
    if not spec:  # None: the default; "": every step
        return
    if not re.fullmatch(r"(ddim)?\d+|\d+(,\d+)*", spec):
        raise SampleError(f"{name} {spec!r}: expected a step count, counts "
                          "per section such as 10,15,20, or ddimN")
    if any(int(count) < 1 for count in re.findall(r"\d+", spec)):
        raise SampleError(f"{name} {spec!r}: expected steps >= 1")


def _classes(labels: str | None) -> tuple[int, ...] | None:
    """`labels` as class numbers, None for "random" (or None), or
    SampleError."""
    if labels in (None, "random"):
        return None
    try:
        chosen = coerce(labels, (0,))
    except ValueError:
        chosen = ()
    if not chosen or not all(isinstance(y, int) and y >= 0 for y in chosen):
        raise SampleError(f"--labels {labels!r}: expected 'random' or class "
                          "numbers such as 0,3,7")
    return chosen


def load_network(path: str | os.PathLike, kind: str,
                 flags: str | None = None, weights: str = "ema",
                 device: str | torch.device = "cpu",
                 compile: bool = False, precision: str = "auto"
                 ) -> TrainedModel:
    """A diffusion model, classifier or upsampler: ours, or the reference's.

    `kind` is one of KINDS. With `flags`, `path` is a released checkpoint
    of the reference described by those flags. The network is prepared
    for sampling on `device` at `precision` (chapter 6's
    `prepare_for_sampling`: what `adm bench` times), and compiled if
    `compile`.
    """
    if kind not in KINDS:
        raise SampleError(f"kind {kind!r}: expected one of "
                          f"{', '.join(KINDS)}")
    path = Path(path)
    if flags is not None:
        try:
            trained = gd.load_trained(path, flags, kind, device)
        except (ValueError, FileNotFoundError) as err:
            raise SampleError(str(err)) from None
    else:
        trained = _load_run(path, kind, weights, device)
    trained.model = guidance.prepare_for_sampling(
        trained.model, device, precision, compile=compile)
    return trained


def _load_run(path: Path, kind: str, weights: str,
              device: str | torch.device) -> TrainedModel:
    try:
        run = load_run(path, weights, device)
    except TrainError as err:
        hint = ("" if path.is_dir() else "; for a checkpoint of the "
                f"reference, pass its flags (--{_flag_option(kind)})")
        raise SampleError(f"{err}{hint}") from None
    if run.kind != kind:
        raise SampleError(f"{path} is {with_article(run.kind)} run, not "
                          f"{with_article(kind)} run")
    return run


def _flag_option(kind: str) -> str:
    return {"diffusion": "model-flags", "classifier": "classifier-flags",
            "upsampler": "upsampler-flags"}[kind]


def to_stage(trained: TrainedModel, respacing: str | None = None,
             sampler: str = "ddpm", eta: float = 0.0) -> cs.Stage:
    """`trained` as a cascade stage sampling with `sampler`, `respacing`."""
    prefix = "--upsampler-" if trained.small_size else "--"
    if respacing is None:
        respacing = trained.respacing or default_respacing(
            sampler, trained.diffusion.num_timesteps)
    try:
        respace(trained.diffusion, respacing)
    except (ValueError, AssertionError) as err:
        raise SampleError(f"{prefix}respacing {respacing!r}: {err}") from None
    # eta is DDIM's; chapter 8's solver_sample draws with every sampler.
    return cs.Stage(trained, respacing, sampler,
                    eta if sampler == "ddim" else 0.0, solver_sample)


def _counted(stage: cs.Stage, counting: Callable[[Model], Model]
             ) -> cs.Stage:
    """`stage` with its network wrapped by `counting` (the step bar)."""
    return replace(stage, trained=replace(
        stage.trained, model=counting(stage.trained.model)))


def check_writable(path: str | os.PathLike, flag: str) -> Path:
    """`path` as a file that can be written, or SampleError naming `flag`.

    For an output that is written after the work: checked before it.
    """
    path = Path(path)
    if path.is_dir():
        raise SampleError(f"{flag} {path} is a folder; name a file in it")
    if not path.parent.is_dir():
        raise SampleError(f"{flag} {path}: no folder {path.parent}")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise SampleError(f"{flag} {path}: cannot write in {path.parent}")
    return path


def sample_outputs(out: str | os.PathLike,
                   cascade: bool = False) -> list[Path]:
    """The files of `--out`: the batch and its grid, then a cascade's base
    samples and their grid (OUT_low_res.npz and .png)."""
    out = Path(out)
    low = out.with_name(f"{out.stem}_low_res.npz")
    return [out, out.with_suffix(".png"),
            *((low, low.with_suffix(".png")) if cascade else ())]


def check_out(out: str | os.PathLike, columns: int | None = None,
              cascade: bool = False) -> Path:
    """`out` and the files beside it writable, `columns` positive, or
    SampleError: checked before any sampling, so none is lost."""
    out = Path(out)
    if out.suffix != ".npz":
        raise SampleError(f"--out {out}: the batch file must end in .npz")
    check_writable(out, "--out")
    for path in sample_outputs(out, cascade)[1:]:
        if path.is_dir():
            raise SampleError(f"--out {out}: it writes {path} too, and "
                              "that is a folder; move it or name another "
                              "--out")
    if columns is not None and columns < 1:
        raise SampleError(f"--grid-columns {columns}: expected a number "
                          ">= 1")
    return out


@contextlib.contextmanager
def lock_out(out: str | os.PathLike) -> Iterator[None]:
    """Hold the lock of `--out` while this process writes its files.

    Two runs writing one --out would interleave their batches and grids;
    the second is refused, naming the first. As chapter 4's run folder
    lock, an flock on a hidden file beside it (.OUT.lock) that the system
    drops when the process ends, however it ends.
    """
    out = Path(out)
    path = out.with_name(f".{out.name}.lock")
    try:
        path.touch()
    except OSError as err:
        raise SampleError(f"--out {out}: cannot create its lock {path}: "
                          f"{err.strerror or err}") from None
    with hold_lock(path, lambda holder: SampleError(
            f"--out {out} is being written by another process (pid "
            f"{holder}): wait for it to end, or choose another --out")):
        yield


def available_memory() -> int | None:
    """Bytes of memory this process could still take; None if unknown.

    Linux's MemAvailable, or less under a container's (cgroup v2) limit.
    """
    free = None
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/meminfo") as f:
            free = next(int(line.split()[1]) * 1024 for line in f
                        if line.startswith("MemAvailable:"))
    with contextlib.suppress(OSError, ValueError):
        cgroup = Path("/sys/fs/cgroup")
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            left = int(limit) - int((cgroup / "memory.current").read_text())
            free = left if free is None else min(free, left)
    if free is None:
        with contextlib.suppress(ValueError, OSError, AttributeError):
            free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    return free


def check_memory(what: str, count: int, model: TrainedModel | None = None,
                 upsampler: TrainedModel | None = None) -> None:
    """Raise SampleError, naming `what`, if `count` samples of `model`
    (upsampled by `upsampler`, or `upsampler`'s alone) cannot fit in memory.

    They are kept in memory until written, as uint8 images with int64
    labels; an upsampler conditions on its inputs as float32 (and a noised
    copy); the PNG grid copies the largest images twice (the grid, and
    PIL's image of it). More than is available is refused, not streamed.
    """
    images = [net.image_size ** 2 * net.in_channels
              for net in (model, upsampler) if net is not None]
    inputs = (2 * 4 * upsampler.small_size ** 2 * upsampler.in_channels
              if upsampler is not None else 0)
    per_sample = 8 + inputs + sum(images) + 2 * max(images)
    free = available_memory()
    if free is not None and count * per_sample > free:
        raise SampleError(
            f"{what}: {count} samples and their grid need about "
            f"{count * per_sample / 1e9:,.1f} GB of memory, and "
            f"{free / 1e9:,.1f} GB is available: refused, as samples are "
            f"not streamed to disk; {free // per_sample} fit, so split "
            "the work into runs of that many")


@contextlib.contextmanager
def step_bar(total: int, progress: bool
              ) -> Iterator[Callable[[Model], Model]]:
    """A bar of `total` network evaluations; yields a wrapper that moves it.

    It moves every sampling step, where a bar of batches would wait a
    whole batch (the samplers' own bars count batches).
    """
    bar = tqdm(total=total, unit="step", desc="sample", disable=not progress)

    def counting(model: Model) -> Model:
        def counted(*args: Any, **kwargs: Any) -> torch.Tensor:
            out = model(*args, **kwargs)
            bar.update()
            return out
        return counted

    try:
        yield counting
    finally:
        bar.close()


def _evaluations(stage: cs.Stage, count: int, batch_size: int) -> int:
    """Network calls of `stage` drawing `count` samples (Heun: two a
    step)."""
    calls = network_calls(stage.sampler, respace(stage.trained.diffusion,
                                                 stage.respacing))
    return math.ceil(count / batch_size) * calls


def draw_labels(options: SampleOptions, count: int,
                num_classes: int) -> torch.Tensor | None:
    """The labels of `count` samples: random, or --labels cycled through."""
    chosen = options.classes
    if num_classes == 0:
        if chosen is not None:
            raise SampleError("--labels needs a class-conditional model or "
                              "a classifier")
        return None
    if chosen is None:
        g = torch.Generator().manual_seed(options.seed)
        return torch.randint(num_classes, (count,), generator=g)
    bad = [y for y in chosen if not 0 <= y < num_classes]
    if bad:
        raise SampleError(f"--labels: {bad} outside the model's "
                          f"{num_classes} classes (0 to {num_classes - 1})")
    return torch.tensor(chosen).repeat(math.ceil(count / len(chosen)))[:count]


def sample(model: TrainedModel, classifier: TrainedModel | None = None,
           options: SampleOptions | None = None,
           device: str | torch.device = "cpu", progress: bool = False,
           ) -> tuple[np.ndarray, np.ndarray | None]:
    """Samples of `model`, guided as `options` ask; uint8 NHWC and labels.

    The network runs at `options.precision` ("auto": bf16 where the device
    has it natively, else fp32; see chapter 4).
    """
    options = options or SampleOptions()
    base, y, cond_fn = _prepare_base(model, classifier, options)
    net = base.trained
    network = net.model if net.num_classes else ignore_labels(net.model)
    shape = (net.in_channels, net.image_size, net.image_size)
    total = _evaluations(base, options.num_samples, options.batch_size)
    with step_bar(total, progress) as counting:
        return sample_batches(respace(net.diffusion, base.respacing),
                              counting(network), options.num_samples, shape,
                              y, options.batch_size, device, options.seed,
                              False, options.precision,
                              sample_fn=solver_sample,
                              sampler=options.sampler, cond_fn=cond_fn,
                              guide_at_mean=options.guide_at_mean,
                              eta=options.eta)


def _prepare_base(
    model: TrainedModel, classifier: TrainedModel | None,
    options: SampleOptions, upsampler: TrainedModel | None = None,
) -> tuple[cs.Stage, torch.Tensor | None, CondFn | None]:
    """The base model's stage (guided as asked), its labels and cond_fn.

    The classifier runs at the network's precision.
    """
    count = options.num_samples
    check_memory(f"--num-samples {count}", count, model, upsampler)
    num_classes = model.num_classes
    if classifier is not None:
        _check_pair(model, classifier)
        num_classes = classifier.num_classes
    if upsampler is not None and upsampler.num_classes:
        if num_classes and num_classes != upsampler.num_classes:
            which = "classifier" if classifier is not None else "base model"
            raise SampleError(
                f"the {which} has {num_classes} classes, the upsampler "
                f"{upsampler.source} {upsampler.num_classes}")
        num_classes = upsampler.num_classes
    stage = to_stage(model, options.respacing, options.sampler, options.eta)
    if options.cfg_scale:
        if model.null_label is None:
            raise SampleError(f"--cfg-scale needs a model trained with label "
                              f"dropout (adm train ... --set "
                              f"label_dropout=0.1); {model.source} was not")
        stage.trained = replace(model, model=classifier_free_model(
            model.model, options.cfg_scale, model.null_label))
    y = draw_labels(options, count, num_classes)
    cond_fn = None
    if classifier is not None and options.classifier_scale:
        cond_fn = classifier_cond_fn(classifier.model,
                                     options.classifier_scale,
                                     options.precision)
    return stage, y, cond_fn


def sample_cascade(
    model: TrainedModel, upsampler: TrainedModel,
    classifier: TrainedModel | None = None,
    options: SampleOptions | None = None,
    device: str | torch.device = "cpu", progress: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Base samples (guided as asked), them upsampled, and their labels.

    Guidance (a classifier, `cfg_scale`) runs in the base model; the
    upsampler samples with `upsampler_sampler`, `upsampler_respacing`, and
    its low-resolution inputs noised to step `low_res_t` (None: the
    cascade's default) if it was trained with conditioning augmentation.
    """
    options = options or SampleOptions()
    if not upsampler.small_size:
        raise SampleError(f"{upsampler.source} is not an upsampler: it "
                          "takes no low-resolution images")
    if model.small_size:
        raise SampleError(f"{model.source} is an upsampler; a cascade "
                          "starts from a model that samples from noise")
    if (classifier is not None
            and classifier.image_size != model.image_size
            and classifier.image_size == upsampler.image_size):
        raise SampleError(
            f"the classifier {classifier.source} sees "
            f"{classifier.image_size}px images, the upsampler's output: "
            "guidance runs in the base model only, so pass a classifier "
            f"of the base model's size ({model.image_size}px)")
    base, y, cond_fn = _prepare_base(model, classifier, options, upsampler)
    up = _upsampler_stage(upsampler, options)
    count, batch_size = options.num_samples, options.batch_size
    total = (_evaluations(base, count, batch_size)
             + _evaluations(up, count, batch_size))
    try:
        with step_bar(total, progress) as counting:
            low, high = cs.cascade(
                _counted(base, counting), _counted(up, counting), count, y,
                cond_fn=cond_fn, guide_at_mean=options.guide_at_mean,
                low_res_t=options.low_res_t, batch_size=batch_size,
                device=device, seed=options.seed, progress=False,
                precision=options.precision)
    except cs.CascadeError as err:  # the stages do not fit
        raise SampleError(f"--upsampler {upsampler.source}: {err}") from None
    return low, high, None if y is None else y.numpy()


def _upsampler_stage(upsampler: TrainedModel,
                     options: SampleOptions) -> cs.Stage:
    """`upsampler` as the stage `options` ask for, its level checked."""
    stage = to_stage(upsampler, options.upsampler_respacing,
                     options.upsampler_sampler, options.eta)
    _check_level(upsampler, options.low_res_t)
    return stage


def _check_level(upsampler: TrainedModel, low_res_t: int | None) -> None:
    """Raise SampleError unless `upsampler` takes augmentation `low_res_t`."""
    if low_res_t is None:
        return
    if not upsampler.low_res_noise:
        if low_res_t:
            raise SampleError(
                f"--low-res-t {low_res_t}: the upsampler {upsampler.source} "
                "was trained without conditioning augmentation "
                "(low_res_noise 0); it takes no augmentation level")
        return
    if not 0 <= low_res_t <= upsampler.low_res_noise:
        raise SampleError(
            f"--low-res-t {low_res_t}: the upsampler {upsampler.source} was "
            f"trained on augmentation levels 0 to {upsampler.low_res_noise}")


def read_low_res(path: str | os.PathLike
                 ) -> tuple[np.ndarray, np.ndarray | None]:
    """Images to upsample, uint8 NHWC, and their labels (None: none).

    `path` is a batch (.npz: arr_0 images, optional arr_1 labels) or a
    folder of images, labelled by class sub-folders if all are in one.
    """
    path = Path(path)
    if not path.exists():
        raise SampleError(f"--low-res {path}: no such file or folder")
    if path.is_dir():
        return _read_folder(path)
    if path.suffix.lower() != ".npz":
        raise SampleError(f"--low-res {path}: expected an .npz batch or a "
                          "folder of images")
    try:
        batch = read_batch(path)  # its ValueErrors name the file
        images, labels = batch.images, batch.labels
    except ValueError as err:
        raise SampleError(f"--low-res: {err}") from None
    if labels is not None:
        if (labels.ndim != 1 or len(labels) != len(images)
                or not np.issubdtype(labels.dtype, np.integer)):
            raise SampleError(
                f"--low-res {path}: arr_1 must hold one integer label per "
                f"image ({len(images)}), not {labels.dtype} of shape "
                f"{labels.shape}")
        labels = labels.astype(np.int64)
    return images, labels


def _read_folder(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """A folder of equal-sized square images, as uint8 NHWC and labels."""
    try:
        data = load_dataset(path, labels="none")
        names = [Path(data.name(i)).relative_to(path)
                 for i in range(len(data))]
        if all(len(name.parts) > 1 for name in names):
            data = load_dataset(path, labels="folder")
        images = np.stack([data.pixels(i)[0].numpy().transpose(1, 2, 0)
                           for i in range(len(data))])
    except DataError as err:
        raise SampleError(f"--low-res {path}: {err}") from None
    if data.labels is None:
        return images, None
    classes = data.class_names
    if all(c.isdecimal() for c in classes):  # folders 0/ 1/ ...: numbers
        big = [c for c in classes if int(c) >= MAX_CLASSES]
        if big:
            raise SampleError(f"--low-res {path}: class folder {big[0]}: "
                              f"classes are numbered 0 to {MAX_CLASSES - 1}")
        numbers = np.array([int(c) for c in classes], np.int64)
        return images, numbers[data.labels]
    return images, np.asarray(data.labels, np.int64)


def upsample_files(
    upsampler: TrainedModel, low_res_path: str | os.PathLike,
    options: SampleOptions | None = None,
    device: str | torch.device = "cpu", progress: bool = False,
) -> tuple[np.ndarray, np.ndarray | None]:
    """The images of `low_res_path` (see read_low_res) upsampled; labels.

    The upsampler samples as `options` ask; their `labels` ("random" or
    class numbers cycled through) replace the inputs' own labels, and a
    class-conditional upsampler needs one or other.
    """
    options = options or SampleOptions()
    if not upsampler.small_size:
        raise SampleError(f"{upsampler.source} is not an upsampler: it "
                          "takes no low-resolution images")
    stage = _upsampler_stage(upsampler, options)
    images, found = read_low_res(low_res_path)
    try:
        cs.check_low_res(stage, images)
    except cs.CascadeError as err:
        raise SampleError(f"--low-res {low_res_path}: {err}") from None
    check_memory(f"--low-res {low_res_path}", len(images),
                 upsampler=upsampler)
    count, classes = len(images), upsampler.num_classes
    if options.labels is not None:
        y = draw_labels(options, count, classes)
    elif found is None:
        if classes:
            raise SampleError(
                f"the upsampler {upsampler.source} is class-conditional "
                f"and {low_res_path} has no labels (no arr_1, no class "
                "folders): pass --labels (class numbers, or random)")
        y = None
    else:
        bad = sorted({int(v) for v in found if not 0 <= v < classes})
        if classes and bad:
            raise SampleError(
                f"--low-res {low_res_path}: labels {bad[:5]} outside the "
                f"upsampler's {classes} classes (0 to {classes - 1}); pass "
                "--labels to replace them")
        y = torch.from_numpy(found)
    try:
        with step_bar(_evaluations(stage, count, options.batch_size),
                      progress) as counting:
            high = cs.upsample(_counted(stage, counting), images, y,
                               low_res_t=options.low_res_t,
                               batch_size=options.batch_size, device=device,
                               seed=options.seed, progress=False,
                               precision=options.precision)
    except cs.CascadeError as err:
        raise SampleError(f"--upsampler {upsampler.source}: {err}") from None
    return high, None if y is None else y.numpy()


def default_respacing(sampler: str, num_timesteps: int) -> str:
    """The paper's: 250 ancestral steps, or DDIM's 25; a solver's 20
    (Heun's 10, 19 network calls); fewer if T is."""
    if sampler == "ddim":
        return "ddim25" if num_timesteps % 25 == 0 else str(
            min(25, num_timesteps))
    steps = {"dpm++2m": 20, "heun": 10}.get(sampler, 250)
    return str(min(steps, num_timesteps))


def _check_pair(model: TrainedModel, classifier: TrainedModel) -> None:
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
    try:
        batch = write_batch(out, images, labels)
        return batch, save_png(out.with_suffix(".png"), images, columns)
    except TrainError as err:  # chapter 4's atomic write: a full disk...
        raise SampleError(f"--out {out}: {err}") from None
