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
# at $s = 1$ targets $p(x \mid y)$, and at $s > 1$ something sharper, with
# higher fidelity (precision, Inception Score) and lower diversity
# (recall), though not the $p(x)\,p(y \mid x)^s$ it is often said to be
# (6.10); a guided conditional model never targets $p(x \mid y)$ (6.1).
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
# * 6.8 `adm sample` and `adm demo`, and 6.9 a longer recorded run;
# * 6.10 guidance on chapter 2's toy, where everything is exact: what
#   $s = 1$ and $s > 1$ sample, and classifier-free guidance as the same
#   tilt; 6.11 the one step that makes guided DDIM blow up, guarded, and
#   saturation with dynamic thresholding.

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
train_steps: int = 4  # of each diffusion model
classifier_steps: int = 4  # of the noisy classifier
label_dropout: float = 0.1  # for classifier-free guidance
respacing: str = "5"  # the ancestral sampler's steps
scales: list[float] = [0.0, 1.0, 4.0]  # classifier guidance scales s
free_scales: list[float] = [0.0, 1.0, 4.0]  # classifier-free scales w
samples_per_scale: int = 10  # samples scored at each scale, for each seed
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
# $p_\theta(x_{t-1} \mid x_t) = \mathcal{N}(\mu, \Sigma)$ (chapter 2; the
# paper writes the same step as $x_{t+1} \to x_t$, this book indexes it
# as chapters 1 and 2 do). To condition it on a label $y$ we want to
# sample $p_{\theta,\phi}(x_{t-1} \mid x_t, y) \propto p_\theta(x_{t-1}
# \mid x_t) \, p_\phi(y \mid x_{t-1})$. The classifier's log-probability
# varies slowly next to $\Sigma^{-1}$, so it is close to its first-order
# expansion around $x_{t-1} = \mu$,
#
# $$\log p_\phi(y \mid x_{t-1}) \approx \text{const} + (x_{t-1} - \mu)^\top
# g, \qquad g = \nabla \log p_\phi(y \mid x)\big|_{x = \mu},$$
#
# and the product of the Gaussian with $e^{(x_{t-1} - \mu)^\top g}$ is
# again a Gaussian, with the mean moved: $\mathcal{N}(\mu + \Sigma g,
# \Sigma)$. That is **Algorithm 1**: ancestral sampling with the mean
# shifted by $s\,\Sigma\,g$. The paper's Algorithm 1, as printed, does
# not take $g$ at $\mu$, where its derivation expands, but at $x_t$:
# $\nabla_{x_t} \log p_\phi(y \mid x_t)$, the classifier asked about the
# current point at the current noise level. The mismatch is between the paper's
# derivation and its own algorithm; the reference implements the
# algorithm, and so does chapter 2's `p_sample`, whose
# `guide_at_mean=True` follows the derivation instead (6.6 compares them).
#
# The scale $s$ multiplies the log-probability at every step, so the
# guided sampler follows the tilted scores of $p_t(x_t)\,p_t(y \mid
# x_t)^s$ at every noise level $t$. At $s = 1$ that is $p_t(x_t \mid
# y)$ by Bayes' rule, the noisy version of $p(x \mid y)$, which the
# sampler then draws. The paper grounds $s > 1$ in a renormalised
# classifier $p(y \mid x)^s / Z$, sharper than $p(y \mid x)$, which
# suggests that the samples follow $p(x)\,p(y \mid x)^s / Z$; that holds
# only at $s = 1$. For $s \ne 1$ the tilted densities of the different
# noise levels are in general not the noisy versions of any one
# distribution, and the
# samples are not drawn from $p(x)\,p(y \mid x)^s / Z$: 6.10 computes
# both exactly on a toy and finds them far apart. What $s > 1$ does
# reliably is push samples further towards where the classifier is
# confident. A class-conditional model guided at scale $s$ follows
# $p_t(x_t \mid y)\,p_t(y \mid x_t)^s$, which for $s > 0$ is not $p(x \mid
# y)$ at any level.
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
# Guidance is a function handed to the sampler, not a new sampler.

# %% [markdown]
# The guided step, as a picture: one network evaluation and one
# classifier gradient per step, combined in one of two ways.

# %% jupyter={"source_hidden": true}
from matplotlib.patches import FancyBboxPatch

fig, ax = plt.subplots(figsize=(9, 3.6))
centres = {}


def box(name: str, x: float, y: float, text: str, colour: str) -> None:
    """A labelled box centred at (x, y), remembered under `name`."""
    width, height = 1.9, 0.9
    ax.add_patch(FancyBboxPatch((x - width / 2, y - height / 2), width,
                                height, boxstyle="round,pad=0.05",
                                facecolor=colour, edgecolor="black"))
    ax.text(x, y, text, ha="center", va="center", fontsize=8.5)
    centres[name] = (x, y)


def arrow(a: str, b: str, label: str = "", dy: float = 0.0) -> None:
    """An arrow from box a's edge to box b's, labelled at its middle."""
    (xa, ya), (xb, yb) = centres[a], centres[b]
    ax.annotate("", xy=(xb, yb + dy), xytext=(xa, ya + dy),
                arrowprops={"arrowstyle": "-|>", "shrinkA": 30,
                            "shrinkB": 30, "color": "black"})
    if label:
        ax.text((xa + xb) / 2, (ya + yb) / 2 + dy + 0.12, label,
                ha="center", va="bottom", fontsize=8, color="tab:blue")


box("x", 0.9, 2.0, "$x_t$, step $t$", "white")
box("model", 3.1, 3.2, "diffusion model\n$\\epsilon_\\theta(x_t)$, "
    "$\\Sigma_\\theta(x_t)$", "#dbe9f6")
box("classifier", 3.1, 0.8, "noisy classifier\n$p_\\phi(y \\mid x_t, t)$",
    "#fde2c8")
