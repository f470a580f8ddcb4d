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
# # Forward noise
#
# *Diffusion Models Beat GANs on Image Synthesis* (Dhariwal & Nichol, 2021)
# improves a model that learns to **undo noise**. Before we can learn to undo
# anything we need the thing being undone: a fixed *forward process* that takes
# an image $x_0$ and, over $T$ small steps, turns it into pure Gaussian noise
# $x_T$. This chapter builds that process exactly as the reference
# implementation (`openai/guided-diffusion`) does, and exports it as
# `adm_lib.forward`.
#
# Why destroy data on purpose? Three reasons, which the rest of the book cashes
# in:
#
# 1. **The end point is known.** After enough noise, $x_T$ is indistinguishable
#    from $\mathcal{N}(0, I)$, a distribution we can sample without any model.
# 2. **Each step is small.** Going from $x_t$ back to $x_{t-1}$ only has to
#    remove a little noise, and for small steps that reverse step is itself
#    close to a Gaussian, so a network only has to predict its mean (and, from
#    chapter 2 on, its variance).
# 3. **One network, every noise level.** The forward process has a closed form
#    for any $t$, so training can jump to a random $t$ and never simulate the
#    chain.
#
# The chapter ends with the *posterior* $q(x_{t-1} \mid x_t, x_0)$: the exact
# reverse step when $x_0$ is known, which is what the network is trained to
# imitate.

# %% tags=["parameters"]
# Smoke configuration: runs on a CPU in seconds. Papermill overrides it:
#   adm book run 1 -p data ../shared/data/cifar10/test.zip
data: str = "mnist5k"  # a data-set name, or a folder, .zip or .npz
num_timesteps: int = 1000  # T, the length of the forward process
num_images: int = 4  # images shown noised across t
num_chains: int = 20_000  # scalar chains simulated to check the closed form
seed: int = 0  # of the images picked and of the noise

# %%
#| default_exp forward

# %%
import os

import matplotlib.pyplot as plt
import numpy as np
import torch

from adm_lib.book import find_root
from adm_lib.data import load_dataset
from adm_lib.viz import show_images

# Relative paths, the parameters' too, start at the book's root, as under
# `adm book run`, wherever the kernel starts (JupyterLab: in chapters/).
os.chdir(find_root())
torch.manual_seed(seed)
rng = np.random.default_rng(seed)

# %% [markdown]
# ## 1.1 The data
#
# The embedded default data set is a 5,000-image subset of MNIST, padded to $32
# \times 32$ and scaled from $[0, 255]$ to $[-1, 1]$ as the reference scales
# its images. The range matters: the forward process shrinks $x_0$ towards $0$
# while adding unit-variance noise, so data should sit in a range comparable to
# that noise.

# %%
dataset = load_dataset(data)
x0 = dataset.images(rng.choice(len(dataset), num_images, replace=False))
print(f"{dataset.source}: {len(dataset)} images, batch {tuple(x0.shape)}")
assert x0.dtype == torch.float32 and x0.shape[0] == num_images
assert -1 <= x0.min() and x0.max() <= 1


# %% [markdown]
# `adm_lib.viz.show_images` draws them, mapping $[-1, 1]$ back to 8-bit pixels
# as the reference does when it saves samples.

# %%
show_images(x0, [f"x_0 #{i}" for i in range(num_images)])
plt.show()

# %% [markdown]
# ## 1.2 The forward process
#
# Each step scales the previous image down a little and adds a little noise.
# With a *variance schedule* $\beta_1, \dots, \beta_T$ in $(0, 1)$,
#
# $$q(x_t \mid x_{t-1}) = \mathcal{N}\big(x_t;\ \sqrt{1 - \beta_t}\, x_{t-1},\
# \beta_t I\big).$$
#
# The scale $\sqrt{1-\beta_t}$ keeps the total variance at one when the data
# has unit variance. Because a Gaussian of a Gaussian is a Gaussian, the steps
# compose. Writing $\alpha_t = 1 - \beta_t$ and $\bar\alpha_t = \prod_{s \le t}
# \alpha_s$ (code: `alphas_cumprod`), any $x_t$ can be drawn from $x_0$ in one
# go:
#
# $$q(x_t \mid x_0) = \mathcal{N}\big(x_t;\ \sqrt{\bar\alpha_t}\, x_0,\
# (1 - \bar\alpha_t) I\big), \qquad
# x_t = \sqrt{\bar\alpha_t}\, x_0 + \sqrt{1 - \bar\alpha_t}\, \epsilon,\
# \epsilon \sim \mathcal{N}(0, I).$$
#
# So everything about the forward process is decided by one curve,
# $\bar\alpha_t$: the share of the signal's variance left at step $t$. A useful
# single number is the signal-to-noise ratio $\bar\alpha_t / (1 -
# \bar\alpha_t)$, usually on a log scale, the *log-SNR* $\lambda_t$. Code
# indexes steps from $0$, so the paper's $t = 1, \dots, T$ are the code's `t =
# 0, ..., T - 1`.
#
# ## 1.3 Two noise schedules
#
# **Linear** (Ho et al., 2020): $\beta$ rises linearly from $10^{-4}$ to $0.02$
# over $T = 1000$ steps. For other $T$ the reference scales both ends by $1000
# / T$, so that the process destroys about as much information whatever its
# length.

# %%
#| export
import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor


def linear_beta_schedule(num_timesteps: int) -> np.ndarray:
    """Ho et al.'s betas, 1e-4 to 0.02 at T = 1000, scaled by 1000 / T."""
    scale = 1000 / num_timesteps
    return np.linspace(
        scale * 0.0001, scale * 0.02, num_timesteps, dtype=np.float64
    )


