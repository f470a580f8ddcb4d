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
# # Classifier guidance
#
# A class-conditional diffusion model samples from $p(x \mid y)$, but its
# samples of a class are as varied as the class's training images, and many
# look like no class at all. GANs of 2021 sharpened their samples with the
# "truncation trick", trading diversity for fidelity with one knob. The
# paper's second contribution is such a knob for diffusion models:
# **classifier guidance**. A classifier $p_\phi(y \mid x_t)$ trained on
# noisy images supplies the gradient $\nabla_{x_t} \log p_\phi(y \mid x_t)$,
# and the sampler follows it, scaled by $s$. An unconditional model guided
# at $s = 1$ targets $p(x \mid y)$, and at $s > 1$ a sharper distribution
# with higher fidelity (precision, Inception Score) and lower diversity
# (recall); a guided conditional model never targets $p(x \mid y)$ (6.1).
#
# This chapter exports `adm_lib.guidance`:
#
# * 6.1 the derivation of the two guided samplers, Algorithms 1 and 2;
# * 6.2 the conditioning function of a noisy classifier, equal to the
#   reference's;
# * 6.3 guided sampling in batches, the code behind `adm sample`;
# * 6.4 classifier-free guidance, the method that succeeded it;
# * 6.5 to 6.7 experiments: three models trained on MNIST-5k, grids across
#   guidance scales, the gradient at $x_t$ against the gradient at the
#   mean, and the fidelity-diversity trade-off measured with chapter 5's
#   metrics, classifier guidance beside classifier-free guidance;
# * 6.8 `adm sample` and `adm demo`, and 6.9 a longer recorded run.

# %% tags=["parameters"]
# Smoke configuration: a few minutes on a CPU. The recorded CPU run of 6.9
# and the full GPU run on CIFAR-10 are
#   adm book run 6 -p train_steps 800 -p classifier_steps 400 \
#       -p respacing 25 -p scales "[0.0, 1.0, 4.0]" \
#       -p free_scales "[0.0, 1.0, 4.0]" -p samples_per_scale 80 \
#       -p sample_seeds "[0, 1, 2]" -p num_ref 2000 \
#       -p runs_dir build/chapter6_record -p figures_dir chapters/figures
#   adm book run 6 -p device cuda -p preset cifar10 -p features cifar10 \
#       -p data ../shared/data/cifar10/train.zip -p train_steps 100000 \
#       -p classifier_steps 50000 -p settings "{}" \
#       -p classifier_settings "{}" -p respacing 250 \
#       -p samples_per_scale 5000 -p sample_seeds "[0, 1, 2]" \
#       -p num_ref 10000 -p batch_size 500 -p runs_dir build/chapter6_cifar10
data: str = "mnist5k"  # a data-set name, or a folder, .zip or .npz
features: str = "mnist"  # the metrics' network: mnist, cifar10 or inception
inception_weights: str = ""  # the Inception weights file, for "inception"
preset: str = "mnist"  # the adm_lib.config preset of all three models
# Chapter 4.9's recipe for runs of minutes.
settings: dict = {"batch_size": 32, "lr": 1e-3, "num_res_blocks": 1,
                  "predict_xstart": True, "learn_sigma": False,
                  "ema_rate": "0.95"}  # changes to the models' preset
classifier_settings: dict = {
    "batch_size": 64, "classifier_depth": 1}  # changes to its preset
device: str = "auto"  # "auto" picks CUDA when there is a GPU
runs_dir: str = "build/chapter6"  # the three run folders
reuse_runs: bool = False  # True: finished runs in runs_dir are loaded
train_steps: int = 10  # of each diffusion model
classifier_steps: int = 10  # of the noisy classifier
label_dropout: float = 0.1  # for classifier-free guidance
respacing: str = "10"  # the ancestral sampler's steps
scales: list[float] = [0.0, 1.0, 4.0]  # classifier guidance scales s
free_scales: list[float] = [0.0, 1.0, 4.0]  # classifier-free scales w
samples_per_scale: int = 15  # samples scored at each scale, for each seed
sample_seeds: list[int] = [0, 1]  # sampling seeds: each setting, each seed
num_ref: int = 500  # real images the samples are scored against
batch_size: int = 200  # of sampling
figures_dir: str = ""  # if set, the figures are also saved there
seed: int = 0  # of training, and of the real images' order

# %%
#| default_exp guidance

# %%
import copy
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import nn

from adm_lib.book import find_root
from adm_lib.config import make_config
from adm_lib.data import load_dataset
from adm_lib.devices import resolve_device
from adm_lib.diffusion import p_sample, respace
from adm_lib.metrics import (
    compute_activations,
    feature_extractor,
    score_activations,
)
from adm_lib.models import load_run
from adm_lib.train import train
from adm_lib.viz import to_uint8

# Relative paths, the parameters' too, start at the book's root, as under
# `adm book run`, wherever the kernel starts (JupyterLab: in chapters/).
os.chdir(find_root())
torch.manual_seed(seed)
device = str(resolve_device(device))
runs = Path(runs_dir)
print(f"device: {device}, features: {features}")

# %% [markdown]
# ## 6.1 Conditioning a diffusion model on a classifier
#
# A diffusion model's reverse step is a Gaussian,
# $p_\theta(x_t \mid x_{t+1}) = \mathcal{N}(\mu, \Sigma)$ (chapter 2). To
# condition it on a label $y$ we want to sample $p_{\theta,\phi}(x_t \mid
# x_{t+1}, y) \propto p_\theta(x_t \mid x_{t+1}) \, p_\phi(y \mid x_t)$.
# The classifier's log-probability varies slowly next to $\Sigma^{-1}$, so
# it is close to its first-order expansion around $x_t = \mu$,
#
# $$\log p_\phi(y \mid x_t) \approx \text{const} + (x_t - \mu)^\top g,
# \qquad g = \nabla_{x_t} \log p_\phi(y \mid x_t)\big|_{x_t = \mu},$$
#
# and the product of the Gaussian with $e^{(x_t - \mu)^\top g}$ is again a
# Gaussian, with the mean moved: $\mathcal{N}(\mu + \Sigma g, \Sigma)$.
# That is **Algorithm 1**: ancestral sampling with the mean shifted by
# $s\,\Sigma\,g$. The scale $s$ multiplies the log-probability, so a model
# of $p(x)$ is steered towards $p(x)\,p(y \mid x)^s / Z$, with $Z$ the
# normaliser: $p(x \mid y)$ at $s = 1$ by Bayes' rule, sharper for $s > 1$.
# A class-conditional model is steered towards the normalised
# $p(x \mid y)\,p(y \mid x)^s$, which for $s > 0$ is never $p(x \mid y)$.
#
# DDIM has no Gaussian step to shift. It follows the noise prediction
# $\epsilon_\theta(x_t)$, which is a scaled score,
# $\nabla_{x_t} \log p(x_t) = -\epsilon_\theta(x_t) / \sqrt{1 - \bar\alpha_t}$.
# The score of $p(x_t)\,p(y \mid x_t)$ adds the classifier's gradient, and
# turned back into a noise prediction that is **Algorithm 2**:
#
# $$\hat\epsilon = \epsilon_\theta(x_t) - \sqrt{1 - \bar\alpha_t}\;
# s \nabla_{x_t} \log p_\phi(y \mid x_t),$$
#
# with which DDIM steps as usual.
#
# Chapter 2 built both as a hook of its samplers: a function
# `cond_fn(x, t, **model_kwargs)` returning the scaled gradient, which
# `condition_mean` (Algorithm 1) and `condition_score` (Algorithm 2) apply.
# Guidance is a function handed to the sampler, not a new sampler. The
# reference evaluates the gradient at $x_t$ rather than at $\mu$, where the
# derivation expands; `p_sample(..., guide_at_mean=True)` does the latter,
# and 6.6 compares the two.