box("mean", 5.5, 3.2, "mean $\\mu$\n(chapter 2)", "#dbe9f6")
box("grad", 5.5, 0.8, "$g = \\nabla_{x_t}$\n$\\log p_\\phi(y \\mid x_t)$",
    "#fde2c8")
box("alg1", 8.0, 3.2, "Algorithm 1\n$\\mathcal{N}(\\mu + s\\Sigma g, "
    "\\Sigma)$", "#d8f0d2")
box("alg2", 8.0, 0.8, "Algorithm 2\n$\\hat\\epsilon = \\epsilon - "
    "\\sqrt{1-\\bar\\alpha_t}\\,s g$", "#d8f0d2")
box("out", 10.3, 2.0, "$x_{t-1}$", "white")
arrow("x", "model")
arrow("x", "classifier", "label $y$")
arrow("model", "mean", "$\\epsilon$, $\\Sigma$")
arrow("classifier", "grad", "autograd")
arrow("mean", "alg1")
arrow("grad", "alg1", "shift $s\\Sigma g$")
arrow("model", "alg2", "$\\epsilon$")
arrow("grad", "alg2", "$g$")
arrow("alg1", "out", "ancestral")
arrow("alg2", "out", "DDIM")
ax.set(xlim=(-0.2, 11.4), ylim=(0.1, 3.9), aspect="equal")
ax.axis("off")
ax.set_title("One guided step: the classifier's gradient shifts the mean "
             "(Algorithm 1) or the noise prediction (Algorithm 2)",
             fontsize=9)
fig.tight_layout()
plt.show()
assert len(centres) == 8 and all(
    -0.2 < x - 1 and x + 1 < 11.4 for x, _ in centres.values())

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
for steps in ("ddim10", "ddim25"):  # stride T/N from 0: never t = T
    gain = ddim_guidance_gain("cosine", steps)
    print(f"{steps:>6}: cosine {gain[-1]:.2f} then {gain[-2]:.2f}")
    assert gain[-1] < 2

