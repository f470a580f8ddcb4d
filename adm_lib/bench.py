"""`adm bench`: training and sampling throughput, side by side with the reference.

Hand-written tooling. It times what `adm train` and `adm sample` run:
chapter 4's `train_step` (loss, backward, AdamW and the EMA, at the run's
precision) and chapter 6's `sample_batches` on the EMA network prepared
as `adm sample` prepares it (`prepare_for_sampling`, compiled with
`compile=true` as `adm sample --compile`), on random data. Given a local
checkout of `openai/guided-diffusion`, it builds the reference's network
and diffusion from the same flags, loads the same weights, and times its
training step (its `TrainLoop.run_step` without MPI or logging) and its
`p_sample_loop` on the same batch, alternating with ours round by round,
so that a busy machine slows both alike. Ratios are medians of each
round's paired ratio.
"""

from __future__ import annotations

import copy
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from adm_lib import guidance
from adm_lib.config import (
    TrainConfig,
    build_diffusion,
    make_config,
    unet_arguments,
    validate,
)
from adm_lib.devices import fast_backends, resolve_precision
from adm_lib.diffusion import respace, space_timesteps
from adm_lib.errors import TrainError
from adm_lib.ranks import Ranks
from adm_lib.train import TrainState, train_step

# The benchmarked networks, as `adm train` configs. "cifar32" is the
# 11M-parameter 32x32 model of the issue that set the CPU targets.
BENCH_MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "demo": ("mnist", {}),  # filled from the demo's own config below
    "cifar32": ("cifar10", {
        "in_channels": 3, "num_classes": 10, "num_channels": 64,
        "num_head_channels": 32, "dropout": 0.0, "batch_size": 32,
    }),
    "imagenet64": ("imagenet64", {"in_channels": 3, "batch_size": 64}),
}

# Dense bf16 tensor-core peaks (TFLOP/s), by device name.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0}


class BenchError(ValueError):
    """The benchmark cannot run as asked; the message says why."""


@dataclass
class Timing:
    """One implementation's timed rounds of one workload."""

    seconds: list[float] = field(default_factory=list)
    peak_bytes: int | None = None  # CUDA: the step's peak above resident

    def rate(self, work: float) -> float:
        """Work per second at the median round."""
        return work / statistics.median(self.seconds)


def bench_config(name: str, overrides: dict[str, Any] | None = None,
                 device: str = "auto") -> TrainConfig:
    """The `adm train` config of benchmark model `name`."""
    if name not in BENCH_MODELS:
        raise BenchError(f"no benchmark model {name!r}: choose from "
                         f"{', '.join(BENCH_MODELS)}")
    preset, fields = BENCH_MODELS[name]
    if name == "demo":
        from adm_lib.demo import DemoSettings, demo_configs

        demo = demo_configs(DemoSettings(), device)["diffusion"]
        fields = {k: v for k, v in asdict(demo).items()
                  if k not in ("data", "kind")}
        fields.update(in_channels=1, num_classes=10)
    try:
        config = make_config("diffusion", preset, {
            **fields, "device": device, **(overrides or {})})
        validate(config)
    except TrainError as err:
        raise BenchError(str(err)) from None
    return config


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[Any], Any], impl: Any, device: torch.device,
           timing: Timing) -> None:
    """Run `fn(impl)`; add its seconds (and CUDA peak memory) to `timing`."""
    _synchronize(device)
    if device.type == "cuda":
        resident = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    fn(impl)
    _synchronize(device)
    timing.seconds.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - resident
        timing.peak_bytes = max(timing.peak_bytes or 0, peak)


