"""`adm demo`: classifier guidance end to end, in minutes on a laptop CPU.

Hand-written tooling. It trains a small class-conditional diffusion model
and a noisy classifier on the embedded MNIST-5k (chapter 4's `train`),
draws every digit at two guidance scales (chapter 6's `sample_batches`),
scores the samples with chapter 5's MNIST network, which did not guide
them, and writes a grid PNG and a report.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from adm_lib import devices
from adm_lib import train as training
from adm_lib.checkpoints import read_metrics
from adm_lib.config import make_config
from adm_lib.data import load_dataset
from adm_lib.diffusion import respace
from adm_lib.errors import TrainError
from adm_lib.files import write_atomic
from adm_lib.guidance import SAMPLERS, classifier_cond_fn, sample_batches
from adm_lib.metrics import (
    compute_activations,
    feature_extractor,
    score_activations,
    write_batch,
)
from adm_lib.models import load_run
from adm_lib.sampling import step_bar
from adm_lib.values import MAX_SEED, flag, option
from adm_lib.viz import pixel_grid, to_uint8

# Chapter 4.9's budget. On a CPU with native bf16 (AVX-512-BF16 or AMX),
# 800 steps took four training seeds to 95% on average, every sampling
# seed past 91%, in under three minutes of training on 2 cores; a GPU is
# faster still. On a float32-only CPU (an AVX2 EPYC) a step took three
# times as long: 350 steps, where its curve passes 85%, keep the demo
# near five minutes there.
STEPS_BF16, STEPS_FP32_CPU = 800, 350


@dataclass
class DemoSettings:
    """What the demo trains and draws: each field but `device` is a flag
    of `adm demo` (values.flag), its default and help written here only.

    The defaults are chapter 4.9's measured choice. `steps` left as None
    is `default_steps` of the device: 800 on a GPU or a CPU with native
    bf16, under four minutes on such a 2-core CPU (docs/measurements.md has the
    timed runs), and 350 on a float32-only CPU, its five-minute run.
    """

    steps: int | None = option(  # diffusion model; None: default_steps
        None, f"diffusion training steps (default {STEPS_BF16} on a GPU or "
        f"a CPU with native bf16, {STEPS_FP32_CPU} on other CPUs)")
    batch: int = option(32, "diffusion training batch (default %(default)s)")
    classifier_steps: int = option(  # noisy classifier
        400, "classifier training steps (default %(default)s)")
    classifier_batch: int = option(
        32, "classifier training batch (default %(default)s)")
    scales: tuple[float, ...] = option(
        (1.0, 4.0), "guidance scales (default %(default)s)")
    per_class: int = option(
        20, "samples of each digit at each scale (default %(default)s)")
    sampler: str = option(
        "ddpm", "DDIM (eta 0) or ancestral sampling (default %(default)s)",
        choices=SAMPLERS)
    respacing: str = option(
        "10", "the sampler's steps, a respacing spec (default %(default)s)")
    device: str = "auto"
    seed: int = option(
        0, "seed of both training runs and of the samples (default "
        "%(default)s)", least=0, limit=MAX_SEED + 1)

    def __post_init__(self) -> None:
        """Raise ValueError naming the first setting's flag that cannot
        work."""
        for name in ("steps", "batch", "classifier_steps",
                     "classifier_batch", "per_class"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{flag(name)} must be >= 1")
        if not self.scales or not all(math.isfinite(s) and s >= 0
                                      for s in self.scales):
            shown = ",".join(f"{s:g}" for s in self.scales)
            raise ValueError(f"--scales {shown}: expected scales >= 0 such "
                             "as 1,4")


# Both networks: one residual block per level, 32 channels at 32x32 and
# 16x16, and resampling by a convolution rather than a residual block.
# Chapter 4.9: as accurate per step as the preset's, in 0.6 (diffusion)
# and 0.7 (classifier) of its step time.
LEAN = {"num_res_blocks": 1, "channel_mult": (1, 1, 2),
        "resblock_updown": False}


def default_steps(device: str) -> int:
    """The diffusion model's training steps on `device` by default."""
    where = torch.device(device)
    if where.type == "cpu" and not devices.native_bf16(where):
        return STEPS_FP32_CPU
    return STEPS_BF16