# %% [markdown]
# One step is to blame: the cosine schedule's last, $t = T$. Its
# $\beta_T$ would be 1 and is clipped to 0.999 (chapter 1), so that
# $\bar\alpha_T = \bar\alpha_{T-1} / 1000 \approx 2.4 \times 10^{-9}$,
# and there one unit of gradient moves the sample by 31 (1,000 steps)
# to 3,492 (10 steps), where the data span $[-1, 1]$; at the next step
# it moves it by about 1. Even respacings ("10", "25") keep step $T$;
# DDIM's own ("ddim10", "ddim25", a stride of $T/N$ from 0) never visit
# it, and their largest factor is about 1. The exact classifier would
# do no harm even at $T$: its gradient there is itself of the order of
# $\sqrt{\bar\alpha_T}$, which cancels the gain. A trained classifier's
# gradient at $T$ is not that small (pure noise at $\bar\alpha_T$ and
# at $\bar\alpha_{T-1}$ look alike to it), and the gain multiplies
# it. Chapter 4.9 measures the harm on the demo's samples (guided at
# $s = 1$ with DDIM on 25 even steps, 48.5% in the right class, against
# 95.0% ancestrally). The cure is to guard that one step: no guidance at
# $t = T$, or a respacing without it; 6.11 shows both on a toy with an
# exact answer. The reference has the same step, and the demo guides
# with Algorithm 1, whose shift is bounded by the step's variance.

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
#
# **How the paper trains its classifiers** (its section 4.1 and appendix):
# the downsampling trunk of the UNet with an attention pool (as in CLIP)
# on the $8 \times 8$ feature map in place of global average pooling,
# trained on the diffusion model's own noising distribution ($t$ uniform,
# $x_t$ from $q(x_t \mid x_0)$), with random crops against overfitting;
# the reference crops 80 to 100% of each image. The book's classifier is
# the same trunk and pool (`classifier_pool="attention"`; MNIST's
# $32 \times 32$ images reach $8 \times 8$ after two downsamplings, so it
# pools at $8 \times 8$ too) on the same noising, with two differences:
# it is far smaller (32 channels, one residual block per level in this
# chapter, 0.56M parameters) and it trains on the centre crop, without
# random crops (chapter 4.2). On MNIST-5k, 400 steps of batch 64 see
# each image about five times, so overfitting is not yet its problem;
# a longer run would want the crops.

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
    """The sampler hook s * grad_x log p(y | x_t), the classifier run at
    `precision` (chapter 4's) as the sampled network is."""
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

    `model_kwargs` (labels `y`, an upsampler's `low_res`) go to the model
    and to `cond_fn`; `noise_fn(x)` gives each step's noise.
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
    """The seed of sample `index`'s noise stream number `stream`."""
    # Stream > 0: another use of the samples' noise (a cascade's upsampler,
    # chapter 7), hashed: independent of stream 0 but by 32-bit chance.
    if stream:
        return step_seed(seed, index, stream)
    # Seed s owns [s M, s M + M), M = 1,000,003: (seed, index) pairs never
    # share a stream while index < M. CPU generators keep a seed's low 32
    # bits, so there this holds for seeds below 4,294; CUDA keeps 64.
    return (seed * 1_000_003 + index) % 2**64


def sample_noise(seed: int, indices: range,
                 device: str | torch.device = "cpu",
                 stream: int = 0) -> NoiseFn:
    """Noise whose row k is the next of sample indices[k]'s own stream."""
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
# images N x H x W x C and their labels. Sample $i$'s noise is row $i$ of
# `sample_noise`, whatever the batch size; the network runs at
# `precision` ("auto": bf16 where native), the sampler's arithmetic in
# float32. The noise is made on the device a batch at a time: all of it
# up front would hold 39 GB for 50,000 images at 256x256.

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

    `model_kwargs` hold a row per sample, as `labels` do; `options`
    (sampler, cond_fn, guide_at_mean, eta) go to `sample_fn` (None:
    `guided_sample`; chapter 8's `solver_sample` takes the same).
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
# A row of a grid shows one sample per class. Diversity needs several:
# every sample of a class, over all sampling seeds, for the unguided
# conditional model and the three models at their largest scale, a row
# per class, grey where a class has fewer samples than the widest row
# (the smoke run's 10 samples per seed give each class one per seed).

# %%
def diversity_figure(settings: list[tuple[str, float, str]],
                     columns: int = 8) -> plt.Figure:
    """Rows = classes, up to `columns` samples of each, per setting."""
    fig, axes = plt.subplots(1, len(settings),
                             figsize=(3 * len(settings), 3.4))
    for ax, (name, v, symbol) in zip(axes, settings, strict=True):
        drawn = np.concatenate([samples[name, v, k] for k in sample_seeds])
        classes = np.tile(labels.numpy(), len(sample_seeds))
        rows = [drawn[classes == c][:columns] for c in range(num_classes)]
        width = max(len(r) for r in rows)
        blank = np.full(drawn.shape[1:], 128, np.uint8)
        ax.imshow(np.concatenate([np.concatenate(
            [*r, *[blank] * (width - len(r))], axis=1) for r in rows]
        ).squeeze(-1), cmap="gray", vmin=0, vmax=255)
        ax.set_title(f"{name}, {symbol} = {v:g}", fontsize=9)
        ax.set_yticks((np.arange(num_classes) + 0.5) * shape[1],
                      [str(c) for c in range(num_classes)], fontsize=7)
        ax.set_xticks([])
    axes[0].set_ylabel("class asked for")
    fig.suptitle(f"up to {width} samples per class, all sampling seeds")
    fig.tight_layout()
    return fig


figures["diversity"] = diversity_figure([
    ("conditional", min(scales), "s"), ("conditional", max(scales), "s"),
    ("unconditional", max(scales), "s"),
    ("classifier-free", max(free_scales), "w")])
plt.show()
assert min(samples_per_scale, num_classes) * len(sample_seeds) >= 2

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
# its measured time; chapter 4.9 its recipe). It guides with ancestral
# steps; guided DDIM would need the clipped step guarded (6.1, 6.11).
#
# ## 6.9 A longer run, recorded
#
# The smoke configuration's samples are noise. A longer run, on a 2-core
# CPU with native bf16, every setting sampled with three seeds (machine,
# day, times: [appendix M.6](appendix_measurements.html)):
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
# thicker, bolder strokes than the data's. With one sample per class and
# scale (the record predates 6.6's figure, eight per class), diversity
# within a class is not judged here by eye.
#
# The scores, with the MNIST network's features against 2,000 real
# digits (FID and precision/recall are "(mnist-net)"; accuracy is that
# network's, on the labels the samples were drawn for, 10% by chance),
# as mean $\pm$ standard error over the three sampling seeds (0, 1 and 2;
# 80 samples per setting and seed; one training run, seed 0), for the
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
# * **Classifier guidance raises fidelity; its cost in diversity is
#   suggested, not shown.** On the conditional model the accuracy rises
#   from 88.3% to 95.8% at $s = 1$ and 97.9% at $s = 4$, the Inception
#   Score from 4.46 to 5.29, and FID improves (1.68 to 1.26, seven
#   standard errors), since unguided samples are sometimes of the wrong
#   class. Recall falls from 0.86 to 0.75 at $s = 4$, but that is 1.9
#   standard errors, under the rule; precision rises from 0.69 to 0.77,
#   1.2. The settings share their noise seed by seed, so paired
#   differences would be tighter, but this record kept only the means.
# * **An unconditional model guided at $s = 1$ is not a conditional
#   one.** In theory it samples $p(x \mid y)$ (6.10 shows it does, with
#   an exact classifier); here it puts 39.2% in the class asked for,
#   against 88.3% for the conditional model unguided and 95.8% guided at
#   the same scale. A 400-step classifier's $\log p_\phi(y \mid x_t)$ is
#   a weak model of the class, and the paper too guides its
#   unconditional model at $s = 10$ (its Table 4). At $s = 4$ the
#   unconditional model reaches 71.3% and FID 3.44 (from 4.92), a gap of
#   four standard errors.
# * **On the unconditional model, $s = 4$ bought fidelity at no measured
#   cost in diversity.** Its precision rose from 0.46 to 0.55 (2.5
#   standard errors) and its recall did not fall: 0.91 to 0.95, a rise
#   within error (1.1). That is not the trade-off the chapter's opening
#   describes, and not Table 4's $s = 10$ row (recall 0.63 to 0.44),
#   though Table 4's own $s = 1$ row has recall rising too (0.63 to
#   0.65). A reading consistent with these numbers: unguided, the
#   unconditional model's samples are spread over all ten digits and
#   many are malformed, and guidance with balanced labels turns them
#   into digits of every class, which covers the real digits at least as
#   well; what it takes away is variety within a class (6.10's toy: mass
#   moves to the class's most typical mode), which 80 samples per seed
#   against 2,000 real digits measure coarsely. Whether recall falls at
#   larger $s$ here is exercise 3.
# * **Classifier-free guidance traded diversity faster in this run.** At
#   $w = 1$ it matches classifier guidance at $s = 4$ in accuracy (99.2%
#   against 97.9%, within a standard error) and precision, but not in FID
#   (1.54 against 1.26) or recall (0.52 against 0.75), gaps of 6.6 and
#   4.6 standard errors. At $w = 4$ recall is 0.12 and precision 0.47:
#   the bold strokes of its grid are far from the thin real digits, and
#   FID is back at 4.08. This is one training run, whose null label was
#   drawn for 10% of 800 steps of batch 32 (about 2,600 images): its
#   unconditional $\epsilon$ is the least trained of its predictions,
#   and the standard errors are over sampling seeds only, not over
#   training runs. With exact predictions the two methods are the same
#   tilt (6.10), so the rate measured here belongs to these two networks,
#   not to the methods.
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

# %% [markdown]
# ## 6.10 Guidance on a toy, exactly
#
# Every claim about what guidance samples has so far been checked on
# samples of trained networks, which are wrong in their own ways. On
# chapter 2's toy, a mixture of Gaussians in the plane (2.12,
# `adm_lib.toy`), the noisy densities, the class posterior
# $p_t(y \mid x_t)$ and the best noise prediction are exact, so the
# sampler and the guidance are the only approximations left. Here the
# mixture has three components of standard deviation 0.2 on the $x_1$
# axis: class 0 owns $A$ at $-0.6$ and $B$ at $0.1$, class 1 owns $C$ at
# $0.6$, which overlaps $B$. We ask for class 0. The tilted data
# distribution $p(x)\,p(y \mid x)^s / Z$ is computed on a grid of
# $401 \times 401$ points over $[-2, 2]^2$ and normalised numerically;
# the samplers use the exact $\epsilon$ and the exact
# $\nabla \log p_t(y \mid x_t)$, 50 steps of the cosine schedule, and
# 4,000 samples in four independent groups of 1,000, whose spread gives
# the standard errors. Each sample is assigned to the component whose
# mean is nearest, as is each grid point.
#
# Three samplers follow the tilted scores: the ancestral sampler whose
# noise prediction is $\epsilon(x_t) - \sqrt{1 - \bar\alpha_t}\,s\,
# \nabla \log p_t(y \mid x_t)$ (the tilted score, exactly), Algorithm 1
# (the mean shifted by $s \Sigma g$, $g$ at $x_t$), and DDIM with
# Algorithm 2. The first is built as classifier-free guidance: a model
# with the exact conditional and unconditional $\epsilon$ (the null label
# 2), through `classifier_free_model`; the end of this section shows
# why that is the same thing.

# %%
from adm_lib.diffusion import ddim_sample_loop, p_sample_loop
from adm_lib.toy import GaussianMixture

f64 = torch.float64
line = GaussianMixture(
    means=torch.tensor([[-0.6, 0.0], [0.1, 0.0], [0.6, 0.0]], dtype=f64),
    stds=torch.full((3,), 0.2, dtype=f64),
    weights=torch.full((3,), 1 / 3, dtype=f64),
    labels=torch.tensor([0, 0, 1]))
NULL = line.num_classes  # the null label of classifier-free guidance
line_base = GaussianDiffusion(get_named_beta_schedule("cosine", 1000),
                              mean_type="eps", var_type="fixed_small",
                              dtype=f64)
line_abar = line_base.alphas_cumprod
exact_eps = line.eps_model(line_abar)


def both_eps(x: torch.Tensor, t: torch.Tensor,
             y: torch.Tensor) -> torch.Tensor:
    """The exact eps given y, or unconditional where y is the null label."""
    null = (y == NULL)[:, None]
    return torch.where(null, exact_eps(x, t),
                       exact_eps(x, t, y.clamp(max=NULL - 1)))


def toy_draw(model, sampler: str = "ddpm", cond_fn=None,
             steps: str = "50", n: int = 4000, seed: int = 0,
             **options) -> torch.Tensor:
    """n samples of class 0 from the toy's sampler, exact up to steps."""
    generator = torch.Generator().manual_seed(seed)

    def noise_fn(like: torch.Tensor) -> torch.Tensor:
        return torch.randn(like.shape, dtype=f64, generator=generator)

    loop = {"ddpm": p_sample_loop, "ddim": ddim_sample_loop}[sampler]
    options = {"clip_denoised": False, **options}
    return loop(respace(line_base, steps), model,
                noise_fn(torch.empty(n, 2)), noise_fn=noise_fn,
                cond_fn=cond_fn, **options,
                model_kwargs={"y": torch.zeros(n, dtype=torch.long)})


def shares(x: torch.Tensor, groups: int = 4) -> np.ndarray:
    """Each group's share of samples nearest A, B and C: (groups, 3)."""
    nearest = torch.cdist(x, line.means).argmin(1).reshape(groups, -1)
    return np.stack([(nearest == k).double().mean(1).numpy()
                     for k in range(3)], 1)


side = torch.linspace(-2, 2, 401, dtype=f64)
plane = torch.cartesian_prod(side, side)


def tilted_target(s: float) -> torch.Tensor:
    """p(x) p(y=0 | x)^s on the grid, normalised to sum to one."""
    log_p = line.log_prob(plane) + s * line.class_log_probs(plane)[:, 0]
    weight = (log_p - log_p.max()).exp()
    return weight / weight.sum()


nearest_on_grid = torch.cdist(plane, line.means).argmin(1)
toy_scales = (1.0, 4.0)
toy_rows = {}  # (sampler, s): (groups, 3) shares
toy_samples = {}
start = time.perf_counter()
for s in toy_scales:
    target = tilted_target(s)
    toy_rows["target", s] = np.array([[
        float(target[nearest_on_grid == k].sum()) for k in range(3)]])
    tilted = classifier_free_model(both_eps, s - 1, NULL)  # see below
    runs_of = {
        "ancestral, tilted eps": toy_draw(tilted),
        "Algorithm 1": toy_draw(ignore_labels(exact_eps),
                                cond_fn=line.cond_fn(line_abar, s)),
        "DDIM, Algorithm 2": toy_draw(tilted, "ddim"),
    }
    for name, x in runs_of.items():
        toy_samples[name, s] = x
        toy_rows[name, s] = shares(x)
print(f"{len(toy_scales) * 3} settings x 4,000 samples, 50 steps: "
      f"{time.perf_counter() - start:.1f} s")
print(f"{'class 0, share nearest':<24}" + "".join(
    f"{f'A, s = {s:g}':>16}{f'C, s = {s:g}':>16}" for s in toy_scales))
for name in ("target", "ancestral, tilted eps", "Algorithm 1",
             "DDIM, Algorithm 2"):
    cells = []
    for s in toy_scales:
        for k in (0, 2):
            m, e = mean_se(toy_rows[name, s][:, k])
            cells.append(f"{m:.3f}" + (f" ± {e:.3f}" if e == e else ""))
    print(f"{name:<24}" + "".join(f"{c:>16}" for c in cells))

# %% [markdown]
# The target is exact up to the grid; the samplers' numbers are means
# $\pm$ standard errors over the four groups (seeded, in float64: every
# run prints the same). At $s = 1$ the tilted samplers give $p(x \mid
# y)$: half of class 0's samples at $A$, 0.498 and 0.500 against the
# target's 0.498. On $C$'s side, where the tail of $B$ reaches past the
# midpoint, they put a little less than the target (0.037 and 0.045
# against 0.051), 50 steps' error at the sharpest, last levels.
# Algorithm 1 puts more there, 0.083: its shift $\Sigma g$ is a
# first-order version of the tilt, and $\Sigma = \tilde\beta_t$ falls
# far below the $\beta_t / \sqrt{\alpha_t}$ the tilt implies
# ($\tilde\beta_t / \beta_t = (1 - \bar\alpha_{t-1}) / (1 - \bar\alpha_t)$)
# over the last steps, where $B$ and $C$ are told apart.
#
# At $s = 4$ the target $p(x)\,p(y \mid x)^4 / Z$ moves little mass: $B$
# loses the part of it that overlaps $C$, and $A$'s share rises from 0.50
# to 0.58. The samplers move far more, to 0.84 (ancestral), 0.81
# (Algorithm 1) and 0.97 (DDIM): every noise level's tilt, applied while
# the sample is still a blur, pushes it away from class 1 as a whole,
# towards $A$. The stochastic and the deterministic sampler do not even
# agree with each other at $s = 4$, as they do at $s = 1$: the tilted
# scores are not the scores of one diffusion, so the two samplers of
# them are not equivalent. Guidance at $s > 1$ does not sample
# $p(x)\,p(y \mid x)^s / Z$; it samples something more extreme, which
# depends on the sampler. The cell asserts these comparisons:

# %%
def gap_in_se(name: str, s: float, k: int = 0) -> float:
    """(sampler's share - target's) / the sampler's standard error."""
    m, e = mean_se(toy_rows[name, s][:, k])
    return (m - toy_rows["target", s][0, k]) / e


for name in ("ancestral, tilted eps", "DDIM, Algorithm 2"):
    assert abs(gap_in_se(name, 1.0)) < 3  # s = 1: p(x | y)
    assert gap_in_se(name, 4.0) > 10  # s = 4: not p(x) p(y | x)^4
assert (mean_se(toy_rows["DDIM, Algorithm 2", 4.0][:, 0])[0]
        - mean_se(toy_rows["ancestral, tilted eps", 4.0][:, 0])[0]) > 0.05

fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), sharey=True)
width = float(side[1] - side[0])
bins = np.linspace(-1.6, 1.6, 65)
for ax, s in zip(axes, toy_scales, strict=True):
    marginal = tilted_target(s).reshape(401, 401).sum(1) / width
    ax.plot(side, marginal, "k-", lw=2, label="target $p(x)p(y|x)^s/Z$")
    for name, colour in (("ancestral, tilted eps", "tab:blue"),
                         ("Algorithm 1", "tab:green"),
                         ("DDIM, Algorithm 2", "tab:orange")):
        ax.hist(toy_samples[name, s][:, 0].numpy(), bins=bins,
                density=True, histtype="step", color=colour, label=name)
    ax.set(title=f"class 0, s = {s:g}", xlabel="$x_1$ (data units)",
           xlim=(-1.6, 1.6))