class Ours:
    """adm_lib's training step and sampler, as `adm train` and `adm sample`."""

    def __init__(self, config: TrainConfig, device: torch.device) -> None:
        fast_backends(device, config.precision, config.deterministic)
        self.config, self.device = config, device
        self.precision = resolve_precision(config.precision, device)
        self.state = TrainState.create(config, device)
        self.diffusion = build_diffusion(config)
        self.net = (torch.compile(self.state.model) if config.compile
                    else self.state.model)
        self.ranks = Ranks(0, 1, device, False)
        # The EMA network as `adm sample --compile` (if compile) runs it.
        self.sampler_net = guidance.prepare_for_sampling(
            next(iter(self.state.ema.values())), device, config.precision,
            config.memory_format, config.compile)

    def train_step(self, pixels: torch.Tensor, y: torch.Tensor) -> None:
        """One step of `adm train` on a uint8 batch."""
        train_step(self.config, self.diffusion, self.net, self.state,
                   pixels, y, slice(0, len(pixels)), self.ranks)

    def sample(self, y: torch.Tensor, steps: str) -> None:
        """One batch of `adm sample`: ancestral sampling at `steps`."""
        c = self.config
        shape = (c.in_channels, c.image_size, c.image_size)
        guidance.sample_batches(respace(self.diffusion, steps),
                                self.sampler_net, len(y), shape, y, len(y),
                                self.device, precision=self.precision)


class Reference:
    """The reference's step and sampler on the same flags and weights."""

    def __init__(self, path: Path, config: TrainConfig,
                 weights: dict[str, torch.Tensor],
                 device: torch.device) -> None:
        modules = _import_reference(path)
        self.device = device
        self.use_fp16 = device.type == "cuda"  # its trainer's fast path
        arguments = unet_arguments(config)
        if arguments.pop("rescale_residual"):
            raise BenchError("rescale_residual is an adm_lib extension: "
                             "the reference cannot run it")
        model = modules["unet"].UNetModel(
            **arguments, use_fp16=self.use_fp16,
            use_new_attention_order=config.use_new_attention_order)
        model.load_state_dict(weights)
        model.to(device)
        if self.use_fp16:
            model.convert_to_fp16()
        make = modules["script_util"].create_gaussian_diffusion
        self.diffusion_of = lambda spacing: make(
            steps=config.diffusion_steps, learn_sigma=config.learn_sigma,
            noise_schedule=config.noise_schedule, use_kl=config.use_kl,
            predict_xstart=config.predict_xstart, rescale_timesteps=False,
            rescale_learned_sigmas=config.rescale_learned_sigmas,
            timestep_respacing=spacing)
        self.diffusion = self.diffusion_of("")
        # Its trainer logs through its logger: a quiet one in a temp dir.
        modules["logger"].configure(dir=tempfile.mkdtemp(prefix="adm-ref-"),
                                    format_strs=[])
        self.trainer = modules["fp16_util"].MixedPrecisionTrainer(
            model=model, use_fp16=self.use_fp16)
        self.opt = torch.optim.AdamW(self.trainer.master_params, lr=config.lr,
                                     weight_decay=config.weight_decay)
        self.ema_rate = config.ema_rate[0]
        self.ema = copy.deepcopy(self.trainer.master_params)
        self.sampler = modules["resample"].UniformSampler(self.diffusion)
        self.update_ema = modules["nn"].update_ema
        self.model = model

    def train_step(self, pixels: torch.Tensor, y: torch.Tensor) -> None:
        """The reference's TrainLoop.run_step, one process, no logging."""
        x = pixels.to(self.device).float() / 127.5 - 1
        y = y.to(self.device)
        self.trainer.zero_grad()
        t, weights = self.sampler.sample(len(x), self.device)
        losses = self.diffusion.training_losses(self.model, x, t,
                                                model_kwargs={"y": y})
        self.trainer.backward((losses["loss"] * weights).mean())
        if self.trainer.optimize(self.opt):
            self.update_ema(self.ema, self.trainer.master_params,
                            rate=self.ema_rate)

    def sample(self, y: torch.Tensor, steps: str) -> None:
        """The reference's p_sample_loop at `steps`."""
        shape = (len(y), *self._shape)
        self.diffusion_of(steps).p_sample_loop(
            self.model, shape, model_kwargs={"y": y.to(self.device)},
            device=self.device)

    @property
    def _shape(self) -> tuple[int, int, int]:
        return (self.model.in_channels, self.model.image_size,
                self.model.image_size)


