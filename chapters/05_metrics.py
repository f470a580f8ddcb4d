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
# # Measuring sample quality
#
# The paper's claims are numbers: "ADM-G reaches FID 4.59 on ImageNet
# 256x256", and precision and recall for guidance's fidelity-diversity
# trade-off. Each compares a batch of samples with a batch of real images
# through a pretrained network's features, and each rewards something
# different. This chapter defines them (5.1 to 5.5) as the reference's
# evaluator (`evaluations/evaluator.py`) does, equal to its numbers,
# exports them as `adm_lib.metrics` and `adm evaluate` (5.6), shows what
# each rewards and misses, on a trained model loaded back from its run
# folder (`adm_lib.models`, 5.7, 5.8), and puts them to work: learned
# against fixed variances in few ancestral steps (5.9), chapter 3's
# architecture ablations (5.10), and copies of training images (5.11).

# %% tags=["parameters"]
# Smoke configuration: minutes on a CPU, with the MNIST classifier's
# features. The full GPU run, with Inception's weights, is
#   adm book run 5 -p device cuda -p features inception \
#       -p inception_weights PATH -p data ../shared/data/cifar10/train.zip \
#       -p sample_counts "[500, 1000, 2000, 5000, 10000]" -p num_images 20000 \
#       -p model_steps 20000 -p model_sampler ddim25 -p model_settings "{}" \
#       -p variance_steps 20000 -p variance_held_out 1000 \
#       -p variance_samples 5000 -p variance_respacings "[10, 25, 50, 100]" \
#       -p variance_seeds "[0, 1, 2]" -p variance_dir build/chapter5_cifar10
# The recorded CPU runs: 5.8's and 5.9's commands (5.9's also covers
# 5.11); 5.10's ablations at CPU and GPU scale: appendix M.4.
data: str = "mnist5k"  # real images: a data-set name, folder, .zip or .npz
features: str = "mnist"  # "inception", "mnist" or "cifar10" (match the data)
inception_weights: str = ""  # the Inception weights file, for "inception"
device: str = "auto"  # "auto" picks CUDA when there is a GPU
sample_counts: list[int] = [100, 200, 400, 800]  # sizes for FID against n
num_images: int = 2000  # real images used (two halves of this many)
model_steps: int = 5  # training steps of the model whose samples are scored
# chapter 4.9's lean network, for speed
model_settings: dict = {"num_res_blocks": 1, "channel_mult": "1,1,2",
                        "resblock_updown": False}  # changes to the preset
model_sampler: str = "ddim2"  # its sampler's respacing
# 5.9 and 5.11: learned and fixed variances, with `adm demo`'s recipe
variance_settings: dict = {}  # changes to the demo's recipe
variance_steps: int = 4  # training steps of each (the demo's: 350 or 800)
variance_held_out: int = 100  # images of `data` kept out of their training
variance_respacings: list[int] = [5, 10]  # ancestral sampling steps
variance_samples: int = 10  # samples per model, step count and seed
variance_seeds: list[int] = [0, 1]  # sampling seeds
variance_dir: str = "build/chapter5/variance"  # their run folders
reuse_runs: bool = False  # True: finished runs in variance_dir are loaded
figures_dir: str = ""  # if set, 5.9's figure is also saved there
seed: int = 0  # of training and of the real images' order
# 5.10: the architecture ablations of chapter 3, trained with chapter 4's loop
ablation_data: str = "mnist5k"  # a data-set name, or a folder, .zip or .npz
ablation_train_images: int = 64  # training images after the held-out (0: all)
ablation_eval_images: int = 4  # held-out (image, t, noise) triples
ablation_channels: int = 64  # base width (64: the per-head widths need it)
ablation_batch_size: int = 4  # images per training step
ablation_steps: int = 1  # the equal-steps arm
ablation_seconds: float = 0.5  # the equal-time budget per variant
ablation_timing_steps: int = 1  # first steps of each run, timed (time arm)
ablation_lr: float = 3e-4  # the ablations' learning rate
ablation_samples: int = 4  # images sampled per variant (its FID's n)
ablation_sample_steps: str = "ddim5"  # the samples' respacing (ddim25 in full)

# %%
#| default_exp metrics

# %%
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F

from adm_lib.book import find_root
from adm_lib.config import make_config
from adm_lib.data import load_dataset
from adm_lib.devices import resolve_device
from adm_lib.diffusion import ddim_sample_loop, p_sample_loop, respace
from adm_lib.models import load_run
from adm_lib.train import train
from adm_lib.viz import pixel_grid, show_rows, to_uint8

# Relative paths, the parameters' too, start at the book's root, as under
# `adm book run`, wherever the kernel starts (JupyterLab: in chapters/).
os.chdir(find_root())
torch.manual_seed(seed)
device = str(resolve_device(device))
print(f"device: {device}, features: {features}")

# %% [markdown]
# ## 5.1 Features
#
# Pixels are a poor space to compare images in (a digit shifted by one pixel is
# far from itself), so every metric compares a classifier's activations. The
# reference evaluator feeds uint8 images to the 2015 TensorFlow Inception-v3
# graph that FID was defined with, which resizes them to 299x299, and reads:
#
# * `pool_3`, the final average pool's 2048 features: FID, precision, recall;
# * `mixed_6/conv`, the first convolution of `Mixed_6d`, 17x17 by 192 channels,
#   of which it keeps the first 7 (2,023 numbers, in NHWC order): spatial FID;
# * the class logits (1008 classes, without the bias), whose softmax is
#   the Inception Score's $p(y \mid x)$.
#
# `adm_lib.inception` rebuilds it in PyTorch as torch-fidelity does, with the
# same resize and normalisation, from a local weights file (a path, else
# `ADM_INCEPTION_WEIGHTS`, else the torch hub cache; nothing is downloaded).
# Offline, small classifiers of MNIST-5k and CIFAR-10 (`adm_lib.datanets`,
# weights in the package) give the same three outputs; their numbers are
# labelled, FID(mnist-net), and never compare with Inception FIDs.

# %%
#| export
import contextlib
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import linalg
from torch import Tensor
from tqdm.auto import tqdm

from adm_lib.data import read_npz
from adm_lib.datanets import load_data_set_net
from adm_lib.files import write_atomic
from adm_lib.inception import load_inception
from adm_lib.viz import to_uint8

FEATURES = ("inception", "mnist", "cifar10")
Extractor = Callable[[Tensor], dict[str, Tensor]]


def feature_extractor(name: str, weights: str | os.PathLike | None = None,
                      device: str | torch.device = "cpu") -> Extractor:
    """Inception-v3 (local weights file), or a data-set classifier."""
    if name == "inception":
        return load_inception(weights, device)
    if name in ("mnist", "cifar10"):
        return load_data_set_net(name, device)
    raise ValueError(f"features must be one of {', '.join(FEATURES)}, "
                     f"not {name!r}")


def feature_label(name: str) -> str:
    """How numbers made with these features are labelled."""
    return "" if name == "inception" else f"({name}-net)"


@contextlib.contextmanager
def ieee_float32() -> Iterator[None]:
    """Float32 products and convolutions in IEEE float32 on a GPU too."""
    # A training run in the same process may have turned TF32 on (10-bit
    # mantissas): distances and features would move with it, and so the
    # k-NN radii of precision and recall. The CPU never uses TF32.
    backends = (torch.backends.cuda.matmul, torch.backends.cudnn)
    saved = [b.allow_tf32 for b in backends]
    for backend in backends:
        backend.allow_tf32 = False
    try:
        yield
    finally:
        for backend, allowed in zip(backends, saved, strict=True):
            backend.allow_tf32 = allowed


@torch.no_grad()
@ieee_float32()
def compute_activations(images: np.ndarray, extractor: Extractor,
                        batch_size: int = 64,
                        device: str | torch.device = "cpu",
                        progress: bool = False) -> dict[str, np.ndarray]:
    """Features ("pool", "spatial", "logits") of uint8 NHWC images."""
    parts: dict[str, list[np.ndarray]] = {}
    starts = range(0, len(images), batch_size)
    for start in tqdm(starts, disable=not progress, desc="features"):
        batch = torch.from_numpy(images[start:start + batch_size])
        batch = batch.to(device).permute(0, 3, 1, 2).float()
        for key, value in extractor(batch).items():
            parts.setdefault(key, []).append(value.float().cpu().numpy())
    return {key: np.concatenate(value) for key, value in parts.items()}


def softmax(logits: np.ndarray) -> np.ndarray:
    """Class probabilities from logits, in float64."""
    logits = np.asarray(logits, dtype=np.float64)
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)

# %% [markdown]
# ## 5.2 FID
#
# The Fréchet Inception Distance (Heusel et al., 2017) fits a Gaussian to
# each batch's features, mean $\mu$ and covariance $\Sigma$, and measures
# the Fréchet (2-Wasserstein) distance between the two Gaussians:
#
# $$\text{FID} = \lVert \mu_r - \mu_g \rVert^2 + \operatorname{tr}\big(
# \Sigma_r + \Sigma_g - 2 (\Sigma_r \Sigma_g)^{1/2}\big).$$
#
# It sees quality and diversity at once, but only through two moments. As in
# the reference: float64 statistics with `np.cov` (ddof 1),
# `scipy.linalg.sqrtm`, $10^{-6} I$ added to both covariances when a nearly
# singular product's root is not finite, and an imaginary diagonal above
# $10^{-3}$ an error. Checked below on a batch and a shifted copy.

# %%
#| export
@dataclass
class FIDStatistics:
    """The mean and covariance of a set of features, in float64."""

    mu: np.ndarray
    sigma: np.ndarray


def feature_statistics(features: np.ndarray) -> FIDStatistics:
    """Mean and covariance (`np.cov`, ddof 1) of N x D features."""
    features = np.asarray(features, dtype=np.float64)
    return FIDStatistics(features.mean(axis=0), np.cov(features, rowvar=False))


def _sqrtm(matrix: np.ndarray) -> np.ndarray:
    """scipy's matrix square root, without its singular-matrix warning."""
    # Fewer samples than feature dimensions always make the product
    # singular, and scipy warns; whether the root is usable is decided by
    # the finiteness check of `frechet_distance`, as in the reference.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        return linalg.sqrtm(matrix)