axes[0].set_ylabel("density of $x_1$")
axes[1].legend(fontsize=7)
fig.suptitle("Guidance on the toy: the samplers against the tilted data "
             "distribution (4,000 samples each)", fontsize=10)
fig.tight_layout()
plt.show()

# %% [markdown]
# **Classifier-free guidance is the same tilt, exactly.** With the exact
# conditional and unconditional noise predictions,
# $\epsilon(x_t, y) - \epsilon(x_t) = -\sqrt{1 - \bar\alpha_t}\,
# \nabla \log p_t(y \mid x_t)$, so
#
# $$\epsilon(x_t) + w\,\big(\epsilon(x_t, y) - \epsilon(x_t)\big) =
# \epsilon(x_t) - \sqrt{1 - \bar\alpha_t}\, w\, \nabla \log p_t(y \mid
# x_t),$$
#
# Algorithm 2's $\hat\epsilon$ at $s = w$. 6.4's `classifier_free_model`
# writes the mix from the conditional side, $\epsilon(y) + w'(\epsilon(y) -
# \epsilon(\varnothing))$, which is the above with $w = 1 + w'$; that
# is why the cell above passed it $s - 1$. The two agree to rounding at
# every step, and so do whole DDIM trajectories, classifier-free against
# classifier-guided:

# %%
x = torch.randn(256, 2, dtype=f64)
t = torch.randint(0, 1000, (256,))
y = torch.zeros(256, dtype=torch.long)
w = 3.0
mixed = classifier_free_model(both_eps, w - 1, NULL)(x, t, y)
a = torch.as_tensor(line_abar)[t][:, None]
algorithm_2 = exact_eps(x, t) - (1 - a).sqrt() * line.cond_fn(
    line_abar, w)(x, t, y)
eps_gap = (mixed - algorithm_2).abs().max().item()
path_gap = (toy_draw(classifier_free_model(both_eps, w - 1, NULL), "ddim",
                     n=500)
            - toy_draw(ignore_labels(exact_eps), "ddim",
                       line.cond_fn(line_abar, w), n=500)).abs().max().item()
print(f"w = {w:g}: eps differ by {eps_gap:.1e}, DDIM samples by "
      f"{path_gap:.1e}")
assert eps_gap < 1e-12 and path_gap < 1e-9

# %% [markdown]
# So classifier-free guidance at $w$ and classifier guidance at $s = w$
# (Algorithm 2, or the ancestral sampler of the tilted $\epsilon$) are
# one method when both use exact quantities; the differences measured
# in 6.7 come from what each network learned, not from the formulas.
# Algorithm 1 approximates the same tilt with a different shift of the
# mean, $s \Sigma g$ rather than the $s \beta_t g / \sqrt{\alpha_t}$ the
# tilted $\epsilon$ implies, which is why its row differs a little.
#
# ## 6.11 The clipped step, guarded, and saturation
#
# 6.1 blamed DDIM's guidance blow-up on one step, the cosine schedule's
# clipped $t = T$. The toy can show it, with a stand-in for a trained
# classifier: one that cannot tell $x_T$ from $x_{T-1}$ (pure noise at
# $\bar\alpha = 2.4 \times 10^{-9}$ and $2.4 \times 10^{-6}$), the exact
# classifier of step $T - 1$ used at step $T$. Its gradient at $T$ is
# $\sqrt{1000} \approx 32$ times the exact one, and DDIM multiplies it by
# the gain of 6.1. Guided at $s = 1$ with 25 even DDIM
# steps, which start at $T$, then with that step unguided, then with 25
# DDIM-spaced steps, which never visit it:

# %%
def unguided_at(cond_fn, step: int):
    """cond_fn with no guidance at the original timestep `step`."""
    def guarded(x: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
        gradient = cond_fn(x, t, **kwargs)
        keep = (t != step).view(-1, *(1,) * (x.ndim - 1))
        return gradient * keep
    return guarded


blurred = line_abar.copy()
blurred[-1] = blurred[-2]  # step T looks like step T - 1 to it
guard_cases = {
    "exact classifier, 25": ("25", line.cond_fn(line_abar, 1.0)),
    "blurred classifier, 25": ("25", line.cond_fn(blurred, 1.0)),
    "blurred, T unguided, 25": ("25", unguided_at(
        line.cond_fn(blurred, 1.0), 999)),
    "blurred classifier, ddim25": ("ddim25", line.cond_fn(blurred, 1.0)),
}
guarded_rows = {}
for name, (steps, hook) in guard_cases.items():
    x = toy_draw(ignore_labels(exact_eps), "ddim", hook, steps=steps)
    guarded_rows[name] = (mean_se(shares(x)[:, 0]),
                          float(x.norm(dim=1).mean()))
print(f"target p(x | y=0): share at A {toy_rows['target', 1.0][0, 0]:.3f}")
for name, ((m, e), radius) in guarded_rows.items():
    print(f"{name:<28} share at A {m:.3f} ± {e:.3f}, mean |x| {radius:.3f}")
blur = guarded_rows["blurred classifier, 25"][0]
for name in ("blurred, T unguided, 25", "blurred classifier, ddim25"):
    fixed = guarded_rows[name][0]
    assert blur[0] - fixed[0] > 5 * np.hypot(blur[1], fixed[1])
    assert abs(fixed[0] - toy_rows["target", 1.0][0, 0]) < 0.03

# %% [markdown]
# The blurred classifier's one bad step sends a fifth of the samples
# from $B$ to $A$; leaving $t = T$ unguided, or respacing without it,
# brings the share back to the exact one, with the same classifier at
# every other step. On images the same bad step throws samples out of
# the data's range (chapter 4.9's 48.5%). The guard costs nothing: at
# $t = T$ the exact gradient is nearly zero anyway, so the rule is
# "do not guide at the clipped step", not "do not guide DDIM".
#
# **Saturation.** Large scales push $\hat x_0$ outside the data's range
# $[-1, 1]$. The samplers clip it there (`clip_denoised`, the
# reference's default), so the pixels pile up at black and white:
# samples **saturate**, over-bright and flat, which is what the bold
# strokes of classifier-free guidance at $w = 4$ in 6.9 look like.
# Imagen (Saharia et al., 2022) replaced the clip by **dynamic
# thresholding**: at each step take $q$, the 99.5th percentile of
# $|\hat x_0|$ over the image's pixels; if $q > 1$, clip to $[-q, q]$
# and divide by $q$. The toy has two pixels and no range to saturate,
# so the conditional MNIST model shows it, at a classifier-free scale
# well past the useful ones, $w = 8$: the same noise, sampled with the
# clip and with dynamic thresholding, and the share of pixels at pure
# white, against the real digits' share (the smoke run's models are
# untrained, so only a longer run's picture means anything):

# %%
def dynamic_threshold(x0: torch.Tensor, q: float = 0.995) -> torch.Tensor:
    """Imagen's dynamic thresholding of a predicted x_0, image by image."""
    level = torch.quantile(x0.flatten(1).abs().float(), q, dim=1)
    level = level.clamp(min=1.0).to(x0.dtype).view(-1, *(1,) * (x0.ndim - 1))
    return x0.clamp(-level, level) / level


assert torch.equal(dynamic_threshold(torch.full((1, 4), 0.5)),
                   torch.full((1, 4), 0.5))  # in range: untouched
assert dynamic_threshold(torch.tensor([[3.0, -3.0, 0.3]])).abs().max() <= 1
hot = classifier_free_model(conditional.model, 8.0, num_classes)
row_labels = torch.arange(min(5, num_classes))  # five digits suffice
saturated = {}
for name, options in {"clip": {},
                      "dynamic": {"clip_denoised": False,
                                  "denoised_fn": dynamic_threshold}}.items():
    noise_fn = sample_noise(seed, range(len(row_labels)), device)
    with torch.no_grad():
        x = p_sample_loop(spaced, hot, noise_fn(torch.empty(
            len(row_labels), *shape, device=device)), noise_fn=noise_fn,
            model_kwargs={"y": row_labels.to(device)}, **options)
    saturated[name] = to_uint8(x)
fig, axes = plt.subplots(2, 1, figsize=(5, 2.4))
for ax, (name, images) in zip(axes, saturated.items(), strict=True):
    extreme = (images == 255).mean()
    ax.imshow(np.concatenate(list(images), axis=1).squeeze(-1),
              cmap="gray", vmin=0, vmax=255)
    ax.set_ylabel(name, rotation=0, ha="right", va="center")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"{extreme:.1%} of pixels at 255", fontsize=8)
    print(f"w = 8, {name}: {extreme:.1%} of pixels at 255, real digits "
          f"{(real_images == 255).mean():.1%}")