def _import_reference(path: Path) -> dict[str, Any]:
    """The reference's modules, imported from the checkout at `path`."""
    package = path / "guided_diffusion"
    if not (package / "gaussian_diffusion.py").is_file():
        raise BenchError(f"{path} is not a checkout of openai/guided-diffusion"
                         f" (no {package / 'gaussian_diffusion.py'}): clone "
                         "it and pass its folder to --reference")
    sys.path.insert(0, str(path.resolve()))
    try:
        import importlib

        names = ("unet", "script_util", "fp16_util", "logger", "resample",
                 "nn")
        modules = {n: importlib.import_module(f"guided_diffusion.{n}")
                   for n in names}
    except ImportError as err:
        raise BenchError(f"cannot import the reference from {path}: {err}"
                         ) from None
    finally:
        sys.path.remove(str(path.resolve()))
    found = Path(modules["unet"].__file__).resolve()
    if package.resolve() not in found.parents:
        raise BenchError(f"guided_diffusion was already imported from "
                         f"{found.parent}, not {package}")
    return modules


def forward_flops(model: torch.nn.Module, config: TrainConfig,
                  device: torch.device) -> float:
    """FLOPs of one image's forward pass (PyTorch's flop counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, config.in_channels, config.image_size,
                    config.image_size, device=device)
    t = torch.zeros(1, dtype=torch.long, device=device)
    kwargs = ({"y": torch.zeros(1, dtype=torch.long, device=device)}
              if config.class_cond else {})
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x, t, **kwargs)
    return float(counter.get_total_flops())


def run_bench(config: TrainConfig, *, rounds: int = 5, warmup: int = 2,
              sample_steps: str = "25",
              sample_batch: int | None = None,
              reference: Path | None = None,
              progress: bool = True,
              sample: bool = True) -> dict[str, Any]:
    """Time training and sampling of `config`; a report.

    Training steps take `config.batch_size` images; the sampler draws
    `sample_batch` at once (default the same): without gradients, a GPU
    needs a larger batch to fill; with `config.compile` it samples with the
    compiled network, as `adm sample --compile`. `sample=False` times
    training only.
    """
    batch = config.batch_size
    sample_batch = batch if sample_batch is None else sample_batch
    # Each is checked before the model is built: nothing waits on a typo.
    for flag, value, least in (("--rounds", rounds, 1),
                               ("--warmup", warmup, 0),
                               ("--sample-batch", sample_batch, 1)):
        if value < least:
            raise BenchError(f"{flag} {value}: expected a whole number "
                             f">= {least}")
    try:
        kept = (space_timesteps(config.diffusion_steps, sample_steps)
                if sample_steps else range(config.diffusion_steps))
    except ValueError as err:
        raise BenchError(f"--sample-steps {sample_steps!r}: {err}") from None
    if not kept:
        raise BenchError(f"--sample-steps {sample_steps!r} keeps no step; "
                         "expected a count such as 25, or ddim25")
    nfe = len(kept)
    device = torch.device(config.device)
    ours = Ours(config, device)
    impls: dict[str, Any] = {"adm_lib": ours}
    if reference is not None:
        impls["reference"] = Reference(reference, config,
                                       ours.state.model.state_dict(), device)
    generator = torch.Generator().manual_seed(0)
    shape = (batch, config.in_channels, config.image_size, config.image_size)
    pixels = torch.randint(0, 256, shape, generator=generator,
                           dtype=torch.uint8)
    y, y_sample = (torch.randint(0, max(config.num_classes, 1), (n,),
                                 generator=generator)
                   for n in (batch, sample_batch))
    workloads = {
        "train": (lambda impl: impl.train_step(pixels, y), batch),
        "sample": (lambda impl: impl.sample(y_sample, sample_steps),
                   sample_batch * nfe),
    }
    if not sample:
        del workloads["sample"]
    timings = {w: {name: Timing() for name in impls} for w in workloads}
    total = (warmup + rounds) * len(workloads) * len(impls)
    bar = tqdm(total=total, desc="bench", unit="run", disable=not progress)
    for workload, (fn, _) in workloads.items():
        for round_ in range(warmup + rounds):
            for name, impl in impls.items():
                timing = timings[workload][name]
                if round_ < warmup:  # not kept: allocator and autotuner
                    fn(impl)
                else:
                    _timed(fn, impl, device, timing)
                bar.update()
    bar.close()
    flops = forward_flops(ours.state.model, config, device)
    report: dict[str, Any] = {
        "device": _device_name(device), "torch": torch.__version__,
        "parameters": sum(p.numel() for p in ours.state.model.parameters()),
        "shape": list(shape[1:]), "batch": batch, "rounds": rounds,
        "precision": ours.precision, "compile": config.compile,
        "reference_precision": ("fp16" if device.type == "cuda" else "fp32"
                                ) if reference else None,
        "sample_steps": sample_steps if sample else None,
        "sample_batch": sample_batch if sample else None,
        "forward_gflop_per_image": flops / 1e9,
    }
    for workload, (_, work) in workloads.items():
        entry: dict[str, Any] = {}
        for name, timing in timings[workload].items():
            entry[name] = {"seconds": timing.seconds,
                           "rate": timing.rate(work),
                           "peak_gib": (timing.peak_bytes / 2**30
                                        if timing.peak_bytes is not None
                                        else None)}
        if "reference" in entry:
            ratios = [r / o for o, r in zip(
                timings[workload]["adm_lib"].seconds,
                timings[workload]["reference"].seconds, strict=True)]
            entry["ratio"] = statistics.median(ratios)
            entry["ratio_range"] = [min(ratios), max(ratios)]
        report[workload] = entry
    seconds = statistics.median(timings["train"]["adm_lib"].seconds)
    report["train_tflops"] = 3 * flops * batch / seconds / 1e12
    peak = _peak_tflops(device)
    report["train_share_of_peak"] = (report["train_tflops"] / peak
                                     if peak else None)
    return report


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, " \
           f"{torch.get_num_threads()} threads)"


def _peak_tflops(device: torch.device) -> float | None:
    """The device's dense bf16 peak, where known (GPUs only)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def format_report(name: str, report: dict[str, Any]) -> str:
    """The report as a Markdown table."""
    both = "ratio" in report["train"]
    lines = [
        f"adm bench {name}: {report['parameters'] / 1e6:.1f}M parameters, "
        f"{'x'.join(map(str, report['shape']))}, batch {report['batch']}, "
        f"{report['device']}, torch {report['torch']}",
        f"adm_lib precision {report['precision']}"
        + (", compiled" if report["compile"] else "")
        + (f"; reference {report['reference_precision']}" if both else "")
        + f"; medians of {report['rounds']} rounds",
        "",
        "| workload | adm_lib | reference | ratio (range) |",
        "| --- | --- | --- | --- |",
    ]
    units = {"train": "images/s",
             "sample": f"images x NFE/s ({report['sample_steps']} steps, "
                       f"batch {report['sample_batch']})"}
    for workload, unit in units.items():
        if workload not in report:  # timed training only
            continue
        entry = report[workload]
        ref = (f"{entry['reference']['rate']:.1f}" if both else "-")
        ratio = (f"{entry['ratio']:.2f}x ({entry['ratio_range'][0]:.2f}-"
                 f"{entry['ratio_range'][1]:.2f})" if both else "-")
        lines.append(f"| {workload}, {unit} | {entry['adm_lib']['rate']:.1f}"
                     f" | {ref} | {ratio} |")
        peak = entry["adm_lib"]["peak_gib"]
        if peak is not None:
            ref_peak = (f"{entry['reference']['peak_gib']:.2f}" if both
                        else "-")
            lines.append(f"| {workload}, peak GiB above resident | "
                         f"{peak:.2f} | {ref_peak} | |")
    share = report["train_share_of_peak"]
    lines += ["", f"training: {report['train_tflops']:.2f} TFLOP/s "
              f"(3 x {report['forward_gflop_per_image']:.2f} GFLOP per image)"
              + (f", {share:.1%} of the device's bf16 peak" if share else "")]
    return "\n".join(lines)