# %% [markdown]
# **Cosine** (Nichol & Dhariwal, 2021; of the paper's released models only
# ImageNet $64 \times 64$ uses it, the others linear, Table 11): define the
# curve $\bar\alpha$ itself rather than the betas,
#
# $$\bar\alpha(t) = \frac{f(t)}{f(0)}, \qquad
# f(t) = \cos^2\!\Big(\frac{t/T + s}{1 + s} \cdot \frac{\pi}{2}\Big),$$
#
# and recover $\beta_t = 1 - \bar\alpha(t) / \bar\alpha(t - 1)$. The offset
# $s = 0.008$ keeps $\beta$ from vanishing near $t = 0$; $\beta$ is clipped at
# $0.999$, for at $t = T$ the cosine is zero and $\beta = 1$ would forget all
# at once. `betas_for_alpha_bar` turns any such curve on $[0, 1]$ into betas.

# %%
#| export
def betas_for_alpha_bar(
    num_timesteps: int,
    alpha_bar: Callable[[float], float],
    max_beta: float = 0.999,
) -> np.ndarray:
    """Betas whose cumulative product follows alpha_bar(t / T), clipped."""
    betas = []
    for i in range(num_timesteps):
        t1, t2 = i / num_timesteps, (i + 1) / num_timesteps
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return np.array(betas, dtype=np.float64)


def cosine_beta_schedule(
    num_timesteps: int, s: float = 0.008, max_beta: float = 0.999
) -> np.ndarray:
    """Nichol & Dhariwal's cosine schedule with offset s and clipped betas."""
    return betas_for_alpha_bar(
        num_timesteps,
        lambda t: math.cos((t + s) / (1 + s) * math.pi / 2) ** 2,
        max_beta,
    )


BETA_SCHEDULES = {
    "linear": linear_beta_schedule,
    "cosine": cosine_beta_schedule,
}


def get_named_beta_schedule(name: str, num_timesteps: int) -> np.ndarray:
    """The betas of a schedule by name ("linear" or "cosine"), as float64."""
    if name not in BETA_SCHEDULES:
        known = ", ".join(BETA_SCHEDULES)
        raise ValueError(f"unknown noise schedule {name!r}; known: {known}")
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    return BETA_SCHEDULES[name](num_timesteps)


# %% [markdown]
# The reference's constants, checked: the linear ends at $T = 1000$ and their
# $1000/T$ scaling, and the cosine's clipping, which touches only the last
# step.

# %%
linear = get_named_beta_schedule("linear", num_timesteps)
cosine = get_named_beta_schedule("cosine", num_timesteps)
scale = 1000 / num_timesteps
assert np.isclose(linear[0], 1e-4 * scale)
assert np.isclose(linear[-1], 0.02 * scale)
assert np.all(np.diff(linear) > 0) and np.all((cosine > 0) & (cosine <= 0.999))
print(f"cosine betas at 0.999: steps {np.flatnonzero(cosine == 0.999)}")
print(f"linear beta range  {linear[0]:.2e} .. {linear[-1]:.2e}")
print(f"cosine beta range  {cosine[0]:.2e} .. {cosine[-1]:.2e}")

# %% [markdown]
# ## 1.4 The posterior $q(x_{t-1} \mid x_t, x_0)$
#
# The reverse of one step, $q(x_{t-1} \mid x_t)$, depends on the whole data
# distribution and is what the network must learn. Given $x_0$ as well, it is a
# Gaussian we can write down (Bayes' rule on two Gaussians):
#
# $$q(x_{t-1} \mid x_t, x_0) = \mathcal{N}\big(x_{t-1};\ \tilde\mu_t,\
# \tilde\beta_t I\big),\quad
# \tilde\mu_t = \underbrace{\frac{\beta_t \sqrt{\bar\alpha_{t-1}}}
# {1 - \bar\alpha_t}}_{\texttt{posterior\_mean\_coef1}} x_0
# + \underbrace{\frac{(1 - \bar\alpha_{t-1}) \sqrt{\alpha_t}}
# {1 - \bar\alpha_t}}_{\texttt{posterior\_mean\_coef2}} x_t,\quad
# \tilde\beta_t = \frac{1 - \bar\alpha_{t-1}}{1 - \bar\alpha_t}\, \beta_t.$$
#
# At the first step, $t = 1$, $\bar\alpha_0 = 1$, so $\tilde\beta_1 = 0$:
# there the posterior is over $x_{t-1} = x_0$, which is given, so $x_{t-1}$
# is certain. Its logarithm is $-\infty$, so the reference stores a
# **clipped log-variance** whose first entry ($t = 1$, code index 0) is
# replaced by $\tilde\beta_2$'s (code index 1). Every loss and sampler uses
# the log-variance, so it must be finite. Training (chapter 2) matches the
# network's reverse step to this posterior.

# %% [markdown]
# ### The two chains in one picture
#
# The forward chain runs left to right, one fixed Gaussian step $q(x_t \mid
# x_{t-1})$ at a time, or in one jump $q(x_t \mid x_0)$ to any $t$. The
# reverse chain runs right to left, one learned step $p_\theta(x_{t-1} \mid
# x_t)$ at a time, starting from pure noise $x_T$; each of its steps is
# trained to match the posterior above. The images are one digit pushed
# through the cosine schedule with one fixed draw of $\epsilon$ (the
# drawing's code is folded).

# %% jupyter={"source_hidden": true}
from matplotlib.patches import FancyArrowPatch

