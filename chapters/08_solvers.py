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
# # Guided sampling in ten steps: fast solvers
#
# The paper samples with 250 ancestral steps, or 25 DDIM steps (chapter 2,
# Table 1's last rows), and guides both with a noisy classifier (chapter
# 6). Every step is a network call, and with a classifier a backward pass
# too. Later work made the *deterministic* sampler much faster by treating
# it as what it is, the numerical solution of an ordinary differential
# equation, and solving that equation better: DPM-Solver++ (Lu et al.
# 2022, arXiv 2211.01095) was measured on exactly ADM's guided ImageNet
# models, and EDM's Heun sampler (Karras et al. 2022) took the released
# ADM ImageNet-64 model from FID 2.07 to 1.55 with no retraining. No
# library offers these solvers together with a trained noisy classifier;
# this chapter builds them on chapter 2's diffusion, with chapter 2's
# signature, so that chapter 6's guidance and chapter 7's cascade use them
# unchanged.
#
# This chapter exports `adm_lib.solvers`:
#
# * 8.1 the score and the sampling ODE of an $\epsilon$-prediction model,
#   checked on chapter 2's toy with its exact $\epsilon$ (DDPM and DDIM
#   draw its law, a trained network's irreducible loss, DDIM as Euler's
#   method), and the ODE's exact solution in the log-SNR $\lambda$ (the
#   exponential integrator);
# * 8.2 DPM-Solver++(2M), 8.3 EDM's Heun sampler on the discrete schedule;
# * 8.4 one signature for every sampler, and guidance: the classifier's
#   $\epsilon$ shift (Algorithm 2) and classifier-free guidance;
# * 8.5 why guided DDIM blows up at the clipped last step of the cosine
#   schedule, and what a solver does about it;
# * 8.6 parity with the solvers' own code;
# * 8.7 the experiment: FID, accuracy, precision and recall against the
#   number of network calls, and 8.8 the recorded run;
# * 8.9 `adm sample --sampler dpm++2m|heun`, and 8.10 a summary.

# %% tags=["parameters"]
# Smoke configuration: about a minute on a CPU; its models train for
# seconds and its samples are noise. The recorded CPU run of 8.8 (MNIST-5k,
# the models of `adm demo`: its recipe, its classifier) is
#   adm book run 8 -p train_steps 350 -p classifier_steps 400 \
#       -p nfes "[5, 10, 20, 50, 250]" -p seeds "[0, 1, 2]" -p per_seed 20 \
#       -p num_ref 2000 -p runs_dir build/chapter8_mnist -p reuse_runs True \
#       -p figures_dir chapters/figures
# and the full grid, on a GPU (not run for this book yet):
#   adm book run 8 -p device cuda -p train_steps 800 \
#       -p nfes "[5, 10, 20, 50, 250]" -p seeds "[0, 1, 2]" \
#       -p per_seed 1000 -p num_ref 5000 -p runs_dir build/chapter8_gpu
# (CIFAR-10: add -p data ../shared/data/cifar10/train.zip -p features
# cifar10 and chapter 7's CIFAR-10 training steps.)
data: str = "mnist5k"  # a data-set name, or a folder, .zip or .npz
features: str = "mnist"  # the metrics' network: mnist or cifar10
device: str = "auto"  # "auto" picks CUDA when there is a GPU
runs_dir: str = "build/chapter8"  # the diffusion and classifier runs
reuse_runs: bool = False  # True: finished runs in runs_dir are loaded
train_steps: int = 4  # of the diffusion model (adm demo's recipe)
classifier_steps: int = 4  # of the noisy classifier (adm demo's recipe)
classifier_scale: float = 1.0  # guidance scale s of the guided arms
samplers: list[str] = ["ddpm", "ddim", "dpm++2m", "heun"]  # compared
nfes: list[int] = [10]  # network calls per sample
seeds: list[int] = [0, 1]  # sampling seeds
per_seed: int = 10  # samples per seed and arm (every class in turn)
num_ref: int = 300  # real images the samples are scored against
batch_size: int = 100  # of sampling
figures_dir: str = ""  # if set, the figures are also saved there
seed: int = 0  # of training, and of 8.1's draws
toy_samples: int = 2000  # 8.1: points drawn by each sampler on the toy
toy_train_steps: int = 600  # 8.1: the toy MLP's training steps

# %%
#| default_exp solvers

# %%
import json
import math
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch
from matplotlib.ticker import NullFormatter
from torch import nn

from adm_lib.book import find_root
from adm_lib.diffusion import (
    GaussianDiffusion,
    SpacedDiffusion,
    ddim_sample,
    ddim_sample_loop,
    ddim_sample_loop_progressive,
    mean_flat,
    p_sample_loop_progressive,
    respace,
    training_losses,
)
from adm_lib.forward import get_named_beta_schedule
from adm_lib.toy import ring_mixture
from adm_lib.unet import timestep_embedding

# Relative paths, the parameters' too, start at the book's root, as under
# `adm book run`, wherever the kernel starts (JupyterLab: in chapters/).
os.chdir(find_root())
torch.manual_seed(seed)
started = time.perf_counter()

# %% [markdown]
# ## 8.1 The sampling ODE
#
# Chapter 1's forward process gives $x_t = \alpha_t x_0 + \sigma_t
# \epsilon$ with $\alpha_t = \sqrt{\bar\alpha_t}$ and $\sigma_t =
# \sqrt{1 - \bar\alpha_t}$. A deterministic sampler solves an ordinary
# differential equation driven by the **score** $\nabla \log p_t(x_t)$ of
# the noised data's density. Chapter 2's toy (2.12, `adm_lib.toy`), a
# labelled mixture of Gaussians in the plane, has its score and its best
# noise prediction $\epsilon^*$ in closed form, so this section checks
# every step on it: what DDPM and DDIM draw with the exact $\epsilon^*$,
# how far a trained network is from it, the score's two identities, and
# then the ODE, DDIM as its Euler method, and its exact solution in the
# log-SNR. The toy's diffusion is chapter 2's: the cosine schedule's 1,000
# steps, $\Sigma = \tilde\beta_t$, in float64.

# %%
ring = ring_mixture()  # chapter 2's toy: six components, three classes
toy_diffusion = GaussianDiffusion(get_named_beta_schedule("cosine", 1000),
                                  var_type="fixed_small", dtype=torch.float64)
num_timesteps = toy_diffusion.num_timesteps
exact_eps = ring.eps_model(toy_diffusion.alphas_cumprod)

# %% [markdown]
# ### Reverse trajectories, exactly
#
# The exact $\epsilon^*$ has no training error, so what the samplers make
# of it is their own doing. Both run 100 respaced steps in float64, without
# clipping $\hat x_0$ (the toy is not an image), from the same
# `toy_samples` noise draws. Ancestral trajectories wander, fresh noise
# entering at every step; DDIM's are smooth, an ODE's solutions (below).
# The third panel compares the samples' shares of the components (nearest
# mean) with the data's; the cell also prints the squared maximum mean
# discrepancy to fresh data (MMD$^2$, RBF kernel of width 0.1, unbiased),
# mean $\pm$ s.e. over 10 blocks, beside data against data.

# %%
toy_spaced = respace(toy_diffusion, "100")
g = torch.Generator().manual_seed(seed)
toy_noise = torch.randn(toy_samples, 2, generator=g, dtype=torch.float64)


def seeded_noise(x):
    """Each step's noise from the seeded generator: a reproducible run."""
    return torch.randn(x.shape, generator=g, dtype=x.dtype)


def block_mmd(a, b, blocks=10, width=0.1):
    """Unbiased MMD^2 (RBF kernel) per block of a against b: mean, s.e."""
    def k(p, q):
        return torch.exp(-torch.cdist(p, q) ** 2 / (2 * width**2))

    values = []
    for u, v in zip(a.chunk(blocks), b.chunk(blocks), strict=True):
        n = len(u)
        within = ((k(u, u).sum() - n) + (k(v, v).sum() - n)) / (n * (n - 1))
        values.append((within - 2 * k(u, v).mean()).item())
    return np.mean(values), np.std(values, ddof=1) / math.sqrt(blocks)


toy_runs = {}  # name: the path, (steps + 1, n, 2)
for name, loop in [("DDPM", p_sample_loop_progressive),
                   ("DDIM", ddim_sample_loop_progressive)]:
    toy_runs[name] = torch.stack([toy_noise] + [out["sample"] for out in loop(
        toy_spaced, exact_eps, toy_noise, noise_fn=seeded_noise,
        clip_denoised=False)])
data_a, _ = ring.sample(toy_samples, g)
data_b, _ = ring.sample(toy_samples, g)
K = len(ring.weights)
side = torch.linspace(-2.5, 2.5, 200, dtype=torch.float64)
density = ring.log_prob(torch.cartesian_prod(side, side)).exp()
fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
mmd = {"data": block_mmd(data_a, data_b)}
for ax, (name, path) in zip(axes[:2], toy_runs.items(), strict=True):
    ax.contourf(side, side, density.reshape(200, 200).T, levels=12,
                cmap="Greys")
    for i in range(5):  # the same five starting points in both panels
        ax.plot(*path[:, i].T, lw=0.8)
        ax.plot(*path[0, i], "ko", ms=4, mfc="none")
        ax.plot(*path[-1, i], "k.", ms=6)
    ax.set(aspect="equal", xlim=(-2.5, 2.5), ylim=(-2.5, 2.5),
           xlabel="$x_1$", ylabel="$x_2$",
           title=f"{name}, {toy_spaced.num_timesteps} steps, exact eps")
    final = path[-1]
    mmd[name] = block_mmd(final, data_a)
    # Equal widths: the most probable component is the nearest mean.
    nearest = torch.cdist(final, ring.means).argmin(1)
    share = torch.bincount(nearest, minlength=K).double() / len(final)
    se = (share * (1 - share) / len(final)).sqrt()
    axes[2].errorbar(np.arange(K) + (0.15 if name == "DDIM" else -0.15),
                     share, 2 * se, fmt="o", label=name, capsize=3)
    z = ((share - 1 / K) / (1 / K * (1 - 1 / K) / len(final)) ** 0.5)
    print(f"{name}: component shares {np.round(share.numpy(), 3)}, "
          f"largest gap {z.abs().max():.1f} s.e.; MMD^2 to data "
          f"{mmd[name][0]:+.4f} ± {mmd[name][1]:.4f}")
    assert z.abs().max() < 4