# %% [markdown]
# The two move a sample by very different amounts. Algorithm 1 shifts the
# mean by $s\,\Sigma\,g$, and $\Sigma$ is at most the step's variance.
# Algorithm 2 changes $\hat x_0$ by $(1 - \bar\alpha_t)\,s g /
# \sqrt{\bar\alpha_t}$, and DDIM's next
# $x = \sqrt{\bar\alpha_\text{prev}}\,\hat x_0 +
# \sqrt{1 - \bar\alpha_\text{prev}}\,\hat\epsilon$ then moves by
# $\big((1 - \bar\alpha_t)\sqrt{\bar\alpha_\text{prev} /
# \bar\alpha_t} - \sqrt{(1 - \bar\alpha_\text{prev})
# (1 - \bar\alpha_t)}\big)\,s g$. That factor at the first step (the
# noisiest) and the second, for both schedules and several step counts:

# %%
from adm_lib.diffusion import GaussianDiffusion
from adm_lib.forward import get_named_beta_schedule


def ddim_guidance_gain(schedule: str, steps: str) -> np.ndarray:
    """How far Algorithm 2's next x moves per unit of s g, at each step."""
    betas = get_named_beta_schedule(schedule, 1000)
    spaced = respace(GaussianDiffusion(betas), steps)
    abar, prev = spaced.alphas_cumprod, spaced.alphas_cumprod_prev
    return ((1 - abar) * np.sqrt(prev / abar)
            - np.sqrt((1 - prev) * (1 - abar)))


for steps in ("10", "25", "50", "250", "1000"):
    cosine, linear = (ddim_guidance_gain(name, steps)
                      for name in ("cosine", "linear"))
    print(f"{steps:>4} steps: cosine {cosine[-1]:7.1f} then "
          f"{cosine[-2]:.2f}; linear {linear[-1]:.2f} then {linear[-2]:.2f}")
    assert cosine[-1] > 20 * max(linear[-1], cosine[-2])

# %% [markdown]
# At the first step of the cosine schedule, where
# $\bar\alpha_T \approx 2 \times 10^{-9}$, one unit of gradient moves
# the sample by 31 (1,000 steps) to 3,492 (10 steps), where the data
# span $[-1, 1]$, and by about 1 at the next step: the classifier's
# gradient is divided by $\sqrt{\bar\alpha_t}$ where the sample is
# nearly all noise. The reference does the same, so this is the method;
# chapter 4.9 measures what it does to the demo's samples (guided at
# $s = 1$ with DDIM, 48.5% of them in the right class against 95.0%
# ancestrally), and the demo guides with Algorithm 1.

# %% [markdown]
# ## 6.2 The conditioning function
#
# The classifier (chapter 3's encoder half of the UNet) takes $x_t$ and $t$ and
# returns logits. `classifier_grad` differentiates the log-softmax of each
# image's label. It sums the chosen log-probabilities over the batch before
# differentiating, which gives every image its own gradient because the
# classifier treats images independently (GroupNorm, no batch statistics). The
# samplers run under `torch.no_grad()`, so gradients are switched back on here.
# The classifier runs at the sampling precision (bf16 autocast on a GPU), as
# the reference runs its released classifiers in float16; the gradient then
# costs a bf16 forward and backward pass per step, not a float32 one.

# %%
#| export
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from adm_lib.devices import (
    autocast_model,
    fast_backends,
    memory_format,
    resolve_precision,
)
from adm_lib.diffusion import (
    GaussianDiffusion,
    Model,
    NoiseFn,
    ddim_sample_loop,
    p_sample_loop,
)
from adm_lib.seeds import step_seed
from adm_lib.viz import to_uint8

CondFn = Callable[..., Tensor]
SAMPLERS = ("ddpm", "ddim")


def classifier_grad(classifier: Model, x: Tensor, t: Tensor,
                    y: Tensor) -> Tensor:
    """grad_x log p(y | x_t) of each image, from a noisy classifier."""
    with torch.enable_grad():
        x_in = x.detach().requires_grad_(True)
        logits = classifier(x_in, t)
        # Half-precision logits are upcast; float64 ones stay float64.
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        log_probs = F.log_softmax(logits, dim=-1)
        chosen = log_probs[torch.arange(len(y), device=y.device), y]
        return torch.autograd.grad(chosen.sum(), x_in)[0]


def classifier_cond_fn(classifier: Model, scale: float,
                       precision: str = "fp32") -> CondFn:
    """The sampler hook s * grad_x log p(y | x_t), labels from `y`.

    The classifier runs at `precision` (chapter 4's; "auto": bf16 where
    native), as the sampled network does; its log-softmax in float32.
    """
    def cond_fn(x: Tensor, t: Tensor, y: Tensor, **_: Any) -> Tensor:
        net = autocast_model(classifier,
                             resolve_precision(precision, x.device),
                             x.device)
        return scale * classifier_grad(net, x, t, y)
    return cond_fn

# %% [markdown]
# Two checks on a small random classifier (its weights perturbed, since a
# new network's last layer is zero and its gradient with it). The
# gradient agrees with
# finite differences of $\log p(y \mid x_t)$, and an image's gradient does
# not depend on the other images of its batch:

# %%
from adm_lib.unet import EncoderUNetModel

probe = EncoderUNetModel(image_size=8, in_channels=1, model_channels=32,
                         out_channels=10, num_res_blocks=1,
                         attention_resolutions=(), channel_mult=(1, 2),
                         pool="adaptive").eval()
with torch.no_grad():
    for weight in probe.parameters():
        weight.add_(0.1 * torch.randn_like(weight))
x = torch.randn(3, 1, 8, 8)
t = torch.tensor([10, 200, 900])
y = torch.tensor([3, 1, 4])
grad = classifier_grad(probe, x, t, y)
direction = torch.randn_like(x)
h = 1e-2  # float32: a step well above round-off


def log_p(x: torch.Tensor) -> torch.Tensor:
    return probe(x, t).log_softmax(-1)[torch.arange(3), y]