abar = np.cumprod(1 - cosine)
middle = num_timesteps // 2  # the paper's t in the picture
picture = x0[0, 0].numpy()
fixed_eps = np.random.default_rng(seed).standard_normal(picture.shape)
# (label, the node's code step; None: the data x_0, "gap": steps left out)
nodes = [("$x_0$", None), ("$x_1$", 0), ("$\\cdots$", "gap"),
         ("$x_{t-1}$", middle - 2), ("$x_t$", middle - 1),
         ("$\\cdots$", "gap"), ("$x_T$", num_timesteps - 1)]
spacing, half = 2.2, 0.5  # centre to centre; half an image's side
fig, ax = plt.subplots(figsize=(10, 4))
for i, (label, step) in enumerate(nodes):
    centre = i * spacing
    if step == "gap":
        ax.text(centre, 0, label, ha="center", va="center", fontsize=18)
        continue
    x_t = picture if step is None else (np.sqrt(abar[step]) * picture
                                        + np.sqrt(1 - abar[step]) * fixed_eps)
    ax.imshow(np.clip(x_t, -1, 1), cmap="gray", vmin=-1, vmax=1,
              extent=(centre - half, centre + half, -half, half))
    ax.text(centre, -half - 0.1, label, ha="center", va="top", fontsize=13)
arrows = 0
for i in range(len(nodes) - 1):
    left, right = i * spacing + half + 0.1, (i + 1) * spacing - half - 0.1
    for start, end, y, colour in [(left, right, 0.2, "tab:blue"),
                                  (right, left, -0.2, "tab:red")]:
        ax.add_patch(FancyArrowPatch((start, y), (end, y), color=colour,
                                     arrowstyle="-|>", mutation_scale=16,
                                     lw=1.8))
        arrows += 1
middle_x = 3.5 * spacing  # between x_{t-1} and x_t
ax.text(middle_x - 0.2, 0.55, "$q(x_t | x_{t-1})$", color="tab:blue",
        ha="center", va="bottom", fontsize=12)
ax.text(middle_x, -0.95, "$p_\\theta(x_{t-1} | x_t)$", color="tab:red",
        ha="center", va="top", fontsize=12)
# The one-jump marginal of section 1.2, from x_0 straight to x_t.
ax.add_patch(FancyArrowPatch((0, half + 0.1), (4 * spacing + 0.35, half + 0.1),
                             connectionstyle="arc3,rad=-0.2", color="gray",
                             ls="--", arrowstyle="-|>", mutation_scale=16))
ax.text(2 * spacing, 1.6, "$q(x_t | x_0)$: any t in one jump",
        color="gray", ha="center", fontsize=12)
ax.text(-half, -1.7, "blue: the forward process q, fixed noise.   red: "
        "the reverse process, learned, trained to match "
        "$q(x_{t-1} | x_t, x_0)$", fontsize=10)
ax.set(xlim=(-0.7, 6 * spacing + 0.7), ylim=(-1.9, 2.0), aspect="equal",
       title=f"The two chains, with one image along them (cosine schedule, "
             f"T = {num_timesteps}, t = {middle})")
ax.axis("off")
plt.show()
assert arrows == 2 * (len(nodes) - 1)
assert abar[middle - 1] > 0.2 > abar[-1]  # x_t keeps signal, x_T none

# %% [markdown]
# ## 1.5 The forward process as code
#
# `ForwardProcess` takes the betas and precomputes, in float64 as the reference
# does, every per-step coefficient the forward process and its posterior need:
# its base, `_ScheduleTables`, holds them under the reference's names.
# `extract` gathers a table at a batch of timesteps `t` (one per image) and
# shapes it to broadcast over the image dimensions.
#
# The gathered coefficients are in `dtype`, float32 by default as in the
# reference, and so is the arithmetic done with them. It is the one precision
# knob of the diffusion maths: with `dtype=torch.float64` (and a float64
# network) every step is recomputed to about 16 digits, which is how the
# tests measure float32's own round-off (section 1.9).

# %%
#| export
class _ScheduleTables:
    """Every per-step coefficient of a beta schedule, in float64."""

    def __init__(
        self, betas: np.ndarray, dtype: torch.dtype = torch.float32
    ) -> None:
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not np.all((betas > 0) & (betas <= 1)):
            raise ValueError("betas must be a 1-D array with values in (0, 1]")
        self.betas = betas
        self.num_timesteps = len(betas)
        alphas = 1.0 - betas
        self.alphas_cumprod = abar = np.cumprod(alphas)
        self.alphas_cumprod_prev = prev = np.append(1.0, abar[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(abar)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - abar)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - abar)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / abar)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / abar - 1)
        # q(x_{t-1} | x_t, x_0); its variance is 0 at t = 0, so the log is
        # clipped by repeating the next step's value. A one-step process
        # (a respacing to "1") has no next step; its beta, the largest
        # variance the step can have, stands in.
        one_minus = 1.0 - abar
        self.posterior_variance = var = betas * (1.0 - prev) / one_minus
        self.posterior_log_variance_clipped = np.log(
            np.append(var[1] if len(var) > 1 else betas[0], var[1:])
        )
        self.posterior_mean_coef1 = betas * np.sqrt(prev) / one_minus
        self.posterior_mean_coef2 = (1.0 - prev) * np.sqrt(alphas) / one_minus
        # The precision of the tables extract returns, and so of the maths
        # done with them; it may be changed at any time.
        self.dtype = dtype
        self._on_device: dict[
            tuple[str, torch.device, torch.dtype], Tensor
        ] = {}

    def extract(self, name: str, t: Tensor, ndim: int) -> Tensor:
        """Table `name` at timesteps t, in self.dtype, broadcastable."""
        key = (name, t.device, self.dtype)
        if key not in self._on_device:
            # Copy each table to a device once: a host-to-device copy per call
            # would synchronise the GPU at every training or sampling step.
            self._on_device[key] = torch.as_tensor(
                getattr(self, name), dtype=self.dtype, device=t.device
            )
        return self._on_device[key][t].view(-1, *(1,) * (ndim - 1))