axes[2].axhline(1 / K, color="gray", ls="--", label="data: 1/6")
axes[2].set(xlabel="mixture component", ylabel="share of samples (± 2 s.e.)",
            title=f"{toy_samples} samples each")
axes[2].legend(fontsize=8)
plt.tight_layout()
plt.show()
print(f"MMD^2 data against data {mmd['data'][0]:+.4f} ± {mmd['data'][1]:.4f}")
for name in toy_runs:  # unbiased: zero in expectation for equal laws
    assert abs(mmd[name][0]) < 4 * mmd[name][1]

# %% [markdown]
# With the exact $\epsilon$, neither sampler's shares nor its MMD$^2$ are 4
# standard errors from the data's: both 100-step samplers draw the data's
# law, to what 2,000 samples can tell.
#
# ### A trained network against the exact $\epsilon$
#
# How far is a trained network from the best prediction, and at which $t$?
# Any $\epsilon$-model's expected loss splits exactly as
#
# $$\mathbb{E}\lVert \epsilon - \epsilon_\theta \rVert^2 = \mathbb{E}
# \lVert \epsilon - \epsilon^* \rVert^2 + \mathbb{E}\lVert \epsilon_\theta
# - \epsilon^* \rVert^2,$$
#
# as $\epsilon^* = \mathbb{E}[\epsilon \mid x_t]$ leaves an error
# uncorrelated with anything computed from $x_t$ (below): the
# **irreducible loss**, a floor no training goes below, plus the model's
# own error. An MLP (two hidden layers of 64; input $x_t$ and chapter 3's
# embedding of $t$) trains with $L_\text{simple}$ on fresh samples for
# `toy_train_steps` steps; the cell measures the three terms at 25 values
# of $t$ on shared draws and checks the split to 4 standard errors.

# %%
class ToyEps(nn.Module):
    """A small MLP eps-model for points in the plane."""

    def __init__(self, width=64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2 + 16, width), nn.SiLU(),
                                 nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, 2))

    def forward(self, x, t):
        emb = timestep_embedding(t, 16, max_period=1000)
        return self.net(torch.cat([x.float(), emb], 1))


torch.manual_seed(seed)
toy_net = ToyEps()
toy_optimizer = torch.optim.Adam(toy_net.parameters(), lr=3e-3)
toy_float = GaussianDiffusion(toy_diffusion.betas, var_type="fixed_small")
start = time.perf_counter()
for _ in range(toy_train_steps):
    x0_batch, _ = ring.sample(256, g)
    t = torch.randint(num_timesteps, (256,), generator=g)
    loss = training_losses(toy_float, toy_net, x0_batch.float(), t)["loss"]
    toy_optimizer.zero_grad(set_to_none=True)
    loss.mean().backward()
    toy_optimizer.step()
print(f"{toy_train_steps} steps of batch 256 in "
      f"{time.perf_counter() - start:.1f} s")

probe = np.unique(np.geomspace(1, num_timesteps - 1, 25).astype(int))
n_probe, rows = 2000, []
with torch.no_grad():
    for step in probe:
        x0_probe, _ = ring.sample(n_probe, g)
        eps = torch.randn(n_probe, 2, generator=g, dtype=torch.float64)
        t = torch.full((n_probe,), int(step))
        x_t = toy_diffusion.q_sample(x0_probe, t, eps)
        best, net = exact_eps(x_t, t), toy_net(x_t, t).double()
        floor, loss, excess = (mean_flat(e**2)
                               for e in (eps - best, eps - net, net - best))
        gap = loss - floor - excess  # zero in expectation
        rows.append([floor.mean(), loss.mean(), excess.mean(), gap.mean(),
                     gap.std() / n_probe**0.5])
floor, loss, excess, gap, gap_se = torch.tensor(rows).T.numpy()
fig, ax = plt.subplots(figsize=(5.5, 3.5))
ax.semilogx(probe, floor, label="exact eps*: irreducible loss")
ax.semilogx(probe, loss, label="trained MLP: its loss")
ax.semilogx(probe, excess, label="MLP's squared distance to eps*")
ax.set(xlabel="t", ylabel="mean squared error per coordinate",
       title="The toy's eps: trained against exact")
ax.legend(fontsize=8)
plt.show()
print(f"irreducible loss from {floor[0]:.3f} (t={probe[0]}) to "
      f"{floor[-1]:.4f} (t={probe[-1]}); the MLP's excess, mean over t "
      f"{excess.mean():.4f}, largest {excess.max():.4f} at t="
      f"{probe[excess.argmax()]}")
print("gap/se", np.round(gap / gap_se, 1))
assert np.all(np.abs(gap) < 4 * gap_se + 1e-12)
assert np.all(loss >= floor - 4 * gap_se)
# The MLP's error lives in between: small at both ends of t.
assert max(excess[0], excess[-1]) < excess.max() / 3

# %% [markdown]
# The floor is about 1 at small $t$, where the noise is far below the
# components' width and $x_t$ says almost nothing about $\epsilon$, and 0 at
# large $t$, where $\epsilon \approx x_t$. The MLP's own error is largest
# in between, where $\epsilon^*$ has the mixture's shape. Its loss alone
# hides this: a loss near 1 at small $t$ is no sign of a bad model, which is
# why models are compared by paired differences (chapter 2.8).
#
# ### The score
#
# **Tweedie's formula.** For $x_t = \alpha_t x_0 + \sigma_t \epsilon$ and
# any data distribution, the best denoiser is one step along the score:
#
# $$\mathbb{E}[x_0 \mid x_t] = \frac{x_t + \sigma_t^2 \nabla \log
# p_t(x_t)}{\alpha_t}$$
#
# (differentiate $p_t(x_t) = \int q(x_t \mid x_0) p(x_0)\, dx_0$ under the
# integral, with $\nabla_{x_t} q = -(x_t - \alpha_t x_0) q / \sigma_t^2$).
# The cell checks it against Bayes' rule: 200,000 draws of $x_0$ from the
# data, weighted by $q(x_t \mid x_0)$, at three $x_t$.

# %%
a_bar = 0.7  # one noise level
points = torch.tensor([[0.0, 0.0], [0.5, 0.0], [0.25, 0.4]],
                      dtype=torch.float64)
tweedie = (points + (1 - a_bar) * ring.score(points, a_bar)) / a_bar**0.5
x0_many, _ = ring.sample(200_000, g)
for point, guess in zip(points, tweedie, strict=True):
    # q(x_t | x_0) as importance weights on draws of x_0 from the data.
    log_w = -((point - a_bar**0.5 * x0_many) ** 2).sum(1) / (2 * (1 - a_bar))
    w = log_w.softmax(0)
    bayes = (w[:, None] * x0_many).sum(0)
    se = ((w[:, None] ** 2 * (x0_many - bayes) ** 2).sum(0)).sqrt()
    print(f"x_t = {point.tolist()}: Tweedie {guess.numpy().round(4)}, "
          f"Bayes on samples {bayes.numpy().round(4)} ± {se.numpy().round(4)}")
    assert torch.all((guess - bayes).abs() < 4 * se)

# %% [markdown]
# **$\epsilon$ is a scaled score.** Solve $x_t = \alpha_t x_0 + \sigma_t
# \epsilon$ for $\epsilon$, take the expectation given $x_t$, and use
# Tweedie:
#
# $$\epsilon^*(x_t, t) = \mathbb{E}[\epsilon \mid x_t] = \frac{x_t -
# \alpha_t\, \mathbb{E}[x_0 \mid x_t]}{\sigma_t} = -\sigma_t\, \nabla \log
# p_t(x_t).$$
#
# A squared error is minimised by the conditional mean, so training on
# $L_\text{simple}$ is denoising score matching; `eps_model` is this
# formula. A conditional mean's error is uncorrelated with every function
# of $x_t$; the cell checks two.

# %%
x0_check, _ = ring.sample(20_000, g)
eps = torch.randn(x0_check.shape, generator=g, dtype=torch.float64)
x_t = a_bar**0.5 * x0_check + (1 - a_bar) ** 0.5 * eps
eps_star = -(1 - a_bar) ** 0.5 * ring.score(x_t, a_bar)
for name, h in [("x_t", x_t), ("x_t^3", x_t**3)]:
    product = (eps - eps_star) * h
    z = product.mean(0) / (product.std(0) / len(product) ** 0.5)
    print(f"E[(eps - eps*) {name}] in s.e.: {z.numpy().round(2)}")
    assert torch.all(z.abs() < 4)