fig.suptitle("classifier-free guidance at w = 8, classes 0 to 4:\n"
             "the clip against dynamic thresholding, same noise",
             fontsize=9)
fig.tight_layout()
plt.show()

# %% [markdown]
# Dynamic thresholding keeps each image inside the range by shrinking
# it rather than flattening its extremes, so it keeps detail where the
# clip saturates; it is a sampler-side fix for large scales, and no
# substitute for choosing a scale that does not need it.
#
# ## 6.12 Summary
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
# * Exactly (6.10): guidance at $s = 1$ samples $p(x \mid y)$; at $s > 1$
#   it samples neither $p(x)\,p(y \mid x)^s / Z$ nor one answer for all
#   samplers. Classifier-free guidance with exact predictions,
#   $\epsilon(\varnothing) + w\,(\epsilon(y) - \epsilon(\varnothing))$, is
#   classifier guidance at $s = w$ (`classifier_free_model`'s scale is
#   $w - 1$).
# * Guided DDIM's blow-up is the cosine schedule's clipped step $t = T$;
#   leaving it unguided (or a `ddimN` respacing) removes it (6.11). Large
#   scales saturate clipped samples; dynamic thresholding rescales
#   $\hat x_0$ instead.

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

# %% [markdown] jupyter={"source_hidden": true} tags=["solution"]
# **Solution 1.** Up to terms free of $x$,
# $-\tfrac12 (x - \mu)^\top \Sigma^{-1} (x - \mu) + s (x - \mu)^\top g =
# -\tfrac12 (x - \mu - s\Sigma g)^\top \Sigma^{-1} (x - \mu - s\Sigma g) +
# \tfrac{s^2}{2} g^\top \Sigma g$: expanding the right side gives back
# the left, and the last term is a constant, absorbed by normalising.
# So the product is $\mathcal{N}(\mu + s\Sigma g, \Sigma)$. The expansion
# drops $\tfrac12 (x - \mu)^\top H (x - \mu)$, with $H$ the Hessian of
# $\log p_\phi(y \mid x_t)$; over the Gaussian's width that is small
# when $H$ is small next to $\Sigma^{-1}$ (the classifier's curvature
# well below the inverse variance), which holds as the steps shrink. The
# cell checks the shift in one dimension on a grid.

# %% jupyter={"source_hidden": true} tags=["solution"]
grid_1d = torch.linspace(-6, 6, 4001, dtype=f64)
mu_1d, var_1d, s_1d, g_1d = 0.3, 0.25, 2.0, -0.7
tilted_1d = (-(grid_1d - mu_1d) ** 2 / (2 * var_1d)
             + s_1d * (grid_1d - mu_1d) * g_1d).exp()
tilted_1d = tilted_1d / tilted_1d.sum()
mean_1d = float((grid_1d * tilted_1d).sum())
spread_1d = float(((grid_1d - mean_1d) ** 2 * tilted_1d).sum())
print(f"mean {mean_1d:.6f} (mu + s var g = {mu_1d + s_1d * var_1d * g_1d}),"
      f" variance {spread_1d:.6f}")
assert abs(mean_1d - (mu_1d + s_1d * var_1d * g_1d)) < 1e-6
assert abs(spread_1d - var_1d) < 1e-6

# %% [markdown] jupyter={"source_hidden": true} tags=["solution"]
# **Solution 2.** With $\epsilon = -\sqrt{1 - \bar\alpha_t}\,\nabla \log
# p$, the mix $\epsilon(y) + w(\epsilon(y) - \epsilon(\varnothing))$ is
# $-\sqrt{1 - \bar\alpha_t}$ times $(1 + w)\nabla \log p(x_t \mid y) - w
# \nabla \log p(x_t) = \nabla \log p(x_t) + (1 + w)\big(\nabla \log
# p(x_t \mid y) - \nabla \log p(x_t)\big)$, and the bracket is $\nabla
# \log p(y \mid x_t)$ by Bayes' rule ($p(y)$ does not depend on $x_t$).
# So it is guidance of scale $1 + w$ in Algorithm 2's form. On the toy
# of 6.10, with exact predictions, the cell checks it to rounding.

# %% jupyter={"source_hidden": true} tags=["solution"]
x = torch.randn(64, 2, dtype=f64)
t = torch.randint(0, 1000, (64,))
y = torch.zeros(64, dtype=torch.long)
a = torch.as_tensor(line_abar)[t][:, None]
for w in (0.5, 3.0):
    mixed = classifier_free_model(both_eps, w, NULL)(x, t, y)
    score_form = -(1 - a).sqrt() * (
        line.score(x, a) + (1 + w) * line.cond_fn(line_abar)(x, t, y))
    assert (mixed - score_form).abs().max() < 1e-12