# %% [markdown]
# On these tables, the process itself. The names follow the reference:
# `q_mean_variance` is $q(x_t \mid x_0)$ and `q_sample` draws from it,
# `q_posterior_mean_variance` is the posterior of section 1.4, and
# `predict_xstart_from_eps` solves `q_sample` for $x_0$ (section 1.8).

# %%
#| export
class ForwardProcess(_ScheduleTables):
    """The forward process q of a beta schedule: marginals and posterior."""

    def q_mean_variance(
        self, x_start: Tensor, t: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and log-variance of q(x_t | x_0)."""
        n = x_start.ndim
        mean = self.extract("sqrt_alphas_cumprod", t, n) * x_start
        variance = 1.0 - self.extract("alphas_cumprod", t, n)
        log_variance = self.extract("log_one_minus_alphas_cumprod", t, n)
        return mean, variance, log_variance

    def q_sample(
        self, x_start: Tensor, t: Tensor, noise: Tensor | None = None
    ) -> Tensor:
        """Draw x_t ~ q(x_t | x_0) as sqrt(abar) x_0 + sqrt(1 - abar) noise."""
        if noise is None:
            noise = torch.randn_like(x_start)
        if noise.shape != x_start.shape:
            raise ValueError(f"noise {noise.shape} != x_start {x_start.shape}")
        n = x_start.ndim
        return (
            self.extract("sqrt_alphas_cumprod", t, n) * x_start
            + self.extract("sqrt_one_minus_alphas_cumprod", t, n) * noise
        )

    def q_posterior_mean_variance(
        self, x_start: Tensor, x_t: Tensor, t: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        if x_start.shape != x_t.shape:
            raise ValueError(f"x_start {x_start.shape} != x_t {x_t.shape}")
        n = x_t.ndim
        mean = (
            self.extract("posterior_mean_coef1", t, n) * x_start
            + self.extract("posterior_mean_coef2", t, n) * x_t
        )
        variance = self.extract("posterior_variance", t, n)
        log_variance = self.extract("posterior_log_variance_clipped", t, n)
        return mean, variance, log_variance

    def predict_xstart_from_eps(
        self, x_t: Tensor, t: Tensor, eps: Tensor
    ) -> Tensor:
        """Invert q_sample: the x_0 that, with noise eps, gives x_t."""
        n = x_t.ndim
        return (
            self.extract("sqrt_recip_alphas_cumprod", t, n) * x_t
            - self.extract("sqrt_recipm1_alphas_cumprod", t, n) * eps
        )

    @property
    def log_snr(self) -> np.ndarray:
        """log(abar / (1 - abar)) at every step: the signal-to-noise ratio."""
        return np.log(self.alphas_cumprod) - self.log_one_minus_alphas_cumprod


# %% [markdown]
# ## 1.6 What the schedules do
#
# One forward process per schedule, and the two curves that describe them. The
# horizontal axis is $t / T$ so that any $T$ gives comparable plots.

# %%
processes = {
    "linear": ForwardProcess(linear),
    "cosine": ForwardProcess(cosine),
}
frac = np.arange(num_timesteps) / num_timesteps


def plot_schedules(named: dict[str, ForwardProcess]) -> None:
    """alpha-bar_t and the log SNR of each process, against t / T."""
    fig, (ax_abar, ax_snr) = plt.subplots(1, 2, figsize=(9, 3.2))
    for name, process in named.items():
        ax_abar.plot(frac, process.alphas_cumprod, label=name)
        ax_snr.plot(frac, process.log_snr, label=name)
    ax_abar.set(xlabel="t / T", ylabel="alpha-bar_t",
                title="signal variance left")
    ax_snr.set(xlabel="t / T", ylabel="log SNR",
               title="log signal-to-noise ratio")
    ax_abar.legend()
    plt.tight_layout()
    plt.show()


plot_schedules(processes)

# %% [markdown]
# The linear schedule spends a large share of its steps where almost nothing of
# $x_0$ is left; the cosine schedule lowers $\bar\alpha_t$ more evenly and its
# log-SNR falls almost linearly in the middle. Counting steps whose signal
# variance is below $10^{-3}$ makes the difference concrete:

# %%
nearly_noise = {
    name: float(np.mean(p.alphas_cumprod < 1e-3))
    for name, p in processes.items()
}
for name, share in nearly_noise.items():
    print(f"{name}: {share:.0%} of steps have alpha-bar < 1e-3")
assert nearly_noise["linear"] > nearly_noise["cosine"]
assert np.all(np.diff(processes["cosine"].log_snr) < 0)

# %% [markdown]
# ### The closed form, checked by simulation
#
# The one-jump formula for $q(x_t \mid x_0)$ is the reason training is cheap,
# so it is worth checking. We run `num_chains` scalar chains step by step from
# $x_0 = 1$ and compare their mean and variance with `q_mean_variance` at a few
# steps, within a few standard errors of Monte Carlo.

# %%
process = processes["cosine"]
checkpoints = [0, num_timesteps // 4, num_timesteps // 2, num_timesteps - 1]
x = torch.ones(num_chains, dtype=torch.float64)
for t in range(num_timesteps):
    beta = process.betas[t]
    x = math.sqrt(1 - beta) * x + math.sqrt(beta) * torch.randn_like(x)
    if t in checkpoints:
        ones, step = torch.ones(1, 1), torch.tensor([t])
        mean, var, _ = process.q_mean_variance(ones, step)
        err = 4 * math.sqrt(var.item() / num_chains)
        print(f"t={t:4d}  simulated mean {x.mean():.4f} var {x.var():.4f}"
              f"  closed form mean {mean.item():.4f} var {var.item():.4f}")
        assert abs(x.mean() - mean.item()) < err + 1e-6
        var_err = 8 * var.item() / math.sqrt(num_chains)
        assert abs(x.var() - var.item()) < var_err

# %% [markdown]
# ### Images through the forward process
#
# `q_sample` with the same noise $\epsilon$ for every $t$ shows what the
# network will be asked to see. Each row is one schedule; the columns are the
# same fractions of the process.

# %%
fractions = [0.0, 0.1, 0.25, 0.5, 0.75, 1.0]
steps = [min(round(f * num_timesteps), num_timesteps - 1) for f in fractions]
image = x0[:1].expand(len(steps), *x0.shape[1:])
noise = torch.randn_like(x0[:1]).expand_as(image)
t = torch.tensor(steps)
fig, axes = plt.subplots(2, len(steps), figsize=(1.6 * len(steps), 3.8))
for row, (name, p) in zip(axes, processes.items(), strict=True):
    x_t = p.q_sample(image, t, noise)
    show_images(x_t, [f"{name} t={s}" for s in steps], row)
    # Same noise at every t, so x_t is exactly the closed form.
    expected = (p.extract("sqrt_alphas_cumprod", t, 4) * image
                + p.extract("sqrt_one_minus_alphas_cumprod", t, 4) * noise)
    assert torch.equal(x_t, expected)
plt.tight_layout()
plt.show()

# %% [markdown]
# The scale of $x_0$ left in $x_t$, $\sqrt{\bar\alpha_t}$, at the same steps
# says what the eye sees: halfway through, the linear schedule has all but
# erased the image while the cosine one still keeps much of it, and at the last
# step both leave almost nothing. That is the point of the cosine schedule:
# fewer steps wasted on pure noise, which matters most when sampling with few
# steps (chapter 2). The paper still uses the linear schedule for most of its
# models: by its Table 11 only ImageNet $64 \times 64$ is cosine, while the
# ImageNet $128$, $256$ and $512$ models and the LSUN ones are linear.

# %%
for name, p in processes.items():
    scales = "  ".join(f"{p.sqrt_alphas_cumprod[s]:.3f}" for s in steps)
    print(f"{name:>6}: sqrt(alpha-bar) {scales}")
    assert p.sqrt_alphas_cumprod[-1] < 0.01
half = num_timesteps // 2
linear_half, cosine_half = (
    p.sqrt_alphas_cumprod[half] for p in processes.values()
)
assert cosine_half > 2 * linear_half

# %% [markdown]
# ## 1.7 The posterior, checked by Bayes' rule
#
# An independent check of the posterior formula of section 1.4: multiply the
# prior $q(x_{t-1} \mid x_0)$ by the likelihood $q(x_t \mid x_{t-1})$ and read
# off the posterior's precision and mean, for a scalar $x_0$ and $x_t$ at every
# $t \ge 1$.

# %%
x_start, x_noisy = 0.7, -0.3
for name, p in processes.items():
    t = torch.arange(1, num_timesteps)
    ones = torch.ones(len(t), 1)
    mean, var, log_var = p.q_posterior_mean_variance(
        x_start * ones, x_noisy * ones, t
    )
    abar_prev, alpha = p.alphas_cumprod_prev[1:], 1 - p.betas[1:]
    precision = 1 / (1 - abar_prev) + alpha / p.betas[1:]
    bayes_mean = (np.sqrt(abar_prev) * x_start / (1 - abar_prev)
                  + np.sqrt(alpha) * x_noisy / p.betas[1:]) / precision
    np.testing.assert_allclose(var.squeeze(1), 1 / precision, rtol=1e-5)
    np.testing.assert_allclose(
        mean.squeeze(1), bayes_mean, rtol=1e-4, atol=1e-6
    )
    assert np.isfinite(p.posterior_log_variance_clipped).all()
    print(f"{name}: matches Bayes' rule at all {len(t)} steps t >= 1")

# %% [markdown]
# How different are the two natural choices of reverse variance, the forward
# $\beta_t$ and the posterior $\tilde\beta_t$? Ho et al. found either works
# when sampling with all $T$ steps; Nichol & Dhariwal, whose model the paper
# uses, learn a variance *between* them (chapter 2). The plot shows why the
# choice matters only at the start of the process: the ratio $\tilde\beta_t /
# \beta_t$ is far below one for the first few steps and nearly one everywhere
# else.

# %%
fig, (ax_var, ax_ratio) = plt.subplots(1, 2, figsize=(9, 3.2))
for name, p in processes.items():
    line, = ax_var.semilogy(frac, p.betas, label=f"{name} beta")
    ax_var.semilogy(frac[1:], p.posterior_variance[1:], "--",
                    color=line.get_color(), label=f"{name} beta-tilde")
    ax_ratio.semilogx(np.arange(1, num_timesteps),
                      p.posterior_variance[1:] / p.betas[1:], label=name)
ax_var.set(xlabel="t / T", ylabel="variance", title="beta and beta-tilde")
ax_ratio.set(xlabel="t (log scale)", ylabel="beta-tilde / beta",
             title="posterior over forward variance")
ax_var.legend(fontsize=8)
ax_ratio.legend()
plt.tight_layout()
plt.show()
for name, p in processes.items():
    ratio = p.posterior_variance[1:] / p.betas[1:]
    assert np.all(ratio < 1) and ratio[-1] > 0.99
    print(f"{name}: beta-tilde/beta = {ratio[0]:.3f} at t=1, "
          f"{ratio[num_timesteps // 10]:.3f} at t=T/10")

# %% [markdown]
# ## 1.8 If we knew the noise
#
# `q_sample` is invertible when the noise is known: $x_0 = (x_t -
# \sqrt{1-\bar\alpha_t}\,\epsilon) / \sqrt{\bar\alpha_t}$
# (`predict_xstart_from_eps`). The network of chapter 2 is trained to predict
# $\epsilon$ from $x_t$ alone, and plugging its guess in here gives its guess
# of $x_0$, which the posterior then turns into a reverse step. With the true
# noise the round trip is exact, up to float32 round-off that grows as
# $\bar\alpha_t$ shrinks. The same process with `dtype=torch.float64`
# shows that it is round-off and nothing else:

# %%
p = processes["cosine"]
t = torch.tensor(steps[:-1])
image = x0[:1].expand(len(t), *x0.shape[1:])
eps = torch.randn_like(image)
recovered = p.predict_xstart_from_eps(p.q_sample(image, t, eps), t, eps)
errors = (recovered - image).abs().amax(dim=(1, 2, 3))
exact = ForwardProcess(p.betas, dtype=torch.float64)
image, eps = image.double(), eps.double()
back = exact.predict_xstart_from_eps(exact.q_sample(image, t, eps), t, eps)
errors64 = (back - image).abs().amax(dim=(1, 2, 3))
for step, error, error64 in zip(steps, errors.tolist(), errors64.tolist(),
                                strict=False):
    print(f"t={step:4d}: max |x_0 error| {error:.1e} in float32, "
          f"{error64:.1e} in float64")
assert torch.all(errors < 1e-3) and torch.all(errors64 < 1e-9)

# %% [markdown]
# ## 1.9 The library
#
# The cells marked `#| export` are `adm_lib.forward`: `adm book export` writes
# them there, and `adm book check` fails if the module and this chapter
# disagree. The test suite checks the betas, `q_sample` and the posterior
# against the numbers the reference implementation produced
# (`tests/test_forward.py`, marker `parity`), to float32 round-off. That
# round-off is measured, not assumed: each quantity is also computed with
# `dtype=torch.float64`, and the reference's float32 numbers, like ours, must
# lie within 8 times our own float32 error of that exact value, image by
# image. A fixed tolerance would not do: as section 1.8 shows, the error of
# $x_0$ grows with $1/\sqrt{\bar\alpha_t}$ (about 157 at the last step of
# the linear schedule). Here we check that the library and the chapter
# agree, so a reader who edits the chapter sees when the library is stale:

# %%
from adm_lib import forward

for name in BETA_SCHEDULES:
    np.testing.assert_array_equal(
        forward.get_named_beta_schedule(name, num_timesteps),
        get_named_beta_schedule(name, num_timesteps),
    )
lib = forward.ForwardProcess(forward.cosine_beta_schedule(num_timesteps))
t = torch.randint(0, num_timesteps, (len(x0),))
eps = torch.randn_like(x0)
chapter_x_t = processes["cosine"].q_sample(x0, t, eps)
assert torch.equal(lib.q_sample(x0, t, eps), chapter_x_t)
print("adm_lib.forward exports:", ", ".join(forward.__all__))

# %% [markdown]
# ## Summary
#
# * The forward process adds Gaussian noise in $T$ steps set by a schedule
#   $\beta_t$; its marginal $q(x_t \mid x_0)$ has a closed form governed by
#   $\bar\alpha_t$, so training can sample any $t$ directly.
# * The cosine schedule keeps signal for longer than the linear one and wastes
#   fewer steps on near-pure noise. Of the paper's models only ImageNet
#   $64 \times 64$ uses it; the others are linear (Table 11).
# * The posterior $q(x_{t-1} \mid x_t, x_0)$ is Gaussian with known mean
#   coefficients and variance $\tilde\beta_t \le \beta_t$; its log-variance is
#   clipped at $t = 1$ to stay finite.
#
# Chapter 2 trains a network to reverse this process, with a learned variance
# between $\tilde\beta_t$ and $\beta_t$, and samples with far fewer than $T$
# steps.

# %% [markdown]
# ## Exercises
#
# 1. Show by induction on $t$ that the steps $q(x_t \mid x_{t-1})$ compose to
#    $q(x_t \mid x_0) = \mathcal{N}(\sqrt{\bar\alpha_t}\, x_0, (1 -
#    \bar\alpha_t) I)$, the closed form that `q_sample` draws from and that
#    section 1.6 checks by simulation.
# 2. Multiply the prior $q(x_{t-1} \mid x_0)$ by the likelihood $q(x_t \mid
#    x_{t-1})$ and complete the square to derive `posterior_mean_coef1`,
#    `posterior_mean_coef2` and $\tilde\beta_t$ of section 1.4. Then show
#    that $\tilde\beta_t < \beta_t$ for $t \ge 2$, as section 1.7 asserts.
# 3. Put the $x_0$ of `predict_xstart_from_eps` into $\tilde\mu_t$ and show
#    that $\tilde\mu_t = \big(x_t - \frac{\beta_t}{\sqrt{1 -
#    \bar\alpha_t}}\, \epsilon\big) / \sqrt{\alpha_t}$: the mean of the
#    reverse step, written with the noise instead of $x_0$.
# 4. Rerun with `-p num_timesteps 100`. Predict the shares of steps with
#    $\bar\alpha_t < 10^{-3}$ that section 1.6 prints for each schedule,
#    then check. Below which $T$ does `linear_beta_schedule` return a beta
#    above 1, which `ForwardProcess` refuses?
# 5. Add a schedule `"linear_logsnr"` whose log-SNR falls linearly from $10$
#    to $-10$: `betas_for_alpha_bar` of $\bar\alpha(u) = 1 / (1 + e^{20 u -
#    10})$, in `BETA_SCHEDULES` (then `adm book export`). Predict where its
#    curves lie against the cosine's in section 1.6's figure, then plot them.
# 6. Section 1.8 leaves out the last step. Predict the float32 error of the
#    round trip there for `processes["linear"]` from $1 /
#    \sqrt{\bar\alpha_t}$, then run it at all of `steps` for both schedules
#    and plot the error against $1 / \sqrt{\bar\alpha_t}$.

# %% [markdown] jupyter={"source_hidden": true} tags=["solution"]
# **Solution 1.** For $t = 1$ the closed form is the step itself
# ($\bar\alpha_1 = \alpha_1$). If $x_{t-1} = \sqrt{\bar\alpha_{t-1}}\, x_0 +
# \sqrt{1 - \bar\alpha_{t-1}}\, \epsilon'$, then $x_t = \sqrt{\alpha_t}\,
# x_{t-1} + \sqrt{\beta_t}\, \epsilon''$ is $\sqrt{\alpha_t
# \bar\alpha_{t-1}}\, x_0$ plus two independent zero-mean Gaussians whose
# variances add: $\alpha_t (1 - \bar\alpha_{t-1}) + 1 - \alpha_t = 1 -
# \bar\alpha_t$. The cell runs that recursion for the mean's scale and the
# variance and compares with the tables.

# %% jupyter={"source_hidden": true} tags=["solution"]
for name, p in processes.items():
    scale, variance = 1.0, 0.0
    for t, beta in enumerate(p.betas):
        scale = math.sqrt(1 - beta) * scale
        variance = (1 - beta) * variance + beta
        assert math.isclose(scale, p.sqrt_alphas_cumprod[t], rel_tol=1e-9)
        assert math.isclose(variance, 1 - p.alphas_cumprod[t], rel_tol=1e-9)
    print(f"{name}: the recursion gives q(x_t | x_0) at all {len(p.betas)} t")

# %% [markdown] jupyter={"source_hidden": true} tags=["solution"]
# **Solution 2.** As a function of $x_{t-1}$, the log of prior times
# likelihood is $-\frac12 \big[\frac{(x_{t-1} - \sqrt{\bar\alpha_{t-1}}
# x_0)^2}{1 - \bar\alpha_{t-1}} + \frac{(x_t - \sqrt{\alpha_t}
# x_{t-1})^2}{\beta_t}\big]$. The precision is the coefficient of
# $x_{t-1}^2$: $\frac{1}{1 - \bar\alpha_{t-1}} + \frac{\alpha_t}{\beta_t} =
# \frac{1 - \bar\alpha_t}{\beta_t (1 - \bar\alpha_{t-1})}$ (use $\beta_t +
# \alpha_t (1 - \bar\alpha_{t-1}) = 1 - \bar\alpha_t$), so $\tilde\beta_t =
# \frac{1 - \bar\alpha_{t-1}}{1 - \bar\alpha_t} \beta_t$. The mean is the
# linear coefficient times $\tilde\beta_t$: $\tilde\beta_t \big(
# \frac{\sqrt{\bar\alpha_{t-1}}}{1 - \bar\alpha_{t-1}} x_0 +
# \frac{\sqrt{\alpha_t}}{\beta_t} x_t \big)$, which is `coef1` $x_0$ +
# `coef2` $x_t$. For $t \ge 2$, $\bar\alpha_t < \bar\alpha_{t-1} < 1$, so the
# ratio $\frac{1 - \bar\alpha_{t-1}}{1 - \bar\alpha_t}$ is below one and
# $\tilde\beta_t < \beta_t$. Section 1.7's cell checks the formulas by
# Bayes' rule numerically; this one checks the ratio.

# %% jupyter={"source_hidden": true} tags=["solution"]
for p in processes.values():
    ratio = (1 - p.alphas_cumprod_prev[1:]) / (1 - p.alphas_cumprod[1:])
    np.testing.assert_allclose(p.posterior_variance[1:],
                               ratio * p.betas[1:], rtol=1e-12)
    assert np.all(ratio < 1)

# %% [markdown] jupyter={"source_hidden": true} tags=["solution"]
# **Solution 3.** With $x_0 = (x_t - \sqrt{1 - \bar\alpha_t}\, \epsilon) /
# \sqrt{\bar\alpha_t}$ the coefficient of $x_t$ in $\tilde\mu_t$ becomes
# $\frac{\beta_t \sqrt{\bar\alpha_{t-1}}}{(1 - \bar\alpha_t)
# \sqrt{\bar\alpha_t}} + \frac{(1 - \bar\alpha_{t-1}) \sqrt{\alpha_t}}{1 -
# \bar\alpha_t} = \frac{\beta_t + \alpha_t (1 - \bar\alpha_{t-1})}{(1 -
# \bar\alpha_t) \sqrt{\alpha_t}} = \frac{1}{\sqrt{\alpha_t}}$ (using
# $\sqrt{\bar\alpha_{t-1} / \bar\alpha_t} = 1 / \sqrt{\alpha_t}$), and that
# of $\epsilon$ is $-\frac{\beta_t \sqrt{\bar\alpha_{t-1}} \sqrt{1 -
# \bar\alpha_t}}{(1 - \bar\alpha_t) \sqrt{\bar\alpha_t}} = -\frac{\beta_t}
# {\sqrt{\alpha_t} \sqrt{1 - \bar\alpha_t}}$. Checked at every $t$ in
# float64:

# %% jupyter={"source_hidden": true} tags=["solution"]
exact = ForwardProcess(cosine, dtype=torch.float64)
t = torch.arange(num_timesteps)
x_t, eps = torch.randn(2, num_timesteps, 1, dtype=torch.float64)
mean, _, _ = exact.q_posterior_mean_variance(
    exact.predict_xstart_from_eps(x_t, t, eps), x_t, t)
beta = torch.from_numpy(exact.betas)[:, None]
abar = torch.from_numpy(exact.alphas_cumprod)[:, None]
by_eps = (x_t - beta / (1 - abar).sqrt() * eps) / (1 - beta).sqrt()
torch.testing.assert_close(mean, by_eps, rtol=1e-9, atol=1e-9)

# %% [markdown] jupyter={"source_hidden": true} tags=["solution"]
# **Solution 4.** At $T = 100$ the linear betas run from $10^{-3}$ to $0.2$
# (ten times larger), so $\bar\alpha$ falls below $10^{-3}$ after about the
# same fraction of the process as at $T = 1000$: 20% of the steps (17.5% at
# $T = 1000$). The cosine schedule depends on $t/T$ only, so its share stays
# about 2 to 3% (3% at $T = 100$). The linear's largest beta is $0.02 \cdot
# 1000 / T$, above one for $T < 20$: `ForwardProcess` refuses $T = 19$. At
# $T = 20$ the last beta is exactly one, which the check lets through, but
# then $\bar\alpha_T = 0$ and the tables that divide by it are infinite.

# %% jupyter={"source_hidden": true} tags=["solution"]
shares = {name: np.mean(ForwardProcess(get_named_beta_schedule(name, 100))
                        .alphas_cumprod < 1e-3) for name in BETA_SCHEDULES}
print(f"T = 100: share of steps with alpha-bar < 1e-3: {shares}")
assert shares["linear"] == 0.2 and shares["cosine"] == 0.03
assert linear_beta_schedule(19)[-1] > 1 >= linear_beta_schedule(20)[-1]
try:
    ForwardProcess(linear_beta_schedule(19))
    raise AssertionError("T = 19 should be refused")
except ValueError as error:
    print(f"T = 19: {error}")

# %% [markdown] jupyter={"source_hidden": true} tags=["solution"]
# **Solution 5.** Its log-SNR is $10 - 20u$, a straight line, while the
# cosine's, $-2 \log \tan\big(\frac{u + s}{1 + s} \frac{\pi}{2}\big)$, is
# nearly linear only in the middle and steep at both ends. Both cross zero
# at $u = \frac12$, so the new schedule keeps more signal than the cosine's
# in the first half (log-SNR 5.0 against 1.7 at $t = T/4$) and less in the
# second (-5.0 against -1.8 at $3T/4$), and its $\bar\alpha_t$ falls more
# steeply around the middle. The line bends near $t = 0$ (log-SNR 13.9 at
# the first step, not 10): `betas_for_alpha_bar` divides by $\bar\alpha(0) =
# 1/(1 + e^{-10})$, so that $\bar\alpha$ starts at one, which makes $1 -
# \bar\alpha_t \propto e^{20u} - 1$ rather than $e^{20u}$; from $u = 1/4$
# on, the difference is under $e^{-5}$. The cell builds it without adding
# it to the library.

# %% jupyter={"source_hidden": true} tags=["solution"]
logsnr = ForwardProcess(betas_for_alpha_bar(
    num_timesteps, lambda u: 1 / (1 + math.exp(20 * u - 10))))
plot_schedules({"cosine": processes["cosine"], "linear_logsnr": logsnr})
quarter, three = num_timesteps // 4, 3 * num_timesteps // 4
assert logsnr.log_snr[quarter] > processes["cosine"].log_snr[quarter]
assert logsnr.log_snr[three] < processes["cosine"].log_snr[three]
np.testing.assert_allclose(np.diff(logsnr.log_snr[quarter:]),
                           -20 / num_timesteps, rtol=1e-2)

# %% [markdown] jupyter={"source_hidden": true} tags=["solution"]
# **Solution 6.** $x_t$ is stored with a relative error of about $2^{-24}
# \approx 6 \cdot 10^{-8}$, and inverting multiplies it by $1 /
# \sqrt{\bar\alpha_t}$ (157 at the linear schedule's last step, about
# 20,000 at the cosine's, whose last beta is clipped at 0.999), times the
# size of $x_t$ and $\epsilon$ (a few units): about $10^{-5}$ to $10^{-4}$
# for the linear schedule and $10^{-3}$ to $10^{-2}$ for the cosine. The
# errors lie on a line of slope one on a log-log plot, a few times $2^{-24}
# / \sqrt{\bar\alpha_t}$.

# %% jupyter={"source_hidden": true} tags=["solution"]
fig, ax = plt.subplots(figsize=(4.5, 3.2))
t = torch.tensor(steps)
image = x0[:1].expand(len(t), *x0.shape[1:])
eps = torch.randn_like(image)
for name, p in processes.items():
    recovered = p.predict_xstart_from_eps(p.q_sample(image, t, eps), t, eps)
    errors = (recovered - image).abs().amax(dim=(1, 2, 3)).numpy()
    gain = 1 / p.sqrt_alphas_cumprod[steps]
    ax.loglog(gain, errors, "o-", label=name)
    print(f"{name}: error at the last step {errors[-1]:.1e}, "
          f"1/sqrt(alpha-bar) {gain[-1]:.0f}")
    assert np.all(errors <= 32 * 2.0**-24 * gain)
ax.set(xlabel="1 / sqrt(alpha-bar_t)", ylabel="max |x_0 error|",
       title="float32 round trip")
ax.legend()
plt.show()