# %% [markdown]
# ### The probability-flow ODE
#
# Song et al. (2021, "Score-based generative modeling through stochastic
# differential equations") showed that the marginals $p_t$ are also those
# of a deterministic flow, the **probability-flow ODE**, which carries
# $p_T$ to $p_0$. Written with the model's noise prediction
# $\hat\epsilon_\theta$ in place of the score $-\epsilon^*/\sigma_t$, it is
#
# $$\frac{dx_t}{dt} = \frac{d \log \alpha_t}{dt}\, x_t
# - \Big(\frac{d\sigma_t}{dt} - \frac{d\log\alpha_t}{dt}\,\sigma_t\Big)
# \hat\epsilon_\theta(x_t, t).$$
#
# Its first term is linear in $x_t$, and stiff where $\alpha_t$ changes
# fast; Lu et al. solve that part exactly. In the **half log-SNR**
# $\lambda = \log(\alpha_t / \sigma_t)$, which rises monotonically from
# noise to data, and with the **data prediction** $\hat x_\theta = (x_t -
# \sigma_t \hat\epsilon_\theta)/\alpha_t$, the variation-of-constants
# formula gives, from $s$ to $t$ with $h = \lambda_t - \lambda_s$,
#
# $$x_t = \frac{\sigma_t}{\sigma_s}\, x_s + \sigma_t \int_{\lambda_s}
# ^{\lambda_t} e^{\lambda}\, \hat x_\theta(x_\lambda, \lambda)\,
# d\lambda.$$
#
# Only the integral needs approximating: an **exponential integrator**.
# Holding $\hat x_\theta$ constant at its value at $s$ gives
#
# $$x_t = \frac{\sigma_t}{\sigma_s}\, x_s - \alpha_t\,(e^{-h} - 1)\,
# \hat x_\theta(x_s),$$
#
# which, with $\alpha_t (1 - e^{-h}) = \alpha_t - \sigma_t \alpha_s /
# \sigma_s$, is exactly chapter 2's DDIM step: DDIM is the first-order
# exponential integrator. Higher orders approximate $\hat x_\theta$ along
# $\lambda$ by a line through the current and an earlier prediction
# (DPM-Solver++(2M), *multistep*: no extra network call) or through a
# prediction at a trial point (Heun, EDM: a second call per step).
#
# EDM writes the same ODE in other coordinates: $z = x_t / \alpha_t$ and
# $\varsigma = \sigma_t / \alpha_t = e^{-\lambda}$ (EDM's $\sigma$; here
# $\varsigma$, to keep $\sigma_t$ for the noise's scale), in which $z =
# x_0 + \varsigma \epsilon$ and the ODE is simply
#
# $$\frac{dz}{d\varsigma} = -\varsigma\, \nabla_z \log p(z; \varsigma)
# = \frac{z - \hat x_\theta}{\varsigma} = \hat\epsilon:$$
#
# the predicted noise is the speed. Euler's method on it is DDIM again:
# divide DDIM's step by $\alpha_{t-1}$ and use $\hat x_\theta = z_t -
# \varsigma_t \hat\epsilon$,
#
# $$\frac{x_{t-1}}{\alpha_{t-1}} = \hat x_\theta + \varsigma_{t-1}
# \hat\epsilon = z_t + (\varsigma_{t-1} - \varsigma_t)\, \hat\epsilon;$$
#
# Heun's method averages the slope at both ends of the step. Euler's
# method is first order: the end point's error should fall as one over
# the steps. The cell checks one step against the formula, and DDIM's end
# points on the toy at 5 to 40 steps against those at 250.

# %%
# One DDIM step is one Euler step of dz/d(varsigma) = eps.
spaced = respace(toy_diffusion, "20")
x = toy_noise[:256]
t = torch.full((len(x),), 10)
step = ddim_sample(spaced, exact_eps, x, t, clip_denoised=False)["sample"]
a_now, a_prev = spaced.alphas_cumprod[10], spaced.alphas_cumprod_prev[10]
vs_now, vs_prev = (((1 - a) / a) ** 0.5 for a in (a_now, a_prev))
eps_hat = exact_eps(x, spaced.model_timesteps(t))
euler = x / a_now**0.5 + (vs_prev - vs_now) * eps_hat
torch.testing.assert_close(step / a_prev**0.5, euler, rtol=1e-12, atol=1e-12)


def toy_ddim(count):
    """DDIM's end points from x with the exact eps, in count steps."""
    return ddim_sample_loop(respace(toy_diffusion, str(count)), exact_eps, x,
                            clip_denoised=False)


# As the steps shrink, DDIM converges to the ODE's solution, at first order.
reference, counts = toy_ddim(250), [5, 10, 20, 40]
errors = [(toy_ddim(c) - reference).norm(dim=1).mean().item() for c in counts]
slope = np.polyfit(np.log(counts), np.log(errors), 1)[0]
print("DDIM steps:", counts, "mean distance to 250 steps:",
      np.round(errors, 4), f"slope {slope:.2f}")
fig, ax = plt.subplots(figsize=(4.5, 3.2))
ax.loglog(counts, errors, "o-", label="DDIM, exact eps")
ax.loglog(counts, errors[0] * counts[0] / np.array(counts), "k--",
          label="1 / steps")
ax.set(xlabel="DDIM steps", ylabel="mean distance to 250 steps",
       title="DDIM converges to the ODE")
ax.legend()
plt.show()
assert slope < -0.7

# %% [markdown]
# On adm_lib's discrete diffusion (and on a respaced one, chapter 2) the
# steps are the diffusion's own: step $i$ has $\bar\alpha_i$, and the
# network sees step $i$'s timestep, as chapter 2's samplers do. The solvers
# below run from the diffusion's last step to its first, then to $x_0$.
# Here is the grid and where each sampler evaluates the network, on the
# cosine schedule respaced to 10 steps:

# %%
cosine = GaussianDiffusion(get_named_beta_schedule("cosine", 1000),
                           var_type="fixed_small")
ten = respace(cosine, "10")
lam = 0.5 * np.log(ten.alphas_cumprod / (1 - ten.alphas_cumprod))
print("steps kept:", ten.timestep_map.tolist())
print("lambda:    ", np.round(lam, 2).tolist())
# The first step is the clipped one (8.5): its lambda is far below the rest.
assert lam[-1] < lam[-2] - 3

# %% [markdown]
# ## 8.2 DPM-Solver++(2M)
#
# Every solver here needs one thing of the network: the data prediction
# $\hat x_\theta(x_t)$ at a step, guided or not. `denoise` gets it from
# chapter 2's `p_mean_variance`, whatever the model predicts
# ($\epsilon$, $x_0$ or the mean; a learned variance is not used by an
# ODE). Guidance shifts the noise prediction by Algorithm 2 (chapter 6's
# `condition_score`), and only then is $\hat x_0$ corrected: by a
# `denoised_fn` if given, then clipped to $[-1, 1]$ (the data's range;
# `clip_denoised`, as chapter 2). DPM-Solver++ calls this thresholding the
# data prediction. The order matters, and 8.5 shows why.

# %%
#| export
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

from adm_lib.diffusion import (
    GaussianDiffusion,
    Model,
    condition_score,
    last_sample,
)
from adm_lib.guidance import SAMPLERS, CondFn, guided_sample

SOLVERS = ("dpm++2m", "heun")
ALL_SAMPLERS = SAMPLERS + SOLVERS
Callback = Callable[[dict[str, Tensor]], None]


