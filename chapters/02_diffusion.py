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
# # Gaussian diffusion with learned variance
#
# Chapter 1 built the forward process $q$, which turns data into noise. A
# diffusion model generates by running a learned *reverse* process
#
# $$p_\theta(x_{t-1} \mid x_t) = \mathcal{N}\big(x_{t-1};\ \mu_\theta(x_t, t),\
# \Sigma_\theta(x_t, t)\big)$$
#
# from $x_T \sim \mathcal{N}(0, I)$ down to $x_0$. Ho et al. (2020) learned
# only the mean and fixed $\Sigma$; Nichol & Dhariwal (2021) showed that
# **learning the variance** too barely changes sample quality with all $T$
# steps but keeps ancestral sampling good with far fewer, and improves
# likelihood. The paper uses their recipe for every model: a learned
# variance, the *hybrid* objective, and 250 ancestral steps instead of 1000
# (its fastest rows, Table 5's "25 steps", use DDIM, section 2.6, where
# $\Sigma_\theta$ plays no part).
#
# Sections 2.1 to 2.6 build that machinery, `adm_lib.diffusion`; 2.7 to
# 2.11 train a small MNIST model with it; 2.12 builds a toy with exact
# answers, on which 2.13 weighs the objectives. The tests check its
# numbers against the reference implementation's.

# %% tags=["parameters"]
# Smoke configuration: trains for a minute on a CPU. The full GPU run is
#   adm book run 2 -p device cuda -p train_steps 30000 -p batch_size 128 \
#       -p model_channels 64 -p num_samples 64 \
#       -p sample_steps "[10, 25, 50, 250]"
data: str = "mnist5k"  # a data-set name, or a folder, .zip or .npz
device: str = "auto"  # "auto" picks CUDA when there is a GPU
schedule: str = "cosine"  # the noise schedule: "cosine" or "linear"
num_timesteps: int = 1000  # T, the diffusion's steps
train_steps: int = 50  # of the small model
batch_size: int = 32  # images per training step
model_channels: int = 32  # the small UNet's base width
learning_rate: float = 1e-3  # AdamW's
ema_rate: float = 0.999  # decay of the weights' average, which samples
sample_steps: list[int] = [10, 25, 50, 100]  # sampling lengths to compare
num_samples: int = 8  # images drawn by each sampler
nll_images: int = 2  # images whose full variational bound is evaluated
vlb_draws: int = 64  # per image: stratified draws of the bound's estimate
seed: int = 0  # of training and sampling
toy_samples: int = 2000  # exercise 5: points drawn by each toy sampler

# %%
#| default_exp diffusion

# %%
import copy
import os
import time

import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from adm_lib.book import find_root
from adm_lib.data import load_dataset
from adm_lib.devices import resolve_device
from adm_lib.forward import ForwardProcess, get_named_beta_schedule
from adm_lib.viz import show_images, show_rows

# Relative paths, the parameters' too, start at the book's root, as under
# `adm book run`, wherever the kernel starts (JupyterLab: in chapters/).
os.chdir(find_root())
torch.manual_seed(seed)

# %% [markdown]
# Every chapter names its device by the string `device`: `"auto"` is CUDA
# when PyTorch sees a GPU and the CPU otherwise, and `resolve_device`
# (`adm_lib.devices`, with the choice of precision, chapter 4) refuses a
# name that cannot work here before any work starts.

# %%
device = str(resolve_device(device))
print(f"device: {device}")

# %% [markdown]
# ## 2.1 From network output to a Gaussian
#
# The network sees $x_t$ and $t$ and outputs a tensor; the diffusion turns
# it into the mean and variance of $p_\theta(x_{t-1} \mid x_t)$. For the
# **mean** (`mean_type`) the network predicts the noise $\epsilon$
# (`"eps"`, ADM's choice; $\hat x_0$ follows by `predict_xstart_from_eps`,
# chapter 1) or $x_0$ itself (`"x0"`), and the mean is the posterior mean
# $\tilde\mu_t(\hat x_0, x_t)$; or it predicts the mean (`"prev"`), which
# inverted gives $\hat x_0$. In all three, $\hat x_0$ may be clipped to the
# data range $[-1, 1]$ and passed through a `denoised_fn`, as sampling
# does. For the **variance** (`var_type`) there are the two fixed ends of
# chapter 1's figure and two learned choices:
#
# * `"fixed_small"`: the posterior variance $\tilde\beta_t$;
# * `"fixed_large"`: $\beta_t$ ($\tilde\beta_2$ at the first step, $t = 1$,
#   for a better decoder likelihood);
# * `"learned"`: the network outputs $\log \Sigma$;
# * `"learned_range"` (ADM's): the network outputs $v$ per pixel, read as
#   $v \in [-1, 1]$ (nothing clamps it), and $\log\Sigma_\theta =
#   \frac{v+1}{2} \log\beta_t + \frac{1-v}{2} \log\tilde\beta_t$ (Nichol &
#   Dhariwal's weight $v \in [0, 1]$ on $\log\beta_t$ is our
#   $\frac{v+1}{2}$). The bounds differ little (section 1.7), so where to
#   sit between them is an easy, well-scaled prediction.
#
# A learned variance makes the output $2C$ channels, mean then $v$, and
# needs the bound in its loss (section 2.3); the hybrid loss needs a
# learned variance. `_checked_loss` checks the choices before anything is
# built. `GaussianDiffusion` extends chapter 1's `ForwardProcess` with them
# in two steps. The first, `_Parameterisation`, writes the rules above as
# code: `_log_variance` reads the variance channels $v$ as $\log\Sigma$,
# `_predict_xstart` the mean channels as $\hat x_0$. `model_timesteps`
# gives the steps the network sees: $t$ itself, which respacing (section
# 2.5) maps (the reference's `rescale_timesteps`, $1000\, t / T$, is off in
# its released models and in this book).

# %%
#| export
import math
import re
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

from adm_lib.forward import ForwardProcess

MEAN_TYPES = ("eps", "x0", "prev")
VAR_TYPES = ("fixed_small", "fixed_large", "learned", "learned_range")
LOSSES = ("simple", "hybrid", "kl")

Model = Callable[..., Tensor]


def _checked_loss(mean_type: str, var_type: str, loss: str | None) -> str:
    """The loss of these choices (hybrid or simple by default), checked."""
    learned = var_type in ("learned", "learned_range")
    loss = loss or ("hybrid" if learned else "simple")
    for name, value, known in [("mean_type", mean_type, MEAN_TYPES),
                               ("var_type", var_type, VAR_TYPES),
                               ("loss", loss, LOSSES)]:
        if value not in known:
            raise ValueError(f"{name} {value!r} is not one of {known}")
    if learned and loss == "simple":
        raise ValueError("a learned variance needs loss 'hybrid' or "
                         "'kl': L_simple gives it no gradient")
    if not learned and loss == "hybrid":
        raise ValueError(f"loss 'hybrid' trains a learned variance, "
                         f"but var_type {var_type!r} is fixed")
    return loss


class _Parameterisation(ForwardProcess):
    """A forward process with the choices of the reverse process's rules."""

    def __init__(
        self, betas: np.ndarray, mean_type: str = "eps",
        var_type: str = "learned_range", loss: str | None = None,
        lambda_vlb: float = 0.001, dtype: torch.dtype = torch.float32,
        rescale_timesteps: bool = False,
    ) -> None:
        super().__init__(betas, dtype)
        loss = _checked_loss(mean_type, var_type, loss)
        self.mean_type, self.var_type = mean_type, var_type
        self.loss, self.lambda_vlb = loss, lambda_vlb
        self.rescale_timesteps = rescale_timesteps
        self.learns_variance = var_type in ("learned", "learned_range")
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)
        self.log_betas = np.log(self.betas)
        # fixed_large starts at beta-tilde_2 (the paper's t = 2, code index
        # 1), for a better decoder likelihood: the clipped posterior's first
        # value, which chapter 1 defines for a one-step process too.
        self.fixed_large_log_variance = np.append(
            self.posterior_log_variance_clipped[0], self.log_betas[1:])

    def model_timesteps(self, t: Tensor) -> Tensor:
        """The timesteps the model sees for steps t (respacing maps them)."""
        if self.rescale_timesteps:
            return t.float() * (1000.0 / self.num_timesteps)
        return t

    def _log_variance(self, var_out: Tensor, x: Tensor, t: Tensor) -> Tensor:
        n = x.ndim
        if self.var_type == "learned":
            return var_out
        if self.var_type == "learned_range":
            min_log = self.extract("posterior_log_variance_clipped", t, n)
            max_log = self.extract("log_betas", t, n)
            frac = (var_out + 1) / 2  # v in [-1, 1] spans [min, max]
            return frac * max_log + (1 - frac) * min_log
        table = {"fixed_small": "posterior_log_variance_clipped",
                 "fixed_large": "fixed_large_log_variance"}[self.var_type]
        return self.extract(table, t, n).expand_as(x)

    def _predict_xstart(self, mean_out: Tensor, x: Tensor, t: Tensor
                        ) -> Tensor:
        if self.mean_type == "eps":
            return self.predict_xstart_from_eps(x, t, mean_out)
        if self.mean_type == "x0":
            return mean_out
        # "prev": solve mean = coef1 * x_0 + coef2 * x_t for x_0.
        coef1 = self.extract("posterior_mean_coef1", t, x.ndim)
        coef2 = self.extract("posterior_mean_coef2", t, x.ndim)
        return (mean_out - coef2 * x) / coef1


# %% [markdown]
# The second step is the Gaussian itself: `p_mean_variance` runs the model
# and returns the mean and variance of $p_\theta(x_{t-1} \mid x_t)$ with
# $\hat x_0$ (`pred_xstart`), in the reference's names;
# `predict_eps_from_xstart` solves `q_sample` for the noise. The diffusion
# carries the objective too (`loss`, section 2.3), so a saved configuration
# rebuilds all of it. The output is cast to chapter 1's `dtype` (float32 by
# default) whatever precision the network ran in, once `check_output` has
# refused any but $2C$ channels for a learned variance ($C$ for a fixed
# one), naming the `out_channels` the model needs; the training loss calls
# it too, lest a fixed variance's MSE silently read half of $2C$ channels.