def frechet_distance(a: FIDStatistics, b: FIDStatistics,
                     eps: float = 1e-6) -> float:
    """The Frechet distance of two Gaussians, as the reference computes it."""
    mu_a, mu_b = np.atleast_1d(a.mu), np.atleast_1d(b.mu)
    sigma_a, sigma_b = np.atleast_2d(a.sigma), np.atleast_2d(b.sigma)
    if mu_a.shape != mu_b.shape or sigma_a.shape != sigma_b.shape:
        raise ValueError(
            f"the statistics have different dimensions: {mu_a.shape[0]} "
            f"and {mu_b.shape[0]} (were they made with the same features?)")
    diff = mu_a - mu_b
    covmean = _sqrtm(sigma_a.dot(sigma_b))
    if not np.isfinite(covmean).all():
        warnings.warn(f"the covariance product is singular; adding {eps} "
                      "to the diagonal of both", stacklevel=2)
        offset = np.eye(sigma_a.shape[0]) * eps
        covmean = _sqrtm((sigma_a + offset).dot(sigma_b + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            worst = np.max(np.abs(covmean.imag))
            raise ValueError(f"sqrtm has an imaginary component {worst}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma_a) + np.trace(sigma_b)
                 - 2 * np.trace(covmean))

# %%
rng = np.random.default_rng(seed)
points = rng.normal(size=(4000, 8))
stats = feature_statistics(points)
same = frechet_distance(stats, stats)
shift = np.array([1.0, 2.0] + [0.0] * 6)
moved = frechet_distance(stats, feature_statistics(points + shift))
print(f"itself: {same:.2e}; shifted by (1, 2): {moved:.4f}")
assert abs(same) < 1e-8 and abs(moved - 5.0) < 1e-8

# %% [markdown]
# ## 5.3 sFID
#
# Average pooling throws away where things are: `pool_3` barely changes
# when an image's parts move. So the paper also reports sFID (Nash et al.,
# 2021): `frechet_distance` on the "spatial" features of `mixed_6/conv`,
# which keep a 17x17 layout; 5.7 shows it catching what FID misses.
#
# ## 5.4 The Inception Score
#
# The Inception Score (Salimans et al., 2016) asks the classifier about the
# samples alone: each should be classified confidently (a peaked $p(y \mid
# x)$), and together they should cover many classes (a flat marginal $p(y)$):
#
# $$\text{IS} = \exp\Big(\mathbb{E}_x\, \mathrm{KL}\big(p(y \mid x)
# \,\Vert\, p(y)\big)\Big).$$
#
# It never looks at real images, so it cannot see confidently classified but
# unrealistic samples, nor diversity within a class. The evaluator splits the
# samples into consecutive groups of 5,000 (no shuffling), estimates $p(y)$
# within each, and averages the groups' scores.

# %%
#| export
def inception_score(probs: np.ndarray, split_size: int = 5000) -> float:
    """exp(E_x KL(p(y|x) || p(y))), averaged over consecutive splits."""
    probs = np.asarray(probs, dtype=np.float64)
    scores = []
    for start in range(0, len(probs), split_size):
        part = probs[start:start + split_size]
        marginal = part.mean(axis=0, keepdims=True)
        kl = (part * (np.log(part) - np.log(marginal))).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores))

# %%
classes = 10
confident = np.full((1000, classes), 1e-9)
confident[np.arange(1000), np.arange(1000) % classes] = 1
one_class = np.eye(classes)[np.zeros(1000, dtype=int)] + 1e-9
spread, collapsed = inception_score(confident), inception_score(one_class)
print(f"even over {classes} classes: {spread:.3f}; one class: {collapsed:.3f}")
assert abs(spread - classes) < 1e-3 and abs(collapsed - 1) < 1e-3

# %% [markdown]
# ## 5.5 Precision and recall
#
# FID mixes two failures into one number: unrealistic samples (low fidelity)
# and real images that no sample resembles (low coverage). Improved precision
# and recall (Kynkäänniemi et al., 2019) measure them apart. Around each real
# feature vector put a ball whose radius is the distance to its $k$-th nearest
# real neighbour ($k = 3$): their union estimates the real manifold.
# **Precision** is the share of samples inside it; **recall** the share of real
# images inside the samples' balls. The paper uses them to show that guidance
# buys precision with recall.
#
# Distances are squared Euclidean, $\lVert u \rVert^2 - 2 u \cdot v + \lVert v
# \rVert^2$ in IEEE float32 (never TF32, which a GPU training run may have
# switched on); a point on a ball's surface is inside. 50,000 samples against
# 10,000 references would make a 2 GB distance matrix, so it goes in blocks:
# each row keeps the $k + 1$ smallest distances seen, the first being the point
# itself (0), so the radius is entry $k$. `precision_recall` then walks the
# reference-by-sample blocks once. Below, in two dimensions: real points fill a
# disk; one batch of "samples" covers its right half (faithful but
# incomplete), another the disk spread twice as wide (complete but partly
# fake).

# %%
#| export
@ieee_float32()
def pairwise_distances(u: Tensor, v: Tensor) -> Tensor:
    """Squared Euclidean distances of rows, |u|^2 - 2 u.v + |v|^2, >= 0."""
    norm_u = (u * u).sum(dim=1, keepdim=True)
    norm_v = (v * v).sum(dim=1, keepdim=True).T
    return (norm_u - 2 * u @ v.T + norm_v).clamp(min=0)


def _blocks(n: int, size: int) -> Iterable[slice]:
    return (slice(i, min(i + size, n)) for i in range(0, n, size))


def manifold_radii(features: np.ndarray | Tensor, k: int = 3,
                   block: int = 10000, device: str | torch.device = "cpu"
                   ) -> Tensor:
    """Each point's squared distance to its k-th nearest other point."""
    x = torch.as_tensor(features, dtype=torch.float32, device=device)
    if len(x) <= k:
        raise ValueError(f"{len(x)} feature vectors: the k-th neighbour "
                         f"(k={k}) needs at least {k + 1}")
    radii = torch.empty(len(x), device=device)
    for rows in _blocks(len(x), block):
        nearest = torch.full((rows.stop - rows.start, 0), torch.inf,
                             device=device)
        for cols in _blocks(len(x), block):
            d = pairwise_distances(x[rows], x[cols])
            both = torch.cat([nearest, d], dim=1)
            nearest = both.topk(min(k + 1, both.shape[1]), dim=1,
                                largest=False).values
        radii[rows] = nearest[:, k]
    return radii.cpu()


def precision_recall(ref: np.ndarray | Tensor, samples: np.ndarray | Tensor,
                     k: int = 3, block: int = 10000,
                     device: str | torch.device = "cpu"
                     ) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al., 2019)."""
    a = torch.as_tensor(ref, dtype=torch.float32, device=device)
    b = torch.as_tensor(samples, dtype=torch.float32, device=device)
    radii_a = manifold_radii(a, k, block, device).to(device)
    radii_b = manifold_radii(b, k, block, device).to(device)
    a_in = torch.zeros(len(a), dtype=torch.bool, device=device)
    b_in = torch.zeros(len(b), dtype=torch.bool, device=device)
    for rows in _blocks(len(a), block):
        for cols in _blocks(len(b), block):
            d = pairwise_distances(a[rows], b[cols])
            b_in[cols] |= (d <= radii_a[rows, None]).any(dim=0)
            a_in[rows] |= (d <= radii_b[None, cols]).any(dim=1)
    return b_in.double().mean().item(), a_in.double().mean().item()

# %%
def disk(n: int, radius: float = 1.0) -> np.ndarray:
    angle = rng.uniform(0, 2 * np.pi, n)
    r = radius * np.sqrt(rng.uniform(0, 1, n))
    return np.stack([r * np.cos(angle), r * np.sin(angle)], axis=1)


disk_real, disk_half, disk_wide = disk(2000), disk(4000), disk(2000, 2.0)
disk_half = disk_half[disk_half[:, 0] > 0][:2000]
fakes = {"right half": disk_half, "twice as wide": disk_wide}
pr = {name: precision_recall(disk_real, fake) for name, fake in fakes.items()}
fig, axes = plt.subplots(1, 2, figsize=(6.5, 3))
for ax, (name, fake) in zip(axes, fakes.items(), strict=True):
    ax.scatter(*disk_real.T, s=1, label="real")
    ax.scatter(*fake.T, s=1, label="samples")
    ax.set(title=f"{name}: P {pr[name][0]:.2f}, R {pr[name][1]:.2f}",
           aspect="equal")
axes[0].legend(markerscale=8, fontsize=7)
plt.show()
assert pr["right half"][0] > 0.95 and pr["right half"][1] < 0.6
assert pr["twice as wide"][0] < 0.4 and pr["twice as wide"][1] > 0.95

# %% [markdown]
# ### The pipeline in one picture
#
# All five numbers come from one pass of both batches through the
# feature network, differing in the features they read and what they fit.

# %% jupyter={"source_hidden": true}
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

headings = {0.9: ("inputs: uint8 images", "#dbe9f6"),  # x: (text, colour)
            3.3: ("one forward pass", "#fde2c8"),
            5.8: ("features", "#e8e8e8"),
            8.4: ("fitted to the features", "#e3f1dc"),
            11.0: ("numbers", "#f6dbe4")}
boxes = {  # name: (x, y, text)
    "samples": (0.9, 3.0, "samples\nn generated images"),
    "refs": (0.9, 1.2, "references\nm real images"),
    "net": (3.3, 2.1, "feature network\nInception-v3\n(or a data-net)"),
    "pool": (5.8, 3.4, "pooled features\npool_3, 2048 per image"),
    "spatial": (5.8, 2.1, "spatial features\nmixed_6/conv, 2023"),
    "logits": (5.8, 0.8, "class logits\n" r"$p(y\,|\,x)$"),
    "knn": (8.4, 4.0, "k-NN balls, k = 3\nradius: 3rd neighbour"),
    "gauss": (8.4, 2.75, "Gaussian fits\n" r"$\mu, \Sigma$ of each set"),
    "marginal": (8.4, 0.8, "samples only:\n" r"marginal $p(y)$"),
    "pr": (11.0, 4.0,
           "precision: samples in\nreal balls; recall:\nreal in sample balls"),
    "fid": (11.0, 2.75, "FID (pooled)\nsFID (spatial):\nFréchet distance"),
    "is": (11.0, 0.8,
           "Inception Score\n" r"$\exp\,E_x\,KL(p(y|x)\,\|\,p(y))$"),
}
arrows = [("samples", "net"), ("refs", "net"), ("net", "pool"),
          ("net", "spatial"), ("net", "logits"), ("pool", "knn"),
          ("pool", "gauss"), ("spatial", "gauss"), ("logits", "marginal"),
          ("knn", "pr"), ("gauss", "fid"), ("marginal", "is")]
width, height = 2.1, 0.95
fig, ax = plt.subplots(figsize=(10, 4.2))
for x, y, text in boxes.values():
    ax.add_patch(FancyBboxPatch(
        (x - width / 2, y - height / 2), width, height, lw=0.8,
        boxstyle="round,pad=0.05", fc=headings[x][1], ec="black"))
    ax.text(x, y, text, ha="center", va="center", fontsize=7.5)
for a, b in arrows:
    (xa, ya), (xb, yb) = boxes[a][:2], boxes[b][:2]
    ax.add_patch(FancyArrowPatch(
        (xa + width / 2 + 0.05, ya), (xb - width / 2 - 0.05, yb),
        arrowstyle="-|>", mutation_scale=10, lw=0.9, color="black"))
for x, (heading, _) in headings.items():
    ax.text(x, 4.85, heading, ha="center", fontsize=8, style="italic")
ax.set(xlim=(-0.3, 12.2), ylim=(0.1, 5.1))
ax.axis("off")
ax.set_title("How FID, sFID, IS, precision and recall are computed",
             fontsize=10)
plt.show()
# Checkable: no two boxes overlap, and every arrow runs left to right
# between two boxes that exist.
assert all(abs(p[0] - q[0]) >= width or abs(p[1] - q[1]) >= height
           for a, p in boxes.items() for b, q in boxes.items() if a < b)
assert all(boxes[a][0] < boxes[b][0] for a, b in arrows)

# %% [markdown]
# ## 5.6 Batches and `adm evaluate`
#
# The reference stores a batch as an `.npz` whose `arr_0` is uint8 N x H x W x
# C (plus `arr_1`, the labels of a class-conditional model's samples); its
# published reference batches add the Inception statistics `mu`, `sigma`,
# `mu_s` and `sigma_s`, used as given with Inception's features. A sampler's
# float output in $[-1, 1]$ is converted as the reference's scripts do
# (`viz.to_uint8`). A file that is no such batch is refused with its name
# before any work; a grey batch against a colour one is scored with a warning.
# `evaluate` scores two batches' features with `score_activations`, which
# chapter 6 and the demo call on features they have (`ref_stats` replacing the
# reference's own, `labels` adding accuracy, the share of top logits equal to
# the labels asked); `format_scores` prints them.

# %%
#| export
def write_batch(path: str | os.PathLike, images: np.ndarray | Tensor,
                labels: np.ndarray | Tensor | None = None) -> Path:
    """Save images as the reference's batch: arr_0 uint8 NHWC (+ arr_1)."""
    if isinstance(images, Tensor) and images.is_floating_point():
        images = to_uint8(images)
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"expected uint8 N x H x W x C images or float "
                         f"N x C x H x W in [-1, 1], got {images.dtype} "
                         f"{images.shape}")
    arrays = {"arr_0": images}
    if labels is not None:
        arrays["arr_1"] = np.asarray(labels, dtype=np.int64)
    path = Path(path)
    write_atomic(path, lambda f: np.savez(f, **arrays))  # chapter 4's
    return path