# %% [markdown] jupyter={"source_hidden": true} tags=["solution"]
# **Solution 3.** Expected: from $s = 10$ to $s = 30$ the accuracy of
# the unconditional model creeps towards its ceiling (the evaluation
# network's agreement with the guiding classifier), recall falls, and
# precision stops rising and may fall, as samples are pushed towards
# what the classifier scores highly rather than towards real digits
# (6.11's saturation adds to it). The reasoning is 6.10's: a larger tilt
# moves a class's samples onto its most typical mode. The toy shows that
# part exactly (25 ancestral steps of the tilted $\epsilon$, 1,000
# samples): the share at $A$ and the spread of $x_1$ over $s$. The MNIST
# numbers need the rerun.

# %% jupyter={"source_hidden": true} tags=["solution"]
concentration = {}
for s in (1.0, 4.0, 10.0, 30.0):
    x = toy_draw(classifier_free_model(both_eps, s - 1, NULL), steps="25",
                 n=1000)
    concentration[s] = (shares(x, 1)[0, 0], float(x[:, 0].std()))
    print(f"s = {s:>4g}: share at A {concentration[s][0]:.3f}, "
          f"std of x1 {concentration[s][1]:.3f}")
at_a, spread = zip(*concentration.values(), strict=True)
assert list(at_a) == sorted(at_a) and list(spread) == sorted(spread)[::-1]

# %% [markdown] jupyter={"source_hidden": true} tags=["solution"]
# **Solution 4.** A classifier trained on clean images, shown $x_t$, is
# off its training distribution at all but the last steps; its gradient
# there is noise or worse, which is why the paper trains on the
# diffusion's noising. Expected: guidance raises the accuracy far less
# than the noisy classifier's (if at all), and only its last,
# nearly clean steps can be trusted ($\bar\alpha_t$ close to 1). The toy
# shows the other half of the story, with a clean classifier that is
# exact ($p_0(y \mid x)$ evaluated at $x_t$): even without a network's
# errors it is a different tilt from $p_t(y \mid x_t)$, much sharper at
# high noise, and guided at $s = 1$ it over-guides, putting more samples
# in class 0 than $p(x \mid y)$ has (95%), not the right number. The MNIST
# result needs the rerun.

# %% jupyter={"source_hidden": true} tags=["solution"]
in_class = {}
for name, hook in (("noisy", line.cond_fn(line_abar)),
                   ("clean", line.cond_fn(np.ones_like(line_abar)))):
    x = toy_draw(ignore_labels(exact_eps), cond_fn=hook, steps="25",
                 n=1000)
    in_class[name] = float(shares(x, 1)[0, :2].sum())
    print(f"{name} classifier at s = 1: {in_class[name]:.3f} in class 0")
target_in_class = float(toy_rows["target", 1.0][0, :2].sum())
print(f"p(x | y = 0): {target_in_class:.3f}")
assert in_class["clean"] > target_in_class > in_class["noisy"] - 0.1

# %% [markdown] jupyter={"source_hidden": true} tags=["solution"]
# **Solution 5.** Algorithm 1 moves the mean by $s\Sigma g$ with
# $\Sigma \le 1$; DDIM's step moves $x$ by `ddim_guidance_gain` times
# $s g$, which on an even respacing is in the thousands at the clipped
# first step (6.1's table). So the same $s$ moves DDIM's samples far
# more, and its scores are worse, unless the respacing drops step $T$
# (`ddimN`) or the hook leaves it unguided (6.11); after that one step
# the gains are about 1. The cell computes the gain of this run's
# respacing at its first step against Algorithm 1's largest variance.

# %% jupyter={"source_hidden": true} tags=["solution"]
first_gain = ddim_guidance_gain("cosine", respacing)[-1]
largest_variance = float(spaced.betas.max())
print(f"respacing {respacing}: DDIM's first-step gain {first_gain:.1f}, "
      f"Algorithm 1's largest variance {largest_variance:.3f}")
kept = getattr(spaced, "timestep_map", torch.arange(spaced.num_timesteps))
if conditional.config.diffusion_steps - 1 in kept.tolist():  # keeps T
    assert first_gain > 100 * largest_variance

# %% [markdown] jupyter={"source_hidden": true} tags=["solution"]
# **Solution 6.** `window_cond_fn` below wraps `classifier_cond_fn` and
# zeroes its gradient outside the window, on the original timesteps the
# hook receives. Which half matters depends on where the classes part.
# In the toy of 6.10, class 0's $B$ and class 1's $C$ overlap and part
# only at fine scale, so the cleaner half keeps most of the gain; on
# MNIST a digit's class is its coarse shape, fixed early, so we expect
# the noisier half to keep more there. The cell runs the toy (exact
# classifier, $s = 1$, 25 ancestral steps, 1,000 samples); the MNIST
# check needs trained models (`window_cond_fn(classifier.model, s, 500,
# 1000)` as `draw`'s hook).

# %% jupyter={"source_hidden": true} tags=["solution"]
def window(cond_fn, t_lo: int, t_hi: int):
    """cond_fn's gradient at original steps t_lo <= t < t_hi, else 0."""
    def windowed(x: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
        keep = ((t >= t_lo) & (t < t_hi)).view(-1, *(1,) * (x.ndim - 1))
        return cond_fn(x, t, **kwargs) * keep
    return windowed


def window_cond_fn(classifier, scale: float, t_lo: int, t_hi: int):
    """Classifier guidance at scale only for t_lo <= t < t_hi."""
    return window(classifier_cond_fn(classifier, scale), t_lo, t_hi)


halves = {}
for name, (lo, hi) in {"none": (0, 0), "cleaner half": (0, 500),
                       "noisier half": (500, 1000),
                       "all": (0, 1000)}.items():
    x = toy_draw(ignore_labels(exact_eps), steps="25", n=1000,
                 cond_fn=window(line.cond_fn(line_abar), lo, hi))
    halves[name] = float(shares(x, 1)[0, :2].sum())
    print(f"guided over {name:<13}: {halves[name]:.3f} in class 0")
assert halves["none"] < halves["noisier half"] < halves["cleaner half"]