numeric = (log_p(x + h * direction) - log_p(x - h * direction)) / (2 * h)
analytic = (grad * direction).flatten(1).sum(1)
alone = classifier_grad(probe, x[1:2], t[1:2], y[1:2])
print(f"directional derivative, analytic {analytic.tolist()}")
print(f"                         numeric {numeric.tolist()}")
assert torch.allclose(analytic, numeric, rtol=1e-2, atol=1e-4)
assert torch.allclose(alone, grad[1:2], atol=1e-6)
assert analytic.abs().min() > 1e-3  # a real gradient, not zeros

# %% [markdown]
# **Equal to the reference.** The parity fixtures hold a random
# class-conditional UNet and classifier, and the reference's guided DDIM
# samples (Algorithm 2, scale 3, ten steps) and one guided ancestral step
# (Algorithm 1). The same weights, through `classifier_cond_fn` and
# chapter 2's samplers, give the same numbers (the test suite checks this
# too, in `tests/test_diffusion.py`):

# %%
from adm_lib.compat import guided_diffusion as gd
from adm_lib.diffusion import ddim_sample_loop as ddim_loop

fixtures = Path("../shared/reference/guided_diffusion")
if (fixtures / "diffusion_a.pt").exists():
    ref, unet, clf = (torch.load(fixtures / f"{n}_a.pt", weights_only=True)
                      for n in ("diffusion", "unet", "classifier"))
    ref_model = gd.model_from_flags(unet["flags"]).eval()
    ref_model.load_state_dict(unet["state_dict"])
    ref_classifier = gd.classifier_from_flags(clf["flags"]).eval()
    ref_classifier.load_state_dict(clf["state_dict"])
    spaced = respace(gd.diffusion_from_flags(unet["flags"]),
                     ref["ddim_respacing"])
    hook = classifier_cond_fn(ref_classifier, float(ref["guidance_scale"]))
    kwargs = {"y": ref["guide_y"]}
    ours = ddim_loop(spaced, ref_model, ref["x_T"], model_kwargs=kwargs,
                     cond_fn=hook)
    with torch.no_grad():
        step = p_sample(spaced, ref_model, ref["ddpm_step_x"],
                        ref["ddpm_step_t"], cond_fn=hook, model_kwargs=kwargs,
                        noise=ref["ddpm_step_noise"])
    gaps = {"guided DDIM": ours - ref["ddim_eta0_guided"],
            "guided ancestral step": step["sample"]
            - ref["ddpm_step_guided_sample"]}
    for name, gap in gaps.items():
        print(f"{name}: largest difference {gap.abs().max():.2e}")
        assert gap.abs().max() < 1e-4
    moved = (ref["ddim_eta0_guided"] - ref["ddim_eta0"]).abs().max()
    print(f"(guidance itself moves the samples by up to {moved:.2f})")
else:
    print(f"no fixtures at {fixtures}: parity not shown")

# %% [markdown]
# ## 6.3 Guided sampling in batches
#
# `guided_sample` runs one batch from noise to images with Algorithm 1
# (`sampler="ddpm"`) or Algorithm 2 (`"ddim"`), on whatever respaced
# diffusion it is given (chapter 2's `respace`: `"250"`, `"ddim25"`...).
# It takes the labels as chapter 2's loops do, in `model_kwargs={"y":
# labels}`, which reach the model and the conditioning function. The
# paper guides unconditional models too; `ignore_labels` wraps such a
# model so that it takes, and ignores, the labels the classifier needs.

# %%
#| export
def ignore_labels(model: Model) -> Model:
    """An unconditional model that accepts (and drops) the labels y."""
    def unconditional(x: Tensor, t: Tensor, y: Tensor | None = None,
                      **kwargs: Any) -> Tensor:
        return model(x, t, **kwargs)
    return unconditional