def demo_configs(settings: DemoSettings, device: str) -> dict:
    """The diffusion model's and the classifier's training configs."""
    common = {"data": "mnist5k", "device": device, "seed": settings.seed,
              "log_interval": 25}
    return {
        "diffusion": make_config("diffusion", "mnist", {
            **common, "steps": (default_steps(device) if settings.steps
                                is None else settings.steps),
            "batch_size": settings.batch, "lr": 1e-3,
            # Chapter 4.9 measured these: a short run learns digits and
            # their classes far sooner predicting x0 under L_simple alone,
            # and a short EMA keeps up with weights that still move fast.
            "predict_xstart": True, "learn_sigma": False,
            "ema_rate": (0.95,), **LEAN,
            "save_interval": 250, "sample_interval": 0}),
        "classifier": make_config("classifier", "mnist", {
            **common, "steps": settings.classifier_steps,
            "batch_size": settings.classifier_batch,
            "lr_anneal_steps": settings.classifier_steps,
            # One residual block per level: as accurate a guide here as
            # the preset's two (chapter 4.9), in two thirds of the time.
            "classifier_depth": 1, "channel_mult": LEAN["channel_mult"],
            "classifier_resblock_updown": False,
            # Held-out accuracy once, at the end, for the report.
            "save_interval": 10**9,
            "eval_interval": settings.classifier_steps, "eval_images": 500}),
    }