# %%
#| export
class GaussianDiffusion(_Parameterisation):
    """A diffusion's reverse process: model output to Gaussian, and back.

    betas: beta_1..beta_T (chapter 1). mean_type: what the model's first C
    channels predict, "eps", "x0" or "prev" (the posterior mean).
    var_type: "fixed_small" (beta-tilde_t), "fixed_large" (beta_t), or
    learned from C more channels, "learned" (log variance) or
    "learned_range" (v in [-1, 1]). loss: "simple", "hybrid" (plus
    lambda_vlb * T * the bound) or "kl"; None picks hybrid for a learned
    variance, else simple. dtype: the Gaussian's arithmetic.
    rescale_timesteps: show the model 1000 t / T.
    """

    def check_output(self, output: Tensor, x: Tensor) -> None:
        """Raise a ValueError unless output is shaped as var_type needs."""
        channels = x.shape[1] * (2 if self.learns_variance else 1)
        expected = (x.shape[0], channels, *x.shape[2:])
        if output.shape != expected:
            rule = ("twice the images' channels (mean, then variance)"
                    if self.learns_variance else "the images' channels")
            raise ValueError(
                f"model output {tuple(output.shape)}, expected {expected}: "
                f"var_type {self.var_type!r} needs a model with "
                f"out_channels={channels}, {rule}")

    def predict_eps_from_xstart(
        self, x_t: Tensor, t: Tensor, pred_xstart: Tensor
    ) -> Tensor:
        """The noise that takes pred_xstart to x_t: q_sample solved for eps."""
        n = x_t.ndim
        return (
            self.extract("sqrt_recip_alphas_cumprod", t, n) * x_t - pred_xstart
        ) / self.extract("sqrt_recipm1_alphas_cumprod", t, n)

    def p_mean_variance(
        self, model: Model, x: Tensor, t: Tensor, clip_denoised: bool = True,
        denoised_fn: Callable[[Tensor], Tensor] | None = None,
        model_kwargs: dict[str, Any] | None = None,
    ) -> dict[str, Tensor]:
        """Run the model: mean, variance, log_variance and pred_xstart."""
        output = model(x, self.model_timesteps(t), **(model_kwargs or {}))
        return self.p_mean_variance_from_output(output, x, t, clip_denoised,
                                                denoised_fn)

    def p_mean_variance_from_output(
        self, output: Tensor, x: Tensor, t: Tensor, clip_denoised: bool = True,
        denoised_fn: Callable[[Tensor], Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """p(x_{t-1} | x_t) from a model output already computed at (x, t)."""
        self.check_output(output, x)
        # The maths runs in self.dtype: half-precision outputs are upcast.
        output = output.to(self.dtype)
        mean_out, var_out = output[:, : x.shape[1]], output[:, x.shape[1]:]
        log_variance = self._log_variance(var_out, x, t)
        pred_xstart = self._predict_xstart(mean_out, x, t)
        if denoised_fn is not None:
            pred_xstart = denoised_fn(pred_xstart)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean = (mean_out if self.mean_type == "prev" else
                self.q_posterior_mean_variance(pred_xstart, x, t)[0])
        return {"mean": mean, "variance": torch.exp(log_variance),
                "log_variance": log_variance, "pred_xstart": pred_xstart}


# %%
# The variance rule, with a model that answers a constant: learned_range
# must give exactly beta-tilde_t at v = -1 and beta_t at v = 1, and
# fixed_small beta-tilde_t whatever the network says.
betas = get_named_beta_schedule(schedule, num_timesteps)
x = torch.randn(3, 1, 4, 4)
t = torch.tensor([1, num_timesteps // 2, num_timesteps - 1])
learned = GaussianDiffusion(betas, var_type="learned_range")
for v, expected in [(-1.0, learned.posterior_variance),
                    (1.0, learned.betas)]:
    constant = torch.cat([torch.zeros_like(x), torch.full_like(x, v)], 1)
    out = learned.p_mean_variance_from_output(constant, x, t)
    got = out["variance"][:, 0, 0, 0].double()
    np.testing.assert_allclose(got, expected[t], rtol=1e-5)
    print(f"v = {v:+.0f}: variance at t={t.tolist()} = {got.tolist()}")
fixed = GaussianDiffusion(betas, var_type="fixed_small")
out = fixed.p_mean_variance_from_output(torch.zeros_like(x), x, t)
assert torch.allclose(out["variance"], out["variance"][:, :1, :1, :1])

# %% [markdown]
# ## 2.2 The variational bound
#
# A likelihood model maximises $\log p_\theta(x_0)$, which for a diffusion
# is bounded by the *variational bound* (Ho et al., eq. 5), a sum of one
# term per step:
#
# $$L_\text{vlb} = \underbrace{D_\text{KL}\big(q(x_T \mid x_0)\,\|\,p(x_T)
# \big)}_{L_T,\ \text{prior}}
# + \sum_{t=2}^{T} \underbrace{D_\text{KL}\big(q(x_{t-1} \mid x_t, x_0)\,\|\,
# p_\theta(x_{t-1} \mid x_t)\big)}_{L_{t-1}}
# \ \underbrace{-\ \log p_\theta(x_0 \mid x_1)}_{L_0,\ \text{decoder}}.$$
#
# Each $L_{t-1}$ compares two Gaussians, chapter 1's posterior and the
# model's step, so it has a closed form (`normal_kl`), as has the prior
# term, which has no parameters. As in the reference, every term is
# averaged over pixels (`mean_flat`) and divided by $\ln 2$: the bound is in
# **bits per dimension**, the unit likelihoods are reported in.
#
# The decoder term $L_0$ scores the 8-bit image itself: each pixel value
# owns the bin of width $2/255$ around it (the edge bins open to
# $\pm\infty$), and its probability is the Gaussian's mass in that bin,
# with the reference's `tanh` approximation of the normal CDF, to give its
# numbers. `vb_terms_bpd` returns each image's term at its own code step
# `t`, the paper's step $t + 1$ (chapter 1.2): the KL term $L_t =
# D_\text{KL}(q(x_t \mid x_{t+1}, x_0) \,\|\, p_\theta(x_t \mid x_{t+1}))$
# in the paper's indices, or the decoder $L_0$ where `t = 0`. So code step
# $t$ carries $L_t$, with no shift; `prior_bpd` is $L_T$.

# %%
#| export
def mean_flat(x: Tensor) -> Tensor:
    """Mean over every dimension but the first (the batch)."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor | float,
              logvar2: Tensor | float) -> Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), in nats."""
    # A number becomes a 0-d tensor left on the host, which a GPU kernel
    # reads as a scalar: copying it to the GPU would block at every call.
    logvar2 = torch.as_tensor(logvar2).to(dtype=logvar1.dtype)
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + ((mean1 - mean2) ** 2) * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: Tensor) -> Tensor:
    """The standard normal CDF, by the tanh approximation."""
    inner = math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))
    return 0.5 * (1.0 + torch.tanh(inner))


def discretized_gaussian_log_likelihood(
    x: Tensor, means: Tensor, log_scales: Tensor
) -> Tensor:
    """Log-probability (nats) of 8-bit pixels x in [-1, 1] under N(means)."""
    centered_x = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered_x + 1 / 255))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered_x - 1 / 255))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(
        x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def vb_terms_bpd(diffusion: GaussianDiffusion, p: dict[str, Tensor],
                 x_start: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
    """Each image's term of the bound at its t (bits/dim): L_{t-1} or L_0."""
    true_mean, _, true_log_variance = diffusion.q_posterior_mean_variance(
        x_start, x_t, t)
    kl = normal_kl(true_mean, true_log_variance, p["mean"], p["log_variance"])
    kl = mean_flat(kl) / math.log(2.0)
    decoder_nll = -discretized_gaussian_log_likelihood(
        x_start, p["mean"], 0.5 * p["log_variance"])
    decoder_nll = mean_flat(decoder_nll) / math.log(2.0)
    return torch.where(t == 0, decoder_nll, kl)


def prior_bpd(diffusion: GaussianDiffusion, x_start: Tensor) -> Tensor:
    """The prior term L_T, KL(q(x_T | x_0) || N(0, I)), in bits/dim."""
    t = torch.full((x_start.shape[0],), diffusion.num_timesteps - 1,
                   device=x_start.device, dtype=torch.long)
    mean, _, log_variance = diffusion.q_mean_variance(x_start, t)
    return mean_flat(normal_kl(mean, log_variance, 0.0, 0.0)) / math.log(2.0)


# %%
# Two sanity checks: the KL between a Gaussian and itself is zero, and the
# decoder's probabilities of the 256 pixel values sum to one (the bins tile
# the real line).
mean, log_var = torch.randn(5), torch.randn(5)
assert torch.allclose(normal_kl(mean, log_var, mean, log_var),
                      torch.zeros(5), atol=1e-6)
pixels = torch.arange(256) / 127.5 - 1
for m, scale in [(0.1, 0.05), (-0.7, 0.3), (0.99, 0.01)]:
    log_p = discretized_gaussian_log_likelihood(
        pixels, torch.full_like(pixels, m), torch.full_like(pixels,
                                                            math.log(scale))
    )
    total = log_p.exp().sum().item()
    print(f"mean {m:+.2f}, scale {scale}: probabilities sum to {total:.6f}")
    assert abs(total - 1) < 1e-5

# %% [markdown]
# An image's whole bound needs the model at every step, $T - 1$ down to 0,
# plus the prior: `calc_bpd_loop`. Like the reference, it also records the
# errors of $\hat x_0$ and of the implied $\epsilon$, in columns in the
# order it visits the steps: column 0 is $t = T - 1$, the last $L_0$.
# Section 2.8 runs it on a trained model.

# %%
#| export
def calc_bpd_loop(
    diffusion: GaussianDiffusion, model: Model, x_start: Tensor,
    clip_denoised: bool = True, model_kwargs: dict[str, Any] | None = None,
    progress: bool = False,
) -> dict[str, Tensor]:
    """The full bound per image (bits/dim), with its per-step terms."""
    from tqdm.auto import tqdm

    vb, xstart_mse, mse = [], [], []
    steps = range(diffusion.num_timesteps - 1, -1, -1)
    for step in tqdm(steps, disable=not progress, desc="bound"):
        t = torch.full((x_start.shape[0],), step, device=x_start.device,
                       dtype=torch.long)
        noise = torch.randn_like(x_start)
        x_t = diffusion.q_sample(x_start, t, noise)
        with torch.no_grad():
            p = diffusion.p_mean_variance(model, x_t, t, clip_denoised,
                                          model_kwargs=model_kwargs)
        vb.append(vb_terms_bpd(diffusion, p, x_start, x_t, t))
        xstart_mse.append(mean_flat((p["pred_xstart"] - x_start) ** 2))
        eps = diffusion.predict_eps_from_xstart(x_t, t, p["pred_xstart"])
        mse.append(mean_flat((eps - noise) ** 2))
    # Columns in the loop's order, t = T - 1 down to 0: the reference's.
    vb, xstart_mse, mse = (torch.stack(v, dim=1)
                           for v in (vb, xstart_mse, mse))
    prior = prior_bpd(diffusion, x_start)
    return {"total_bpd": vb.sum(dim=1) + prior, "prior_bpd": prior,
            "vb": vb, "xstart_mse": xstart_mse, "mse": mse}


# %% [markdown]
# That costs $T$ network evaluations per image, too many for comparing
# models. The bound can be **estimated** from two: the prior $L_T$ and the
# decoder $L_0$ exactly, plus $T - 1$ times the KL term at one timestep
# $t_i$ per image,
#
# $$L_\text{vlb} \approx \frac{1}{n} \sum_{i=1}^{n} \Big( L_T(x^{(i)}) +
# L_0(x^{(i)}) + (T - 1)\, L_{t_i}(x^{(i)}) \Big),$$
#
# unbiased for $t_i$ uniform on $1, \dots, T - 1$. Drawing the $t_i$
# **stratified**, one uniform draw in each of $n$ equal slices
# (`stratified_timesteps`), keeps it unbiased over the $n$ images with less
# spread. `vlb_estimate` returns each image's estimate (`"vlb"`, bits/dim)
# and the squared error of the implied noise (`"mse"`). Fixed (image, $t$,
# noise) triples make a fair comparison: models that see the same draws
# differ with a small standard error even where images spread widely.

# %%
#| export
def stratified_timesteps(
    n: int, num_timesteps: int, generator: torch.Generator | None = None
) -> Tensor:
    """n timesteps in 1..T-1, one uniform draw in each of n equal slices."""
    if num_timesteps < 2:
        raise ValueError(f"num_timesteps must be >= 2, got {num_timesteps}")
    strata = torch.arange(n) + torch.rand(n, generator=generator,
                                          dtype=torch.float64)
    t = 1 + (strata * (num_timesteps - 1) / n).long()
    # Float rounding can put the last draw on T itself.
    return t.clamp(max=num_timesteps - 1)


def vlb_estimate(
    diffusion: GaussianDiffusion, model: Model, x_start: Tensor, t: Tensor,
    noise: Tensor | None = None, clip_denoised: bool = True,
    model_kwargs: dict[str, Any] | None = None,
) -> dict[str, Tensor]:
    """Per-image VLB estimate L_T + L_0 + (T-1) L_t and eps MSE at t."""
    # t may be on the CPU (as stratified_timesteps draws it): checked there,
    # it reaches a GPU without a sync, where a check would wait.
    if t.min() < 1 or t.max() >= diffusion.num_timesteps:
        raise ValueError(f"t must lie in [1, {diffusion.num_timesteps}) for "
                         "a KL term; t = 0 is the decoder, counted anyway")
    t = t.to(x_start.device, non_blocking=True)
    noise = torch.randn_like(x_start) if noise is None else noise

    def term(step: Tensor) -> tuple[Tensor, Tensor]:
        x_t = diffusion.q_sample(x_start, step, noise)
        with torch.no_grad():
            p = diffusion.p_mean_variance(model, x_t, step, clip_denoised,
                                          model_kwargs=model_kwargs)
        eps = diffusion.predict_eps_from_xstart(x_t, step, p["pred_xstart"])
        return vb_terms_bpd(diffusion, p, x_start, x_t, step), eps

    kl, eps = term(t)
    decoder, _ = term(torch.zeros_like(t))
    vlb = (prior_bpd(diffusion, x_start) + decoder
           + (diffusion.num_timesteps - 1) * kl)
    return {"vlb": vlb, "mse": mean_flat((eps - noise) ** 2)}


# %% [markdown]
# ## 2.3 Training objectives
#
# Ho et al. found that a much simpler objective gives better samples than
# the bound: with $x_t = \sqrt{\bar\alpha_t} x_0 + \sqrt{1-\bar\alpha_t}
# \epsilon$ and $t$ uniform,
#
# $$L_\text{simple} = \mathbb{E}_{t, x_0, \epsilon}\big[\lVert \epsilon -
# \epsilon_\theta(x_t, t) \rVert^2\big],$$
#
# the bound with its weights dropped (section 2.13), which says nothing
# about the variance. Nichol & Dhariwal keep it for the mean and add the
# bound for the variance, the **hybrid** objective
#
# $$L_\text{hybrid} = L_\text{simple} + \lambda L_\text{vlb}, \qquad
# \lambda = 0.001,$$
#
# with the mean output detached in $L_\text{vlb}$ (a stop-gradient), so that
# the bound trains only $\Sigma_\theta$. One example sees one $t$, and $T
# L_t$ is an unbiased one-sample estimate of $L_\text{vlb}$, so each example
# adds $\lambda T L_t$: exactly $L_t$ at $T = 1000$ (the reference's vb
# term, "rescaled" by $T/1000$). The bound alone, $T L_t$ (`loss="kl"`),
# gives the best likelihoods but noisier training (section 2.4).
#
# `training_losses` returns the per-image loss and the terms the reference
# logs, `mse` and `vb`. Our `vb` is always $L_t$ in bits/dim; the
# reference's is the term its loss adds, $\lambda T L_t$, the same wherever
# $\lambda T = 1$. The mean's target follows `mean_type`: the noise, $x_0$
# or the posterior mean.

# %%
#| export
def training_losses(
    diffusion: GaussianDiffusion, model: Model, x_start: Tensor, t: Tensor,
    model_kwargs: dict[str, Any] | None = None, noise: Tensor | None = None,
) -> dict[str, Tensor]:
    """Per-image loss at timesteps t, with its terms "mse" and "vb"."""
    noise = torch.randn_like(x_start) if noise is None else noise
    x_t = diffusion.q_sample(x_start, t, noise)
    output = model(x_t, diffusion.model_timesteps(t), **(model_kwargs or {}))
    # Else a fixed variance's loss would read a learned one's output, and
    # ignore half of it.
    diffusion.check_output(output, x_t)
    if diffusion.loss == "kl":
        p = diffusion.p_mean_variance_from_output(output, x_t, t, False)
        vb = vb_terms_bpd(diffusion, p, x_start, x_t, t)
        return {"loss": vb * diffusion.num_timesteps, "vb": vb}
    channels = x_start.shape[1]
    mean_out = output[:, :channels].to(diffusion.dtype)
    target = {
        "eps": noise,
        "x0": x_start,
        "prev": diffusion.q_posterior_mean_variance(x_start, x_t, t)[0],
    }[diffusion.mean_type]
    terms = {"mse": mean_flat((target - mean_out) ** 2)}
    terms["loss"] = terms["mse"]
    if diffusion.learns_variance:
        # The bound trains only the variance: the mean output is detached.
        frozen = torch.cat([mean_out.detach(), output[:, channels:]], dim=1)
        p = diffusion.p_mean_variance_from_output(frozen, x_t, t, False)
        terms["vb"] = vb_terms_bpd(diffusion, p, x_start, x_t, t)
        weight = diffusion.lambda_vlb * diffusion.num_timesteps
        terms["loss"] = terms["mse"] + weight * terms["vb"]
    return terms


# %%
# The stop-gradient, checked with a "model" that returns a fixed tensor: the
# vb term's gradient must not reach the mean channels, nor the mse term's
# the variance channels.
x_start = torch.rand(2, 1, 8, 8) * 2 - 1
output = torch.randn(2, 2, 8, 8, requires_grad=True)
t = torch.tensor([3, 600])
terms = training_losses(learned, lambda x, t: output, x_start, t)
grad_vb, = torch.autograd.grad(terms["vb"].sum(), output, retain_graph=True)
grad_mse, = torch.autograd.grad(terms["mse"].sum(), output)
assert grad_vb[:, :1].abs().max() == 0 and grad_vb[:, 1:].abs().max() > 0
assert grad_mse[:, 1:].abs().max() == 0 and grad_mse[:, :1].abs().max() > 0
print({k: [round(v, 4) for v in val.tolist()] for k, val in terms.items()})

# %% [markdown]
# ## 2.4 Which timesteps to train on
#
# The bound's terms differ by orders of magnitude across $t$, the first
# steps carrying most of it (section 2.8), so the one-sample estimate $T
# \cdot L_t$ with uniform $t$ is very noisy. Nichol & Dhariwal **importance
# sample** instead: draw $t$ with $p_t \propto \sqrt{\mathbb{E}[L_t^2]}$,
# estimated from the last 10 values of $L_t$ seen at each $t$, and weight
# the loss by $1 / (T p_t)$, which keeps its expectation. The sampler stays
# uniform until every $t$ has its 10 values, and a uniform share of 0.001
# keeps every $t$ possible. They use it for the bound alone (`loss="kl"`);
# the hybrid objective samples uniformly. Both samplers return timesteps
# and weights; the loss-aware one learns from `update(t, losses)`, and its
# history (`state_dict`) goes into training checkpoints, so that a resumed
# run draws the same timesteps.

# %%
#| export
class UniformSampler:
    """Draws training timesteps uniformly; weights are all one."""

    def __init__(self, num_timesteps: int) -> None:
        self.num_timesteps = num_timesteps

    def weights(self) -> np.ndarray:
        """Unnormalised probabilities of each timestep."""
        return np.ones(self.num_timesteps)

    def sample(
        self, batch_size: int, device: torch.device | str = "cpu",
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Timesteps t ~ p and importance weights 1 / (T p_t)."""
        weights = self.weights()
        p = weights / weights.sum()
        t = torch.multinomial(torch.from_numpy(p), batch_size,
                              replacement=True, generator=generator)
        importance = torch.from_numpy(1 / (len(p) * p[t.numpy()])).float()
        return t.to(device), importance.to(device)


class LossAwareSampler(UniformSampler):
    """Samples t in proportion to the RMS of its recent losses."""

    def __init__(self, num_timesteps: int, history_per_term: int = 10,
                 uniform_prob: float = 0.001) -> None:
        super().__init__(num_timesteps)
        self.uniform_prob = uniform_prob
        self.history = np.zeros((num_timesteps, history_per_term))
        self.counts = np.zeros(num_timesteps, dtype=np.int64)

    def weights(self) -> np.ndarray:
        """Uniform until every t has a full history, then RMS-proportional."""
        if (self.counts < self.history.shape[1]).any():
            return np.ones(self.num_timesteps)
        weights = np.sqrt(np.mean(self.history**2, axis=-1))
        weights = weights / weights.sum() * (1 - self.uniform_prob)
        return weights + self.uniform_prob / self.num_timesteps

    def update(self, t: Tensor, losses: Tensor) -> None:
        """Record the losses seen at timesteps t (all ranks' losses)."""
        size = self.history.shape[1]
        for step, loss in zip(t.tolist(), losses.tolist(), strict=True):
            if self.counts[step] == size:  # full: drop the oldest
                self.history[step, :-1] = self.history[step, 1:]
                self.history[step, -1] = loss
            else:
                self.history[step, self.counts[step]] = loss
                self.counts[step] += 1

    def state_dict(self) -> dict[str, Tensor]:
        """The loss history, as tensors (for checkpoints)."""
        return {"history": torch.from_numpy(self.history.copy()),
                "counts": torch.from_numpy(self.counts.copy())}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore the loss history saved by `state_dict`."""
        self.history = state["history"].numpy().copy()
        self.counts = state["counts"].numpy().copy()


# %% [markdown]
# Importance sampling must not change the objective's expectation. For a
# made-up loss profile falling steeply with $t$, the weighted loss's exact
# expectation under the learned $p_t$ is the uniform mean, and samples
# estimate it with far less spread than uniform sampling.

# %%
T = 200
profile = 5.0 * np.exp(-np.arange(T) / 10) + 0.01
aware = LossAwareSampler(T)
for _ in range(10):
    aware.update(torch.arange(T), torch.from_numpy(profile))
p = aware.weights() / aware.weights().sum()
assert np.isclose((p * profile / (T * p)).sum(), profile.mean())
spreads = {}
for name, sampler in [("uniform", UniformSampler(T)), ("loss-aware", aware)]:
    t, w = sampler.sample(20_000)
    estimates = (w.numpy() * profile[t.numpy()]).reshape(200, 100).mean(1)
    spreads[name] = estimates.std()
    print(f"{name:>10}: mean {estimates.mean():.4f} "
          f"(true {profile.mean():.4f}), spread {spreads[name]:.4f}")
assert spreads["loss-aware"] < spreads["uniform"] / 2

# %% [markdown]
# ## 2.5 Respacing: sampling with fewer steps
#
# A model trained with $T$ steps can sample with a subsequence $S$ of them.
# The forward process restricted to $S$ is again a Gaussian diffusion, with
# the original $\bar\alpha$ at the kept steps, so $\beta_i = 1 -
# \bar\alpha_{S_i} / \bar\alpha_{S_{i-1}}$; but the network, trained on
# the original step numbers, must still be shown $S_i$, not $i$.
# `SpacedDiffusion` is a `GaussianDiffusion` on the new betas whose
# `model_timesteps` maps back through `timestep_map` (scaled to $[0, 1000)$
# where the base rescales, as the reference's); `respace` makes one from a
# spec. `space_timesteps` reads the reference's two kinds of spec:
#
# * `"250"` or `"10,15,20"`: split the $T$ steps into as many equal sections
#   as numbers, and take that many evenly spaced steps from each (at $T =
#   300$: 10 of the first 100, 15 of the next, 20 of the last). To take $n$
#   of $m$, the reference walks the stride $s = (m - 1)/(n - 1)$ in floating
#   point and rounds each partial sum, and so do we: it differs from
#   $\operatorname{round}(s k)$ where a sum lands just off a half (at $T =
#   1000$, $n = 21$: $s k = 499.5$ keeps 500, the walked sum 499), for 278
#   of the 1,000 possible counts.
# * `"ddimN"`: the DDIM paper's striding, every $k$-th step from 0, for the
#   integer $k$ that gives exactly $N$ steps.

# %%
#| export
def space_timesteps(num_timesteps: int, spec: str) -> list[int]:
    """The steps kept by a respacing spec ("250", "10,15,20" or "ddim50")."""
    if re.fullmatch(r"ddim\d+", spec):
        count = int(spec[len("ddim"):])
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == count:
                return list(range(0, num_timesteps, stride))
        raise ValueError(f"cannot take exactly {count} of {num_timesteps} "
                         "steps with an integer stride")
    if not re.fullmatch(r"\d+(,\d+)*", spec):
        raise ValueError(f"respacing spec {spec!r} is not a step count, "
                         "comma-separated counts, or ddimN")
    counts = [int(c) for c in spec.split(",")]
    size, extra = divmod(num_timesteps, len(counts))
    steps, start = [], 0
    for i, count in enumerate(counts):
        section = size + (1 if i < extra else 0)
        if section < count:
            raise ValueError(f"cannot take {count} steps from a section "
                             f"of {section} in {spec!r}")
        stride = 1 if count <= 1 else (section - 1) / (count - 1)
        position = 0.0
        for _ in range(count):
            steps.append(start + round(position))
            # Accumulated, as the reference: round(stride * k) differs.
            position += stride
        start += section
    return sorted(set(steps))


class SpacedDiffusion(GaussianDiffusion):
    """A diffusion on a subset of a base's steps; the model sees the base's."""

    def __init__(self, base: GaussianDiffusion, timesteps: list[int]) -> None:
        kept = sorted(set(timesteps))
        if not kept or kept[0] < 0 or kept[-1] >= base.num_timesteps:
            raise ValueError(f"timesteps must lie in [0, "
                             f"{base.num_timesteps}), got {kept[:3]}...")
        alphas_cumprod = base.alphas_cumprod[kept]
        previous = np.append(1.0, alphas_cumprod[:-1])
        super().__init__(1 - alphas_cumprod / previous, base.mean_type,
                         base.var_type, base.loss, base.lambda_vlb,
                         base.dtype, base.rescale_timesteps)
        # The base's model timesteps: its steps, rescaled if it rescales.
        self.timestep_map = base.model_timesteps(torch.tensor(kept))
        self._maps: dict[torch.device, Tensor] = {}

    def model_timesteps(self, t: Tensor) -> Tensor:
        """The base (original) timesteps of the spaced steps t."""
        if t.device not in self._maps:
            self._maps[t.device] = self.timestep_map.to(t.device)
        return self._maps[t.device][t]


def respace(diffusion: GaussianDiffusion, spec: str) -> GaussianDiffusion:
    """The diffusion restricted to the steps of a spec; "" keeps them all."""
    if not spec:
        return diffusion
    return SpacedDiffusion(diffusion,
                           space_timesteps(diffusion.num_timesteps, spec))


# %%
# The reference's documented examples, and the invariant that makes
# respacing correct: the same alpha-bar at each kept step.
assert space_timesteps(300, "10,15,20")[:3] == [0, 11, 22]
assert len(space_timesteps(300, "10,15,20")) == 45
assert space_timesteps(1000, "ddim10") == list(range(0, 1000, 100))
assert space_timesteps(1000, "21")[10] == 499  # the walked sum, not 500
base = GaussianDiffusion(betas)
for spec in ["250", "25", "ddim50", "10,15,20"]:
    spaced = respace(base, spec)
    kept = spaced.timestep_map.numpy()
    np.testing.assert_allclose(spaced.alphas_cumprod,
                               base.alphas_cumprod[kept], rtol=1e-9)
    print(f"{spec:>9}: {spaced.num_timesteps} steps, first {kept[:4]}, "
          f"last {kept[-1]}")
assert respace(base, "").num_timesteps == num_timesteps

# %% [markdown]
# ## 2.6 Sampling
#
# **Ancestral sampling** (DDPM) draws each step from the model's Gaussian,
# $x_{t-1} = \mu_\theta + \sqrt{\Sigma_\theta}\, z$, with no noise at the
# last step. **DDIM** (Song et al., 2021) uses the same trained model
# differently: a family of non-Markovian processes with chapter 1's
# marginals $q(x_t \mid x_0)$, hence the same training objective, whose
# reverse step is
#
# $$x_{t-1} = \sqrt{\bar\alpha_{t-1}}\,\hat x_0 + \sqrt{1 - \bar\alpha_{t-1}
# - \sigma_t^2}\;\hat\epsilon + \sigma_t z, \quad
# \sigma_t = \eta \sqrt{\frac{1-\bar\alpha_{t-1}}{1-\bar\alpha_t}}
# \sqrt{1 - \frac{\bar\alpha_t}{\bar\alpha_{t-1}}}.$$
#
# At $\eta = 1$ it is ancestral sampling with $\Sigma = \tilde\beta_t$; at
# $\eta = 0$ it is deterministic, a discretised ODE (chapter 8.1): good
# with few steps, and invertible (`ddim_reverse_sample` encodes an image
# into the noise that DDIM decodes back into it).
#
# **Guidance** enters through a hook, `cond_fn(x, t, **model_kwargs)`, that
# returns a gradient, for classifier guidance $s \nabla_{x_t} \log
# p_\phi(y \mid x_t)$ (chapter 6). Ancestral sampling shifts the mean by
# $\Sigma \cdot$ gradient (`condition_mean`, the paper's Algorithm 1); DDIM
# has no such mean, so it corrects the predicted noise, $\hat\epsilon =
# \epsilon_\theta - \sqrt{1-\bar\alpha_t} \cdot$ gradient
# (`condition_score`, Algorithm 2). The hook sees original timesteps, and
# enables gradients itself (samplers run without). `guide_at_mean=True`
# takes the gradient at the unguided mean, where the paper's derivation
# expands, instead of at $x_t$, as the reference; chapter 6 compares them.
#
# One ancestral step, `p_sample`, draws from the model's Gaussian, its mean
# shifted by `condition_mean` when there is a `cond_fn`; at `t = 0` it adds
# no noise (`_nonzero`). One DDIM step, `ddim_sample`, is the formula above
# with $\hat\epsilon$ re-derived from the (clipped) $\hat x_0$;
# `ddim_reverse_sample` runs the deterministic step forwards, $x_t$ to
# $x_{t+1}$, with $\bar\alpha_{t+1}$ (`alphas_cumprod_next`).

# %%
#| export
def condition_mean(
    diffusion: GaussianDiffusion, cond_fn: Callable[..., Tensor],
    p: dict[str, Tensor], x: Tensor, t: Tensor,
    model_kwargs: dict[str, Any] | None = None, at_mean: bool = False,
) -> Tensor:
    """Algorithm 1: the mean shifted by the variance times cond_fn's grad."""
    point = p["mean"] if at_mean else x
    gradient = cond_fn(point, diffusion.model_timesteps(t),
                       **(model_kwargs or {}))
    dtype = diffusion.dtype
    return p["mean"].to(dtype) + p["variance"] * gradient.to(dtype)


def condition_score(
    diffusion: GaussianDiffusion, cond_fn: Callable[..., Tensor],
    p: dict[str, Tensor], x: Tensor, t: Tensor,
    model_kwargs: dict[str, Any] | None = None,
) -> dict[str, Tensor]:
    """Algorithm 2: eps - sqrt(1 - abar) grad, and its x_0 and mean."""
    alpha_bar = diffusion.extract("alphas_cumprod", t, x.ndim)
    eps = diffusion.predict_eps_from_xstart(x, t, p["pred_xstart"])
    gradient = cond_fn(x, diffusion.model_timesteps(t), **(model_kwargs or {}))
    eps = eps - (1 - alpha_bar).sqrt() * gradient
    pred_xstart = diffusion.predict_xstart_from_eps(x, t, eps)
    mean, _, _ = diffusion.q_posterior_mean_variance(pred_xstart, x, t)
    return {**p, "pred_xstart": pred_xstart, "mean": mean}


def _nonzero(t: Tensor, ndim: int) -> Tensor:
    """1 where t > 0, else 0: the last step adds no noise."""
    return (t != 0).float().view(-1, *(1,) * (ndim - 1))


def p_sample(
    diffusion: GaussianDiffusion, model: Model, x: Tensor, t: Tensor,
    clip_denoised: bool = True,
    denoised_fn: Callable[[Tensor], Tensor] | None = None,
    cond_fn: Callable[..., Tensor] | None = None,
    model_kwargs: dict[str, Any] | None = None,
    noise: Tensor | None = None, guide_at_mean: bool = False,
) -> dict[str, Tensor]:
    """One ancestral step: x_{t-1} ~ p(x_{t-1} | x_t), and pred_xstart."""
    p = diffusion.p_mean_variance(model, x, t, clip_denoised, denoised_fn,
                                  model_kwargs)
    mean = p["mean"]
    if cond_fn is not None:
        mean = condition_mean(diffusion, cond_fn, p, x, t, model_kwargs,
                              guide_at_mean)
    noise = torch.randn_like(x) if noise is None else noise
    std = torch.exp(0.5 * p["log_variance"])
    sample = mean + _nonzero(t, x.ndim) * std * noise
    return {"sample": sample, "pred_xstart": p["pred_xstart"]}


def ddim_sample(
    diffusion: GaussianDiffusion, model: Model, x: Tensor, t: Tensor,
    clip_denoised: bool = True,
    denoised_fn: Callable[[Tensor], Tensor] | None = None,
    cond_fn: Callable[..., Tensor] | None = None,
    model_kwargs: dict[str, Any] | None = None,
    noise: Tensor | None = None, eta: float = 0.0,
) -> dict[str, Tensor]:
    """One DDIM step (Song et al. eq. 12) with stochasticity eta."""
    p = diffusion.p_mean_variance(model, x, t, clip_denoised, denoised_fn,
                                  model_kwargs)
    if cond_fn is not None:
        p = condition_score(diffusion, cond_fn, p, x, t, model_kwargs)
    # Re-derive eps from x_0, whatever the model predicts.
    eps = diffusion.predict_eps_from_xstart(x, t, p["pred_xstart"])
    alpha_bar = diffusion.extract("alphas_cumprod", t, x.ndim)
    alpha_bar_prev = diffusion.extract("alphas_cumprod_prev", t, x.ndim)
    sigma = (eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar))
             * torch.sqrt(1 - alpha_bar / alpha_bar_prev))
    mean = (p["pred_xstart"] * torch.sqrt(alpha_bar_prev)
            + torch.sqrt(1 - alpha_bar_prev - sigma**2) * eps)
    noise = torch.randn_like(x) if noise is None else noise
    sample = mean + _nonzero(t, x.ndim) * sigma * noise
    return {"sample": sample, "pred_xstart": p["pred_xstart"]}


def ddim_reverse_sample(
    diffusion: GaussianDiffusion, model: Model, x: Tensor, t: Tensor,
    clip_denoised: bool = True,
    denoised_fn: Callable[[Tensor], Tensor] | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> dict[str, Tensor]:
    """One step of the DDIM ODE run forwards: x_t to x_{t+1}."""
    p = diffusion.p_mean_variance(model, x, t, clip_denoised, denoised_fn,
                                  model_kwargs)
    eps = diffusion.predict_eps_from_xstart(x, t, p["pred_xstart"])
    alpha_bar_next = diffusion.extract("alphas_cumprod_next", t, x.ndim)
    sample = (p["pred_xstart"] * torch.sqrt(alpha_bar_next)
              + torch.sqrt(1 - alpha_bar_next) * eps)
    return {"sample": sample, "pred_xstart": p["pred_xstart"]}


# %% [markdown]
# The loops share one signature: the diffusion, the model, the starting
# noise $x_T$ (which fixes batch, shape and device), and the steps' keyword
# options. The progressive forms yield every step's `sample` and
# `pred_xstart`; the plain forms return the final sample, handing each
# step's dictionary to an optional `callback`. Each step's noise is
# `noise_fn(x)`, `torch.randn_like` by default: how noise is drawn is an
# argument, not a new loop, as in k-diffusion's samplers (chapter 6 gives
# every sample its own stream). DDIM inversion runs the steps upwards, from
# the image to $x_T$, with no noise at all.

# %%
#| export
NoiseFn = Callable[[Tensor], Tensor]
_Callback = Callable[[dict[str, Tensor]], None]


def _loop(
    step: Callable[..., dict[str, Tensor]], diffusion: GaussianDiffusion,
    model: Model, x: Tensor, steps: range, progress: bool,
    noise_fn: NoiseFn | None = None, **kwargs: Any,
) -> Iterator[dict[str, Tensor]]:
    from tqdm.auto import tqdm

    # Guidance differentiates a classifier inside the step, which
    # inference mode (no autograd records at all) would forbid.
    grad_free = (torch.no_grad if kwargs.get("cond_fn")
                 else torch.inference_mode)
    for i in tqdm(steps, disable=not progress, desc=step.__name__):
        t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        if noise_fn is not None:  # None: a deterministic step (inversion)
            kwargs["noise"] = noise_fn(x)
        with grad_free():
            out = step(diffusion, model, x, t, **kwargs)
        yield {"step": i, **out}
        x = out["sample"]


def p_sample_loop_progressive(
    diffusion: GaussianDiffusion, model: Model, noise: Tensor,
    progress: bool = False, noise_fn: NoiseFn = torch.randn_like,
    **kwargs: Any,
) -> Iterator[dict[str, Tensor]]:
    """Ancestral sampling from x_T = noise, yielding every step."""
    steps = range(diffusion.num_timesteps - 1, -1, -1)
    yield from _loop(p_sample, diffusion, model, noise, steps, progress,
                     noise_fn, **kwargs)


def ddim_sample_loop_progressive(
    diffusion: GaussianDiffusion, model: Model, noise: Tensor,
    progress: bool = False, noise_fn: NoiseFn = torch.randn_like,
    **kwargs: Any,
) -> Iterator[dict[str, Tensor]]:
    """DDIM sampling from x_T = noise (option eta), yielding every step."""
    steps = range(diffusion.num_timesteps - 1, -1, -1)
    yield from _loop(ddim_sample, diffusion, model, noise, steps, progress,
                     noise_fn, **kwargs)


def last_sample(
    steps: Iterator[dict[str, Tensor]], callback: _Callback | None
) -> Tensor:
    """The last step's sample, passing every step to callback."""
    for out in steps:
        if callback is not None:
            callback(out)
    return out["sample"]


def p_sample_loop(
    diffusion: GaussianDiffusion, model: Model, noise: Tensor,
    progress: bool = False, callback: _Callback | None = None, **kwargs: Any,
) -> Tensor:
    """Ancestral sampling from x_T = noise; returns x_0."""
    return last_sample(p_sample_loop_progressive(
        diffusion, model, noise, progress, **kwargs), callback)


def ddim_sample_loop(
    diffusion: GaussianDiffusion, model: Model, noise: Tensor,
    progress: bool = False, callback: _Callback | None = None, **kwargs: Any,
) -> Tensor:
    """DDIM sampling from x_T = noise (option eta); returns x_0."""
    return last_sample(ddim_sample_loop_progressive(
        diffusion, model, noise, progress, **kwargs), callback)


def ddim_reverse_sample_loop(
    diffusion: GaussianDiffusion, model: Model, x_start: Tensor,
    progress: bool = False, callback: _Callback | None = None, **kwargs: Any,
) -> Tensor:
    """DDIM inversion: the x_T that deterministic DDIM decodes to x_start."""
    steps = range(diffusion.num_timesteps)
    return last_sample(_loop(ddim_reverse_sample, diffusion, model, x_start,
                             steps, progress, **kwargs), callback)


# %% [markdown]
# A model we can write down checks the samplers before any training. If the
# data set is one image $x^\star$, the best noise prediction is exact,
# $\epsilon^\star(x_t, t) = (x_t - \sqrt{\bar\alpha_t}\,x^\star) / \sqrt{1 -
# \bar\alpha_t}$: every sampler, at any number of steps, must land on
# $x^\star$, and DDIM inversion then DDIM must give it back. The oracle
# sees original timesteps, so it reads the unspaced process's tables.

# %%
oracle_diffusion = GaussianDiffusion(betas, var_type="fixed_small")
x_star = torch.rand(1, 1, 8, 8) * 2 - 1


def oracle(x, t):
    """The exact noise prediction for a data set holding only x_star."""
    a = oracle_diffusion.extract("sqrt_alphas_cumprod", t, x.ndim)
    s = oracle_diffusion.extract("sqrt_one_minus_alphas_cumprod", t, x.ndim)
    return (x - a * x_star) / s


noise = torch.randn(4, 1, 8, 8)
for spec in ["10", "ddim25"]:
    spaced = respace(oracle_diffusion, spec)
    ancestral = p_sample_loop(spaced, oracle, noise)
    ddim = ddim_sample_loop(spaced, oracle, noise)
    back = ddim_sample_loop(spaced, oracle,
                            ddim_reverse_sample_loop(spaced, oracle, x_star))
    errors = [(v - x_star).abs().max().item()
              for v in (ancestral, ddim, back)]
    print(f"{spec:>7}: max error ancestral {errors[0]:.1e}, "
          f"DDIM {errors[1]:.1e}, inversion round trip {errors[2]:.1e}")
    assert max(errors) < 1e-4

# %% [markdown]
# ## 2.7 Training a small model
#
# The architecture is chapter 3's subject, so a small UNet, defined here
# only, will do: two down-sampling stages, residual blocks that receive a
# sinusoidal embedding of $t$, and $2C$ output channels ($\epsilon$ and
# $v$). The diffusion is ADM's ImageNet $64 \times 64$ one: cosine schedule
# (the paper's other models use the linear one, Table 11), $\epsilon$
# prediction, `learned_range` variance and the hybrid objective.

# %%
def timestep_embedding(t, dim, max_period=10_000):
    """Sinusoidal embedding of (float) timesteps, as in the Transformer."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half) / half)
    angles = t.float()[:, None] * freqs.to(t.device)[None]
    return torch.cat([angles.cos(), angles.sin()], dim=1)


class Block(nn.Module):
    """Residual block: norm, SiLU, conv, plus the timestep embedding."""

    def __init__(self, cin, cout, emb_dim):
        super().__init__()
        self.norm1, self.norm2 = nn.GroupNorm(8, cin), nn.GroupNorm(8, cout)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, cout)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(nn.functional.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(nn.functional.silu(self.norm2(h)))
        return self.skip(x) + h


class SmallUNet(nn.Module):
    """A two-stage UNet predicting noise and the variance interpolation v."""

    def __init__(self, channels, width):
        super().__init__()
        self.width = width
        emb = 4 * width
        self.embed = nn.Sequential(nn.Linear(width, emb), nn.SiLU(),
                                   nn.Linear(emb, emb))
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        self.down1, self.down2 = Block(width, width, emb), Block(
            width, 2 * width, emb)
        self.mid = Block(2 * width, 2 * width, emb)
        self.up2 = Block(4 * width, width, emb)
        self.up1 = Block(2 * width, width, emb)
        self.out = nn.Sequential(nn.GroupNorm(8, width), nn.SiLU(),
                                 nn.Conv2d(width, 2 * channels, 3, padding=1))

    def forward(self, x, t):
        emb = self.embed(timestep_embedding(t, self.width))
        h1 = self.down1(self.inp(x), emb)  # full resolution
        h2 = self.down2(nn.functional.avg_pool2d(h1, 2), emb)  # 1/2
        h = self.mid(nn.functional.avg_pool2d(h2, 2), emb)  # 1/4
        h = nn.functional.interpolate(h, scale_factor=2.0)
        h = self.up2(torch.cat([h, h2], 1), emb)
        h = nn.functional.interpolate(h, scale_factor=2.0)
        h = self.up1(torch.cat([h, h1], 1), emb)
        return self.out(h)


# %% [markdown]
# The training loop is the paper's in miniature: draw a batch and
# timesteps, compute `training_losses`, weight them, step AdamW. It also
# keeps an exponential moving average of the weights, $\bar\theta
# \leftarrow d\,\bar\theta + (1 - d)\,\theta$ after every step, which the
# rest of the chapter evaluates and samples: with a constant learning rate
# the last weights carry the last step's noise. The decay $d$ is `ema_rate`
# held to $\frac{1+n}{10+n}$ at update $n$, so that a short run's average is
# not mostly its initialisation (chapter 4.6 measures why). Chapter 4 turns
# the loop into a full training engine.

# %%
dataset = load_dataset(data)
images = dataset.images(range(len(dataset)))
diffusion = GaussianDiffusion(betas)
model = SmallUNet(dataset.channels, model_channels).to(device)
print(f"{dataset.source}: {len(dataset)} images {tuple(images.shape[1:])}; "
      f"model {sum(p.numel() for p in model.parameters()):,} parameters")
optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
ema = copy.deepcopy(model).requires_grad_(False)
sampler = UniformSampler(num_timesteps)
history = {"loss": [], "mse": [], "vb": []}
start = time.perf_counter()
for step in tqdm(range(train_steps), desc="training"):
    batch = images[torch.randint(len(images), (batch_size,))].to(device)
    t, weights = sampler.sample(batch_size, device)
    terms = training_losses(diffusion, model, batch, t)
    loss = (terms["loss"] * weights).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    decay = min(ema_rate, (1 + step) / (10 + step))
    with torch.no_grad():
        pairs = zip(ema.parameters(), model.parameters(), strict=True)
        for average, weight in pairs:
            average.lerp_(weight, 1 - decay)
    for key in history:
        history[key].append(terms[key].mean().item())
train_seconds = time.perf_counter() - start
last, model = model.eval(), ema.eval()  # `last`: the final step's weights
print(f"{train_steps} steps of batch {batch_size} in {train_seconds:.0f} s "
      f"on {device}")


def smooth(values, width=25):
    """Moving average, to see a trend through the noise of single batches."""
    width = min(width, len(values))
    return np.convolve(values, np.ones(width) / width, mode="valid")


fig, axes = plt.subplots(1, 2, figsize=(9, 3))
axes[0].plot(smooth(history["mse"]))
axes[0].set(title="L_simple (eps MSE)", xlabel="step", yscale="log")
axes[1].plot(smooth(history["vb"]))
axes[1].set(title="vb term L_t (bits/dim)", xlabel="step", yscale="log")
plt.tight_layout()
plt.show()
early, late = np.mean(history["mse"][:20]), np.mean(history["mse"][-20:])
print(f"L_simple: first 20 steps {early:.3f}, last 20 steps {late:.3f}")
assert late < early and all(np.isfinite(history["loss"]))

# %% [markdown]
# ## 2.8 The bound of a trained model
#
# `calc_bpd_loop` evaluates all $T$ terms for a few training images (the
# question is the bound's shape, not generalisation). The terms span orders
# of magnitude, and the first steps dominate: why importance sampling helps.

# %%
x_nll = images[:nll_images].to(device)
bound = calc_bpd_loop(diffusion, model, x_nll, progress=True)
terms_by_t = bound["vb"].mean(0).flip(0).cpu().numpy()  # t = 0 first
print(f"bound: {bound['total_bpd'].mean():.3f} bits/dim "
      f"(prior {bound['prior_bpd'].mean():.2e}, decoder L_0 "
      f"{terms_by_t[0]:.3f}, sum of KL terms {terms_by_t[1:].sum():.3f})")
fig, ax = plt.subplots(figsize=(5, 3))
# Code step t holds the paper's L_t (section 2.2): t = 0 is the decoder.
ax.semilogy(np.arange(1, num_timesteps), terms_by_t[1:],
            label=r"KL term $L_t$, $t \geq 1$")
ax.axhline(terms_by_t[0], color="gray", ls="--", label=r"decoder $L_0$")
ax.set(xlabel="code step t", ylabel="bits/dim", title="terms of the bound")
ax.legend()
plt.show()
assert torch.isfinite(bound["total_bpd"]).all()
head = terms_by_t[1:num_timesteps // 10].sum()
assert head > terms_by_t[num_timesteps // 10:].sum()

# %% [markdown]
# Section 2.2's estimate costs two evaluations per draw instead of $T$.
# With `vlb_draws` stratified draws of $(t, \epsilon)$ per image, shuffled
# so that every image sees the whole range of $t$, its mean should agree
# with the full bound within a few standard errors. Single estimates spread
# widely ($T - 1$ multiplies the dominant first steps), so comparing models
# needs many images, or paired differences (chapter 4): here the EMA
# against the last step's weights (`last`) on the **same** draws, whose
# shared images, $t$ and $\epsilon$ cancel most of the spread. The standard
# error of the mean difference (for these images only) is below that of two
# independent estimates, $\sqrt{\text{se}_1^2 + \text{se}_2^2}$.

# %%
g = torch.Generator().manual_seed(seed)
x_many = x_nll.repeat(vlb_draws, 1, 1, 1)
t_many = stratified_timesteps(len(x_many), num_timesteps, g)
t_many = t_many[torch.randperm(len(x_many), generator=g)].to(device)
noise_many = torch.randn(x_many.shape, generator=g).to(device)
estimate = vlb_estimate(diffusion, model, x_many, t_many, noise_many)["vlb"]
se = estimate.std().item() / len(estimate) ** 0.5
full = bound["total_bpd"].mean().item()
print(f"estimate {estimate.mean():.3f} ± {se:.3f} bits/dim from "
      f"{len(estimate)} draws ({2 * len(estimate)} evaluations); full bound "
      f"{full:.3f} ({num_timesteps * nll_images} evaluations)")
assert abs(estimate.mean().item() - full) < 5 * se
estimate_last = vlb_estimate(diffusion, last, x_many, t_many,
                             noise_many)["vlb"]
diff = (estimate - estimate_last).cpu()
paired_se = diff.std().item() / len(diff) ** 0.5
se_last = estimate_last.std().item() / len(estimate_last) ** 0.5
print(f"EMA {estimate.mean():.3f} ± {se:.3f}, last {estimate_last.mean():.3f}"
      f" ± {se_last:.3f} bits/dim; EMA - last {diff.mean():+.3f} ± "
      f"{paired_se:.3f} (paired, {len(diff)} draws: "
      f"{abs(diff.mean().item()) / paired_se:.1f} s.e.)")
assert paired_se < (se**2 + se_last**2) ** 0.5

# %% [markdown]
# ## 2.9 What the variance learned
#
# With `learned_range` the model places $\log\Sigma_\theta$ between
# $\log\tilde\beta_t$ and $\log\beta_t$. The pixel mean of $\frac{v+1}{2}$
# over noised images, the weight on $\log\beta_t$ (Nichol & Dhariwal's $v$,
# section 2.1), shows where. The two bounds differ only in the first few
# steps (chapter 1), so only there does the choice matter.

# %%
probe_t = np.unique(np.geomspace(1, num_timesteps - 1, 40).astype(int))
x_probe = images[:16].to(device)
fractions = []
with torch.no_grad():
    for step in probe_t:
        t = torch.full((len(x_probe),), int(step), device=device)
        x_t = diffusion.q_sample(x_probe, t)
        v = model(x_t, t)[:, dataset.channels:]
        fractions.append(((v + 1) / 2).mean().item())
fig, (ax_log, ax_frac) = plt.subplots(1, 2, figsize=(9, 3))
learned_log = [f * diffusion.log_betas[s]
               + (1 - f) * diffusion.posterior_log_variance_clipped[s]
               for f, s in zip(fractions, probe_t, strict=True)]
ax_log.semilogx(probe_t, diffusion.log_betas[probe_t], label="log beta")
ax_log.semilogx(probe_t, diffusion.posterior_log_variance_clipped[probe_t],
                label="log beta-tilde")
ax_log.semilogx(probe_t, learned_log, "k.", label="learned")
ax_log.set(xlabel="t", title="log variance")
ax_log.legend(fontsize=8)
ax_frac.semilogx(probe_t, fractions, "k.-")
ax_frac.set(xlabel="t", ylabel="(v + 1) / 2", title="learned interpolation")
plt.tight_layout()
plt.show()
assert np.all(np.isfinite(fractions))

# %% [markdown]
# ## 2.10 Fewer steps: DDPM and DDIM
#
# The trained model samples from one noise with the respaced processes of
# `sample_steps`, ancestrally and with deterministic DDIM, a row each. The
# last row repeats the longest DDIM with the last step's weights (`last`)
# instead of their average: what the EMA changes.

# %%
noise = torch.randn(num_samples, *images.shape[1:], device=device)
grids, longest = {}, max(sample_steps)
chain = []  # the longest DDPM run's steps, for the next figure


def record(out):
    """Keep the first two images' x_{t-1} and pred_xstart of a step."""
    chain.append({k: out[k][:2].cpu() for k in ("sample", "pred_xstart")})


for steps in sample_steps:
    spaced = respace(diffusion, str(steps))
    for name, loop in [("DDPM", p_sample_loop), ("DDIM", ddim_sample_loop)]:
        start = time.perf_counter()
        watch = record if (name, steps) == ("DDPM", longest) else None
        samples = loop(spaced, model, noise, callback=watch)
        print(f"{name} {steps:4d} steps: {time.perf_counter() - start:5.1f} s")
        grids[f"{name} {steps}"] = samples.cpu()
        assert samples.shape == noise.shape
        assert samples.abs().max() <= 1 + 1e-6  # x_0 is clipped to [-1, 1]
grids[f"DDIM {longest}, last"] = ddim_sample_loop(
    respace(diffusion, str(longest)), last, noise).cpu()
show_rows(grids)

# %% [markdown]
# ### $\hat x_0$ along the chain
#
# Every step also predicts where the chain will end, $\hat x_0$
# (`pred_xstart`), which the posterior mean moves $x_t$ towards; the
# `callback` kept them for the longest ancestral run. For two samples, the
# rows show $x_t$ entering a step and its $\hat x_0$, at eight steps from
# $t = T - 1$ to 0. The first guess is clipped noise: there
# $\sqrt{\bar\alpha_{T-1}} \approx 5 \cdot 10^{-5}$ (chapter 1.3), and
# $\hat x_0$ divides $\hat\epsilon$'s error by it. Then come blurred
# shapes, as they should: a perfect $\hat x_0$ is $\mathbb{E}[x_0 \mid
# x_t]$ (chapter 8.1), the mean of every image that could lie under that
# noise. They sharpen as $t$ falls, the shape fixed well before $x_t$ shows
# it. (The smoke run's shapes are blobs more often than digits.)

# %%
spaced = respace(diffusion, str(longest))
inputs = [noise[:2].cpu()] + [c["sample"] for c in chain[:-1]]
columns = np.linspace(0, len(chain) - 1, 8).round().astype(int)
fig, axes = plt.subplots(4, len(columns), figsize=(1.3 * len(columns), 6))
for i in range(2):
    for j, k in enumerate(columns):
        t_orig = int(spaced.timestep_map[len(chain) - 1 - k])
        show_images(inputs[k][i:i + 1], [f"x_t, t={t_orig}"],
                    axes[2 * i, j:j + 1])
        show_images(chain[k]["pred_xstart"][i:i + 1],
                    [f"x0-hat, t={t_orig}"], axes[2 * i + 1, j:j + 1])
plt.tight_layout()
plt.show()
assert len(chain) == longest
assert torch.equal(chain[-1]["sample"], grids[f"DDPM {longest}"][:2])
# At t = 0 the posterior mean is x0-hat itself (coef2 = 0), with no noise.
torch.testing.assert_close(chain[-1]["sample"], chain[-1]["pred_xstart"])

# %% [markdown]
# DDIM at $\eta = 0$ is deterministic: one noise gives nearly one image at
# every length, while ancestral samples change as fresh noise enters at
# every step. What short processes lose is what the learned variance is
# for: Nichol & Dhariwal found that with a fixed one, ancestral sampling
# degrades quickly as steps are removed (the paper's 25-step rows of Table
# 5 are DDIM, `ddim25`, which never reads $\Sigma_\theta$). Section 5.9
# measures it with FID, with chapter 4's training loop and chapter 5's
# metrics: one model trained with $L_\text{simple}$ (fixed variance) and
# with $L_\text{hybrid}$ (learned), sampled with 10 to 100 ancestral steps.
#
# Finally DDIM inversion: encode real images to $x_T$ with 50 steps and
# decode back, exactly only as the steps grow and as far as the model is
# good; the error is set against the distance between images.

# %%
spaced = respace(diffusion, "ddim50")
originals = images[-num_samples:].to(device)
encoded = ddim_reverse_sample_loop(spaced, model, originals)
decoded = ddim_sample_loop(spaced, model, encoded)
error = (decoded - originals).pow(2).mean().sqrt().item()
spread = (originals - originals.roll(1, 0)).pow(2).mean().sqrt().item()
print(f"DDIM round trip RMS error {error:.3f}; "
      f"RMS distance between different images {spread:.3f}")
print(f"encoded x_T: mean {encoded.mean():+.3f}, std {encoded.std():.3f}")
show_rows({"original": originals.cpu(), "x_T": encoded.cpu() / 3,
           "decoded": decoded.cpu()})
assert error < spread

# %% [markdown]
# ## 2.11 A longer run, recorded
#
# A longer run than the smoke configuration's, on a 2-core CPU in float32
# (this loop has no autocast; the machine, date and earlier runs are in
# [appendix M.1](appendix_measurements.html)):
#
# ```sh
# adm book run 2 -p train_steps 6000 -p batch_size 64 \
#     -p num_samples 16 -p nll_images 16 -p sample_steps "[10, 25, 50, 250]"
# ```
#
# | what | result |
# | --- | --- |
# | $L_\text{simple}$, mean of the first / last 20 steps | 0.332 / 0.031 |
# | bound on 16 training images | 1.453 bits/dim |
# | of which decoder $L_0$ / KL terms / prior | 0.620 / 0.833 / 1.6e-09 |
# | its estimate from 1,024 draws (section 2.8) | 1.437 $\pm$ 0.137 |
# | DDIM-50 inversion round trip, RMS error | 0.013 (0.572 between images) |
#
# ![Samples of the CPU run](figures/02_cpu_run_samples.png)
#
# The rows are section 2.10's. Ancestral samples change with every length,
# more than half of them recognisable digits: the model is small (282k
# parameters), unconditional, and has seen each image about 77 times.
# DDIM's are smoother and less often digits, keep a trace of speckle at 10
# steps and barely change from 25 to 250. Appendix M.1's earlier runs
# recorded only mean bounds, so their gaps to this run support no
# conclusion; section 2.8's paired comparison does. A run this small says
# little about a well-trained model; the full GPU run (the parameters
# cell's command) is not made yet: its numbers belong in this table.

# %% [markdown]
# ## 2.12 A toy with exact answers
#
# So far every claim about what sampling *should* produce was checked
# against samples. A toy with known answers removes that doubt: points in
# the plane from a mixture of Gaussians, component $k$ with weight $w_k$,
# mean $\mu_k$, standard deviation $s_k$ and class label $y_k$. Noised, it
# stays a mixture, of $\mathcal{N}(\sqrt{\bar\alpha_t} \mu_k, (\bar\alpha_t
# s_k^2 + 1 - \bar\alpha_t) I)$, so the density $p_t(x_t)$, its score
# $\nabla \log p_t(x_t)$, the class posterior $p_t(y \mid x_t)$ and the
# best noise prediction $\epsilon^*(x_t, t) = -\sqrt{1 - \bar\alpha_t}
# \nabla \log p_t(x_t)$ are closed-form. `adm_lib.toy` holds them, for
# 2.13, chapter 6 (what guidance samples) and chapter 8.1 (what the
# samplers and a trained network make of it, and the ODE behind DDIM).

# %%
#| export toy
"""A labelled mixture of Gaussians in the plane whose noisy densities, score,
class posterior and best noise prediction are exact."""
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class GaussianMixture:
    """p(x, y) = sum_k w_k N(x; mu_k, s_k^2 I) [y = y_k], in float64."""

    means: Tensor  # (K, 2): mu_k
    stds: Tensor  # (K,): s_k
    weights: Tensor  # (K,): w_k, summing to 1
    labels: Tensor  # (K,): y_k, the class of each component

    @property
    def num_classes(self) -> int:
        """The number of classes, 1 + the largest label."""
        return int(self.labels.max()) + 1

    def sample(self, n: int, generator: torch.Generator | None = None
               ) -> tuple[Tensor, Tensor]:
        """n draws of (x_0, y)."""
        k = torch.multinomial(self.weights, n, replacement=True,
                              generator=generator)
        eps = torch.randn(n, self.means.shape[1], generator=generator,
                          dtype=self.means.dtype)
        return self.means[k] + self.stds[k, None] * eps, self.labels[k]

    def _components(self, x: Tensor, alpha_bar: Tensor | float
                    ) -> tuple[Tensor, Tensor, Tensor]:
        """log w_k N(x; sqrt(abar) mu_k, var_k I), x - its mean, var_k."""
        a = torch.as_tensor(alpha_bar, dtype=x.dtype).reshape(-1, 1)
        var = a * self.stds**2 + (1 - a)  # (n or 1, K)
        diff = x[:, None, :] - a.sqrt()[..., None] * self.means  # (n, K, d)
        dim = x.shape[1]
        log_joint = (self.weights.log() - 0.5 * (diff**2).sum(-1) / var
                     - 0.5 * dim * torch.log(2 * math.pi * var))
        return log_joint, diff, var

    def log_prob(self, x: Tensor, alpha_bar: Tensor | float = 1.0) -> Tensor:
        """log p_t(x_t), the density of sqrt(abar) x_0 + sqrt(1-abar) eps."""
        return self._components(x, alpha_bar)[0].logsumexp(1)

    def class_log_probs(self, x: Tensor, alpha_bar: Tensor | float = 1.0
                        ) -> Tensor:
        """log p_t(y | x_t) for every class y: (n, num_classes)."""
        log_joint = self._components(x, alpha_bar)[0]
        per_class = [log_joint[:, self.labels == c].logsumexp(1)
                     for c in range(self.num_classes)]
        return torch.stack(per_class, 1) - log_joint.logsumexp(1, True)

    def score(self, x: Tensor, alpha_bar: Tensor | float = 1.0,
              y: Tensor | None = None) -> Tensor:
        """grad log p_t(x_t), or grad log p_t(x_t | y) given labels y."""
        log_joint, diff, var = self._components(x, alpha_bar)
        if y is not None:  # keep only the components of each x's class
            other = self.labels[None, :] != y[:, None]
            log_joint = log_joint.masked_fill(other, -math.inf)
        resp = log_joint.softmax(1)  # p_t(k | x_t), or p_t(k | x_t, y)
        return -(resp[..., None] * diff / var[..., None]).sum(1)

    def eps_model(self, alphas_cumprod: Sequence[float] | np.ndarray
                  ) -> Callable[..., Tensor]:
        """The exact eps(x_t, t[, y]) at the steps of alphas_cumprod."""
        table = torch.tensor(np.asarray(alphas_cumprod), dtype=torch.float64)

        def model(x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
            a = table.to(x.device)[t].to(x.dtype)
            return -(1 - a).sqrt()[:, None] * self.score(x, a, y)
        return model

    def cond_fn(self, alphas_cumprod: Sequence[float] | np.ndarray,
                scale: float = 1.0) -> Callable[..., Tensor]:
        """Guidance's s grad log p_t(y | x_t), exactly, as a cond_fn."""
        table = torch.tensor(np.asarray(alphas_cumprod), dtype=torch.float64)

        def cond_fn(x: Tensor, t: Tensor, y: Tensor) -> Tensor:
            a = table.to(x.device)[t].to(x.dtype)
            return scale * (self.score(x, a, y) - self.score(x, a))
        return cond_fn


def ring_mixture(num_components: int = 6, num_classes: int = 3,
                 radius: float = 0.6, std: float = 0.1) -> GaussianMixture:
    """Equal components on a circle, labelled in turn 0, 1, ..., 0, 1, ..."""
    n = num_components
    angle = 2 * math.pi * torch.arange(n, dtype=torch.float64) / n
    ones = torch.ones(n, dtype=torch.float64)
    return GaussianMixture(
        means=radius * torch.stack([angle.cos(), angle.sin()], 1),
        stds=std * ones, weights=ones / n,
        labels=torch.arange(n) % num_classes)


# %%
# The exact score must be the gradient of the exact log-density, and the
# class posterior must sum to one, at every noise level.
from adm_lib.toy import ring_mixture

toy = ring_mixture()
x_toy, y_toy = toy.sample(512, torch.Generator().manual_seed(seed))
for a_bar in (1.0, 0.5, 0.01):
    x = x_toy[:8].clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(toy.log_prob(x, a_bar).sum(), x)
    assert torch.allclose(toy.score(x.detach(), a_bar), grad, atol=1e-10)
    total = toy.class_log_probs(x_toy, a_bar).exp().sum(1)
    assert torch.allclose(total, torch.ones_like(total))
fig, ax = plt.subplots(figsize=(4, 4))
ax.scatter(*x_toy.T, c=y_toy, s=4, cmap="tab10", vmax=9)
ax.set(aspect="equal", xlabel="$x_1$", ylabel="$x_2$",
       title="The toy's data, coloured by class")
plt.show()

# %% [markdown]
# ## 2.13 The objectives as weightings of the bound
#
# With $\Sigma = \tilde\beta_t$ fixed, the KL term at code step $t \ge 1$
# is $w_t \lVert \epsilon - \epsilon_\theta \rVert^2$ (exercise 2); with
# the signal-to-noise ratio $\mathrm{SNR}_t = \bar\alpha_t / (1 -
# \bar\alpha_t)$ and its log $\lambda_t$ (chapter 1.2),
#
# $$w_t = \frac{\beta_t^2}{2 \tilde\beta_t \alpha_t (1 - \bar\alpha_t)}
# = \frac12 \Big(\frac{\mathrm{SNR}_{t-1}}{\mathrm{SNR}_t} - 1\Big)
# \approx \frac12 (\lambda_{t-1} - \lambda_t).$$
#
# The bound weights each step's error by the log-SNR the step removes;
# $L_\text{simple}$ weights every step by one. Both are minimised by
# $\epsilon^* = \mathbb{E}[\epsilon \mid x_t]$, the conditional mean; they
# differ in where a finite network spends its capacity, and in the
# variance of their one-sample estimates (here the weights span five
# orders of magnitude: section 2.4). On the toy, $w_t$ times $\epsilon^*$'s
# loss, the **irreducible loss** $\mathbb{E}\lVert \epsilon - \epsilon^*
# \rVert^2$ that no model goes below (chapter 8.1), is term by term the
# exact mean's bound with $\Sigma = \tilde\beta_t$. The spike at the last
# step is the cosine's $\beta$ clipped at 0.999 (chapter 1.3), dividing
# the SNR by 1,000; the toy's loss there is zero, so it adds nothing.

# %%
toy_diffusion = GaussianDiffusion(betas, var_type="fixed_small",
                                  dtype=torch.float64)
exact_eps = toy.eps_model(toy_diffusion.alphas_cumprod)
g = torch.Generator().manual_seed(seed)
# The bound's weight on the eps MSE with Sigma = beta-tilde, per code step.
snr = toy_diffusion.alphas_cumprod / (1 - toy_diffusion.alphas_cumprod)
w = 0.5 * (snr[:-1] / snr[1:] - 1)  # code steps 1 .. T-1
beta_t, abar_t = toy_diffusion.betas[1:], toy_diffusion.alphas_cumprod[1:]
w_direct = beta_t**2 / (2 * toy_diffusion.posterior_variance[1:]
                        * (1 - beta_t) * (1 - abar_t))
np.testing.assert_allclose(w, w_direct, rtol=1e-9)
# The toy's irreducible loss at every step, and the two objectives' shares.
t_all = torch.arange(1, num_timesteps).repeat(100)
x0_all, _ = toy.sample(len(t_all), g)
eps = torch.randn(x0_all.shape, generator=g, dtype=torch.float64)
x_t = toy_diffusion.q_sample(x0_all, t_all, eps)
per_t = torch.zeros(num_timesteps - 1, dtype=torch.float64).index_add_(
    0, t_all - 1, mean_flat((eps - exact_eps(x_t, t_all)) ** 2)) / 100
floor_t = per_t.numpy()
vlb_terms = w * floor_t  # nats per coordinate: the exact model's KL terms
head = slice(0, num_timesteps // 10)
print(f"first 10% of steps: {vlb_terms[head].sum() / vlb_terms.sum():.0%} of "
      f"the exact model's bound, {floor_t[head].sum() / floor_t.sum():.0%} "
      f"of its L_simple")
fig, (ax_w, ax_terms) = plt.subplots(1, 2, figsize=(9, 3.2))
steps_ = np.arange(1, num_timesteps)
ax_w.loglog(steps_, w, label="L_vlb: w_t")
ax_w.loglog(steps_, np.ones(len(w)), label="L_simple: 1")
ax_w.set(xlabel="code step t", ylabel="weight on the eps MSE per step",
         title="objectives as weightings")
ax_terms.loglog(steps_, vlb_terms / vlb_terms.sum(), label="L_vlb")
ax_terms.loglog(steps_, floor_t / floor_t.sum(), label="L_simple")
ax_terms.set(xlabel="code step t", ylabel="share of the objective",
             ylim=(1e-7, 1), title="the toy's exact eps: where the loss lies")
for ax in (ax_w, ax_terms):
    ax.legend(fontsize=8)
plt.tight_layout()
plt.show()
assert vlb_terms[head].sum() > 0.5 * vlb_terms.sum()

# %% [markdown]
# ## Summary
#
# * ADM's reverse step is a Gaussian whose mean comes from a predicted
#   $\epsilon$ and whose log-variance it interpolates between
#   $\tilde\beta_t$ and $\beta_t$.
# * The bound, closed-form KL terms plus a discretised decoder in bits/dim,
#   costs $T$ evaluations per image; `vlb_estimate` estimates it from two.
#   The hybrid objective trains the mean by $L_\text{simple}$ and only the
#   variance by the bound; importance sampling of $t$ tames the bound alone.
# * Respacing keeps a subsequence of steps; DDPM and DDIM sample on it, and
#   guidance shifts the mean (Algorithm 1) or the noise (Algorithm 2).
# * A toy in the plane has an exact $\epsilon^*$; on it the bound and
#   $L_\text{simple}$ weigh one irreducible loss per step, the bound most
#   of it in the first steps. Chapter 8.1 samples the toy exactly.
#
# Chapter 3 builds the network the paper uses in place of `SmallUNet`.

# %% [markdown]
# ## Exercises
#
# 1. Show that at $\eta = 1$ DDIM's $\sigma_t^2$ is $\tilde\beta_t$ and its
#    mean is $\tilde\mu_t(\hat x_0, x_t)$, so `ddim_sample` with `eta=1.0`
#    is `p_sample` with `fixed_small`. Check one step of each on
#    `oracle_diffusion` and `oracle`, with the same $x_t$, `t` and `noise`.
# 2. With $\Sigma = \sigma_t^2 I$ fixed and `mean_type="eps"`, show that
#    $L_{t-1} = w_t \lVert \epsilon - \epsilon_\theta \rVert^2 + c$, and
#    $L_\text{simple}$ drops $w_t = \beta_t^2 / (2 \sigma_t^2 \alpha_t (1 -
#    \bar\alpha_t))$. Where is $w_t$ largest when $\sigma_t^2 = \tilde\beta_t$?
# 3. Predict the largest step kept by `space_timesteps(1000, "ddim7")` and
#    by `space_timesteps(1000, "7")`, then check, and compare
#    `base.alphas_cumprod` there. Which of the two starts a sampler from
#    $x_T \sim \mathcal{N}(0, I)$ with the smaller mismatch?
# 4. Rerun with `-p schedule linear`. Using chapter 1's figure of
#    $\tilde\beta_t / \beta_t$, predict how the terms of the bound in section
#    2.8 and the learned interpolation of section 2.9 change, then check.
# 5. Train section 2.7's model with `var_type="fixed_small"`, then
#    `"fixed_large"` (the loss becomes `"simple"`): end `SmallUNet` in
#    `channels` outputs, log only `mse`, skip section 2.9. Predict which
#    loses more in section 2.10's 10-step rows, then check.
# 6. Train on the bound alone, `GaussianDiffusion(..., loss="kl")`, with a
#    `LossAwareSampler(num_timesteps)` and, after each step,
#    `sampler.update(t, terms["loss"].detach())` (log only `vb`). Predict
#    after how many steps its `weights()` stop being uniform, then check.

# %% [markdown] jupyter={"source_hidden": true} tags=["solution"]
# **Solution 1.** At $\eta = 1$, $\sigma_t^2 = \frac{1 -
# \bar\alpha_{t-1}}{1 - \bar\alpha_t} \beta_t = \tilde\beta_t$, so $1 -
# \bar\alpha_{t-1} - \sigma_t^2 = \frac{(1 - \bar\alpha_{t-1})^2
# \alpha_t}{1 - \bar\alpha_t}$.
# With $\hat\epsilon = (x_t - \sqrt{\bar\alpha_t} \hat x_0) / \sqrt{1 -
# \bar\alpha_t}$, the mean's coefficient of $x_t$ is $\frac{(1 -
# \bar\alpha_{t-1}) \sqrt{\alpha_t}}{1 - \bar\alpha_t}$ (`coef2`) and that
# of $\hat x_0$ is $\frac{\sqrt{\bar\alpha_{t-1}} \beta_t}{1 -
# \bar\alpha_t}$ (`coef1`): `p_sample`'s step, noise for noise. Checked in
# float64: in float32, $1 - \bar\alpha_{t-1} - \sigma_t^2$ cancels at $t =
# 1$ ($1 - \bar\alpha_{t-1} \approx 4 \cdot 10^{-5}$), a $10^{-3}$ error.

# %% jupyter={"source_hidden": true} tags=["solution"]
oracle_diffusion.dtype = torch.float64  # chapter 1's precision knob
x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
t = torch.tensor([1, num_timesteps // 2, num_timesteps - 1])
z = torch.randn_like(x)
by_ddim = ddim_sample(oracle_diffusion, oracle, x, t, noise=z, eta=1.0)
by_ddpm = p_sample(oracle_diffusion, oracle, x, t, noise=z)
oracle_diffusion.dtype = torch.float32
torch.testing.assert_close(by_ddim["sample"], by_ddpm["sample"],
                           rtol=1e-9, atol=1e-9)

# %% [markdown] jupyter={"source_hidden": true} tags=["solution"]
# **Solution 2.** Two Gaussians with covariance $\sigma_t^2 I$ differ in KL
# by $\lVert \tilde\mu_t - \mu_\theta \rVert^2 / (2\sigma_t^2)$ plus terms
# free of $\theta$. Both means are $(x_t - \frac{\beta_t}{\sqrt{1 -
# \bar\alpha_t}} \epsilon) / \sqrt{\alpha_t}$ (chapter 1, exercise 3), with
# $\epsilon$ and $\epsilon_\theta$, so $\tilde\mu_t - \mu_\theta =
# \frac{\beta_t}{\sqrt{\alpha_t (1 - \bar\alpha_t)}} (\epsilon_\theta -
# \epsilon)$, giving $w_t$. With $\sigma_t^2 = \tilde\beta_t$ it is
# $\frac12 (\mathrm{SNR}_{t-1} / \mathrm{SNR}_t - 1)$ (section 2.13),
# largest where a step removes the most log-SNR: the linear schedule's first
# KL term (code step 1, $w \approx 0.6$); the cosine's last step (about
# 500, where the clipped $\beta = 0.999$ divides the SNR by 1,000).

# %% jupyter={"source_hidden": true} tags=["solution"]
for name in ("linear", "cosine"):
    d = GaussianDiffusion(get_named_beta_schedule(name, num_timesteps))
    snr = d.alphas_cumprod / (1 - d.alphas_cumprod)
    w = 0.5 * (snr[:-1] / snr[1:] - 1)  # code steps 1 .. T-1
    print(f"{name}: w_t largest {w.max():.3g} at code step "
          f"{w.argmax() + 1}, {w[0]:.3g} at step 1")
    assert w.argmax() + 1 == (1 if name == "linear" else num_timesteps - 1)

# %% [markdown] jupyter={"source_hidden": true} tags=["solution"]
# **Solution 3.** `"ddim7"` strides by the smallest $k$ giving 7 steps, 143,
# and ends at 858; `"7"` spans the whole range and keeps 999. There the
# cosine's $\bar\alpha$ is about $2 \cdot 10^{-9}$, so $\mathcal{N}(0, I)$
# is the right start; at 858 it is about 0.05, and $x_{858}$ still holds
# $\sqrt{0.05} \approx 0.22$ of the image: `"7"` has the smaller mismatch.

# %% jupyter={"source_hidden": true} tags=["solution"]
last_ddim, last_even = (space_timesteps(1000, s)[-1] for s in ("ddim7", "7"))
abar_1000 = GaussianDiffusion(
    get_named_beta_schedule("cosine", 1000)).alphas_cumprod
print(f"ddim7 ends at {last_ddim}, alpha-bar {abar_1000[last_ddim]:.3f}; "
      f"7 ends at {last_even}, alpha-bar {abar_1000[last_even]:.1e}")
assert (last_ddim, last_even) == (858, 999)
assert abar_1000[last_ddim] > 1e6 * abar_1000[last_even]

# %% [markdown] jupyter={"source_hidden": true} tags=["solution"]
# **Solution 4.** Both schedules start at $\beta_1 \approx 10^{-4}$, and in
# both $\tilde\beta_t / \beta_t$ rises from about 0.5 to 0.9 within 15 steps
# (chapter 1's figure): the bound's terms keep their shape, the first steps
# dominating, with a tail that drops earlier (the linear schedule spends
# more steps near pure noise). The interpolation matters, and moves, only in
# the first steps; elsewhere $v$ is free. The cell computes the cheap part.

# %% jupyter={"source_hidden": true} tags=["solution"]
for name in ("cosine", "linear"):
    d = GaussianDiffusion(get_named_beta_schedule(name, num_timesteps))
    ratio = d.posterior_variance[1:] / d.betas[1:]
    print(f"{name}: beta-tilde/beta {ratio[0]:.2f} at code step 1; below "
          f"0.9 at {np.sum(ratio < 0.9)} of {num_timesteps - 1} steps")
    assert np.sum(ratio < 0.9) < 20

# %% [markdown] jupyter={"source_hidden": true} tags=["solution"]
# **Solution 5.** At 10 steps each respaced $\beta_t$ is large, and
# `fixed_large` adds noise that big at every step: expect speckled rows.
# `fixed_small`'s $\tilde\beta_t$ is below the true reverse variance, so it
# errs the other way, too smooth, by less. The toy measures it with the
# exact $\epsilon$: the RMS distance of samples to their nearest component
# mean, against the data's $0.1\sqrt2 \approx 0.14$. (MNIST is not run.)

# %% jupyter={"source_hidden": true} tags=["solution"]
spreads = {}
x_T = torch.randn(toy_samples, 2, generator=g, dtype=torch.float64)
for var_type in ("fixed_small", "fixed_large"):
    d = GaussianDiffusion(betas, var_type=var_type, dtype=torch.float64)
    for spec in ("10", "100"):  # 2.13's exact_eps: the same alphas_cumprod
        end = p_sample_loop(respace(d, spec), exact_eps, x_T,
                            clip_denoised=False)
        spreads[var_type, spec] = torch.cdist(end, toy.means).min(
            1).values.pow(2).mean().sqrt().item()
print({k: round(v, 3) for k, v in spreads.items()})
assert spreads["fixed_large", "10"] > spreads["fixed_small", "10"]
assert all(spreads[v, "100"] < spreads[v, "10"]
           for v in ("fixed_small", "fixed_large"))

# %% [markdown] jupyter={"source_hidden": true} tags=["solution"]
# **Solution 6.** The weights stay uniform until each of the $T$ steps has
# 10 losses: a coupon collector's with 10 copies, about $T (\ln T + 9 \ln
# \ln T) \approx 24{,}000$ draws at $T = 1000$, some 760 steps of batch 32.
# The cell simulates the drawn timesteps with a dummy loss.

# %% jupyter={"source_hidden": true} tags=["solution"]
counts = []
for run in range(3):
    aware = LossAwareSampler(num_timesteps)
    gen = torch.Generator().manual_seed(run)
    steps_taken = 0
    while (aware.counts < 10).any():  # exactly weights()'s uniform test
        t, _ = aware.sample(32, generator=gen)
        aware.update(t, torch.ones(32))
        steps_taken += 1
    counts.append(steps_taken)
print(f"weights stop being uniform after {counts} steps of batch 32")
predicted = num_timesteps * (np.log(num_timesteps)
                             + 9 * np.log(np.log(num_timesteps))) / 32
assert all(0.6 * predicted < c < 1.5 * predicted for c in counts)