def guided_sample(
    diffusion: GaussianDiffusion, model: Model, noise: Tensor,
    sampler: str = "ddpm", cond_fn: CondFn | None = None,
    guide_at_mean: bool = False, eta: float = 0.0, progress: bool = False,
    callback: Callable[[dict[str, Tensor]], None] | None = None,
    noise_fn: NoiseFn = torch.randn_like,
    model_kwargs: dict[str, Tensor] | None = None,
) -> Tensor:
    """Images from noise by Algorithm 1 ("ddpm") or 2 ("ddim").

    `model_kwargs` go to the model and to `cond_fn`, as in chapter 2's
    loops: the labels as `y`, an upsampler's `low_res` (chapter 7);
    `noise_fn(x)` gives each step's noise.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, "
                         f"not {sampler!r}")
    kwargs = model_kwargs or {}
    if cond_fn is not None and kwargs.get("y") is None:
        raise ValueError("guidance needs labels: pass model_kwargs="
                         "{'y': labels}")
    if guide_at_mean and sampler != "ddpm":
        raise ValueError("guide_at_mean applies to ancestral sampling "
                         "(Algorithm 1, sampler='ddpm') only")
    if sampler == "ddpm":
        return p_sample_loop(diffusion, model, noise, progress, callback,
                             noise_fn=noise_fn, model_kwargs=kwargs,
                             cond_fn=cond_fn, guide_at_mean=guide_at_mean)
    return ddim_sample_loop(diffusion, model, noise, progress, callback,
                            noise_fn=noise_fn, model_kwargs=kwargs,
                            cond_fn=cond_fn, eta=eta)

# %% [markdown]
# **Noise per sample.** Every random number a sample uses, its $x_T$ and
# then the noise of each ancestral (or $\eta > 0$ DDIM) step, comes from a
# generator of its own, seeded from `seed` and the sample's index
# (`sample_noise`), and reaches chapter 2's loops as their `noise_fn`. A
# sample then does not depend on the batch it was drawn in: a seed gives
# the same samples with any batch size or number of GPUs, up to float
# rounding (a batched kernel may add in another order), and the same noise
# at every guidance scale, which makes grids across scales comparable.
# One seed gives other numbers on a CPU and on a GPU, whose generators
# differ. The price is a kernel per sample and step, as the generators
# are the samples' own; deterministic DDIM ($\eta = 0$), whose steps
# scale their noise by zero, draws x_T alone.

# %%
#| export
def sample_seed(seed: int, index: int, stream: int = 0) -> int:
    """The seed of the noise stream of sample `index` under `seed`.

    `stream` > 0 names another use of the same samples' noise (a
    cascade's upsampler, chapter 7).
    """
    if stream:  # hashed: independent of stream 0 but by 32-bit chance
        return step_seed(seed, index, stream)
    # Seed s owns [s M, s M + M), M = 1,000,003: (seed, index) pairs never
    # share a stream while index < M. CPU generators keep a seed's low 32
    # bits, so there this holds for seeds below 4,294; CUDA keeps 64.
    return (seed * 1_000_003 + index) % 2**64


def sample_noise(seed: int, indices: range,
                 device: str | torch.device = "cpu",
                 stream: int = 0) -> NoiseFn:
    """Noise whose row k comes from sample indices[k]'s own stream.

    Each call draws the next noise of every stream on `device`: first a
    sample's x_T, then its steps' noise, whatever batch it is in.
    """
    generators = [torch.Generator(device).manual_seed(
        sample_seed(seed, i, stream)) for i in indices]

    def noise_fn(like: Tensor) -> Tensor:
        if len(like) != len(generators):
            raise ValueError(f"noise for {len(generators)} samples, "
                             f"asked for {len(like)}")
        # Contiguous whatever `like`'s layout (channels_last on a GPU): a
        # row's numbers are drawn in memory order.
        noise = torch.empty(like.shape, dtype=like.dtype, device=like.device)
        for row, generator in zip(noise, generators, strict=True):
            row.normal_(generator=generator)
        return noise
    return noise_fn

# %% [markdown]
# `sample_batches` draws any number of samples batch by batch with a
# progress bar and returns them as the reference stores them: uint8
# images N x H x W x C and their labels. The noise is made on the device,
# one batch at a time, so memory is that of a batch however many samples
# are drawn; drawing it all up front would hold 39 GB for 50,000 images
# at 256x256.

# %%
#| export
def sample_batches(
    diffusion: GaussianDiffusion, model: Model, count: int,
    shape: tuple[int, int, int], labels: Tensor | None = None,
    batch_size: int = 64, device: str | torch.device = "cpu",
    seed: int = 0, progress: bool = False, precision: str = "fp32",
    model_kwargs: dict[str, Tensor] | None = None, stream: int = 0,
    sample_fn: Callable[..., Tensor] | None = None, **options: Any,
) -> tuple[np.ndarray, np.ndarray | None]:
    """`count` samples as uint8 N x H x W x C, and their labels.

    `model_kwargs` hold a row per sample (as `labels`), given to the model
    a batch at a time; `options` go to `sample_fn` (None: `guided_sample`;
    chapter 8's `solver_sample` has its signature): sampler, cond_fn,
    guide_at_mean, eta. Sample i's noise, x_T and steps, comes from
    `sample_noise(seed, ..., stream)`'s row i, so samples do not depend on
    the batch size. The network runs at `precision` (chapter 4's; "auto":
    bf16 where native), the sampler's arithmetic in float32.
    """
    model_kwargs = dict(model_kwargs or {})
    for name, rows in {"labels": labels, **model_kwargs}.items():
        if rows is not None and len(rows) != count:
            raise ValueError(f"{len(rows)} {name} for {count} samples")
    device = torch.device(device)
    model = autocast_model(model, resolve_precision(precision, device),
                           device)
    # Deterministic DDIM scales its steps' noise by zero: they take zeros,
    # one fill per step, not a draw per sample; x_T is the stream's first.
    still = options.get("sampler") == "ddim" and not options.get("eta")
    # Filled in place: no second copy of all samples, as concatenating has.
    images = np.empty((count, *shape[1:], shape[0]), np.uint8)
    bar = tqdm(total=count, unit="img", desc="sample", disable=not progress)
    for start in range(0, count, batch_size):
        rows = range(start, min(start + batch_size, count))
        noise_fn = sample_noise(seed, rows, device, stream)
        x_T = noise_fn(torch.empty((len(rows), *shape), device=device))
        kwargs = {k: v[start:rows.stop].to(device)
                  for k, v in model_kwargs.items()}
        if labels is not None:
            kwargs["y"] = labels[start:rows.stop].to(device)
        x = (sample_fn or guided_sample)(
            diffusion, model, x_T,
            noise_fn=torch.zeros_like if still else noise_fn,
            model_kwargs=kwargs, **options)
        images[start:rows.stop] = to_uint8(x)
        bar.update(len(rows))
    bar.close()
    return images, None if labels is None else labels.cpu().numpy()

# %% [markdown]
# A small random UNet shows it: five samples drawn one at a time equal
# the same five drawn as one batch, with the ancestral sampler, whose
# every step adds noise. Sample 2's stream is the same whether it is row
# 2 of a batch of five or row 0 of a batch starting at index 2.

# %%
from adm_lib.diffusion import GaussianDiffusion
from adm_lib.forward import get_named_beta_schedule
from adm_lib.unet import UNetModel

toy_unet = UNetModel(image_size=8, in_channels=1, model_channels=32,
                     out_channels=2, num_res_blocks=1,
                     attention_resolutions=(), channel_mult=(1, 2)).eval()
with torch.no_grad():  # a new UNet's output layer is zero: perturb it
    for weight in toy_unet.parameters():
        weight.add_(0.05 * torch.randn_like(weight))
toy_unet.to(device)
toy_diffusion = respace(
    GaussianDiffusion(get_named_beta_schedule("cosine", 100)), "10")
drawn = {size: sample_batches(toy_diffusion, toy_unet, 5, (1, 8, 8),
                              batch_size=size, device=device, seed=seed)[0]
         for size in (1, 5)}
gap = np.abs(drawn[1].astype(int) - drawn[5].astype(int)).max()
streams = sample_noise(seed, range(5), device)
later = sample_noise(seed, range(2, 5), device)
for _ in range(3):  # x_T, then two steps' noise
    like = torch.empty(5, 1, 8, 8, device=device)
    assert torch.equal(streams(like)[2:], later(like[2:]))
print(f"batch 1 against batch 5: largest difference {gap} of 255 grey "
      f"levels; pixel spread {drawn[5].std():.0f}")
assert gap <= 1 and drawn[5].std() > 10  # equal, and not a flat image

# %% [markdown]
# A network sampled on a GPU takes chapter 4's fast path, as in training:
# channels_last weights and cuDNN's autotuner (`fast_backends`), and, if
# asked, `torch.compile`. `prepare_for_sampling` is that one step, taken
# by `adm sample` for each network it loads and by `adm bench` for the
# network whose sampling it times, so the bench times what `adm sample`
# runs. The layout changes the order of a convolution's sums, not its
# result, and not the noise, which `sample_noise` draws in a contiguous
# layout whatever the network's: samples agree up to float rounding.

# %%
#| export
def prepare_for_sampling(model: nn.Module, device: str | torch.device,
                         precision: str = "auto", layout: str = "auto",
                         compile: bool = False) -> nn.Module:
    """`model` in chapter 4's layout and backends for `device` and
    `precision` (TF32 unless fp32), compiled if asked."""
    device = torch.device(device)
    fast_backends(device, precision)
    model.to(device, memory_format=memory_format(layout, device))
    return torch.compile(model) if compile else model

# %% [markdown]
# On a CPU the fast path keeps the contiguous layout; forced to
# channels_last, the toy UNet draws the same samples:

# %%
toy_last = copy.deepcopy(toy_unet).to(memory_format=torch.channels_last)
last = sample_batches(toy_diffusion, toy_last, 5, (1, 8, 8),
                      batch_size=5, device=device, seed=seed)[0]
layout_gap = np.abs(last.astype(int) - drawn[5].astype(int)).max()
print(f"channels_last against contiguous: largest difference "
      f"{layout_gap} of 255 grey levels")
assert layout_gap <= 1

# %% [markdown]
# ## 6.4 Classifier-free guidance
#
# Classifier guidance needs a second network, trained on noisy images,
# whose gradients are not always meaningful: a classifier can be fooled
# by changes that raise $p(y \mid x_t)$ without looking more like $y$.
# Ho & Salimans (2021) removed it. Since
# $\nabla \log p(y \mid x_t) = \nabla \log p(x_t \mid y) -
# \nabla \log p(x_t)$, a model that knows both the conditional and the
# unconditional score supplies the classifier's gradient itself. One
# network learns both if a share of its training labels (`label_dropout`,
# 10 to 20 %) is replaced by a "null" label; at sampling time it runs
# twice and mixes its noise predictions,
#
# $$\tilde\epsilon = \epsilon_\theta(x_t, y) + w\,\big(\epsilon_\theta(x_t,
# y) - \epsilon_\theta(x_t, \varnothing)\big),$$
#
# which is classifier guidance of scale $1 + w$ with the implicit
# classifier $p(y \mid x_t) \propto p(x_t \mid y) / p(x_t)$. At $w = 0$
# it is the conditional model. `classifier_free_model` wraps the model so
# that any sampler runs it unchanged: one forward pass on the doubled
# batch, the mixed $\epsilon$ on the image channels, and the conditional
# output's variance channels. `adm train` learns such a model with
# `--set label_dropout=0.1` (chapter 4); its null label is `num_classes`.

# %%
#| export
def classifier_free_model(model: Model, scale: float,
                          null_label: int) -> Model:
    """eps(y) + w (eps(y) - eps(null)): classifier-free guidance, w=scale."""
    def guided(x: Tensor, t: Tensor, y: Tensor, **kwargs: Any) -> Tensor:
        if scale == 0:
            return model(x, t, y=y, **kwargs)
        labels = torch.cat([y, torch.full_like(y, null_label)])
        doubled = {k: torch.cat([v, v]) for k, v in kwargs.items()}
        out = model(torch.cat([x, x]), torch.cat([t, t]), y=labels,
                    **doubled)
        cond, uncond = out.chunk(2)
        c = x.shape[1]
        eps = cond[:, :c] + scale * (cond[:, :c] - uncond[:, :c])
        return torch.cat([eps, cond[:, c:]], dim=1)
    return guided

# %% [markdown]
# Mixing is linear, so a model whose two predictions agree is left
# alone at any scale, and at $w = 0$ the wrapper is the model itself:

# %%
def toy_model(x: torch.Tensor, t: torch.Tensor,
              y: torch.Tensor) -> torch.Tensor:
    """eps = x * (label + 1), with a variance channel of ones."""
    return torch.cat([x * (y[:, None, None, None] + 1), torch.ones_like(x)],
                     dim=1)


x = torch.randn(2, 1, 4, 4)
t, y = torch.tensor([5, 5]), torch.tensor([2, 3])
mixed = classifier_free_model(toy_model, 0.5, null_label=0)(x, t, y)
expected = x * (y[:, None, None, None] + 1) * 1.5 - 0.5 * x
assert torch.allclose(mixed[:, :1], expected)
assert torch.equal(mixed[:, 1:], torch.ones_like(x))
assert torch.equal(classifier_free_model(toy_model, 0.0, 0)(x, t, y),
                   toy_model(x, t, y))
print("mixed eps of the first image, first row:", mixed[0, 0, 0].tolist())

# %% [markdown]
# ## 6.5 Three models on MNIST-5k
#
# The experiments need a class-conditional diffusion model, an
# unconditional one and a noisy classifier, all on the same data. They are
# trained with chapter 4's `train`, from the `preset` of `adm_lib.config`
# changed by the parameters cell: by default chapter 4.9's recipe for
# runs of minutes, under which the networks predict $x_0$ with fixed
# variances ($L_\text{simple}$ alone) and keep an EMA at 0.95. The
# conditional model is trained with `label_dropout` so that it serves
# classifier-free guidance too: with a real label it is an ordinary
# conditional model. Mixing its $x_0$ predictions is the same as mixing
# $\epsilon$: at a given $x_t$ each is an affine function of the other,
# and the weights $1 + w$ and $-w$ sum to one.

# %%
if runs.exists() and not reuse_runs:
    shutil.rmtree(runs)
base = {"data": data, "device": device, "seed": seed, "sample_interval": 0,
        "save_interval": 10**9, "log_interval": 10}
configs = {
    "conditional": make_config("diffusion", preset, {
        **base, **settings, "steps": train_steps,
        "label_dropout": label_dropout}),
    "unconditional": make_config("diffusion", preset, {
        **base, **settings, "steps": train_steps, "class_cond": False}),
    "classifier": make_config("classifier", preset, {
        **base, **classifier_settings, "steps": classifier_steps,
        "eval_interval": 0}),
}
timings = {}
for name, config in configs.items():
    start = time.perf_counter()
    train(config, runs / name, resume=reuse_runs and (runs / name).exists())
    timings[name] = time.perf_counter() - start
models = {name: load_run(runs / name, device=device) for name in configs}
for name, run in models.items():
    params = sum(p.numel() for p in run.model.parameters())
    print(f"{name:<13} step {run.step:>6}  {params / 1e6:.2f}M parameters  "
          f"{timings[name]:.0f} s")
    assert run.step == configs[name].steps

# %% [markdown]
# The samplers use the EMA weights and `respacing` steps of Algorithm 1.
# Each guidance scale draws `samples_per_scale` samples with labels
# $0, 1, \dots, 9, 0, 1, \dots$ and, for one sampling seed, the same noise,
# so the first ten of every scale form one row of a grid: a column is one
# starting noise and one class, guided harder down the column.
#
# Every setting is drawn once for each seed of `sample_seeds`. The models
# are trained once, with the training seed `seed`; the sampling seeds
# change only the noise the samples start from and take at each step. The
# spread of a score over them is therefore the sampling error of
# `samples_per_scale` samples from these three trained models, not the
# variation between training runs, which would add to it.

# %%
conditional, unconditional, classifier = (
    models[n] for n in ("conditional", "unconditional", "classifier"))
num_classes = conditional.config.num_classes
shape = (conditional.config.in_channels, conditional.config.image_size,
         conditional.config.image_size)
labels = torch.arange(samples_per_scale) % num_classes
spaced = respace(conditional.diffusion, respacing)
guided_models = {"conditional": conditional.model,
                 "unconditional": ignore_labels(unconditional.model)}


def draw(model: nn.Module, sample_seed: int, cond_fn=None,
         **options) -> np.ndarray:
    """The chapter's samples of one setting and seed (uint8 NHWC)."""
    images, _ = sample_batches(spaced, model, samples_per_scale, shape,
                               labels, batch_size, device, sample_seed,
                               cond_fn=cond_fn, **options)
    return images


samples = {}  # (model, scale, sampling seed): uint8 NHWC images
start = time.perf_counter()
for name, model in guided_models.items():
    for s in scales:
        hook = classifier_cond_fn(classifier.model, s) if s else None
        for k in sample_seeds:
            samples[name, s, k] = draw(model, k, hook)
sampling_time = time.perf_counter() - start
print(f"{len(samples)} settings and seeds x {samples_per_scale} samples "
      f"in {sampling_time:.0f} s")
assert all(s.shape == (samples_per_scale, *shape[1:], shape[0])
           for s in samples.values())

# %% [markdown]
# Classifier-free guidance samples the conditional model through
# `classifier_free_model`. At $w = 0$ that is the conditional model
# itself (6.4), with the same noise, so its samples are those of the
# conditional model at $s = 0$, reused rather than drawn again:

# %%
start = time.perf_counter()
for w in free_scales:
    free = classifier_free_model(conditional.model, w, num_classes)
    for k in sample_seeds:
        same = ("conditional", 0.0, k)
        samples["classifier-free", w, k] = (
            samples[same] if w == 0 and same in samples else draw(free, k))
print(f"classifier-free: {len(free_scales)} scales x {len(sample_seeds)} "
      f"seeds in {time.perf_counter() - start:.0f} s")

# %% [markdown]
# ## 6.6 Grids across guidance scales
#
# The grids show the first sampling seed.

# %%
def grid_figure(name: str, values: list[float], symbol: str) -> plt.Figure:
    """Rows of the first ten samples of each scale of a setting."""
    rows = [np.concatenate(
        list(samples[name, v, sample_seeds[0]][:num_classes]), axis=1)
        for v in values]
    fig, axes = plt.subplots(len(values), 1, figsize=(8, 0.95 * len(values)))
    for ax, row, v in zip(axes, rows, values, strict=True):
        ax.imshow(row.squeeze(-1), cmap="gray", vmin=0, vmax=255)
        ax.set_ylabel(f"{symbol} = {v:g}", rotation=0, ha="right",
                      va="center")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{name} model: classes 0 to 9")
    return fig


figures = {f"grid_{name}": grid_figure(name, scales, "s")
           for name in guided_models}
figures["grid_free"] = grid_figure("classifier-free", free_scales, "w")
plt.show()

# %% [markdown]
# At $s = 0$ the unconditional model draws whatever digit its noise leads
# to, and its row ignores the labels; guidance pulls each column toward
# its class. The conditional model starts from the right classes, and
# guidance makes its digits bolder and more alike.
#
# **Means and error bars.** A score of one seed is one draw of a noisy
# estimate. Every number from here on is the mean over the sampling seeds
# $\pm$ its standard error: the standard deviation over seeds (with
# $n - 1$) divided by $\sqrt{n}$, for $n$ seeds. Two settings differ by
# more than sampling error only when their gap is well beyond both
# standard errors; with three seeds a standard error is itself rough, so
# gaps of a standard error or two are not claimed.

# %%
def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (nan for a single value)."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return float(values.mean()), float("nan")
    return (float(values.mean()),
            float(values.std(ddof=1) / np.sqrt(len(values))))


mean, se = mean_se([1.0, 2.0, 3.0])
assert mean == 2.0 and abs(se - 1 / np.sqrt(3)) < 1e-12

# %% [markdown]
# **The gradient at $x_t$ or at the mean.** The reference takes the
# classifier's gradient at $x_t$; the derivation of 6.1 expands around
# the unguided mean $\mu$, which is $x_{t-1}$'s expected value. The two
# points differ by one denoising step, and the classifier, asked about
# $\mu$ with the timestep $t$ of $x_t$, sees a cleaner image than it was
# trained to expect at $t$. The same noise and labels, guided both ways at
# the middle scale, for every sampling seed; the accuracy gap is taken
# seed by seed (same noise), then averaged:

# %%
middle = scales[len(scales) // 2]
hook = classifier_cond_fn(classifier.model, middle)
judge = feature_extractor(features, inception_weights or None, device)


def accuracy(images: np.ndarray) -> float:
    """Share of samples the evaluation network puts in their class."""
    logits = compute_activations(images, judge, 256, device)["logits"]
    return float((logits.argmax(1) == labels.numpy()).mean())


compared = {"difference": [], "at x_t": [], "at the mean": []}
start = time.perf_counter()
for k in sample_seeds:
    at_mean = draw(guided_models["unconditional"], k, hook,
                   guide_at_mean=True)
    at_x_t = samples["unconditional", middle, k]
    gap = np.abs(at_mean.astype(float) - at_x_t.astype(float)).mean()
    compared["difference"].append(gap)
    if features != "inception":
        compared["at x_t"].append(accuracy(at_x_t))
        compared["at the mean"].append(accuracy(at_mean))
print(f"s = {middle:g}, unconditional model, {len(sample_seeds)} seeds "
      f"({time.perf_counter() - start:.0f} s): mean |difference| "
      "{:.1f} ± {:.1f} of 255 grey levels".format(
          *mean_se(compared["difference"])))
if features != "inception":
    for where in ("at x_t", "at the mean"):
        print(f"accuracy {where}: per seed "
              f"{[round(a, 3) for a in compared[where]]}, "
              "mean {:.1%} ± {:.1%}".format(*mean_se(compared[where])))
    lead = np.subtract(compared["at x_t"], compared["at the mean"])
    print("x_t minus mean, seed by seed: {:+.1%} ± {:.1%}".format(
        *mean_se(lead)))
assert min(compared["difference"]) > 0

# %% [markdown]
# ## 6.7 Fidelity against diversity
#
# The paper measures what guidance trades with chapter 5's metrics:
# FID (lower is better) and, separately, precision (fidelity) and recall
# (diversity), and the Inception Score, which rewards confident and
# varied class predictions. Here they use the `features` network
# (`mnist`: chapter 5's MNIST classifier, whose numbers are labelled
# "(mnist-net)" and comparable only with each other). Its own accuracy
# on the samples, against the labels they were drawn for, says how often
# guidance got the class right, by a network that did not guide it.
# Chapter 5's `score_activations` computes all of them from the features
# of a batch of real images and of the samples. The real images are
# `num_ref` images of the training data, in a seeded random order. Each
# seed's samples are scored on their own, then the scores averaged.

# %%
real = load_dataset(data, resolution=shape[1], channels=shape[0])
order = torch.randperm(len(real),
                       generator=torch.Generator().manual_seed(seed))
chosen = order[:num_ref].tolist()
real_images = to_uint8(real.images(chosen))
ref_acts = compute_activations(real_images, judge, 256, device)
with_labels = labels.numpy() if features != "inception" else None
scores = {key: score_activations(
    ref_acts, compute_activations(images, judge, 256, device), with_labels,
    device) for key, images in samples.items()}
names = ["inception_score", "fid", "precision", "recall"]
if with_labels is not None:
    names.append("accuracy")
settings_of = {"conditional": scales, "unconditional": scales,
               "classifier-free": free_scales}
summary = {(name, v): {n: mean_se([scores[name, v, k][n]
                                   for k in sample_seeds]) for n in names}
           for name, values in settings_of.items() for v in values}
print(f"mean ± standard error over {len(sample_seeds)} sampling seeds")
print(f"{'setting':<22}" + "".join(f"{n[:9]:>17}" for n in names))
for (name, v), row in summary.items():
    print(f"{name + f' {v:g}':<22}" + "".join(
        f"{m:>9.3f} ± {e:<4.3f}" for m, e in row.values()))
assert all(np.isfinite(row[n]) for row in scores.values() for n in names)

# %%
fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3))
for name, values in settings_of.items():
    style = "--" if name == "classifier-free" else "-"
    for ax, metric in zip(axes, names, strict=True):
        means, errors = zip(*(summary[name, v][metric] for v in values),
                            strict=True)
        ax.errorbar(values, means, yerr=errors, linestyle=style,
                    marker="o", capsize=3, label=name)
        ax.set_title(metric.replace("_", " "))
        ax.set_xlabel("scale (s, or w dashed)")