def run_demo(out: str | Path, settings: DemoSettings | None = None,
             progress: bool = True,
             say: Callable[[str], None] = print) -> dict:
    """Train, sample and score; returns the report (also in out/)."""
    settings = settings or DemoSettings()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = str(devices.resolve_device(settings.device))
    timings: dict[str, float] = {}
    started = time.perf_counter()
    configs = demo_configs(settings, device)
    steps = configs["diffusion"].steps
    if settings.steps is None and steps == STEPS_FP32_CPU:
        say(f"adm demo: {steps} diffusion steps, not {STEPS_BF16}, to stay "
            "near five minutes in float32 (this CPU has no native bf16; "
            f"chapter 4.9); --steps {STEPS_BF16} for the full recipe")
    runs = {}
    for number, (name, config) in enumerate(configs.items(), 1):
        say(f"[{number}/4] training the {name} on MNIST-5k "
            f"({config.steps} steps, {device}); run folder {out / name}")
        start = time.perf_counter()
        # An earlier demo's finished run is reused; a cut one goes on.
        try:
            training.train(config, out / name,
                           resume=(out / name).exists(), progress=progress)
        except TrainError as err:
            if "does not match" not in str(err):
                raise
            raise TrainError(f"{out / name} holds a run made with other "
                             f"demo settings; delete it or pass another "
                             f"--out ({err})") from None
        runs[name] = load_run(out / name, device=device)
        timings[f"train {name}"] = time.perf_counter() - start

    model, classifier = runs["diffusion"], runs["classifier"]
    num_classes = model.config.num_classes
    count = num_classes * settings.per_class
    labels = torch.arange(count) % num_classes
    shape = (model.config.in_channels, model.config.image_size,
             model.config.image_size)
    spaced = respace(model.diffusion, settings.respacing)
    say(f"[3/4] sampling {count} digits at each guidance scale "
        f"{', '.join(f'{s:g}' for s in settings.scales)} "
        f"({_sampler_text(settings)})")
    start = time.perf_counter()
    samples, batches = {}, {}
    per_scale = -(-count // 100) * spaced.num_timesteps  # batches of 100
    with step_bar(len(settings.scales) * per_scale, progress) as counting:
        net = counting(model.model)
        for scale in settings.scales:
            hook = (classifier_cond_fn(classifier.model, scale) if scale
                    else None)
            samples[scale], _ = sample_batches(
                spaced, net, count, shape, labels, 100, device,
                settings.seed, False, precision="auto",
                sampler=settings.sampler, cond_fn=hook)
            batches[scale] = write_batch(
                out / f"samples_scale_{scale:g}.npz", samples[scale],
                labels.numpy())
    timings["sample"] = time.perf_counter() - start

    say("[4/4] scoring the samples with the MNIST network of chapter 5")
    start = time.perf_counter()
    judge = feature_extractor("mnist", device=device)
    real = load_dataset(model.config.data, resolution=shape[1],
                        channels=shape[0])
    real_images = to_uint8(real.images(range(len(real))))
    ref = compute_activations(real_images, judge, 500, device)
    scores = {scale: {**score_activations(
        ref, compute_activations(images, judge, 500, device),
        labels.numpy(), device), "mean_intensity": float(images.mean())}
        for scale, images in samples.items()}
    timings["score"] = time.perf_counter() - start
    timings["total"] = time.perf_counter() - started

    grid = out / "guided_digits.png"
    _save_grid(grid, samples, num_classes, settings.per_class)
    report = {
        "settings": {**asdict(settings), "steps": steps, "device": device},
        "classifier_accuracy_held_out": _held_out(out / "classifier"),
        # Mean pixel (0-255) of the training digits; each scale's samples
        # have theirs in scores: grey backgrounds show as a higher one.
        "data_mean_intensity": float(real_images.mean()),
        "scores": {f"{scale:g}": s for scale, s in scores.items()},
        "timings_s": timings,
        "files": {"grid": str(grid),
                  **{f"samples_scale_{scale:g}": str(path)
                     for scale, path in batches.items()},
                  "diffusion_run": str(out / "diffusion"),
                  "classifier_run": str(out / "classifier")},
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    text = format_report(report)
    (out / "report.md").write_text(text)
    say(text)
    return report


def _sampler_text(settings: DemoSettings | dict) -> str:
    """How the samples were drawn, e.g. "DDIM, respacing ddim25"."""
    if not isinstance(settings, dict):
        settings = asdict(settings)
    name = "DDIM" if settings["sampler"] == "ddim" else "ancestral sampling"
    return f"{name}, respacing {settings['respacing']}"


def _held_out(run: Path) -> float | None:
    """The classifier's last held-out top-1 accuracy at random t."""
    hits = [r["ema_val_acc@1"] for r in read_metrics(run)
            if "ema_val_acc@1" in r]
    return hits[-1] if hits else None


def _save_grid(path: Path, samples: dict[float, np.ndarray],
               num_classes: int, per_class: int) -> None:
    """One block per scale: a row per digit, `per_class` (<= 8) columns."""
    shown = min(per_class, 8)
    blocks = []
    for images in samples.values():
        # Sample i has label i % num_classes: regroup them by class.
        by_class = images.reshape(per_class, num_classes, *images.shape[1:])
        rows = by_class[:shown].transpose(1, 0, 2, 3, 4)
        blocks.append(pixel_grid(rows.reshape(-1, *images.shape[1:]), shown))
    height, width, channels = blocks[0].shape
    gap, caption = 16, 18
    canvas = np.full((height + caption, len(blocks) * (width + gap) - gap,
                      channels), 255, np.uint8)
    for i, block in enumerate(blocks):
        left = i * (width + gap)
        canvas[caption:, left:left + width] = block
    picture = Image.fromarray(canvas[..., 0] if channels == 1 else canvas)
    draw = ImageDraw.Draw(picture)
    for i, scale in enumerate(samples):
        draw.text((i * (width + gap) + 4, 3), f"guidance scale {scale:g}",
                  fill=0)
    write_atomic(path, lambda f: picture.save(f, format="PNG"))


def format_report(report: dict) -> str:
    """The report as Markdown."""
    settings, timings = report["settings"], report["timings_s"]
    lines = [
        "# adm demo: classifier guidance on MNIST-5k",
        "",
        f"A class-conditional diffusion model ({settings['steps']} steps) "
        f"and a noisy classifier ({settings['classifier_steps']} steps), "
        f"trained on {settings['device']}; {settings['per_class']} samples "
        f"of each digit per scale, {_sampler_text(settings)}.",
        "",
        "| guidance scale | accuracy on the samples | FID (mnist-net) "
        "| precision | recall | mean intensity |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for scale, s in report["scores"].items():
        lines.append(f"| {scale} | {s['accuracy']:.1%} | {s['fid']:.2f} | "
                     f"{s['precision']:.3f} | {s['recall']:.3f} | "
                     f"{s['mean_intensity']:.1f} |")
    lines.append(f"| data | | | | | {report['data_mean_intensity']:.1f} |")
    held = report["classifier_accuracy_held_out"]
    lines += [
        "",
        "Accuracy is the share of samples that chapter 5's MNIST network "
        "(99.2% on real digits; it did not guide them) puts in the class "
        "they were drawn for. FID compares the samples with the 5,000 "
        "training digits in that network's features: lower is closer. "
        "Mean intensity is the mean pixel (0-255) of the samples and of the "
        "training digits (data); grey backgrounds raise it. "
        + (f"The guiding classifier's held-out accuracy on noised digits "
           f"at random t is {held:.1%}." if held is not None else ""),
        "",
        "| stage | seconds |",
        "| --- | --- |",
        *(f"| {name} | {seconds:.0f} |" for name, seconds in timings.items()),
        "",
        f"Grid: {report['files']['grid']} (a row per digit, a block per "
        "scale)",
        "Samples: " + ", ".join(
            path for name, path in report["files"].items()
            if name.startswith("samples_scale_"))
        + " (the reference's batch format: arr_0 images, arr_1 labels)",
        f"Runs: {report['files']['diffusion_run']}, "
        f"{report['files']['classifier_run']} (use them with adm sample)",
        "",
    ]
    return "\n".join(lines)