@dataclass
class Batch:
    """A reference-format batch: uint8 NHWC images, labels, given stats."""

    images: np.ndarray
    labels: np.ndarray | None
    stats: FIDStatistics | None  # reference batches may carry mu, sigma
    stats_spatial: FIDStatistics | None
    source: str = ""  # the file or folder read, for errors to name


def read_batch(path: str | os.PathLike) -> Batch:
    """Read a sample or reference batch (.npz with arr_0, maybe mu...)."""
    path = Path(path)
    data = read_npz(path)  # a DataError (a ValueError) names a bad file
    names = set(data)
    if "arr_0" not in names:
        raise ValueError(f"{path} has no arr_0 (images); it has "
                         f"{', '.join(sorted(names)) or 'nothing'}")
    images = data["arr_0"]
    if images.dtype != np.uint8 or images.ndim != 4 or \
            images.shape[-1] not in (1, 3):
        raise ValueError(f"{path}: arr_0 must be uint8 N x H x W x C (C 1 "
                         f"or 3), not {images.dtype} {images.shape}")
    given = {"mu", "sigma", "mu_s", "sigma_s"} <= names
    return Batch(
        images, data["arr_1"] if "arr_1" in names else None,
        FIDStatistics(data["mu"], data["sigma"]) if given else None,
        FIDStatistics(data["mu_s"], data["sigma_s"]) if given else None,
        str(path))


def evaluate(ref: str | os.PathLike | Batch,
             samples: str | os.PathLike | Batch,
             features: str = "inception",
             weights: str | os.PathLike | None = None,
             batch_size: int = 64, device: str | torch.device = "cpu",
             progress: bool = False) -> dict[str, float | str]:
    """Inception Score, FID, sFID, precision and recall of a sample batch."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: expected >= 1")
    extractor = feature_extractor(features, weights, device)  # fail fast
    batches, named = [], []
    for name, given in (("reference", ref), ("sample", samples)):
        batch = given if isinstance(given, Batch) else read_batch(given)
        named.append(f"the {name} batch"
                     + (f" {batch.source}" if batch.source else ""))
        if len(batch.images) < 4:
            raise ValueError(
                f"{named[-1]} has {len(batch.images)} images; the scores "
                "need at least 4 (precision and recall use each image's "
                "3rd nearest neighbour)")
        batches.append(batch)
    ref, samples = batches
    if ref.images.shape[-1] != samples.images.shape[-1]:
        # Both can be scored (the features take grey or colour), but a
        # grey batch against a colour one is more often a mistake.
        shapes = [" x ".join(map(str, b.images.shape)) for b in batches]
        warnings.warn(f"{named[0]} is {shapes[0]}, {named[1]} {shapes[1]}:"
                      " the scores compare grey images with colour ones",
                      stacklevel=2)
    ref_acts, sample_acts = (
        compute_activations(batch.images, extractor, batch_size, device,
                            progress) for batch in (ref, samples))
    given = ref.stats is not None and features == "inception"
    scores = score_activations(
        ref_acts, sample_acts, device=device,
        ref_stats=(ref.stats, ref.stats_spatial) if given else None)
    return {"features": features, **scores}


def score_activations(
    ref: dict[str, np.ndarray], samples: dict[str, np.ndarray],
    labels: np.ndarray | None = None, device: str | torch.device = "cpu",
    ref_stats: tuple[FIDStatistics, FIDStatistics] | None = None,
) -> dict[str, float]:
    """IS, FID, sFID, precision, recall (and accuracy) of sample features."""
    if ref_stats is None:
        ref_stats = (feature_statistics(ref["pool"]),
                     feature_statistics(ref["spatial"]))
    precision, recall = precision_recall(ref["pool"], samples["pool"],
                                         device=device)
    scores = {
        "inception_score": inception_score(softmax(samples["logits"])),
        "fid": frechet_distance(feature_statistics(samples["pool"]),
                                ref_stats[0]),
        "sfid": frechet_distance(feature_statistics(samples["spatial"]),
                                 ref_stats[1]),
        "precision": precision, "recall": recall,
    }
    if labels is not None:
        hits = samples["logits"].argmax(axis=1) == np.asarray(labels)
        scores["accuracy"] = float(hits.mean())
    return scores


def format_scores(scores: dict[str, float | str]) -> str:
    """The evaluator's printout, each name labelled by its features."""
    label = feature_label(str(scores["features"]))
    names = {"inception_score": "Inception Score", "fid": "FID",
             "sfid": "sFID", "precision": "Precision", "recall": "Recall"}
    return "\n".join(f"{name}{label}: {scores[key]}"
                     for key, name in names.items())

# %% [markdown]
# The experiments' real images: `num_images` in a seeded order, split
# into halves A (the reference batch) and B (a second real batch, the
# best any model could do). `adm evaluate REF SAMPLES` prints what the
# reference evaluator prints (`--json` keeps it); here, B against A:

# %%
dataset = load_dataset(data, resolution=32)
chosen = torch.randperm(len(dataset), generator=torch.Generator(
    ).manual_seed(seed))[:num_images].tolist()
images = to_uint8(dataset.images(chosen))
labels = np.array([dataset[i][1] for i in chosen])
half = num_images // 2
ref_images, real_images = images[:half], images[half:]
work = Path("build/chapter5")
work.mkdir(parents=True, exist_ok=True)
write_batch(work / "ref.npz", ref_images, labels[:half])
write_batch(work / "real.npz", real_images, labels[half:])
print(read_batch(work / "ref.npz").images.shape, images.dtype)
command = [sys.executable, "-m", "adm_lib.cli", "evaluate",
           str(work / "ref.npz"), str(work / "real.npz"),
           "--features", features, "--device", device, "--quiet",
           "--json", str(work / "real.json")]
if inception_weights:
    command += ["--weights", inception_weights]
printed = subprocess.run(command, check=True, capture_output=True,
                         text=True).stdout
print(printed)
real_scores = json.loads((work / "real.json").read_text())
assert real_scores["features"] == features
assert f"FID{feature_label(features)}:" in printed
# The experiments below compute each batch's features once and score
# them with `score_activations`.
extractor = feature_extractor(features, inception_weights or None, device)


def activations(images: np.ndarray) -> dict[str, np.ndarray]:
    """Pool, spatial and logit features of uint8 NHWC images."""
    return compute_activations(images, extractor, device=device)


def scores(images: np.ndarray, ref: dict[str, np.ndarray]) -> dict:
    """IS, FID, sFID, precision and recall of images against `ref`."""
    return score_activations(ref, activations(images), device=device)


ref_acts = activations(ref_images)
print({key: value.shape for key, value in ref_acts.items()})

# %% [markdown]
# ## 5.7 What each metric rewards and misses
#
# ### FID depends on the number of samples
#
# FID is biased: with $n$ samples the covariance estimate is noisy, and
# the noise adds to the distance, roughly as $1/n$ (Chong & Forsyth,
# 2020). Two real batches are far apart at small $n$: hence the paper's
# 50,000 samples, and never comparing FIDs at different $n$.

# %%
fids = [frechet_distance(
            feature_statistics(activations(real_images[:n])["pool"]),
            feature_statistics(ref_acts["pool"]))
        for n in sample_counts]
inverse = 1 / np.array(sample_counts)
slope, intercept = np.polyfit(inverse, fids, 1)
fig, ax = plt.subplots(figsize=(5, 3))
ax.plot(inverse, fids, "o", label="real vs real")
ax.plot([0, inverse.max()], [intercept, intercept + slope * inverse.max()],
        "--", label=f"fit: {intercept:.2f} + {slope:.0f}/n")
ax.set(xlabel="1 / n", ylabel=f"FID{feature_label(features)}")
ax.legend()
plt.show()
print(dict(zip(sample_counts, np.round(fids, 3), strict=True)))
assert fids[0] > fids[-1] and slope > 0

# %% [markdown]
# ### Precision, recall and their trade
#
# Four batches against half A: the real half B; B's digits 0 to 4 only
# (half the modes dropped); B blurred (every image worse, all modes
# present); and the samples of a small model trained here for
# `model_steps` steps with chapter 4's `train`.
#
# A finished run is a folder; `load_run` rebuilds its network from the
# configuration stored in its newest checkpoint (or a checkpoint file), with
# the weights asked for ("ema", the first EMA rate, by default; a rate such
# as "0.9999"; or "model"), for evaluation, sampling (chapter 6) or
# fine-tuning. What it returns, a `TrainedModel`, is also what the
# reference's released files load into (appendix on released checkpoints).

# %%
#| export models
"""A trained model (network, diffusion, configuration, source) from a run
folder (`load_run`) or, through `adm_lib.compat`, the reference's files."""
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from adm_lib.checkpoints import read_weights
from adm_lib.config import (
    TrainConfig,
    build_diffusion,
    build_model,
    config_from_dict,
)
from adm_lib.diffusion import GaussianDiffusion
from adm_lib.errors import TrainError


@dataclass
class TrainedModel:
    """A network with its diffusion, its configuration and its source."""

    model: nn.Module
    diffusion: GaussianDiffusion
    config: TrainConfig
    path: Path
    step: int = 0
    weights: str = "ema"  # "ema", an EMA rate, "model" or "reference"
    respacing: str = ""  # the respacing its source asks for, if any

    @property
    def kind(self) -> str:
        """"diffusion", "classifier" or "upsampler"."""
        return self.config.kind

    @property
    def image_size(self) -> int:
        """The size of the images it makes (an upsampler: its output's)."""
        return self.config.image_size

    @property
    def in_channels(self) -> int:
        """Its images' channels."""
        return self.config.in_channels

    @property
    def num_classes(self) -> int:
        """The labels it takes; 0 for an unconditional model."""
        c = self.config
        return c.num_classes if c.kind == "classifier" or c.class_cond else 0

    @property
    def null_label(self) -> int | None:
        """Classifier-free guidance's label, if it trained with one."""
        return self.config.num_classes if self.config.label_dropout else None

    @property
    def small_size(self) -> int:
        """An upsampler's input size; 0 for other kinds."""
        return self.config.small_size if self.kind == "upsampler" else 0

    @property
    def low_res_noise(self) -> int:
        """The largest step an upsampler's input was noised to in training."""
        return self.config.low_res_noise if self.kind == "upsampler" else 0

    @property
    def source(self) -> str:
        """Where it came from, for messages."""
        if self.weights == "reference":
            return f"{self.path} (reference flags)"
        return f"{self.path} (step {self.step}, {self.weights} weights)"