axes[0].legend(fontsize=8)
fig.suptitle(f"guidance scale against the metrics, {features}-net "
             f"features, {samples_per_scale} samples each: mean ± s.e. "
             f"over {len(sample_seeds)} sampling seeds")
fig.tight_layout()
figures["scales"] = fig
plt.show()

# %% [markdown]
# The paper's Figure 5 (arXiv version) plots the trade-off itself:
# precision against recall as BigGAN-deep's truncation and the guidance
# scale vary, one curve per method. Moving along a curve buys precision
# with recall; a curve above and to the right of another is the better
# method. The error bars are standard errors in both directions.

# %%
fig, ax = plt.subplots(figsize=(4.5, 4))
for name, values in settings_of.items():
    style = "--" if name == "classifier-free" else "-"
    recall, recall_se = zip(*(summary[name, v]["recall"] for v in values),
                            strict=True)
    precision, precision_se = zip(
        *(summary[name, v]["precision"] for v in values), strict=True)
    ax.errorbar(recall, precision, xerr=recall_se, yerr=precision_se,
                linestyle=style, marker="o", capsize=3, label=name)
    for v, r, p in zip(values, recall, precision, strict=True):
        ax.annotate(f"{v:g}", (r, p), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
ax.set_xlabel("recall (diversity)")
ax.set_ylabel("precision (fidelity)")
ax.legend(fontsize=8)
ax.set_title(f"the trade-off, labelled by scale ({len(sample_seeds)} seeds)")
fig.tight_layout()
figures["tradeoff"] = fig
plt.show()
if figures_dir:
    for key, figure in figures.items():
        figure.savefig(Path(figures_dir) / f"06_{key}.png", dpi=120,
                       bbox_inches="tight")

# %% [markdown]
# ## 6.8 `adm sample`
#
# The command line does the same for any model: a run folder or
# checkpoint of `adm train`, or a released checkpoint of the reference
# through `--model-flags` (the appendix's compatibility loader); an
# optional classifier with `--classifier-scale`, or `--cfg-scale` for a
# model trained with label dropout; either sampler with any respacing;
# chosen or random labels. It writes the reference's `.npz` (`arr_0`
# uint8 NHWC, `arr_1` labels), which `adm evaluate` (chapter 5) and the
# reference's evaluator read, and a PNG grid beside it:

# %%
batch_file = runs / "samples_guided.npz"
command = [sys.executable, "-m", "adm_lib.cli", "sample",
           str(runs / "unconditional"), "--classifier",
           str(runs / "classifier"), "--classifier-scale", str(middle),
           "--num-samples", "20", "--labels", "0,1,2,3,4,5,6,7,8,9",
           "--respacing", respacing, "--device", device, "--out",
           str(batch_file), "--quiet"]
print(subprocess.run(command, check=True, capture_output=True,
                     text=True).stdout)
with np.load(batch_file) as batch:
    print({key: (batch[key].shape, batch[key].dtype) for key in batch})
    assert batch["arr_0"].shape == (20, *shape[1:], shape[0])
    assert batch["arr_1"].tolist() == list(range(10)) * 2

# %% [markdown]
# `adm demo` runs this chapter's story in one command: it trains a small
# class-conditional model and a classifier on MNIST-5k, draws every digit
# at two guidance scales, and reports the evaluation network's accuracy
# on them and their FID, in minutes on a two-core CPU (the README has
# its measured time; chapter 4.9 its recipe, and why it guides with
# ancestral steps rather than DDIM's).
#
# ## 6.9 A longer run, recorded
#
# The smoke configuration trains for seconds and its samples are noise.
# A longer run, on a 2-core CPU with native bf16, with every setting
# sampled with three seeds (its machine, day and times, and the run
# before it: [appendix M.6](appendix_measurements.html)):
#
# ```sh
# adm book run 6 -p train_steps 800 -p classifier_steps 400 \
#     -p respacing 25 -p scales "[0.0, 1.0, 4.0]" \
#     -p free_scales "[0.0, 1.0, 4.0]" -p samples_per_scale 80 \
#     -p sample_seeds "[0, 1, 2]" -p num_ref 2000 \
#     -p runs_dir build/chapter6_record -p figures_dir chapters/figures
# ```
#
# It trains 800 steps of batch 32 for each diffusion model (1.37M
# parameters), 400 of batch 64 for the classifier (0.56M, one residual
# block per level), then samples 25 ancestral steps for every setting.
# The grids (first seed), a column per class and starting noise:
#
# ![Conditional model across guidance scales](figures/06_grid_conditional.png)
#
# ![Unconditional model, guided](figures/06_grid_unconditional.png)
#
# ![Classifier-free guidance across scales](figures/06_grid_free.png)
#
# The digits are on black backgrounds, as in the data. Down a column the
# noise is the same and only the guidance changes: on the unconditional
# model, whose samples at $s = 0$ ignore the label, guidance at $s = 4$
# turns most columns into the digit asked for (the 0, 1, 3, 5, 7 and 9),
# and on the conditional model it straightens the 5 and the 9; its 4 is
# poor at every scale. Classifier-free guidance at $w = 4$ draws
# thicker, bolder strokes than the data's.
#
# The scores, with the MNIST network's features against 2,000 real
# digits (FID and precision/recall are "(mnist-net)"; accuracy is that
# network's, on the labels the samples were drawn for, 10% by chance),
# as mean $\pm$ standard error over the three sampling seeds, for the
# conditional (cond.) and unconditional (uncond.) models under classifier
# guidance and the conditional model under classifier-free guidance
# (free), whose $w = 0$ is the conditional model at $s = 0$:
#
# | setting | IS | FID | precision | recall | accuracy, % |
# | --- | --- | --- | --- | --- | --- |
# | cond., $s = 0$ | 4.46±.05 | 1.68±.05 | .69±.04 | .86±.04 | 88.3±1.8 |
# | cond., $s = 1$ | 5.05±.12 | 1.37±.07 | .72±.04 | .81±.02 | 95.8±1.8 |
# | cond., $s = 4$ | 5.29±.16 | 1.26±.03 | .77±.05 | .75±.04 | 97.9±1.5 |
# | uncond., $s = 0$ | 2.51±.09 | 4.92±.35 | .46±.02 | .91±.03 | 11.7±1.5 |
# | uncond., $s = 1$ | 2.42±.05 | 5.23±.08 | .49±.02 | .86±.01 | 39.2±3.3 |
# | uncond., $s = 4$ | 3.05±.09 | 3.44±.12 | .55±.03 | .95±.02 | 71.3±1.9 |
# | free, $w = 1$ | 5.88±.07 | 1.54±.03 | .80±.02 | .52±.03 | 99.2±0.8 |
# | free, $w = 4$ | 6.07±.05 | 4.08±.06 | .47±.02 | .12±.02 | 100.0±0.0 |
#
# ![Metrics against the guidance scale](figures/06_scales.png)
#
# ![Precision against recall](figures/06_tradeoff.png)
#
# A gap is claimed below only when it is more than twice the standard
# error of the difference, $\sqrt{e_1^2 + e_2^2}$; with three seeds even
# that is a rough test. What this run shows, and what it does not:
#
# * **Classifier guidance trades diversity for fidelity, as the paper
#   says.** On the conditional model the accuracy rises from 88.3% to
#   95.8% at $s = 1$ and 97.9% at $s = 4$, the Inception Score from 4.46
#   to 5.29, and FID improves (1.68 to 1.26, seven standard errors),
#   since unguided samples are sometimes of the wrong class. Recall falls
#   from 0.86 to 0.75 at $s = 4$, 2.2 standard errors: the cost in
#   diversity shows. Precision rises from 0.69 to 0.77, within its error.
# * **An unconditional model guided at $s = 1$ is not a conditional
#   one.** In theory it samples $p(x \mid y)$; here it puts 39.2% in the
#   class asked for, against 88.3% for the conditional model unguided and
#   95.8% guided at the same scale. A 400-step classifier's
#   $\log p_\phi(y \mid x_t)$ is a weak model of the class, and the paper
#   too guides its unconditional model at $s = 10$ (its Table 4). At $s = 4$
#   the unconditional model reaches 71.3% and FID 3.44 (from 4.92), a gap
#   of four standard errors.
# * **Classifier-free guidance trades diversity at a higher rate.** At
#   $w = 1$ it matches classifier guidance at $s = 4$ in accuracy (99.2%
#   against 97.9%, within a standard error) and precision, but not in FID
#   (1.54 against 1.26) or recall (0.52 against 0.75), gaps of five
#   standard errors and more. At $w = 4$ recall is 0.12 and precision
#   0.47: the bold strokes of its grid are far from the thin real
#   digits, and FID is back at 4.08.
# * **Here the gradient at the mean is better than at $x_t$.** With the
#   same noise at $s = 1$ on the unconditional model the two kinds of
#   samples differ by 15.4 ± 0.4 grey levels on average, and the accuracy
#   is 39.2 ± 3.3% at $x_t$ against 52.1 ± 1.8% at the mean, a paired gap
#   of $-12.9 \pm 5.1$ points, two and a half standard errors over three
#   seeds (the run before it saw the same gap, $-12.9 \pm 3.3$). The
#   earlier, shorter runs of this chapter (with the paper's recipe,
#   predicting $\epsilon$) saw no gap, or one the other way, so this is
#   a finding about this recipe and classifier, not a rule; the reference
#   takes the gradient at $x_t$, the point its classifier was trained
#   for, and so does `classifier_cond_fn`.
#
# The paper's claims are about the full-scale regime, which needs a GPU:
# the command of the parameters cell trains on CIFAR-10 for 100,000 steps
# and scores 5,000 samples per scale and seed with the CIFAR-10
# network's features (or Inception's, with `-p features inception -p
# inception_weights PATH`). It has not been run for this book yet, so no
# GPU numbers are quoted here.
#
# ## 6.10 Summary
#
# * Guidance conditions a sampler on a classifier through one function,
#   `cond_fn`: Algorithm 1 shifts the ancestral mean by $s\Sigma\nabla\log
#   p(y \mid x_t)$, Algorithm 2 moves DDIM's $\epsilon$ by
#   $-\sqrt{1-\bar\alpha_t}\,s\nabla\log p(y \mid x_t)$.
# * `classifier_cond_fn` equals the reference; `guided_sample` and
#   `sample_batches` sample with it, from conditional and (via
#   `ignore_labels`) unconditional models. Every sample draws its noise
#   from its own stream (`sample_noise`), so a seed gives the same samples
#   whatever the batch size, in the memory of one batch.
# * `prepare_for_sampling` puts a network on its device's fast path
#   (layout, backends, optionally compiled) for `adm sample` and the
#   bench alike; a guiding classifier runs at the sampling precision.
# * `classifier_free_model` replaces the classifier by the model's own
#   conditional and unconditional predictions.
# * The scale trades diversity (recall) for fidelity (precision), which
#   the experiments measure with chapter 5's `score_activations`.

# %% [markdown]
# ## Exercises
#
# 1. Complete the square to show that $\mathcal{N}(x; \mu, \Sigma)\,
#    e^{s (x - \mu)^\top g} \propto \mathcal{N}(x; \mu + s \Sigma g,
#    \Sigma)$, the shift that `condition_mean` applies. What must hold of
#    $\log p_\phi(y \mid x_t)$ next to $\Sigma^{-1}$ for 6.1's expansion?
# 2. From $\nabla_{x_t} \log p(x_t) = -\epsilon / \sqrt{1 - \bar\alpha_t}$,
#    show that `classifier_free_model` of scale $w$ follows the unconditional
#    score plus $(1 + w) \nabla_{x_t} \log p(y \mid x_t)$, with $p(y \mid
#    x_t) \propto p(x_t \mid y) / p(x_t)$: guidance of scale $1 + w$.
# 3. Rerun with `-p scales "[0.0, 1.0, 3.0, 10.0, 30.0]"`. Predict how the
#    unconditional model's accuracy, precision and recall move from $s = 10$
#    to $s = 30$ in the table of 6.7, then check.
# 4. Guide with a classifier trained on clean images only, by rerunning with
#    `-p classifier_settings "{'batch_size': 64, 'noised': False}"`.
#    Predict whether guidance still raises the unconditional model's accuracy
#    in 6.7, and at which $t$ its gradient can be trusted, then check.
# 5. Draw the samples of 6.5 with Algorithm 2 by passing `sampler="ddim"` to
#    `draw`, which hands it to `guided_sample`. From `ddim_guidance_gain` of
#    6.1, predict whether the same $s$ moves DDIM's samples more or less than
#    the ancestral ones, then compare their `score_activations`.
# 6. Write `window_cond_fn(classifier, scale, t_lo, t_hi)`, a hook that
#    guides only at original timesteps $t_\text{lo} \le t < t_\text{hi}$.
#    Predict whether guiding the unconditional model in the noisier or the
#    cleaner half of sampling keeps more of 6.7's accuracy gain, then check.