def denoise(
    diffusion: GaussianDiffusion, model: Model, x: Tensor, t: Tensor,
    clip_denoised: bool = True,
    denoised_fn: Callable[[Tensor], Tensor] | None = None,
    cond_fn: CondFn | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> Tensor:
    """The data prediction x_0(x_t): guided (Algorithm 2), then corrected.

    The correction (`denoised_fn`, then clipping to [-1, 1]) comes after
    the guidance shift, as DPM-Solver++ thresholds its data prediction.
    """
    p = diffusion.p_mean_variance(model, x, t, clip_denoised=False,
                                  model_kwargs=model_kwargs)
    if cond_fn is not None:
        p = condition_score(diffusion, cond_fn, p, x, t, model_kwargs)
    x0 = p["pred_xstart"]
    if denoised_fn is not None:
        x0 = denoised_fn(x0)
    return x0.clamp(-1, 1) if clip_denoised else x0

# %% [markdown]
# Imagen's **dynamic thresholding** (Saharia et al. 2022), which
# DPM-Solver++ offers as `correcting_x0_fn="dynamic_thresholding"`,
# clips each image at a high quantile of its own $|\hat x_0|$ (at least
# 1) and rescales it into $[-1, 1]$: a strongly guided prediction that
# overshoots the data's range is pulled back in whole, not flattened at
# the edges. It is a `denoised_fn`:

# %%
#| export
def dynamic_threshold(x0: Tensor, ratio: float = 0.995,
                      max_value: float = 1.0) -> Tensor:
    """Imagen's dynamic thresholding: clip each image at its `ratio`
    quantile of |x_0| (at least `max_value`) and rescale into [-1, 1]."""
    flat = x0.abs().reshape(len(x0), -1)
    s = torch.quantile(flat, ratio, dim=1).clamp(min=max_value)
    s = s.view(-1, *(1,) * (x0.ndim - 1))
    return torch.maximum(torch.minimum(x0, s), -s) / s

# %% [markdown]
# The multistep second-order update, from step $i$ to $s = i - 1$ with
# $h = \lambda_s - \lambda_i$ and the previous step's $h'$, $r = h'/h$:
#
# $$x_s = \frac{\sigma_s}{\sigma_i} x_i - \alpha_s (e^{-h} - 1)
# \Big(\hat x_i + \frac{\hat x_i - \hat x_{i+1}}{2r}\Big).$$
#
# The first update has no earlier prediction and is first order; so is
# the last in runs of under 10 updates (the reference's
# `lower_order_final`, which it finds is what keeps very short runs
# stable). At step 0 the solver takes the step to $\lambda = \infty$,
# where $\sigma = 0$: $x_0 = \hat x_\theta(x_0\text{'s step})$, the
# reference's `denoise_to_zero`, as chapter 2's DDIM ends. So $N$ steps
# cost $N$ network calls. The tables are float64, as chapter 1's are.

# %%
#| export
def _tables(diffusion: GaussianDiffusion) -> dict[str, np.ndarray]:
    """alpha_t, sigma_t, lambda_t and EDM's sigma of every step (float64)."""
    abar = diffusion.alphas_cumprod
    alpha, sigma = np.sqrt(abar), np.sqrt(1 - abar)
    return {"alpha": alpha, "sigma": sigma,
            "lambda": np.log(alpha) - np.log(sigma),
            "edm_sigma": sigma / alpha}


def _steps(
    diffusion: GaussianDiffusion, noise: Tensor, progress: bool, name: str,
) -> Iterator[tuple[int, Tensor]]:
    """The steps T-1 .. 0, as numbers and as a batch of timesteps."""
    from tqdm.auto import tqdm

    for i in tqdm(range(diffusion.num_timesteps - 1, -1, -1),
                  disable=not progress, desc=name):
        yield i, torch.full((len(noise),), i, device=noise.device,
                            dtype=torch.long)


def _grad_free(cond_fn: CondFn | None) -> Any:
    """No autograd records, but the classifier's gradient where guided."""
    return torch.no_grad() if cond_fn else torch.inference_mode()


def dpm_solver_sample_loop_progressive(
    diffusion: GaussianDiffusion, model: Model, noise: Tensor,
    progress: bool = False, clip_denoised: bool = True,
    denoised_fn: Callable[[Tensor], Tensor] | None = None,
    cond_fn: CondFn | None = None,
    model_kwargs: dict[str, Any] | None = None,
    order: int = 2, lower_order_final: bool = True,
) -> Iterator[dict[str, Tensor]]:
    """DPM-Solver++(order) multistep over the diffusion's steps, yielding
    each; one network call a step, the last one denoising to x_0."""
    if order not in (1, 2):
        raise ValueError(f"order must be 1 or 2, got {order}")
    tab = _tables(diffusion)
    alpha, sigma, lam = tab["alpha"], tab["sigma"], tab["lambda"]
    updates = diffusion.num_timesteps - 1
    x, previous = noise, None  # previous: (x_0, h) of the last step
    for i, t in _steps(diffusion, noise, progress, "dpm++"):
        with _grad_free(cond_fn):
            x0 = denoise(diffusion, model, x, t, clip_denoised, denoised_fn,
                         cond_fn, model_kwargs)
        if i == 0:  # to lambda = infinity: first order, x = x_0
            x = x0
        else:
            s = i - 1
            h = lam[s] - lam[i]
            # The final update is first order in short runs (the
            # reference's lower_order_final, below 10 updates).
            last_low = lower_order_final and updates < 10 and s == 0
            if order == 1 or previous is None or last_low:
                d = x0
            else:
                r = previous[1] / h
                d = x0 + (x0 - previous[0]) / (2 * r)
            x = (sigma[s] / sigma[i]) * x - alpha[s] * np.expm1(-h) * d
            previous = (x0, h)
        yield {"step": i, "sample": x, "pred_xstart": x0}

# %% [markdown]
# ## 8.3 EDM's Heun sampler on the discrete schedule
#
# EDM's sampler works in $z = x_t/\alpha_t$ and $\varsigma =
# \sigma_t/\alpha_t$. For ADM's models EDM wraps the network
# (`iDDPMPrecond`) with a table of the 1,000 steps' $\varsigma_i =
# \sqrt{(1 - \bar\alpha_i)/\bar\alpha_i}$ and calls it at the step
# nearest in $\varsigma$; here the grid *is* the diffusion's steps, so the
# network is called at those steps exactly, with $x_t = \alpha_t z$ (EDM's
# $c_\text{in} = 1/\sqrt{\varsigma^2 + 1} = \alpha_t$). Each step takes
# an Euler step to the next $\varsigma$, evaluates the slope there, and
# redoes the step with the mean of the two slopes; the last step, to
# $\varsigma = 0$, is Euler's, so $N$ steps cost $2N - 1$ calls. A step
# that starts below $\lambda = -5.1$ ($\varsigma > 164$; DPM-Solver's clip,
# 8.5) is Euler's too: EDM, which starts at $\varsigma = 80$, never starts
# there, and 8.5 shows what the trapezoid does across
# the cosine schedule's clipped step (`network_calls` counts both).
# EDM adds no noise by default (`S_churn = 0`), and neither does this.

# %%
#| export
def heun_sample_loop_progressive(
    diffusion: GaussianDiffusion, model: Model, noise: Tensor,
    progress: bool = False, clip_denoised: bool = True,
    denoised_fn: Callable[[Tensor], Tensor] | None = None,
    cond_fn: CondFn | None = None,
    model_kwargs: dict[str, Any] | None = None, lambda_min: float = -5.1,
) -> Iterator[dict[str, Tensor]]:
    """EDM's Heun sampler over the diffusion's steps, then to sigma 0,
    yielding each; two network calls a step, one at the last.

    A step from a log-SNR below `lambda_min` (the cosine schedule's clipped
    last steps; DPM-Solver's clip) is Euler's: EDM never starts there (8.5).
    """
    tab = _tables(diffusion)
    alpha, edm_sigma, lam = tab["alpha"], tab["edm_sigma"], tab["lambda"]

    def slope(z: Tensor, i: int, t: Tensor) -> tuple[Tensor, Tensor]:
        """dz/dsigma = (z - D(z)) / sigma in EDM's z = x_t / alpha_t."""
        with _grad_free(cond_fn):
            x0 = denoise(diffusion, model, z * alpha[i], t, clip_denoised,
                         denoised_fn, cond_fn, model_kwargs)
        return (z - x0) / edm_sigma[i], x0

    z = None
    for i, t in _steps(diffusion, noise, progress, "heun"):
        if z is None:
            z = noise / alpha[i]
        d, x0 = slope(z, i, t)
        if i == 0:  # Euler to sigma 0: z = D(z)
            z, x = x0, x0
        else:
            step = edm_sigma[i - 1] - edm_sigma[i]
            euler = z + step * d
            if lam[i] < lambda_min:
                z = euler
            else:
                d_next, _ = slope(euler, i - 1, t - 1)
                z = z + step * (d + d_next) / 2
            x = z * alpha[i - 1]
        yield {"step": i, "sample": x, "pred_xstart": x0}

# %% [markdown]
# EDM pairs the sampler with its own grid: $\varsigma$ from
# $\varsigma_\text{max} = 80$ to $\varsigma_\text{min} = 0.002$ (or the
# table's ends, if inside), uniform in $\varsigma^{1/\rho}$ with $\rho =
# 7$, which crowds the steps at low noise, each rounded to the nearest
# step of the table (`iDDPMPrecond.round_sigma`). `edm_steps` gives those
# steps, for `SpacedDiffusion`; where two round to one step it is kept
# once, so the count may fall short. 8.8 measures why it matters: on a
# grid uniform in $t$ the last step, from $\varsigma \approx 0.3$ to
# $0.006$, is long, and Heun's slope at its end divides by the small
# $\varsigma$.

# %%
#| export
def edm_steps(diffusion: GaussianDiffusion, count: int,
              sigma_min: float = 0.002, sigma_max: float = 80.0,
              rho: float = 7.0) -> list[int]:
    """The steps of EDM's grid of `count` points (descending in noise)
    nearest, in EDM's sigma, to the diffusion's own steps; no repeats."""
    if count < 2:
        raise ValueError(f"count must be >= 2, got {count}")
    table = _tables(diffusion)["edm_sigma"]
    low = max(sigma_min, table[0]) ** (1 / rho)
    high = min(sigma_max, table[-1]) ** (1 / rho)
    grid = (high + np.arange(count) / (count - 1) * (low - high)) ** rho
    nearest = np.abs(table[None, :] - grid[:, None]).argmin(1)
    return sorted({int(i) for i in nearest})

# %% [markdown]
# The loops above yield every step, as chapter 2's `*_progressive` loops
# do: a dict with the step, the sample so far and $\hat x_0$. The
# returning versions take chapter 2's `callback`, called with each, through
# chapter 2's `last_sample`:

# %%
#| export
def dpm_solver_sample_loop(
    diffusion: GaussianDiffusion, model: Model, noise: Tensor,
    progress: bool = False, callback: Callback | None = None,
    **kwargs: Any,
) -> Tensor:
    """DPM-Solver++(2M) from x_T = noise; returns x_0."""
    return last_sample(dpm_solver_sample_loop_progressive(
        diffusion, model, noise, progress, **kwargs), callback)


def heun_sample_loop(
    diffusion: GaussianDiffusion, model: Model, noise: Tensor,
    progress: bool = False, callback: Callback | None = None,
    **kwargs: Any,
) -> Tensor:
    """EDM's Heun sampler from x_T = noise; returns x_0."""
    return last_sample(heun_sample_loop_progressive(
        diffusion, model, noise, progress, **kwargs), callback)

# %% [markdown]
# ## 8.4 One signature, and guidance
#
# `solver_sample` has chapter 6's `guided_sample` signature and takes its
# samplers' names too, so anything that samples through chapter 6's
# `sample_batches` (its `sample_fn`) or chapter 7's cascade (a `Stage`'s
# `sample_fn`) gets the solvers by name. The two kinds of guidance
# compose with it differently:
#
# * **classifier guidance** is a `cond_fn` (chapter 6's
#   `classifier_cond_fn`), applied inside `denoise` by Algorithm 2's shift
#   $\hat\epsilon = \epsilon_\theta - \sigma_t\, s \nabla \log
#   p_\phi(y \mid x_t)$: the solver integrates the ODE of the guided score,
#   as the reference's `model_wrapper(guidance_type="classifier")`;
#   Algorithm 1 shifts a Gaussian step's mean, and an ODE has none, so
#   `guide_at_mean` is refused;
# * **classifier-free guidance** is a model (chapter 6's
#   `classifier_free_model`), $\epsilon(y) + w(\epsilon(y) -
#   \epsilon(\varnothing))$, which every sampler calls as it calls any
#   network (the reference's `guidance_type="classifier-free"` with scale
#   $1 + w$).
#
# A solver's cost is counted in network calls (NFE): `network_calls`.

# %%
#| export
def network_calls(sampler: str, diffusion: GaussianDiffusion,
                  lambda_min: float = -5.1) -> int:
    """Network evaluations per sample of `sampler` over the diffusion's
    steps (the NFE): one a step, Heun's two but at Euler's steps."""
    if sampler not in ALL_SAMPLERS:
        raise ValueError(f"sampler must be one of "
                         f"{', '.join(ALL_SAMPLERS)}, not {sampler!r}")
    steps = diffusion.num_timesteps
    if sampler != "heun":
        return steps
    euler = np.sum(_tables(diffusion)["lambda"][1:] < lambda_min)
    return 2 * steps - 1 - int(euler)


def solver_sample(
    diffusion: GaussianDiffusion, model: Model, noise: Tensor,
    sampler: str = "dpm++2m", cond_fn: CondFn | None = None,
    guide_at_mean: bool = False, eta: float = 0.0, progress: bool = False,
    callback: Callback | None = None,
    noise_fn: Callable[[Tensor], Tensor] = torch.randn_like,
    model_kwargs: dict[str, Tensor] | None = None,
) -> Tensor:
    """`guided_sample` with the solvers too: images from noise by any of
    ALL_SAMPLERS, guided by `cond_fn` (Algorithm 2's shift for a solver).

    The solvers are deterministic: `noise_fn` is not called, and `eta`
    and `guide_at_mean` (options of chapter 2's samplers) are refused.
    """
    if sampler in SAMPLERS:
        return guided_sample(diffusion, model, noise, sampler, cond_fn,
                             guide_at_mean, eta, progress, callback,
                             noise_fn, model_kwargs)
    if sampler not in SOLVERS:
        raise ValueError(f"sampler must be one of "
                         f"{', '.join(ALL_SAMPLERS)}, not {sampler!r}")
    if eta or guide_at_mean:
        raise ValueError(f"the {sampler} solver is deterministic: eta and "
                         "guide_at_mean apply to ddim and ddpm only")
    kwargs = model_kwargs or {}
    if cond_fn is not None and kwargs.get("y") is None:
        raise ValueError("guidance needs labels: pass model_kwargs="
                         "{'y': labels}")
    loop = dpm_solver_sample_loop if sampler == "dpm++2m" else \
        heun_sample_loop
    return loop(diffusion, model, noise, progress, callback,
                cond_fn=cond_fn, model_kwargs=kwargs)

# %% [markdown]
# The pipeline of one step, drawn:

# %%
fig, ax = plt.subplots(figsize=(10, 2.6))
boxes = [("$x_t$, step $i$", 0.0),
         ("network\n$\\epsilon_\\theta$ or $x_0$", 1.6),
         ("Algorithm 2 shift\n$-\\sigma_t\\, s\\nabla\\log p(y|x_t)$", 3.4),
         ("$\\hat x_0$, then\nclip or threshold", 5.3),
         ("update\nDDIM / 2M / Heun", 7.0), ("$x$ at step $i-1$", 8.7)]
for label, left in boxes:
    ax.add_patch(FancyBboxPatch((left, 0.3), 1.4, 0.9,
                                boxstyle="round,pad=0.05", fc="#e8eef7",
                                ec="#335"))
    ax.text(left + 0.7, 0.75, label, ha="center", va="center", fontsize=9)
for (_, a), (_, b) in zip(boxes[:-1], boxes[1:], strict=True):
    ax.add_patch(FancyArrowPatch((a + 1.45, 0.75), (b - 0.05, 0.75),
                                 arrowstyle="-|>", mutation_scale=12))
ax.add_patch(FancyArrowPatch((9.4, 0.25), (0.7, 0.25),
                             connectionstyle="arc3,rad=-0.25",
                             arrowstyle="-|>", mutation_scale=12,
                             color="#777"))
ax.text(5.0, -0.55, "next step (Heun: a second call at the trial point; "
        "2M: keeps $\\hat x_0$ for the next update)", ha="center",
        fontsize=9, color="#555")
ax.text(2.3, 1.45, "classifier-free guidance: inside the network call",
        ha="center", fontsize=9, color="#555")
ax.set_xlim(-0.2, 10.3)
ax.set_ylim(-0.9, 1.7)
ax.axis("off")
plt.show()
assert len(ax.patches) == 2 * len(boxes)

# %% [markdown]
# **A check with an exact answer.** For data drawn from a Gaussian
# $\mathcal{N}(\mu, s^2)$ the best noise prediction is known in closed
# form, $\epsilon^*(x_t) = \sigma_t (x_t - \alpha_t\mu)/(\alpha_t^2 s^2 +
# \sigma_t^2)$, and so is the ODE's solution: each $x_t$'s z-score under
# $\mathcal{N}(\alpha_t \mu, \alpha_t^2 s^2 + \sigma_t^2)$ stays constant.
# So each sampler's largest error at $x_0$ can be measured exactly,
# against its number of network calls, on the linear schedule (the
# cosine's clipped step is 8.5's subject). DPM-Solver++ with order 1 is
# DDIM to rounding; from 49 to 199 calls the second-order solvers' errors
# fall about as $\text{NFE}^{-2}$, DDIM's as $\text{NFE}^{-1}$. With few
# calls the ordering is not so clean (2M's error at 19 calls is no better
# than DDIM's on this grid, uniform in $t$, whose last steps are long in
# $\lambda$): order describes the limit, and 8.8 measures the regime
# that matters.

# %%
MU, SPREAD = 0.3, 0.5  # the toy data's mean and standard deviation


def gaussian_eps(diffusion: GaussianDiffusion):
    """The exact noise prediction for N(MU, SPREAD^2) data."""
    def model(x, t, **_):
        abar = torch.as_tensor(diffusion.alphas_cumprod,
                               dtype=x.dtype)[t].view(-1, 1, 1, 1)
        alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
        return sigma * (x - alpha * MU) / (abar * SPREAD**2 + sigma**2)
    return model


linear = GaussianDiffusion(get_named_beta_schedule("linear", 1000),
                           var_type="fixed_small", dtype=torch.float64)
toy = gaussian_eps(linear)
x_T = torch.randn(64, 1, 2, 2, dtype=torch.float64,
                  generator=torch.Generator().manual_seed(0))


def exact_x0(spaced: GaussianDiffusion, noise: torch.Tensor) -> torch.Tensor:
    """The ODE's x at spaced's step 0 from noise at its last step, and
    that x denoised (the samplers' last step)."""
    first, last = spaced.alphas_cumprod[0], spaced.alphas_cumprod[-1]
    z = (noise - np.sqrt(last) * MU) / np.sqrt(last * SPREAD**2 + 1 - last)
    spread = first * SPREAD**2 + 1 - first
    x = np.sqrt(first) * MU + np.sqrt(spread) * z
    return MU + SPREAD**2 * np.sqrt(first) * (x - np.sqrt(first) * MU) / spread


# Unclipped: the toy's data are not confined to [-1, 1].
LOOPS = {"ddim": ddim_sample_loop, "dpm++2m": dpm_solver_sample_loop,
         "heun": heun_sample_loop}
errors = {}
for name, loop in LOOPS.items():
    for nfe in (19, 49, 199):
        steps = (nfe + 1) // 2 if name == "heun" else nfe
        spaced = respace(linear, str(steps))
        assert network_calls(name, spaced) == nfe
        out = loop(spaced, toy, x_T, clip_denoised=False)
        errors[name, nfe] = float((out - exact_x0(spaced, x_T)).abs().max())
for name in LOOPS:
    print(f"{name:8}", "  ".join(f"NFE {n:3}: {errors[name, n]:.1e}"
                                 for n in (19, 49, 199)))
spaced = respace(linear, "10")
ddim_out = ddim_sample_loop(spaced, toy, x_T, clip_denoised=False)
first_order = dpm_solver_sample_loop(spaced, toy, x_T, order=1,
                                     clip_denoised=False)
assert torch.allclose(ddim_out, first_order, rtol=0, atol=1e-12)
assert errors["ddim", 49] / errors["ddim", 199] < 6  # first order: ~4
for name in ("dpm++2m", "heun"):
    assert errors[name, 199] < errors["ddim", 199] / 3
    assert errors[name, 49] / errors[name, 199] > 10  # second order: ~16

# %% [markdown]
# ## 8.5 The clipped last step of the cosine schedule
#
# Chapter 1's cosine schedule clips every $\beta$ at 0.999, and its last
# one always is: at $T = 1000$, $\bar\alpha_{999} \approx 2.4 \times
# 10^{-9}$, a thousand times below the step before, so $\lambda_{999}
# \approx -9.9$ against $-6.5$ (the grid above shows it too). Chapter 6.1
# measured what that does to guided DDIM. Algorithm 2 shifts $\hat\epsilon$
# by $\sigma_t s g$; chapter 2's `ddim_sample` clips $\hat x_0$ *before*
# the shift (as the reference does), and the shifted $\hat x_0 = (x_t -
# \sigma_t \hat\epsilon)/\alpha_t$ moves by $\sigma_t^2 s g/\alpha_t$,
# about $20{,}000\, s g$ at step 999, unclipped. The next DDIM step carries
# that into $x$.
#
# A data-prediction solver clips (or thresholds) *after* the shift, so
# $\hat x_0$ stays in $[-1, 1]$ however large the shift, and every update
# is a combination of $x$ and bounded predictions. The reference solvers
# also avoid the step: DPM-Solver drops the steps whose $\lambda$ is below
# $-5.1$ from its discrete schedule (`numerical_clip_alpha`), and EDM
# starts at $\varsigma = 80$ ($\lambda = -4.4$). Heun's correction has a
# trouble of its own there: it averages the slopes, noise predictions, at
# both ends of the step and multiplies by the step in $\varsigma$, about
# $\varsigma_{999} \approx 20{,}000$, so any difference between the two
# predictions (guidance's shifts differ by $\sigma_t$) is magnified that
# much, by $\alpha_{888}(\varsigma_{999} - \varsigma_{888})/
# (2\varsigma_{888})$ per unit of difference in $\hat x_0$; so a step
# from below $\lambda = -5.1$ is Euler's (8.3). The first step of a
# 10-step run, guided by a constant gradient of one unit ($s g = 1$ in
# every pixel), on the toy of 8.4 rescaled into $[-1, 1]$:

# %%
MU, SPREAD = 0.0, 0.5  # toy data well inside [-1, 1]
toy = gaussian_eps(cosine)
cosine.dtype = torch.float64
labels = torch.zeros(len(x_T), dtype=torch.long)


def unit_push(x, t, **_):
    """A classifier gradient of s g = 1 in every pixel."""
    return torch.ones_like(x)


first_step = {}
for name in ("ddim", "dpm++2m", "heun"):
    seen = []
    solver_sample(respace(cosine, "10"), toy, x_T, sampler=name,
                  cond_fn=unit_push, model_kwargs={"y": labels},
                  callback=seen.append)
    first_step[name] = float(seen[0]["sample"].abs().max())
    print(f"{name:8} largest |x| after the first step: "
          f"{first_step[name]:9.2f}; final sample in "
          f"[{float(seen[-1]['sample'].min()):.2f}, "
          f"{float(seen[-1]['sample'].max()):.2f}]")
assert first_step["ddim"] > 100 * max(first_step["dpm++2m"],
                                      first_step["heun"])
# Heun's trapezoid from step 999 to 888 moves x, beyond Euler's step, by
# alpha' (vs - vs') / (2 vs') |D - D'|: the two ends' x_0 predictions.
vs = np.sqrt((1 - ten.alphas_cumprod) / ten.alphas_cumprod)
gain = np.sqrt(ten.alphas_cumprod[-2]) * (vs[-1] - vs[-2]) / (2 * vs[-2])
print(f"Heun's trapezoid across step 999: |D - D'| = 0.01 moves x by "
      f"{0.01 * gain:.0f}")
assert gain > 100

# %% [markdown]
# DDIM's first step throws the sample hundreds of units away, from where
# every later clipped $\hat x_0$ sits on the boundary $\pm 1$: the
# saturated, flat samples chapter 4.9 saw. A difference of 0.01 between
# the predictions at the ends of Heun's step would move $x$ by 3 if the
# trapezoid were taken across it. The solvers' first steps stay within a
# few units. Clipping stops the blow-up but flattens whatever exceeds the
# range; **dynamic thresholding** (8.2) instead rescales an overshooting
# prediction as a whole, which keeps its shape: it helps where guidance is
# strong enough that many pixels of $\hat x_0$ overshoot
# at the steps that fix the image's layout. With the usual scales here
# few do, and static clipping is the default (`dynamic_threshold` is a
# `denoised_fn` for `denoise` and the loops).

# %% [markdown]
# ## 8.6 Parity with the solvers' own code
#
# `tests/make_solver_fixtures.py` runs the reference implementations,
# LuChengTHU/dpm-solver's `dpm_solver_pytorch.py` (`DPM_Solver.sample`,
# multistep, `dpmsolver++`, with `denoise_to_zero`) and NVlabs/edm's
# `generate.py` (`edm_sampler`, its `iDDPMPrecond` table for ADM's
# models), in float64 on small random networks: linear and cosine
# discrete schedules, orders 1 and 2, several step counts, unguided, with
# classifier guidance and with classifier-free guidance. It gives the
# references the time grid of a respaced diffusion (DPM-Solver's
# `get_time_steps` returns our steps' continuous times $(i + 1)/N$; EDM's
# grid is rounded to the table as its sampler rounds it) and saves the
# inputs and outputs under `tests/data/solvers/`. `tests/test_solvers.py`
# replays them through this chapter's loops in float64 and holds them to
# the same error model as chapter 2's parity tests (`tests/reference.py`):
# a few float64 roundings per step, scaled by the step count. Neither
# reference's code is in this repository; the script fetches nothing
# and expects them in `build/ref/`.
#
# ## 8.7 The experiment
#
# The question is the issue's: how many network calls does each sampler
# need for digits as good as 250 ancestral steps make, unguided and guided
# by the noisy classifier? The models are `adm demo`'s (chapter 4.9's
# recipe: an $x_0$-predicting class-conditional model on MNIST-5k, cosine
# schedule, and its noisy classifier), trained here for `train_steps` and
# `classifier_steps`. Each arm draws `per_seed` samples (every digit in
# turn) for each of the `seeds`, the same noise $x_T$ for every arm of a
# seed, so arms are compared in pairs. Each set is scored with chapter 5's
# MNIST network against `num_ref` training digits: FID, precision and
# recall in its features, and accuracy (the share in the class they were
# drawn for). Each arm takes as many steps as its number of network calls
# allows (`network_calls`): $N$ steps uniform in $t$ (chapter 2's
# respacing) for ancestral, DDIM and DPM-Solver++, and about $N/2$ on
# EDM's grid (`edm_steps`) for Heun, whose table shows the calls it made.
# Guided arms use Algorithm 1 for ancestral sampling and Algorithm
# 2's shift for the others, at `classifier_scale`.

# %%
from adm_lib.data import load_dataset
from adm_lib.demo import DemoSettings, demo_configs
from adm_lib.devices import resolve_device
from adm_lib.guidance import classifier_cond_fn, sample_batches
from adm_lib.metrics import (
    compute_activations,
    feature_extractor,
    feature_statistics,
    score_activations,
)
from adm_lib.models import load_run
from adm_lib.train import train
from adm_lib.viz import pixel_grid, to_uint8

dev = str(resolve_device(device))
configs = demo_configs(DemoSettings(steps=train_steps,
                                    classifier_steps=classifier_steps,
                                    seed=seed), dev)
runs = {}
for name, config in configs.items():
    folder = Path(runs_dir) / name
    # The demo scores its classifier on 500 held-out digits; not needed.
    config = replace(config, data=data, eval_interval=0, log_interval=10**9)
    if not (reuse_runs and (folder / "checkpoints").is_dir()):
        if folder.exists():
            shutil.rmtree(folder)
        train(config, folder, progress=False)
    runs[name] = load_run(folder, device=dev)
model, classifier = runs["diffusion"], runs["classifier"]
trained_at = time.perf_counter()
print(f"models ready in {trained_at - started:.0f} s")

# %%
net = model.model
shape = (model.config.in_channels, model.config.image_size,
         model.config.image_size)
num_classes = model.config.num_classes
labels = torch.arange(per_seed) % num_classes
judge = feature_extractor(features, device=dev)
real = load_dataset(data, resolution=shape[1], channels=shape[0])
picked = np.random.default_rng(seed).choice(len(real), num_ref,
                                            replace=False)
ref = compute_activations(to_uint8(real.images(picked.tolist())), judge,
                          500, dev)
ref_stats = (feature_statistics(ref["pool"]),
             feature_statistics(ref["spatial"]))
hook = classifier_cond_fn(classifier.model, classifier_scale)


def arm_grid(sampler: str, nfe: int) -> GaussianDiffusion:
    """The most steps of `sampler` that make at most `nfe` network calls:
    respaced uniformly in t, or on EDM's grid for Heun."""
    base = model.diffusion
    for count in range(nfe, 1, -1):
        grid = (SpacedDiffusion(base, edm_steps(base, count))
                if sampler == "heun" else respace(base, str(count)))
        if network_calls(sampler, grid) <= nfe:
            return grid
    raise ValueError(f"no grid of {sampler} within {nfe} calls")


results, grids = [], {}
for sampler in samplers:
    for nfe in nfes:
        spaced = arm_grid(sampler, nfe)
        for guided in (False, True):
            for s in seeds:
                clock = time.perf_counter()
                images, _ = sample_batches(
                    spaced, net, per_seed, shape, labels, batch_size, dev,
                    seed=s, sample_fn=solver_sample, sampler=sampler,
                    cond_fn=hook if guided else None)
                seconds = time.perf_counter() - clock
                scores = score_activations(
                    ref, compute_activations(images, judge, 500, dev),
                    labels.numpy(), dev, ref_stats)
                results.append({
                    "sampler": sampler, "nfe": network_calls(sampler, spaced),
                    "asked": nfe, "guided": guided, "seed": s,
                    "seconds": seconds,
                    **{k: scores[k] for k in ("fid", "accuracy",
                                              "precision", "recall")}})
                if s == seeds[0] and nfe == 10:
                    grids[sampler, guided] = images
sampled_at = time.perf_counter()
print(f"{len(results)} sets of {per_seed} samples in "
      f"{sampled_at - trained_at:.0f} s")
Path(runs_dir, "results.json").write_text(json.dumps(results, indent=1))

# %% [markdown]
# Each arm's mean over the seeds, with its standard error (the seeds'
# standard deviation over $\sqrt{n}$, $n$ = number of seeds):

# %%
METRICS = ("fid", "accuracy", "precision", "recall")


def summary(rows: list[dict]) -> dict:
    """Mean and standard error of each metric over `rows` (the seeds)."""
    out = {}
    for key in METRICS:
        values = np.array([r[key] for r in rows])
        out[key] = (values.mean(), values.std(ddof=1) / np.sqrt(len(values))
                    if len(values) > 1 else float("nan"))
    return out


def arm(sampler: str, asked: int, guided: bool) -> list[dict]:
    """The rows of one arm, in seed order."""
    return [r for r in results if (r["sampler"], r["asked"], r["guided"])
            == (sampler, asked, guided)]


print(f"{'sampler':8} {'NFE':>4} {'guided':6} " + " ".join(
    f"{k:>15}" for k in METRICS))
table = {}
for sampler in samplers:
    for nfe in nfes:
        for guided in (False, True):
            rows = arm(sampler, nfe, guided)
            table[sampler, nfe, guided] = stats = summary(rows)
            print(f"{sampler:8} {rows[0]['nfe']:4} {guided!s:6} " + " ".join(
                f"{stats[k][0]:8.3f} ± {stats[k][1]:4.3f}" for k in METRICS))
assert len(results) == (len(samplers) * len(nfes) * 2 * len(seeds))

# %% [markdown]
# The claims rest on paired differences: each solver against DDIM at the
# same number of calls, seed by seed (the same $x_T$), with the standard
# error of the mean difference. `*` marks a difference over two standard
# errors:

# %%
def paired(a: list[dict], b: list[dict], key: str) -> tuple[float, float]:
    """Mean and standard error of a - b over the seeds."""
    d = np.array([x[key] - y[key] for x, y in zip(a, b, strict=True)])
    return d.mean(), d.std(ddof=1) / np.sqrt(len(d))


claims = {}
for guided in (False, True):
    for nfe in nfes:
        for sampler in samplers:
            if sampler == "ddim":
                continue
            line = []
            for key in ("fid", "accuracy"):
                mean, se = paired(arm(sampler, nfe, guided),
                                  arm("ddim", nfe, guided), key)
                sure = abs(mean) > 2 * se
                claims[sampler, nfe, guided, key] = (mean, se, sure)
                line.append(f"{key} {mean:+7.3f} ± {se:5.3f}"
                            f"{'*' if sure else ' '}")
            print(f"{'guided' if guided else 'plain':6} NFE {nfe:3} "
                  f"{sampler:8} - ddim: " + "  ".join(line))

# %%
COLOURS = {"ddpm": "C0", "ddim": "C1", "dpm++2m": "C2", "heun": "C3"}
NAMES = {"ddpm": "ancestral", "ddim": "DDIM", "dpm++2m": "DPM-Solver++(2M)",
         "heun": "Heun (EDM)"}
panels = [("fid", False), ("accuracy", False), ("fid", True),
          ("accuracy", True), ("precision", True), ("recall", True)]
fig, axes = plt.subplots(2, 3, figsize=(13, 7))
for ax, (key, guided) in zip(axes.flat, panels, strict=True):
    for sampler in samplers:
        xs = [arm(sampler, n, guided)[0]["nfe"] for n in nfes]
        ys = [table[sampler, n, guided][key] for n in nfes]
        ax.errorbar(xs, [y[0] for y in ys], [y[1] for y in ys], marker="o",
                    capsize=3, color=COLOURS[sampler], label=NAMES[sampler])
    ax.set_xscale("log")
    # The step counts themselves as ticks: a log axis's own minor labels
    # collide between 20 and 50.
    ax.set_xticks(nfes, [str(n) for n in nfes])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("network calls per sample (NFE)")
    label = "FID (MNIST-net features)" if key == "fid" else key
    ax.set_ylabel(label)
    how = f"guided, s = {classifier_scale:g}" if guided else "unguided"
    ax.set_title(f"{key}, {how}")
axes[0, 0].legend()
fig.suptitle(f"{len(seeds)} seeds x {per_seed} samples per point; "
             "error bars: one standard error")
fig.tight_layout()
if figures_dir:
    fig.savefig(Path(figures_dir) / "08_solvers_curves.png", dpi=100)
plt.show()

# %% [markdown]
# The samples at 10 calls (the first seed's), a row per sampler, unguided
# left and guided right; each row runs through the digits in turn:

# %%
if grids:
    shown = min(per_seed, 20)
    fig, axes = plt.subplots(len(samplers), 2, figsize=(12, 1.4 *
                                                        len(samplers)))
    for row, sampler in enumerate(samplers):
        for col, guided in enumerate((False, True)):
            ax = axes[row, col]
            grid = pixel_grid(grids[sampler, guided][:shown], shown)
            ax.imshow(grid[..., 0], cmap="gray", vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(NAMES[sampler], fontsize=8)
            if row == 0:
                ax.set_title("guided" if guided else "unguided")
    fig.tight_layout()
    if figures_dir:
        fig.savefig(Path(figures_dir) / "08_solvers_grid.png", dpi=100)
    plt.show()
print(f"chapter run: {time.perf_counter() - started:.0f} s")

# %% [markdown]
# ## 8.8 The experiment, recorded
#
# The recorded run is the first command of the parameters cell, on
# 2026-12-07, on a 2-core AMD EPYC CPU (no GPU, nothing else running) in
# float32: 120 sets of 20 samples (every digit twice) and their scores, 3
# seeds per arm, against 2,000 training digits, in 16 minutes (979 s),
# 691 s of them for NFE 250. Its two runs have `adm demo`'s recipe and
# seed (350 and 400 steps); the chapter trains them when `runs_dir` is
# empty (219 s) and `reuse_runs` loads them after. The rows at 5 to 20
# calls equal, to every digit, those of the first record of this section
# (477 s on the same machine, shared with other jobs), made from `adm
# demo`'s own runs.
#
# ![the curves](figures/08_solvers_curves.png)
#
# ![samples at 10 network calls](figures/08_solvers_grid.png)
#
# Unguided (mean ± standard error over the 3 seeds, 60 samples an arm;
# Heun on EDM's grid):
#
# | sampler | NFE | FID (mnist-net) | accuracy | precision | recall |
# | --- | --- | --- | --- | --- | --- |
# | ancestral | 5 | 6.56 ± 0.67 | 80% ± 3% | 0.45 ± 0.05 | 0.95 ± 0.05 |
# | ancestral | 10 | 6.69 ± 0.18 | 77% ± 3% | 0.48 ± 0.02 | 0.94 ± 0.02 |
# | ancestral | 20 | 6.23 ± 1.09 | 77% ± 6% | 0.48 ± 0.06 | 0.95 ± 0.03 |
# | ancestral | 50 | 6.62 ± 0.17 | 82% ± 4% | 0.60 ± 0.06 | 0.98 ± 0.01 |
# | ancestral | 250 | 6.07 ± 0.55 | 70% ± 0% | 0.48 ± 0.07 | 0.97 ± 0.01 |
# | DDIM | 5 | 6.26 ± 0.31 | 77% ± 4% | 0.45 ± 0.03 | 0.99 ± 0.00 |
# | DDIM | 10 | 6.50 ± 0.34 | 70% ± 8% | 0.48 ± 0.04 | 0.99 ± 0.01 |
# | DDIM | 20 | 6.62 ± 0.32 | 70% ± 9% | 0.48 ± 0.03 | 0.98 ± 0.01 |
# | DDIM | 50 | 6.67 ± 0.29 | 70% ± 8% | 0.43 ± 0.02 | 0.98 ± 0.01 |
# | DDIM | 250 | 6.68 ± 0.29 | 68% ± 7% | 0.47 ± 0.02 | 0.98 ± 0.01 |
# | DPM++(2M) | 5 | 6.41 ± 0.37 | 72% ± 7% | 0.43 ± 0.07 | 0.99 ± 0.00 |
# | DPM++(2M) | 10 | 6.68 ± 0.33 | 70% ± 9% | 0.47 ± 0.04 | 0.98 ± 0.01 |
# | DPM++(2M) | 20 | 6.77 ± 0.29 | 67% ± 6% | 0.48 ± 0.02 | 0.98 ± 0.00 |
# | DPM++(2M) | 50 | 6.70 ± 0.29 | 68% ± 7% | 0.47 ± 0.02 | 0.98 ± 0.01 |
# | DPM++(2M) | 250 | 6.67 ± 0.29 | 68% ± 7% | 0.45 ± 0.00 | 0.98 ± 0.01 |
# | Heun | 5 | 67.16 ± 0.85 | 8% ± 2% | 0.00 ± 0.00 | 0.00 ± 0.00 |
# | Heun | 9 | 20.95 ± 1.96 | 52% ± 2% | 0.17 ± 0.04 | 0.80 ± 0.12 |
# | Heun | 19 | 6.74 ± 0.40 | 65% ± 6% | 0.45 ± 0.06 | 0.99 ± 0.00 |
# | Heun | 49 | 6.90 ± 0.45 | 67% ± 6% | 0.42 ± 0.04 | 0.98 ± 0.01 |
# | Heun | 249 | 6.77 ± 0.34 | 67% ± 6% | 0.45 ± 0.03 | 0.98 ± 0.01 |
#
# Guided by the noisy classifier at $s = 1$ (Algorithm 1 for ancestral
# sampling, Algorithm 2's shift for the others):
#
# | sampler | NFE | FID (mnist-net) | accuracy | precision | recall |
# | --- | --- | --- | --- | --- | --- |
# | ancestral | 5 | 5.99 ± 0.60 | 83% ± 4% | 0.53 ± 0.03 | 0.96 ± 0.04 |
# | ancestral | 10 | 5.83 ± 0.15 | 87% ± 2% | 0.57 ± 0.09 | 0.96 ± 0.02 |
# | ancestral | 20 | 5.91 ± 1.09 | 88% ± 3% | 0.57 ± 0.04 | 0.99 ± 0.01 |
# | ancestral | 50 | 5.51 ± 0.09 | 87% ± 2% | 0.55 ± 0.05 | 1.00 ± 0.00 |
# | ancestral | 250 | 5.13 ± 0.61 | 85% ± 5% | 0.52 ± 0.04 | 0.99 ± 0.01 |
# | DDIM | 5 | 24.24 ± 0.01 | 27% ± 2% | 0.10 ± 0.03 | 0.20 ± 0.06 |
# | DDIM | 10 | 22.89 ± 0.39 | 28% ± 4% | 0.17 ± 0.04 | 0.27 ± 0.05 |
# | DDIM | 20 | 19.20 ± 0.41 | 23% ± 2% | 0.20 ± 0.03 | 0.46 ± 0.06 |
# | DDIM | 50 | 17.35 ± 0.72 | 25% ± 3% | 0.18 ± 0.04 | 0.59 ± 0.08 |
# | DDIM | 250 | 13.47 ± 1.34 | 40% ± 3% | 0.22 ± 0.02 | 0.79 ± 0.10 |
# | DPM++(2M) | 5 | 10.35 ± 0.11 | 60% ± 3% | 0.23 ± 0.09 | 0.93 ± 0.02 |
# | DPM++(2M) | 10 | 8.06 ± 0.23 | 80% ± 5% | 0.45 ± 0.03 | 0.97 ± 0.03 |
# | DPM++(2M) | 20 | 7.09 ± 0.50 | 77% ± 2% | 0.43 ± 0.07 | 0.97 ± 0.02 |
# | DPM++(2M) | 50 | 6.35 ± 0.46 | 77% ± 4% | 0.42 ± 0.06 | 0.98 ± 0.01 |
# | DPM++(2M) | 250 | 6.25 ± 0.57 | 75% ± 3% | 0.43 ± 0.07 | 0.96 ± 0.04 |
# | Heun | 5 | 58.51 ± 1.06 | 13% ± 4% | 0.00 ± 0.00 | 0.00 ± 0.00 |
# | Heun | 9 | 21.28 ± 1.42 | 63% ± 4% | 0.18 ± 0.04 | 0.79 ± 0.10 |
# | Heun | 19 | 6.16 ± 0.62 | 70% ± 3% | 0.48 ± 0.04 | 0.97 ± 0.03 |
# | Heun | 49 | 6.20 ± 0.55 | 73% ± 4% | 0.47 ± 0.08 | 0.98 ± 0.02 |
# | Heun | 249 | 6.16 ± 0.50 | 73% ± 4% | 0.47 ± 0.08 | 0.97 ± 0.03 |
#
# A difference is claimed only where the mean of its seed-by-seed
# differences (the arms share each seed's $x_T$) is more than twice its
# standard error; with 3 seeds of 20 samples these errors are rough, and
# FID at 60 samples is far above its value at 50,000 (chapter 5's bias):
# only the comparison between rows holds.
#
# * **Guided DDIM fails at every step count, and the solvers do not.**
#   With Algorithm 2's shift DDIM scores FID 13 to 24 and puts 23% to 40%
#   of the samples in their class (it improves only slowly with calls);
#   DPM-Solver++ with the same shift, which clips $\hat x_0$ after it
#   (8.5), is better by 7 to 15 FID and 33 to 53 points of accuracy at 5
#   to 250 calls, and Heun by 7 to 13 FID and 33 to 48 points at 19 to
#   249 calls (all over 2 standard errors). This is chapter 4.9's
#   collapse, and its cause is the clipped last step, not the ODE.
# * **Ancestral sampling with Algorithm 1 stays the best guided sampler
#   here.** At 5 and 10 calls its FID is better than DPM-Solver++'s by
#   $4.4 \pm 0.6$ and $2.2 \pm 0.4$, its accuracy by $23 \pm 6$ points at
#   5 calls ($7 \pm 3$ at 10, at the edge of two errors); at 20 calls
#   the FIDs cannot be told apart and its accuracy is higher by $12 \pm
#   4$ points. At 20 calls Heun's FID is better than DPM-Solver++'s by
#   $0.9 \pm 0.2$. At 50 and 250 calls ancestral sampling's FID is better
#   than DPM-Solver++'s by $0.8 \pm 0.4$ and $1.1 \pm 0.1$, its accuracy
#   by $10 \pm 6$ points (within the error) and $10 \pm 3$; more calls do
#   not help it (250 against 10: FID $-0.7 \pm 0.8$, accuracy
#   $-2 \pm 4$ points).
# * **Unguided, the solvers buy nothing on this model.** Ancestral, DDIM
#   and DPM-Solver++ are within their errors of each other from 5 to 20
#   calls but for one small gap in DDIM's favour: DPM-Solver++'s FID is
#   higher by $0.15 \pm 0.06$ and $0.18 \pm 0.03$ at 5 and 10 calls. At 50
#   calls ancestral sampling's accuracy is above DDIM's by $12 \pm 4$
#   points, a gap no other step count shows (at 250: $2 \pm 7$), so one
#   of many comparisons rather than a trend; at 250 calls all four are
#   within their errors. One
#   reading: a model of 350 training steps errs far more than a
#   first-order step does, so a better solver has nothing to remove; the
#   solvers' gains (8.4's toy, and the papers' ImageNet models) show where
#   the model is good and the steps are few.
# * **Heun needs its calls.** On EDM's grid it is far worse than the
#   others at 5 and 9 calls (FID 67 and 21) and level with them from 19
#   calls on (19, 49 and 249). On
#   chapter 2's grid, uniform in $t$, it is worse still: a first run of
#   the same command, before `edm_steps`, measured FID $114 \pm 2$ at 4
#   calls, $37 \pm 4$ at 10 and $8.7 \pm 0.8$ at 20, unguided.
#
# So, for the guided digits of `adm demo`, no solver keeps the accuracy of
# its 10 ancestral steps with fewer calls (DPM-Solver++ at 10 calls: 80%
# against 87%, a gap within the error but not a match), and the demo
# keeps ancestral sampling. Ancestral sampling at 5 calls is within the
# error of 10 (83% against 87%, FID 5.99 against 5.83), which is not a
# measured equality either; the demo's scale 4 was not measured here.
#
# Not run: CIFAR-10 (chapter 7's CPU models reach 27% accuracy, too weak
# to rank samplers). The second
# command of the parameters cell is the full grid with 1,000 samples an
# arm, for a GPU; with `-p data ../shared/data/cifar10/train.zip -p
# features cifar10` it is CIFAR-10's.

# %% [markdown]
# ## 8.9 `adm sample --sampler dpm++2m|heun`
#
# The command line takes the solvers by name: `--sampler dpm++2m` or
# `--sampler heun`, with `--respacing` choosing the steps as for the other
# samplers (a count, `ddimN` or counts per section; chapter 2). A solver
# of `--respacing N` makes $N$ network calls (Heun $2N - 1$, one fewer
# where the grid starts at the cosine schedule's clipped step); by default
# the solvers take 20 steps (Heun 10). Heun steps on the respacing's grid:
# EDM's own grid (`edm_steps`, 8.8) is the library's for now. They work
# wherever a sampler is chosen: plain, with `--classifier` (Algorithm 2's
# shift), with `--cfg-scale`, and in a cascade (`--sampler` for the base model,
# `--upsampler-sampler` for the upsampler). What a solver cannot do is
# refused before any model loads, with one line naming the flag: `--eta`
# (a solver adds no noise) and `--guide-at mean` (Algorithm 1 has a mean
# to shift; an ODE has not), and, as for every sampler, an unknown name
# or a step count below 1:
#
#     adm sample RUN --classifier CLS --sampler dpm++2m --respacing 10
#     adm sample RUN --cfg-scale 2 --sampler heun --respacing 5
#     adm sample BASE --upsampler UP --sampler dpm++2m \
#         --upsampler-sampler heun --upsampler-respacing 5

# %%
import contextlib
import io

from adm_lib import cli

for flags in (["--sampler", "dpm++3m"], ["--sampler", "heun", "--eta", "1"],
              ["--sampler", "dpm++2m", "--respacing", "0"]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = cli.main(["sample", "no-such-run", *flags])
        except SystemExit as stop:  # argparse's refusal of a choice
            code = stop.code
    message = err.getvalue().strip().splitlines()[-1]
    print(" ".join(flags), "->", message)
    # Refused on the options: the run, which does not exist, is not read.
    assert code != 0 and "no-such-run" not in message

# %% [markdown]
# ## 8.10 Summary
#
# * On chapter 2's toy, whose $\epsilon^* = -\sigma_t \nabla \log p_t$ is
#   exact, DDPM and DDIM draw the data's law, a trained network's loss is
#   the irreducible loss plus its own error, and DDIM's end points near
#   the ODE's at least as one over its steps.
# * A deterministic sampler solves the probability-flow ODE. In the half
#   log-SNR $\lambda$ its linear part is exact, and only the integral of
#   the data prediction is approximated: DDIM is the first-order
#   exponential integrator, DPM-Solver++(2M) the multistep second-order
#   one (no extra network calls), EDM's Heun sampler a second-order
#   Runge-Kutta method in $z = x/\alpha$ and $\varsigma = e^{-\lambda}$
#   (two calls a step).
# * `adm_lib.solvers` runs both on chapter 2's (respaced) diffusion with
#   chapter 2's signature and callback; `solver_sample` is chapter 6's
#   `guided_sample` with the solvers added, for `sample_batches` and for
#   chapter 7's cascade stages.
# * Classifier guidance is Algorithm 2's shift of $\hat\epsilon$, made
#   before the data prediction is clipped: that order is what keeps the
#   solvers stable at the cosine schedule's clipped last step, where
#   guided DDIM's prediction moves by $\sigma_t^2 s g / \alpha_t$;
#   classifier-free guidance is a model, and composes with any sampler.
# * The solvers equal their reference implementations in float64
#   (`tests/test_solvers.py`).
#
# ## Exercises
#
# 1. Predict how far DPM-Solver++ with `order=1` lands from chapter 2's
#    DDIM on the cosine schedule, with clipping on, then check. Does the
#    clip change the answer?
# 2. Predict how many times `adm sample --sampler heun --respacing 10`
#    calls the network per sample, then count the calls.
# 3. Respace the cosine schedule to the 10 steps of 8.1 but with step 995
#    (the last whose $\lambda \ge -5.1$, DPM-Solver's clip) in place of
#    999. Predict by what factor guided DDIM's first step (8.5's unit
#    push) shrinks, then check.
# 4. Predict whether dynamic thresholding (`denoised_fn=dynamic_threshold,
#    clip_denoised=False`) changes 8.5's solver samples, then check.

# %% [markdown] jupyter={"source_hidden": true} tags=["solution"]
# **Solution 1.** To rounding, clip or no clip. With $\hat x$ the clipped
# prediction, the first-order update is $x_s = \alpha_s \hat x + \sigma_s
# (x_i - \alpha_i \hat x)/\sigma_i$, and $(x_i - \alpha_i \hat x)/
# \sigma_i$ is the noise that DDIM re-derives from the clipped $\hat x$:
# the same step. The last steps agree too: both return $\hat x$.

# %% jupyter={"source_hidden": true} tags=["solution"]
MU, SPREAD = 0.3, 0.5
toy = gaussian_eps(cosine)
spaced = respace(cosine, "10")
gap = (ddim_sample_loop(spaced, toy, x_T)
       - dpm_solver_sample_loop(spaced, toy, x_T, order=1)).abs().max()
print(f"largest difference, clipped: {float(gap):.1e}")
assert gap < 1e-10

# %% [markdown] jupyter={"source_hidden": true} tags=["solution"]
# **Solution 2.** On the linear schedule 19: two calls for each of the 9
# steps between the 10 kept steps, and one for the last step, Euler's, to
# $\varsigma = 0$. On the cosine schedule 18: the first step starts at
# the clipped step 999, below $\lambda = -5.1$, and is Euler's too.

# %% jupyter={"source_hidden": true} tags=["solution"]
calls = []


def counted(x, t, **kwargs):
    calls.append(len(x))
    return toy(x, t)


solver_sample(respace(cosine, "10"), counted, x_T[:1], sampler="heun")
assert len(calls) == network_calls("heun", respace(cosine, "10")) == 18

# %% [markdown] jupyter={"source_hidden": true} tags=["solution"]
# **Solution 3.** The shift of $\hat x_0$ is $\sigma_t^2 s g/\alpha_t
# \approx s g/\alpha_t$ near $T$, so the first step shrinks by about
# $\alpha_{995}/\alpha_{999} = \sqrt{\bar\alpha_{995}/\bar\alpha_{999}}$,
# a factor of about 100 (the step it lands on, $\bar\alpha$ of step 888,
# is the same in both).

# %% jupyter={"source_hidden": true} tags=["solution"]
MU, SPREAD = 0.0, 0.5
toy = gaussian_eps(cosine)
kept = ten.timestep_map.tolist()
moves = {}
for last in (999, 995):
    grid = SpacedDiffusion(cosine, kept[:-1] + [last])
    seen = []
    solver_sample(grid, toy, x_T, sampler="ddim", cond_fn=unit_push,
                  model_kwargs={"y": labels}, callback=seen.append)
    moves[last] = float(seen[0]["sample"].abs().max())
factor = np.sqrt(cosine.alphas_cumprod[995] / cosine.alphas_cumprod[999])
print(f"first step {moves[999]:.1f} -> {moves[995]:.1f}; "
      f"predicted factor {factor:.0f}")
assert 0.5 * factor < moves[999] / moves[995] < 2 * factor

# %% [markdown] jupyter={"source_hidden": true} tags=["solution"]
# **Solution 4.** Barely, here: the toy's data sit well inside
# $[-1, 1]$, so a prediction overshoots only where the push is large, at
# the first steps; there dynamic thresholding rescales the whole image
# where clipping cuts the overshooting pixels, and from then on both
# predictions are inside the range and the two runs converge.

# %% jupyter={"source_hidden": true} tags=["solution"]
outs = {}
for name, fn, clip in (("clip", None, True),
                       ("dynamic", dynamic_threshold, False)):
    outs[name] = dpm_solver_sample_loop(
        respace(cosine, "10"), toy, x_T, clip_denoised=clip,
        denoised_fn=fn, cond_fn=unit_push, model_kwargs={"y": labels})
change = float((outs["clip"] - outs["dynamic"]).abs().mean())
print(f"mean change: {change:.3f}")
assert torch.isfinite(outs["dynamic"]).all()