def load_run(path: str | os.PathLike, weights: str = "ema",
             device: str | torch.device = "cpu") -> TrainedModel:
    """A run folder's (newest checkpoint's) or checkpoint file's network."""
    path, state, chosen = read_weights(path, weights)
    try:
        config = config_from_dict(state["config"])
    except TrainError as err:
        raise TrainError(f"{path}: its config does not fit this adm_lib "
                         f"({err})") from None
    model = build_model(config)
    model.load_state_dict(chosen)
    model.to(device).eval().requires_grad_(False)
    return TrainedModel(model, build_diffusion(config), config, path,
                        state["step"], weights)

# %%
def blurred(images: np.ndarray) -> np.ndarray:
    """Images down-sampled 2x and back: every one of them worse."""
    x = F.avg_pool2d(torch.from_numpy(images).permute(0, 3, 1, 2).float(), 2)
    x = F.interpolate(x, size=images.shape[1:3], mode="bilinear")
    return x.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()


def as_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


real_labels = labels[half:]
dropped = real_images[real_labels < dataset.num_classes // 2]
shutil.rmtree(work / "model", ignore_errors=True)  # a fresh run each time
run = train(make_config("diffusion", "mnist", {
    "data": data, "steps": model_steps, "batch_size": 32,
    "image_size": 32, "in_channels": dataset.channels, "device": device,
    "sample_interval": 0, "log_interval": 10**9, "seed": seed,
    **model_settings}), work / "model", progress=False)
model = load_run(run, device=device)
spaced = respace(model.diffusion, model_sampler)
sample_labels = torch.arange(len(real_images), device=device) % max(
    dataset.num_classes, 1)
samples = torch.cat([
    ddim_sample_loop(spaced, model.model, torch.randn(
        len(chunk), dataset.channels, 32, 32, device=device),
        model_kwargs={"y": chunk})
    for chunk in sample_labels.split(250)])
write_batch(work / "samples.npz", samples, sample_labels.cpu())
sample_images = read_batch(work / "samples.npz").images
show_rows({"samples": samples[:10].cpu(),
           "blurred B": as_tensor(blurred(real_images[:10]))})
table = {"real half B": scores(real_images, ref_acts),
         "B, classes 0-4": scores(dropped, ref_acts),
         "B, blurred": scores(blurred(real_images), ref_acts),
         f"model, {model_steps} steps": scores(sample_images, ref_acts)}
label, columns = feature_label(features), "IS FID sFID precision recall"
print(f"{'batch':<18}" + "".join(f"{k + label:>20}" for k in columns.split()))
for name, row in table.items():
    print(f"{name:<18}" + "".join(f"{v:>20.3f}" for v in row.values()))
real, dropped_row, blur = (table[k] for k in list(table)[:3])
assert dropped_row["recall"] < real["recall"] - 0.1
assert dropped_row["precision"] > real["precision"] - 0.1
assert blur["precision"] < real["precision"] - 0.1
assert real["fid"] < min(dropped_row["fid"], blur["fid"])

# %% [markdown]
# Dropping half the classes costs recall and leaves precision (the remaining
# images are realistic); FID rises as the mean and covariance shift. Blurring
# costs precision: every image is off the real manifold (and, this far off,
# their balls cover few real images, so recall falls too). FID punishes both
# without saying which. The Inception Score of the dropped half falls, but
# would miss every "3" being the same "3". 5.8 trains the model longer.
#
# ### sFID sees layout
#
# Shift B's images two pixels right (wrapping around), or swap their
# quadrants diagonally. Pooled features average over positions, so the
# shift barely moves FID, while sFID sees it at once. Swapping quadrants
# destroys the digits, which the pooled features see too.

# %%
moved = {"shifted 2 pixels": np.roll(real_images, 2, axis=2),
         # rolled by half the size both ways: quadrants swapped diagonally
         "shuffled quadrants": np.roll(real_images, (16, 16), axis=(1, 2))}
growth = {}
for name, batch in moved.items():
    row = scores(batch, ref_acts)
    growth[name] = {k: row[k] / real[k] for k in ("fid", "sfid")}
    print(f"{name}: FID {row['fid']:.3f} (x{growth[name]['fid']:.1f}), "
          f"sFID {row['sfid']:.3f} (x{growth[name]['sfid']:.1f}), "
          "relative to the real half B")
shift = growth["shifted 2 pixels"]
assert shift["sfid"] > 3 * shift["fid"]
show_rows({"B": as_tensor(real_images[:8]),
           **{name: as_tensor(batch[:8]) for name, batch in moved.items()}})

# %% [markdown]
# ## 5.8 A larger run, recorded
#
# A larger run than the smoke one, on a 2-core CPU with the MNIST net's
# features (machine, day and time: [appendix M.6](appendix_measurements.html)):
#
# ```sh
# adm book run 5 -p num_images 4000 \
#     -p sample_counts "[250, 500, 1000, 2000]" -p model_steps 1500 \
#     -p model_sampler ddim25 -p model_settings "{}"
# ```
#
# FID(mnist-net) of the first $n$ of 2,000 real images against the other
# 2,000 is 0.337, 0.212, 0.140 and 0.109 at $n$ = 250, 500, 1000 and 2000.
# A line in $1/n$ fits them, about $0.08 + 65/n$: at 250 samples three
# quarters of the distance between two real batches is small-sample bias.
# The batches against the reference half A (all with the mnist net):
#
# | batch | IS | FID | sFID | precision | recall |
# | --- | --- | --- | --- | --- | --- |
# | real half B | 6.144 | 0.109 | 2.277 | 0.881 | 0.872 |
# | B, classes 0-4 | 3.733 | 12.681 | 22.936 | 0.882 | 0.445 |
# | B, blurred | 4.188 | 11.335 | 44.154 | 0.220 | 0.028 |
# | model, 1,500 steps | 1.799 | 159.379 | 274.219 | 0.018 | 0.933 |
#
# One draw of each batch (seed 0); precision and recall, shares of 1,000 to
# 2,000 images, have binomial standard errors of at most $0.5/\sqrt{1000} =
# 0.016$, far below the gaps read here. The model (chapter 4's MNIST preset,
# 1,500 steps of batch 32, 25 DDIM steps) shows a third pattern: its grainy
# samples are almost never inside the real manifold, yet spread so widely
# that their $k$-NN balls cover most real images; recall alone would call it
# excellent. Shifting B by two pixels multiplied FID by 2.9 (0.11 to 0.32,
# small beside the blurred and dropped batches' 11 to 13) and sFID by 17.6
# (2.3 to 40); swapping quadrants, by 309 and 215. The parameters cell's GPU
# run has not been made yet (no GPU, no Inception weights file).
#
# ## 5.9 Learned against fixed variance in few steps
#
# Chapter 2 derived the learned variance and the hybrid objective
# $L_\text{hybrid} = L_\text{simple} + \lambda L_\text{vlb}$ and promised what
# they are for: Nichol & Dhariwal (2021) found that a fixed variance loses
# quality quickly when sampled *ancestrally* ($x_{t-1} \sim
# \mathcal{N}(\mu_\theta, \Sigma_\theta)$ each step) with fewer steps, a
# learned one much less. (DDIM with $\eta = 0$, the paper's 25-step sampler,
# draws no noise after $x_T$: $\Sigma_\theta$ plays no part in it.) Two
# models follow `adm demo`'s recipe (chapter 4.9: the lean network, $x_0$
# prediction, learning rate $10^{-3}$, EMA 0.95, batch 32) on the same
# batches and differ in `learn_sigma`: with it the network also outputs the
# variance's interpolation $v$, trained with $L_\text{hybrid}$; without, it
# is trained with $L_\text{simple}$. Four arms:
#
# * `learned`: the first model with its own $v$;
# * `fixed_large`: the second with $\sigma_t^2 = \beta_t$, the reference's
#   default without a learned variance;
# * `fixed_small`: the second with the posterior's $\tilde\beta_t$;
# * `hybrid+small`: the first model's mean with $\tilde\beta_t$. The
#   bound's term trains only $v$ (its gradient stops at the mean, chapter
#   2), but both outputs share every layer before the last: `learned`
#   against this arm isolates the learned variance at sampling time, this
#   arm against `fixed_small` what learning it did to the mean.
#
# Each arm is sampled with chapter 2's ancestral loop respaced to each of
# `variance_respacings` and scored against half A; the models train on `data`
# less `variance_held_out` images, kept for 5.11.

# %%
import functools

from adm_lib.demo import DemoSettings, demo_configs
from adm_lib.diffusion import GaussianDiffusion
from adm_lib.evaluation import mean_se as tensor_mean_se


def exact_pixels(source, ids: list[int]) -> np.ndarray:
    """The images `ids` of a data set as its uint8 N x H x W x C pixels."""
    # Not to_uint8, whose truncation (the reference's, for samples) would
    # lower some stored grey levels by one.
    return np.stack([source.pixels(i)[0].numpy() for i in ids]
                    ).transpose(0, 2, 3, 1)


def rows_figure(rows: dict[str, np.ndarray], title: str) -> plt.Figure:
    """One labelled row per entry of uint8 N x H x W x C images."""
    columns = max(len(batch) for batch in rows.values())
    fig, axes = plt.subplots(len(rows), 1, squeeze=False,
                             figsize=(0.8 * columns + 2, 0.9 * len(rows)))
    for ax, (label, batch) in zip(axes[:, 0], rows.items(), strict=True):
        grid = pixel_grid(batch, columns)
        ax.imshow(grid[..., 0] if grid.shape[-1] == 1 else grid,
                  cmap="gray", vmin=0, vmax=255)
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
        ax.set(xticks=[], yticks=[])
    fig.suptitle(title, fontsize=9)
    return fig


def keep(fig: plt.Figure, name: str) -> None:
    """Show a figure, and save it in `figures_dir` when that is set."""
    if figures_dir:
        fig.savefig(Path(figures_dir) / name, dpi=120, bbox_inches="tight")
    plt.show()


variance_runs = Path(variance_dir)
if not reuse_runs:
    shutil.rmtree(variance_runs, ignore_errors=True)
variance_runs.mkdir(parents=True, exist_ok=True)
variance_split = torch.randperm(
    len(dataset), generator=torch.Generator().manual_seed(seed + 2))
variance_held = variance_split[:variance_held_out].tolist()
variance_train = variance_split[variance_held_out:].tolist()
variance_npz = write_batch(variance_runs / "train.npz",
                           exact_pixels(dataset, variance_train),
                           dataset.labels[variance_train])
recipe = demo_configs(DemoSettings(seed=seed), device)["diffusion"]
variance_models = {}
for name, learned in (("learned", True), ("fixed", False)):
    config = make_config("diffusion", base=recipe, overrides={
        "data": str(variance_npz), "in_channels": dataset.channels,
        "steps": variance_steps, "learn_sigma": learned,
        "sample_interval": 0, "save_interval": 10**9, "log_interval": 10,
        **variance_settings})
    start = time.perf_counter()
    folder = variance_runs / name
    train(config, folder, resume=reuse_runs and folder.exists(),
          progress=False)
    run = variance_models[name] = load_run(folder, device=device)
    print(f"{name}: {run.step} steps of batch {config.batch_size} on "
          f"{len(variance_train)} images in {time.perf_counter() - start:.0f}"
          f" s, {sum(p.numel() for p in run.model.parameters()):,} parameters")
    assert run.step == variance_steps and run.config.learn_sigma == learned
learned_run, fixed_run = variance_models["learned"], variance_models["fixed"]


def small_variance(diffusion: GaussianDiffusion) -> GaussianDiffusion:
    """The same diffusion with the fixed variance of the posterior."""
    return GaussianDiffusion(diffusion.betas, diffusion.mean_type,
                             "fixed_small", None, diffusion.lambda_vlb,
                             diffusion.dtype, diffusion.rescale_timesteps)


def mean_only(x: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
    """The learned model's mean output alone (its v dropped)."""
    return learned_run.model(x, t, **kwargs)[:, :dataset.channels]


arms = {"learned": (learned_run.model, learned_run.diffusion),
        "hybrid+small": (mean_only, small_variance(learned_run.diffusion)),
        "fixed_large": (fixed_run.model, fixed_run.diffusion),
        "fixed_small": (fixed_run.model, small_variance(fixed_run.diffusion))}
assert fixed_run.diffusion.var_type == "fixed_large"

# %% [markdown]
# **What the network learned.** At every pixel the learned model outputs $v \in
# [-1, 1]$, its log variance being $\frac{1+v}{2} \log \beta_t + \frac{1-v}{2}
# \log \tilde\beta_t$ ($v = 1$: `fixed_large`, $v = -1$: `fixed_small`). Left:
# $v$ over $t$, averaged over the pixels of 16 held-out digits noised to $x_t$
# (band: their spread). Right: the variances of the shortest respaced process,
# whose large steps set $\beta_t$ and $\tilde\beta_t$ far apart.

# %%
probe_ids = variance_held[:16] or variance_train[:16]
probe_x = dataset.images(probe_ids).to(device)
probe_y = torch.as_tensor(dataset.labels[probe_ids]).long().to(device)
probe_noise = torch.randn(probe_x.shape, generator=torch.Generator(
    ).manual_seed(seed + 3)).to(device)


@torch.no_grad()
def learned_v(diffusion: GaussianDiffusion, t: int) -> torch.Tensor:
    """Per-image mean of v at step t of `diffusion` (its own steps)."""
    steps = torch.full((len(probe_x),), t, device=device)
    x_t = diffusion.q_sample(probe_x, steps, probe_noise)
    v = learned_run.model(x_t, diffusion.model_timesteps(steps), y=probe_y)
    return v[:, dataset.channels:].float().mean(dim=(1, 2, 3)).cpu()


full = learned_run.diffusion
v_steps = np.linspace(0, full.num_timesteps - 1, 21).round().astype(int)
v_full = torch.stack([learned_v(full, int(t)) for t in v_steps])
short = respace(full, str(min(variance_respacings)))
v_short = torch.stack([learned_v(short, t)
                       for t in range(short.num_timesteps)]).mean(dim=1)
log_large, log_small = short.log_betas, short.posterior_log_variance_clipped
log_learned = ((1 + v_short.numpy()) / 2 * log_large
               + (1 - v_short.numpy()) / 2 * log_small)

fig, (ax_v, ax_s) = plt.subplots(1, 2, figsize=(9, 3.2))
mean_v, spread_v = v_full.mean(dim=1), v_full.std(dim=1)
ax_v.plot(v_steps, mean_v, marker="o", ms=3, label="mean over images")
ax_v.fill_between(v_steps, mean_v - spread_v, mean_v + spread_v,
                  alpha=0.3, label="± s.d. over images")
ax_v.axhline(1, ls="--", color="C3", lw=1, label="v = 1: fixed_large")
ax_v.axhline(-1, ls=":", color="C2", lw=1, label="v = -1: fixed_small")
ax_v.set(xlabel="timestep t (of 1,000)", ylabel="learned v (unitless)",
         title=f"v over t, after {learned_run.step} training steps")
for log_var, style, name in ((log_large, "--C3", "fixed_large"),
                             (log_small, ":C2", "fixed_small"),
                             (log_learned, "o-C0", "learned (mean v)")):
    ax_s.semilogy(np.arange(short.num_timesteps), np.exp(log_var), style,
                  label=name)
ax_s.set(xlabel=f"step t of the {short.num_timesteps}-step process",
         ylabel="variance (images scaled to [-1, 1])",
         title=f"{short.num_timesteps} respaced steps")
for ax in (ax_v, ax_s):
    ax.legend(fontsize=7)
fig.tight_layout()
keep(fig, "05_learned_v.png")
print("mean v at t = " + ", ".join(
    f"{t}: {v:+.2f}" for t, v in zip(v_steps[::5], mean_v[::5].tolist(),
                                     strict=True)))
print(f"{short.num_timesteps} steps: learned variance / fixed_small "
      + " ".join(f"{r:.2f}" for r in np.exp(log_learned - log_small)))
assert torch.isfinite(v_full).all()
assert np.all(log_small <= log_large + 1e-9)

# %% [markdown]
# **Seeded noise, shared by the arms.** For sampling seed $k$ a generator
# seeded with $k$ draws $x_T$ and every step's noise, the same for every arm,
# so their differences are paired; the labels are $0, 1, \dots, 9, 0, \dots$.
# The models are trained once: the error bars are sampling error only.
#
# Each batch is scored by `score_activations` against half A (accuracy by the
# features' own classifier): the mean over seeds $\pm$ its standard error. The
# row `real`, as many other real images of half B per seed, is the floor of
# FID's small-sample bias at this $n$. Then the paired differences, with their
# standard errors and ratio (a gap is claimed below only beyond 2).

# %%
variance_labels = torch.arange(variance_samples, device=device) % max(
    dataset.num_classes, 1)


@torch.no_grad()
def few_step_samples(model, diffusion: GaussianDiffusion, steps: int,
                     sample_seed: int) -> np.ndarray:
    """Ancestral samples with `steps` respaced steps, uint8 NHWC."""
    spaced = respace(diffusion, str(steps))
    noise_fn = functools.partial(  # float32 noise, whatever the loop's dtype
        torch.randn_like, dtype=torch.float32,
        generator=torch.Generator(device).manual_seed(sample_seed))
    return to_uint8(torch.cat([  # in chunks of 500 images, for memory
        p_sample_loop(spaced, model, noise_fn(torch.empty(
            len(chunk), dataset.channels, 32, 32, device=device)),
            noise_fn=noise_fn, model_kwargs={"y": chunk})
        for chunk in variance_labels.split(500)]))


few = {}  # (arm, steps, seed): samples
for arm, (net, diffusion) in arms.items():
    start = time.perf_counter()
    few.update({(arm, steps, k): few_step_samples(net, diffusion, steps, k)
                for steps in variance_respacings for k in variance_seeds})
    print(f"{arm}: {len(variance_respacings) * len(variance_seeds)} batches"
          f" of {variance_samples} in {time.perf_counter() - start:.0f} s")
assert few["learned", variance_respacings[0], variance_seeds[0]].shape == (
    variance_samples, 32, 32, dataset.channels)


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (nan for a single value)."""
    return tensor_mean_se(torch.as_tensor(np.asarray(values, np.float64)))


with_labels = (variance_labels.cpu().numpy() if features != "inception"
               else None)
few_scores = {key: score_activations(ref_acts, activations(images),
                                     with_labels, device)
              for key, images in few.items()}
by_seed = {(arm, steps): [few_scores[arm, steps, k] for k in variance_seeds]
           for arm in arms for steps in variance_respacings}
for i in range(len(variance_seeds)):
    part = slice(i * variance_samples, (i + 1) * variance_samples)
    if part.stop <= len(real_images):  # enough of half B left
        by_seed.setdefault(("real", 0), []).append(score_activations(
            ref_acts, activations(real_images[part]),
            real_labels[part] if with_labels is not None else None, device))
metric_names = ["fid", "precision", "recall", "inception_score"] + (
    ["accuracy"] if with_labels is not None else [])
few_summary = {key: {m: mean_se([row[m] for row in rows])
                     for m in metric_names} for key, rows in by_seed.items()}
print(f"mean ± s.e. over seeds {variance_seeds}, {variance_samples} "
      f"samples each, features {features}")
print(f"{'arm, steps':<17}" + "".join(f"{m[:9]:>18}" for m in metric_names))
for (arm, steps), row in few_summary.items():
    print(f"{f'{arm}, {steps}' if steps else arm:<17}" + "".join(
        f"{m:>10.3f} ± {e:<5.3f}" for m, e in row.values()))
assert all(np.isfinite(row["fid"]) for row in few_scores.values())
for steps in variance_respacings:
    for a, b in [("learned", "fixed_large"), ("learned", "fixed_small"),
                 ("fixed_small", "fixed_large"), ("learned", "hybrid+small")]:
        for m in ["fid"] + (["accuracy"] if with_labels is not None else []):
            gap, se = mean_se(
                [few_scores[a, steps, k][m] - few_scores[b, steps, k][m]
                 for k in variance_seeds])
            print(f"{steps:>3} steps, {m:<8} {a} - {b}: {gap:+8.3f} ± "
                  f"{se:.3f} ({abs(gap) / se if se > 0 else np.inf:.1f} s.e.)")
fig, axes = plt.subplots(1, len(metric_names),
                         figsize=(3.2 * len(metric_names), 3))
for ax, metric in zip(axes, metric_names, strict=True):
    for arm in arms:
        means, errors = zip(*(few_summary[arm, steps][metric]
                              for steps in variance_respacings), strict=True)
        ax.errorbar(variance_respacings, means, yerr=errors, marker="o",
                    capsize=3, label=arm)
    if ("real", 0) in few_summary:
        ax.axhline(few_summary["real", 0][metric][0], color="gray", ls="--",
                   lw=1, label="real digits")
    unit = {"accuracy": " (share)", "fid": feature_label(features)}
    ax.set(title=metric.replace("_", " ") + unit.get(metric, ""),
           xlabel="ancestral sampling steps", xscale="log")
    ax.set_xticks(variance_respacings, [str(n) for n in variance_respacings])
    ax.minorticks_off()  # the log axis would label 6, 7, 8, 9 as well
axes[0].legend(fontsize=7)
fig.suptitle(f"{variance_steps} training steps, {variance_samples} "
             f"samples: mean ± s.e. over {len(variance_seeds)} seeds")
fig.tight_layout()
keep(fig, "05_few_steps.png")
# The samples: seed 0's first ten (the digits 0 to 9), the same noise in
# every row.
shown = min(10, variance_samples)
sample_rows = {f"{arm}, {steps}": few[arm, steps, variance_seeds[0]][:shown]
               for steps in variance_respacings for arm in arms}
keep(rows_figure(sample_rows, "ancestral samples, seed 0 (row: arm, "
                 "sampling steps)"), "05_few_step_samples.png")
assert all(len(batch) == shown for batch in sample_rows.values())

# %% [markdown]
# **A recorded run**, on a 2-core CPU in float32 (its machine, day and
# times: [appendix M.6](appendix_measurements.html)):
#
# ```sh
# adm book run 5 -p variance_steps 350 -p variance_held_out 500 \
#     -p variance_respacings "[5, 10]" -p variance_samples 150 \
#     -p variance_seeds "[0, 1, 2]" \
#     -p variance_dir build/chapter5_record/variance \
#     -p figures_dir chapters/figures -p reuse_runs True
# ```
#
# Each model is the demo's lean network (878,434 parameters with the learned
# variance's channel, 878,145 without), trained 350 steps of batch 32 on 4,500
# of MNIST-5k's digits (the demo's float32 budget); the learned one came from
# an earlier run of the same settings, which this run loaded.
#
# ![The learned v over t; the 5-step variances](figures/05_learned_v.png)
#
# **The learned $v$ left its range.** After 350 steps $v$ is about +6.2 to +6.5
# at every $t$ (the 16 digits' spread is smaller than the line), far outside
# $[-1, 1]$: the log variance is extrapolated beyond $\log \beta_t$. With 1,000
# steps this costs little, as $\beta_t$ and $\tilde\beta_t$ nearly agree except
# at the first few steps (which is also why the bound hardly constrains $v$); a
# respaced process's large steps make them differ by orders of magnitude: at
# step 1 of 5 the extrapolated variance is $6.5 \times 10^{12}$ times
# $\tilde\beta_t$. Ancestral sampling with it destroys the samples:
#
# | arm, steps | FID | precision | recall | IS | accuracy, % |
# | --- | --- | --- | --- | --- | --- |
# | learned, 5 | 101.1±0.1 | .000±.000 | .000±.000 | 1.20±.01 | 8.9±0.9 |
# | learned, 10 | 98.4±0.3 | .000±.000 | .000±.000 | 1.43±.03 | 10.4±1.2 |
# | hybrid+small, 5 | 30.0±0.5 | .284±.023 | .066±.008 | 1.60±.01 | 10.7±0.8 |
# | hybrid+small, 10 | 25.5±0.6 | .293±.007 | .130±.039 | 1.72±.03 | 13.6±0.6 |
# | fixed_large, 5 | 3.97±0.18 | .560±.030 | .730±.006 | 3.36±.11 | 76.2±1.6 |
# | fixed_large, 10 | 3.49±0.18 | .524±.019 | .799±.028 | 3.30±.02 | 70.2±2.1 |
# | fixed_small, 5 | 3.80±0.05 | .569±.039 | .776±.019 | 3.34±.06 | 76.4±1.9 |
# | fixed_small, 10 | 3.47±0.17 | .520±.010 | .822±.032 | 3.26±.03 | 73.6±1.2 |
# | real | 1.19±0.18 | .896±.010 | .841±.012 | 6.00±.08 | 99.8±0.2 |
#
# Mean $\pm$ standard error over the three seeds, against half A's 1,000
# images (mnist-net features, 128 dimensions; accuracy by chance 10%);
# `real`: three sets of 150 real digits of half B. Paired over the seeds:
#
# * **The learned variance, as trained here, ruins ancestral sampling.**
#   `learned` minus `hybrid+small` (the same mean): +71.1 ± 0.6 FID at 5
#   steps and +72.9 ± 0.4 at 10; its samples are blank or grey (below).
# * **Learning it also damaged the mean.** `hybrid+small` against
#   `fixed_small`: each gap in FID and accuracy is tens of standard
#   errors. The bound's term reaches the shared layers through $v$, and
#   with $v$ far out of range that term is large and noisy.
# * **The two fixed variances do about equally.** `fixed_small` minus
#   `fixed_large`: $-0.17 \pm 0.15$ FID at 5 steps (1.1 s.e.: no difference
#   claimed) and $-0.025 \pm 0.011$ at 10 (2.3 s.e., a hundredth of the FID);
#   accuracy $+0.2 \pm 2.3$ and $+3.3 \pm 2.1$ points (none claimed). Both
#   sample digits, three in four in the class asked for.
#
# ![Scores against sampling steps](figures/05_few_steps.png)
#
# ![Samples of each arm](figures/05_few_step_samples.png)
#
# Not shown: the spread between training runs; the paper's finding is
# about models trained 100,000 steps and more at a tenth of this learning
# rate. The parameters cell's GPU run has not been made yet.
#
# ## 5.10 The architecture ablations, trained and measured
#
# Chapter 3 (3.11) wrote the paper's architecture ablations as switches:
# `ABLATIONS` maps each variant to a few `UNetModel` options on top of a Ho
# et al.-like baseline. The paper trained every variant on ImageNet $128
# \times 128$ and compared FID after 700K and 1.2M iterations. Small, that is
# one run of chapter 4's loop per variant, differing only in the network:
# the same seed (batches, timesteps, noise), the `mnist` preset's diffusion
# (cosine schedule, $\epsilon$ prediction, `learned_range` variance, hybrid
# loss), class conditioning. Two comparisons per run:
#
# * **equal steps**: after `ablation_steps` updates: what does each change buy
#   per update?
# * **equal time**: after as many updates as `ablation_seconds` buy at the
#   variant's own speed (timed on its first `ablation_timing_steps`). A
#   change that makes steps slower must pay for them; this is why the
#   paper kept two blocks per resolution and went wider instead.
#
# Exact resume (appendix R.4) trains no step twice: a run goes to the smaller
# step count, then resumes to the larger. The judge is chapter 2's estimate of
# the bound in bits/dim, with its $\epsilon$ error, of the EMA weights on the
# held-out images (`evaluation.bound_terms`, as `adm evaluate --nll`): one
# stratified $t$ and noise per image, drawn from the seed alone, so the same
# for every variant, and a *difference* from the baseline has a much smaller
# standard error than a bound. Not FID, because of cost: it needs thousands of
# samples per variant, each a sampling chain, before its bias and noise (5.7)
# fall below Table 1's differences; the bound needs one forward pass per image.
# A better bound is not the same claim as a better FID; the FID of a few
# samples at the end is a glance.
#
# The data: `ablation_eval_images` held-out images, drawn with the seed, and
# the training images (`ablation_train_images`, 0 for all), each in an `.npz`.
# A variant overrides the `mnist` preset by chapter 3's rules for the width
# (multiples of 32, the group norm's groups), the levels (down to $8 \times 8$)
# and the attention resolutions (in pixels), so `build_model` gives it exactly
# the parameters of chapter 3's `ablation_unet`.

# %%
import math
import re
from typing import Any

from adm_lib.checkpoints import read_metrics
from adm_lib.config import TrainConfig, build_model
from adm_lib.evaluation import bound_terms
from adm_lib.unet import ABLATION_BASELINE, ABLATIONS, ablation_unet

source = load_dataset(ablation_data, resolution=32)
assert source.num_classes, "the ablations are class-conditional"
split = torch.randperm(len(source),
                       generator=torch.Generator().manual_seed(seed))
held_out = split[:ablation_eval_images].tolist()
train_ids = split[ablation_eval_images:][:ablation_train_images or None]
ablation_runs = work / "ablations"
shutil.rmtree(ablation_runs, ignore_errors=True)  # fresh runs each time
ablation_runs.mkdir(parents=True)
train_npz, held_npz = (
    write_batch(ablation_runs / f"{name}.npz", exact_pixels(source, ids),
                source.labels[ids])
    for name, ids in (("train", train_ids.tolist()), ("held", held_out)))


def ablation_config(variant: str, steps: int) -> TrainConfig:
    """The run of a variant (its ABLATIONS entry), trained to `steps`."""
    options = {**ABLATION_BASELINE, **ABLATIONS[variant]}
    levels = int(math.log2(source.resolution // 8)) + 1  # down to 8 x 8
    width = round(options["width"] * ablation_channels / 32)
    return make_config("diffusion", "mnist", {
        "data": str(train_npz), "image_size": source.resolution,
        "in_channels": source.channels, "num_classes": source.num_classes,
        "batch_size": ablation_batch_size, "lr": ablation_lr, "steps": steps,
        "device": device, "seed": seed,
        # A checkpoint only where a run stops, no grids, and only the newest
        # checkpoint kept: each arm is evaluated before the run goes on.
        "save_interval": 10**9, "sample_interval": 0, "keep_checkpoints": 1,
        "num_channels": 32 * max(1, width),
        "channel_mult": ",".join(["1"] + ["2"] * (levels - 1)),
        "attention_resolutions": ",".join(map(str, options["attention_at"])),
        **{name: options[name] for name in (
            "num_res_blocks", "num_heads", "num_head_channels",
            "resblock_updown", "use_scale_shift_norm", "rescale_residual")},
    })


for variant in ABLATIONS:
    with torch.device("meta"):  # shapes only: counting is instant
        built = build_model(ablation_config(variant, 1))
        expected = ablation_unet(variant, source.resolution,
                                 ablation_channels, source.num_classes,
                                 source.channels)
    assert (sum(p.numel() for p in built.parameters())
            == sum(p.numel() for p in expected.parameters())), variant
sample_noise = torch.randn(
    ablation_samples, source.channels, source.resolution, source.resolution,
    generator=torch.Generator().manual_seed(seed + 1)).to(device)
sample_y = torch.arange(ablation_samples, device=device) % source.num_classes


def train_seconds(out: Path, steps: int) -> float:
    """Seconds the run's loop spent on its first `steps` steps."""
    # Each record of the metrics log covers the steps since the one before
    # at `steps_per_s`: the loop's clock, which leaves out checkpoints and
    # grids, and sees a GPU's work (every step copies its losses to the CPU).
    seconds, done = 0.0, 0
    for record in read_metrics(out):
        if "steps_per_s" in record and record["step"] <= steps:
            seconds += (record["step"] - done) / record["steps_per_s"]
            done = record["step"]
    assert done == steps, f"{out}: metrics end at {done}, not {steps}"
    return seconds


def train_variant(variant: str) -> dict[str, Any]:
    """Train a variant to both arms, resuming; evaluate each."""
    out = ablation_runs / re.sub("[^a-z0-9]+", "-", variant.lower()).strip("-")
    probe = min(ablation_timing_steps, ablation_steps)
    train(ablation_config(variant, probe), out, progress=False)
    step_s = train_seconds(out, probe) / probe
    arms = {"equal steps": ablation_steps,
            "equal time": max(probe, round(ablation_seconds / step_s))}
    row: dict[str, Any] = {}
    for steps in sorted(set(arms.values())):
        if steps > probe:  # resume: the steps before are not trained again
            train(ablation_config(variant, steps), out, resume=True,
                  progress=False)
        run = load_run(out, device=device)  # the newest checkpoint, `steps`
        scores = {"steps": steps, "seconds": train_seconds(out, steps),
                  **bound_terms(run, held_npz, seed=seed, device=device,
                                batch_size=ablation_batch_size)}
        row.update({arm: scores for arm, at in arms.items() if at == steps})
        if steps == ablation_steps:
            row["samples"] = ddim_sample_loop(
                respace(run.diffusion, ablation_sample_steps), run.model,
                sample_noise, model_kwargs={"y": sample_y}).cpu()
    row["parameters"] = sum(p.numel() for p in run.model.parameters())
    # Evaluated: its checkpoint (weights, EMA and AdamW) is not needed again.
    shutil.rmtree(out / "checkpoints")
    return row


# %% [markdown]
# All variants in turn, each arm evaluated when its run reaches it, and
# `ablation_samples` images drawn from the equal-steps weights. Per arm: the
# VLB $\pm$ its standard error, and its difference from the baseline $\pm$ the
# paired standard error (negative is better), which the bars show. Then the
# samples, a row per variant with the same noise and classes in every row, and
# their FID against half A when `ablation_data` is `data`. Of 4 samples (the
# smoke run's), that FID is a glance: its bias alone (5.8's $65/n$: 16) is as
# large as the spread of sets this small. The bound is the measurement.

# %%
start = time.perf_counter()
results = {variant: train_variant(variant) for variant in ABLATIONS}
print(f"{len(results)} variants in {(time.perf_counter() - start) / 60:.1f}"
      f" min on {device}: {ablation_data}, {len(train_ids)} training images, "
      f"batch {ablation_batch_size}, base width {ablation_channels}; VLB on "
      f"{len(held_out)} held-out (image, t) pairs")
vlb_diffs = {arm: {variant: mean_se(row[arm]["vlb"]
                                    - results["baseline"][arm]["vlb"])
                   for variant, row in results.items()}
             for arm in ("equal steps", "equal time")}
fig, ax = plt.subplots(figsize=(9, 3.5))
for k, (arm, diffs) in enumerate(vlb_diffs.items()):
    print(f"\n{arm}:")
    print(f"{'variant':<29}{'params':>10}{'steps':>7}{'ms/step':>8}"
          f"{'eps MSE':>9}{'VLB bits/dim':>15}{'vs baseline':>15}")
    for variant, row in results.items():
        r, (diff, diff_se) = row[arm], diffs[variant]
        vlb, se = mean_se(r["vlb"])
        print(f"{variant:<29}{row['parameters']:>10,}{r['steps']:>7}"
              f"{1000 * r['seconds'] / r['steps']:>8.1f}"
              f"{r['mse'].mean():>9.4f} {vlb:7.3f} ±{se:5.3f} "
              f"{diff:+7.3f} ±{diff_se:5.3f}")
    means, errors = zip(*diffs.values(), strict=True)
    ax.bar([i + 0.4 * k for i in range(len(diffs))], means, width=0.4,
           yerr=errors, label=arm)
ax.axhline(0, color="black", lw=0.8)
ax.set_xticks([i + 0.2 for i in range(len(results))], list(results),
              rotation=30, ha="right")
ax.set(ylabel="VLB - baseline (bits/dim)",
       title=f"ablations on {ablation_data}")
ax.legend()
plt.tight_layout()
plt.show()
assert list(results) == list(ABLATIONS)
assert all(row["equal steps"]["steps"] == ablation_steps
           and row["samples"].shape == sample_noise.shape and all(
    torch.isfinite(row[arm][key]).all() for arm in vlb_diffs
    for key in ("mse", "vlb")) for row in results.values())
show_rows({variant: row["samples"] for variant, row in results.items()})
if ablation_data == data:
    ref_statistics = feature_statistics(ref_acts["pool"])
    ablation_fid = {variant: frechet_distance(feature_statistics(
        activations(to_uint8(row["samples"]))["pool"]), ref_statistics)
        for variant, row in results.items()}
    print(f"FID{feature_label(features)} of {ablation_samples} samples "
          f"(equal steps) against half A's {len(ref_images)} images:")
    for variant, fid in ablation_fid.items():
        print(f"{variant:<29}{fid:9.2f}")
    assert all(np.isfinite(fid) for fid in ablation_fid.values())
else:
    print(f"no FID: ablation_data {ablation_data!r} is not data {data!r}, "
          "whose features and reference half it would need")

# %% [markdown]
# The smoke numbers say nothing about the architectures. The one run at CPU
# scale (appendix M.4, made by an earlier version of the book with its own
# loop: 100 steps of batch 16 on 5,000 CIFAR-10 images) left every model at
# the start of training: at equal steps the bounds differed from the
# baseline's by a few hundredths of a bit per dimension, neither confirming
# nor refuting the paper. At equal time, attention at $32 \times 32$ cost 2.5
# times the baseline's time per step: the variants that use it (and ADM)
# reached 42 and 41 steps to its 107 and fell behind by $0.9 \pm 0.2$
# bits/dim. M.4's GPU run has not been made yet.
#
# ## 5.11 Do the samples copy their training images?
#
# Every metric here would also reward a model that returns its training images:
# they are real. Whether samples are new is a separate question, cheap to ask
# on MNIST-5k: for each sample of 5.9's best arm (lowest mean FID), the
# distance to the nearest training image, in pixels (grey levels in $[0, 1]$)
# and in the data-net's pooled features; for the `variance_held_out` real
# images the models never saw, how close a *new* digit comes. A copying model
# puts its samples much closer, many near 0; a generalising one, as far or
# farther.

# %%
held_pixels = exact_pixels(dataset, variance_held)
train_pixels = read_batch(variance_npz).images
best_arm, best_steps = min(
    ((arm, steps) for arm, steps in few_summary if arm != "real"),
    key=lambda key: few_summary[key]["fid"][0])
generated = np.concatenate([few[best_arm, best_steps, k]
                            for k in variance_seeds])


def nearest(queries: np.ndarray, keys: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray]:
    """Each query's Euclidean distance to its nearest key, and its index."""
    d = pairwise_distances(torch.as_tensor(queries, dtype=torch.float32),
                           torch.as_tensor(keys, dtype=torch.float32))
    best = d.min(dim=1)
    return best.values.sqrt().numpy(), best.indices.numpy()


def flat(pixels: np.ndarray) -> np.ndarray:
    return pixels.reshape(len(pixels), -1) / 255.0


print(f"{len(generated)} samples ({best_arm}, {best_steps} steps, seeds "
      f"{variance_seeds}) and {len(held_pixels)} held-out digits against "
      f"{len(train_pixels)} training digits: distance to the nearest")
copies = {}  # space: {"samples", "held-out"}: (distances, indices)
fig, axes = plt.subplots(1, 2, figsize=(9, 3))
for ax, (space, embed) in zip(axes, (
        ("pixels", flat), ("features", lambda p: activations(p)["pool"])),
        strict=True):
    keys = embed(train_pixels)
    sets = copies[space] = {"samples": nearest(embed(generated), keys),
                            "held-out": nearest(embed(held_pixels), keys)}
    (mean_g, se_g), (mean_h, se_h) = (mean_se(d) for d, _ in sets.values())
    below = (sets["samples"][0] < np.quantile(sets["held-out"][0], .01)).mean()
    print(f"{space:<9} samples {mean_g:7.3f} ± {se_g:.3f} (median "
          f"{np.median(sets['samples'][0]):.3f}), held-out {mean_h:7.3f} ± "
          f"{se_h:.3f} (median {np.median(sets['held-out'][0]):.3f}); "
          f"difference {mean_g - mean_h:+.3f} ± "
          f"{np.hypot(se_g, se_h):.3f}; samples below the held-out's 1% "
          f"quantile: {below:.1%} ± "
          f"{np.sqrt(below * (1 - below) / len(generated)):.1%}")
    edges = np.histogram_bin_edges(np.concatenate(
        [d for d, _ in sets.values()]), bins=30)
    for s, (distances, _) in sets.items():
        ax.hist(distances, bins=edges, density=True, alpha=0.5,
                label=f"{s} (n = {len(distances)})")
    ax.set(xlabel="distance to the nearest training image",
           ylabel="density (per unit distance)",
           title="in pixels (grey levels scaled to [0, 1])" if space ==
           "pixels" else f"in {features}-net pooled features")
    ax.legend(fontsize=7)
fig.tight_layout()
keep(fig, "05_nearest.png")
assert all(np.isfinite(sets[s][0]).all() for sets in copies.values()
           for s in sets)

distances, indices = copies["pixels"]["samples"]
closest = np.argsort(distances)[:8]
chosen_at_random = np.random.default_rng(seed).choice(
    len(generated), size=min(8, len(generated)), replace=False)
pair_rows = {f"{name}: {kind}": batch
             for name, picks in (("closest", closest),
                                 ("random", chosen_at_random))
             for kind, batch in (("sample", generated[picks]),
                                 ("training", train_pixels[indices[picks]]))}
keep(rows_figure(pair_rows, "samples above their nearest training images "
                 "(pixel distance)"), "05_nearest_pairs.png")
assert np.allclose(distances[closest], np.sqrt(((
    flat(generated[closest]) - flat(train_pixels[indices[closest]])) ** 2
).sum(axis=1)), atol=1e-3)

# %% [markdown]
# **The recorded run** (the command of 5.9) compared 450 samples of the best
# arm (`fixed_small`, 10 steps, seeds 0 to 2) and the 500 held-out digits
# with the 4,500 training digits (mean $\pm$ standard error over the images;
# the difference's, of independent sets, is the root of the sum of squares):
#
# | nearest training image | samples | held-out digits | difference |
# | --- | --- | --- | --- |
# | in pixels, mean | 5.78±0.06 | 4.89±0.06 | +0.89±0.08 |
# | in pixels, median | 6.04 | 4.99 | |
# | in mnist-net features, mean | 2.11±0.04 | 1.20±0.02 | +0.91±0.04 |
# | in mnist-net features, median | 2.12 | 1.14 | |
#
# ![Nearest-neighbour distances](figures/05_nearest.png)
#
# ![Samples above their nearest training images](figures/05_nearest_pairs.png)
#
# No sample is a copy: none lies closer to the training set than the
# closest 1% of held-out digits (0 of 450, in pixels and in features),
# and on average the samples lie *farther* from it than new real digits,
# by about 11 standard errors in pixels and 22 in features. The closest
# pairs are 1s, the simplest strokes, which held-out 1s match as closely.
# Farther than real digits is the other failure, which 5.9's FID,
# precision and accuracy already showed. A larger model trained longer
# could move the other way; the check is cheap enough to repeat.
#
# ## Summary
#
# * Every metric compares a pretrained classifier's features: Inception's
#   `pool_3` (FID, precision, recall), `mixed_6/conv` (sFID), logits (IS).
# * FID sees fidelity and diversity together, through two moments, biased
#   upwards at small $n$: compare FIDs only at equal $n$. sFID keeps the
#   layout pooling averages away; IS never looks at real images.
# * Precision and recall separate fidelity from coverage: dropping modes
#   costs recall, degrading every image precision (chapter 6's trade).
#   `adm evaluate REF.npz SAMPLES.npz` prints all five as the evaluator does.
# * At work: claim only the gaps the seeds' errors allow (5.9), compare
#   architectures at equal steps and time by a held-out bound (5.10), and
#   check samples for copies against held-out real images (5.11).
#
# ## Exercises
#
# 1. Show that for one-dimensional features FID is $(\mu_a - \mu_b)^2 +
#    (\sigma_a - \sigma_b)^2$; check it with `frechet_distance`. In $d$
#    dimensions, when is the trace term zero?
# 2. For $n$ and $m$ features from the same $\mathcal{N}(0, I_d)$, show
#    that $\mathbb{E} \lVert \hat\mu_a - \hat\mu_b \rVert^2 = d\,(1/n +
#    1/m)$. Simulate FID at $d = 8$; compare its slope in $1/n$ with $d$.
# 3. Show that $\log \text{IS} = H(p(y)) - \mathbb{E}_x H(p(y \mid x))$,
#    so that $1 \le \text{IS} \le C$ for $C$ classes. Check it on
#    `rng.dirichlet` probabilities.
# 4. Predict how 5.5's precision and recall move for $k$ = 1, 3 and 10.
# 5. Add `kernel_distance`, KID (Bińkowski et al., 2018): the unbiased
#    squared MMD with the kernel $k(u, v) = (u \cdot v / d + 1)^3$. Do two
#    real batches still seem apart at small $n$, as with FID in 5.7?
# 6. Add "B, noisy" to 5.7's table: Gaussian noise of 16 grey levels,
#    rounded and clipped. Does it cost precision, recall or both?
# 7. Predict how 5.9's four arms differ with a single ancestral step
#    (`few_step_samples(net, diffusion, 1, 0)`), then check.
# 8. In 5.11, keep only the first 1,000 training images as keys. How do
#    the held-out digits' distances move, and what does it mean for
#    comparing samples with them?

# %% [markdown] jupyter={"source_hidden": true} tags=["solution"]
# **Solution 1.** In one dimension the trace term is $\sigma_a^2 +
# \sigma_b^2 - 2 \sigma_a \sigma_b = (\sigma_a - \sigma_b)^2$. In $d$
# dimensions it is the squared Bures distance of the covariances, zero
# exactly when $\Sigma_a = \Sigma_b$.

# %% jupyter={"source_hidden": true} tags=["solution"]
one_d = frechet_distance(FIDStatistics(np.array([1.0]), np.array([[4.0]])),
                         FIDStatistics(np.array([3.0]), np.array([[9.0]])))
spread = np.diag([1.0, 4.0, 9.0])
equal = frechet_distance(FIDStatistics(np.zeros(3), spread),
                         FIDStatistics(np.ones(3), spread))
print(f"(1 - 3)^2 + (2 - 3)^2 = 5: {one_d:.6f}; equal covariances: "
      f"{equal:.6f} (|mu_a - mu_b|^2 = 3)")
assert abs(one_d - 5) < 1e-9 and abs(equal - 3) < 1e-8

# %% [markdown] jupyter={"source_hidden": true} tags=["solution"]
# **Solution 2.** $\hat\mu_a$ and $\hat\mu_b$ are independent, with component
# variances $1/n$ and $1/m$: the sum is $d\,(1/n + 1/m)$. Below, the reference
# is exact ($m \to \infty$), so the mean term's slope is $d = 8$. FID's is
# larger: with $\hat\Sigma = I + E$ the trace term is about
# $\operatorname{tr}(E^2)/4$, of expectation $d(d+1)/(4n)$, a slope of about
# $d + d(d+1)/4 = 26$ in all. Growing as $d^2$, it is why FID in 2,048
# dimensions needs thousands of samples.

# %% jupyter={"source_hidden": true} tags=["solution"]
dims, sizes = 8, np.array([100, 200, 400, 800])
exact = FIDStatistics(np.zeros(dims), np.eye(dims))
sim = np.random.default_rng(seed + 5)
draws = [[feature_statistics(sim.normal(size=(n, dims))) for _ in range(200)]
         for n in sizes]
means = np.array([[(d.mu @ d.mu, frechet_distance(d, exact)) for d in at_n]
                  for at_n in draws]).mean(axis=1)  # per n: mean term, FID
mean_slope, fid_slope = np.polyfit(1 / sizes, means, 1)[0]
print(f"slope in 1/n: mean term {mean_slope:.1f} (d = {dims}), FID "
      f"{fid_slope:.1f} (d + d(d+1)/4 = {dims + dims * (dims + 1) / 4:.0f})")
# Tolerances: the mean term is a chi-square with d degrees of freedom
# over n (relative s.d. 0.5 a draw, 0.035 over 200): 10% is about 3 s.e.
assert abs(mean_slope - dims) < 0.1 * dims
assert abs(fid_slope - 26) < 0.15 * 26

# %% [markdown] jupyter={"source_hidden": true} tags=["solution"]
# **Solution 3.** $\log \text{IS} = \mathbb{E}_x \sum_y p(y \mid x) \log p(y
# \mid x) - \mathbb{E}_x \sum_y p(y \mid x) \log p(y) = -\mathbb{E}_x H(p(y
# \mid x)) + H(p(y))$, as $\mathbb{E}_x p(y \mid x) = p(y)$: the mutual
# information, $\ge 0$ and $\le \log C$. Small Dirichlet concentrations give
# nearly one-hot rows (IS near $C$), large ones nearly uniform rows (near 1).

# %% jupyter={"source_hidden": true} tags=["solution"]
for concentration in (0.01, 0.1, 1.0, 10.0, 100.0):
    probs = sim.dirichlet(np.full(classes, concentration), size=5000)
    probs = np.clip(probs, 1e-300, None)  # no log(0) for tiny draws
    score, marginal = inception_score(probs), probs.mean(axis=0)
    information = ((probs * np.log(probs)).sum(axis=1).mean()  # H(y) - H(y|x)
                   - (marginal * np.log(marginal)).sum())
    print(f"concentration {concentration:>6}: IS {score:.3f}")
    assert 1 - 1e-9 <= score <= classes + 1e-9
    assert abs(np.log(score) - information) < 1e-6

# %% [markdown] jupyter={"source_hidden": true} tags=["solution"]
# **Solution 4.** Both rise (or stay): a radius, the distance to the
# $k$-th neighbour, only grows with $k$, and so do the unions of balls
# and the shares inside them. "Right half" gains recall slowly (balls on
# the cut reach a little left), "twice as wide" gains precision. Large $k$
# flatters both: the definition fixes $k = 3$.

# %% jupyter={"source_hidden": true} tags=["solution"]
by_k = {k: {name: precision_recall(disk_real, fake, k=k)
            for name, fake in fakes.items()} for k in (1, 3, 10)}
for k, row in by_k.items():
    print(f"k = {k:>2}: " + "; ".join(f"{name} P {p:.3f} R {r:.3f}"
                                      for name, (p, r) in row.items()))
for name in fakes:  # precision and recall never fall as k grows
    assert np.all(np.diff([by_k[k][name] for k in by_k], axis=0) >= 0), name

# %% [markdown] jupyter={"source_hidden": true} tags=["solution"]
# **Solution 5.** Leaving out each set's diagonal $k(u, u)$ terms makes
# the estimate's expectation the population MMD, 0 for two real batches
# at every $n$ (noisier at small $n$, possibly negative). Below, disjoint
# sets of 100 images of B against A: KID near 0, FID clearly above.

# %% jupyter={"source_hidden": true} tags=["solution"]
def kernel_distance(a: np.ndarray, b: np.ndarray) -> float:
    """KID: the unbiased squared MMD with the kernel (u.v / d + 1)^3."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    k_aa, k_bb, k_ab = ((x @ y.T / a.shape[1] + 1) ** 3
                        for x, y in ((a, a), (b, b), (a, b)))
    return float((k_aa.sum() - np.trace(k_aa)) / (len(a) * (len(a) - 1))
                 + (k_bb.sum() - np.trace(k_bb)) / (len(b) * (len(b) - 1))
                 - 2 * k_ab.mean())


real_pool = activations(real_images)["pool"]
parts = [real_pool[i:i + 100] for i in range(0, len(real_pool) - 99, 100)]
(kid_mean, kid_se), (fid_mean, fid_se) = (mean_se(values) for values in (
    [kernel_distance(part, ref_acts["pool"]) for part in parts],
    [frechet_distance(feature_statistics(part),
                      feature_statistics(ref_acts["pool"]))
     for part in parts]))
print(f"{len(parts)} sets of 100 real images: KID {kid_mean:+.5f} ± "
      f"{kid_se:.5f}, FID {fid_mean:.3f} ± {fid_se:.3f}")
assert abs(kid_mean) < 3 * kid_se and fid_mean > 10 * fid_se

# %% [markdown] jupyter={"source_hidden": true} tags=["solution"]
# **Solution 6.** Both, like blurring: noise on every pixel, background
# included, moves every image off the real manifold (precision), and the
# noisy images form a cluster whose small balls miss most real images
# (recall). In the smoke configuration (mnist-net features, 1,000 images
# a batch) precision fell from 0.88 to 0.31 and recall from 0.86 to 0.10,
# over ten binomial standard errors (at most 0.016); FID rose from 0.4 to
# 5.6, less than blurring's 12.1.

# %% jupyter={"source_hidden": true} tags=["solution"]
noise = np.random.default_rng(seed + 6).normal(0, 16, real_images.shape)
noisy = np.clip(np.round(real_images + noise), 0, 255).astype(np.uint8)
noisy_row = scores(noisy, ref_acts)
for name, row in (("real half B", real), ("B, blurred", blur),
                  ("B, noisy", noisy_row)):
    print(f"{name:<12}" + "".join(f"  {k} {v:.3f}" for k, v in row.items()))
assert noisy_row["fid"] > real["fid"] and all(
    noisy_row[k] < real[k] - 0.1 for k in ("precision", "recall"))

# %% [markdown] jupyter={"source_hidden": true} tags=["solution"]
# **Solution 7.** Arms that share a mean give identical images: `learned`
# and `hybrid+small`, `fixed_large` and `fixed_small`. A one-step process
# has only $t = 0$, where the ancestral loop returns the mean (chapter
# 2): the variance is never used. (All are poor: the networks read pure
# noise as the almost clean image of $t = 0$.) The variance acts only
# through the noise of earlier steps: with two or more, the arms part.

# %% jupyter={"source_hidden": true} tags=["solution"]
one_step = {arm: few_step_samples(net, diffusion, 1, 0)
            for arm, (net, diffusion) in arms.items()}
print({arm: images.shape for arm, images in one_step.items()})
assert np.array_equal(one_step["learned"], one_step["hybrid+small"])
assert np.array_equal(one_step["fixed_large"], one_step["fixed_small"])

# %% [markdown] jupyter={"source_hidden": true} tags=["solution"]
# **Solution 8.** They grow (or stay), as a sample's would: compare
# samples with held-out images against the same keys, as 5.11 does; a
# distance threshold set at one training-set size says little at another.

# %% jupyter={"source_hidden": true} tags=["solution"]
held_all = copies["pixels"]["held-out"][0]  # against all the keys
held_fewer, _ = nearest(flat(held_pixels), flat(train_pixels[:1000]))
print(f"held-out, mean distance to the nearest of {len(train_pixels)} "
      f"training images: {held_all.mean():.3f}; of 1,000: "
      f"{held_fewer.mean():.3f}")
assert np.all(held_fewer >= held_all - 1e-4)
