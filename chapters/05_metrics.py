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
# 256x256", and, for the fidelity-diversity trade-off of guidance, precision
# and recall. Each number compares a batch of samples with a batch of real
# images through the features of a pretrained network, and each rewards
# something different and misses something else. This chapter defines them
# as the reference's evaluator (`evaluations/evaluator.py`) defines them,
# equal to its numbers, and exports them as `adm_lib.metrics` and the
# `adm evaluate` command:
#
# * 5.1 the features: Inception-v3's, and offline stand-ins;
# * 5.2 FID and 5.3 sFID: distances between Gaussians fitted to features;
# * 5.4 the Inception Score: confident and varied class predictions;
# * 5.5 precision and recall: fidelity and coverage, separately;
# * 5.6 batches on disk and `adm evaluate`;
# * 5.7 experiments that show what each metric rewards and misses, and
#   5.8 a larger run of them;
# * 5.9 the metrics at work: learned against fixed variances, sampled
#   ancestrally in few steps;
# * 5.10 chapter 3's architecture ablations, trained with chapter 4's loop
#   and judged by a held-out bound (the paper judged them by FID);
# * 5.11 whether samples copy their training images: nearest neighbours.

# %% tags=["parameters"]
# Smoke configuration: a couple of minutes on a CPU, with the MNIST
# classifier's features. The full GPU run, with Inception's weights, is
#   adm book run 5 -p device cuda -p features inception \
#       -p inception_weights PATH -p data ../shared/data/cifar10/train.zip \
#       -p sample_counts "[500, 1000, 2000, 5000, 10000]" \
#       -p num_images 20000 -p model_steps 20000 -p model_sampler ddim25 \
#       -p model_settings "{}" -p variance_steps 20000 \
#       -p variance_held_out 1000 -p variance_samples 5000 \
#       -p variance_respacings "[10, 25, 50, 100]" \
#       -p variance_seeds "[0, 1, 2]" -p variance_dir build/chapter5_cifar10
# and the recorded CPU run of 5.9 and 5.11 (5.8 has its own) is
#   adm book run 5 -p variance_steps 350 -p variance_held_out 500 \
#       -p variance_respacings "[5, 10]" -p variance_samples 150 \
#       -p variance_seeds "[0, 1, 2]" \
#       -p variance_dir build/chapter5_record/variance \
#       -p figures_dir chapters/figures
# (5.10's ablations at CPU and GPU scale: the commands of appendix M.4.)
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
# 5.9: models with learned and fixed variances, sampled in few steps,
# made with `adm demo`'s recipe (chapter 4.9); 5.11 checks the samples
# for copies
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
# Pixels are a poor space to compare images in: a digit shifted by one
# pixel is far from itself. Every metric here instead compares the
# activations of a classifier trained on real images. The reference
# evaluator feeds uint8 images to the TensorFlow Inception-v3 graph of
# 2015 (the one FID was defined with), which resizes them to 299x299, and
# reads three things:
#
# * `pool_3`, the 2048 features after the final average pooling: FID,
#   precision and recall;
# * `mixed_6/conv`, the first convolution of the block `Mixed_6d`, 17x17
#   by 192 channels, of which it keeps the first 7 channels (2,023
#   numbers, flattened in NHWC order): spatial FID;
# * the class logits (1008 classes, without the bias) whose softmax is the
#   Inception Score's $p(y \mid x)$.
#
# `adm_lib.inception` rebuilds that network in PyTorch as torch-fidelity
# does, with the same resize and normalisation, from a local weights
# file: an explicit path, else `ADM_INCEPTION_WEIGHTS`, else the torch hub
# cache. Nothing is downloaded. For offline use, for this book's own
# experiments and for its tests there are also small classifiers trained
# on MNIST-5k and CIFAR-10 (`adm_lib.datanets`, weights shipped in the
# package) with the same three outputs. Their numbers are labelled with
# the network, FID(mnist-net), and are never comparable with Inception
# FIDs.

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
# It rewards samples whose features have the data's mean and spread, so
# it sees both quality and diversity at once, but only through the first
# two moments. As the reference does, the statistics are computed in
# float64 with `np.cov` (ddof 1), and the matrix square root with
# `scipy.linalg.sqrtm`; when the product is nearly singular the root is
# not finite, and $10^{-6} I$ is added to both covariances.

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
    return FIDStatistics(features.mean(axis=0),
                         np.cov(features, rowvar=False))


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
    """The Frechet distance of two Gaussians, as the reference computes it.

    |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)). When the root of a
    nearly singular product is not finite, eps * I is added to both
    covariances; an imaginary diagonal above 1e-3 is an error.
    """
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

# %% [markdown]
# Two checks against the formula: for Gaussians with equal covariance the
# distance is the squared distance of the means; and a batch against
# itself is at distance 0.

# %%
rng = np.random.default_rng(seed)
points = rng.normal(size=(4000, 8))
shift = np.array([1.0, 2.0] + [0.0] * 6)
same = frechet_distance(feature_statistics(points),
                        feature_statistics(points))
moved = frechet_distance(feature_statistics(points),
                         feature_statistics(points + shift))
print(f"itself: {same:.2e}; shifted by (1, 2): {moved:.4f}")
assert abs(same) < 1e-8 and abs(moved - 5.0) < 1e-8

# %% [markdown]
# ## 5.3 sFID
#
# Average pooling throws away where things are: `pool_3` barely changes
# when an image's parts are moved around. The paper therefore also reports
# sFID (Nash et al., 2021), the same Fréchet distance on the spatial
# features of `mixed_6/conv`, which keep a 17x17 layout. It is
# `frechet_distance` applied to the "spatial" features; 5.7 shows it
# catching what FID misses.
#
# ## 5.4 The Inception Score
#
# The Inception Score (Salimans et al., 2016) asks the classifier about
# the samples alone: each sample should be classified confidently (a
# peaked $p(y \mid x)$), and the samples together should cover many
# classes (a flat marginal $p(y)$):
#
# $$\text{IS} = \exp\Big(\mathbb{E}_x\, \mathrm{KL}\big(p(y \mid x)
# \,\Vert\, p(y)\big)\Big).$$
#
# It never looks at real images, so it cannot see samples that are
# confidently classified but unrealistic, nor diversity within a class.
# The evaluator splits the samples into consecutive groups of 5,000 (no
# shuffling), estimates $p(y)$ within each, and reports the mean of the
# groups' scores.

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

# %% [markdown]
# With $C$ classes, confident predictions spread evenly over all of them
# score $C$, and confident predictions of one class score 1:

# %%
classes = 10
confident = np.full((1000, classes), 1e-9)
confident[np.arange(1000), np.arange(1000) % classes] = 1
one_class = np.eye(classes)[np.zeros(1000, dtype=int)] + 1e-9
spread, collapsed = inception_score(confident), inception_score(one_class)
print(f"even over {classes} classes: {spread:.3f}; one class: "
      f"{collapsed:.3f}")
assert abs(spread - classes) < 1e-3 and abs(collapsed - 1) < 1e-3

# %% [markdown]
# ## 5.5 Precision and recall
#
# FID mixes two failures into one number: samples that are unrealistic
# (low fidelity) and real images that no sample resembles (low coverage).
# Improved precision and recall (Kynkäänniemi et al., 2019) measure them
# apart. Around each real feature vector put a ball whose radius is the
# distance to its $k$-th nearest real neighbour ($k = 3$); their union
# estimates the manifold of real images. **Precision** is the share of
# samples inside it; **recall** is the converse, the share of real images
# inside the balls around the samples. The paper uses them to show that
# guidance buys precision with recall.
#
# Distances are squared Euclidean, computed as
# $\lVert u \rVert^2 - 2 u \cdot v + \lVert v \rVert^2$ in IEEE float32 (never
# TF32, which a GPU training run may have switched on), and a
# point on a ball's surface is inside. With 50,000 samples against 10,000
# references the distance matrix would take 2 GB, so it is computed in
# blocks, keeping for each row only the $k + 1$ smallest distances seen;
# the same code runs on a GPU by passing `device`.

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
    """Each point's squared distance to its k-th nearest other point.

    Sorted, a row's distances start with the point itself (0), so the
    radius is entry k. Rows and columns go in blocks, keeping the k + 1
    smallest distances so far: memory is block x block whatever N is.
    """
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

# %% [markdown]
# `precision_recall` computes both sets of radii, then walks the blocks of
# the reference-by-sample distance matrix once: a sample is inside when it
# is within some reference point's radius, a reference point when it is
# within some sample's.

# %%
#| export
def precision_recall(ref: np.ndarray | Tensor, samples: np.ndarray | Tensor,
                     k: int = 3, block: int = 10000,
                     device: str | torch.device = "cpu"
                     ) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al., 2019).

    Precision: the share of samples inside some reference point's ball
    (radius: its k-th neighbour distance); recall: the share of reference
    points inside some sample's ball. Inside means <=.
    """
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

# %% [markdown]
# A picture in two dimensions: real points fill a disk; one batch of
# "samples" covers only its right half (faithful but incomplete), another
# is the whole disk spread twice as wide (complete but partly fake).

# %%
def disk(n: int, radius: float = 1.0) -> np.ndarray:
    angle = rng.uniform(0, 2 * np.pi, n)
    r = radius * np.sqrt(rng.uniform(0, 1, n))
    return np.stack([r * np.cos(angle), r * np.sin(angle)], axis=1)


real = disk(2000)
half = disk(4000)
half = half[half[:, 0] > 0][:2000]
wide = disk(2000, radius=2.0)
scores = {"right half": precision_recall(real, half),
          "twice as wide": precision_recall(real, wide)}
fig, axes = plt.subplots(1, 2, figsize=(6.5, 3))
for ax, (name, fake) in zip(axes, [("right half", half),
                                   ("twice as wide", wide)], strict=True):
    ax.scatter(*real.T, s=1, label="real")
    ax.scatter(*fake.T, s=1, label="samples")
    p, r = scores[name]
    ax.set(title=f"{name}: P {p:.2f}, R {r:.2f}", aspect="equal")
axes[0].legend(markerscale=8, fontsize=7)
plt.show()
assert scores["right half"][0] > 0.95 and scores["right half"][1] < 0.6
assert scores["twice as wide"][0] < 0.4 and scores["twice as wide"][1] > 0.95

# %% [markdown]
# ### The pipeline in one picture
#
# All five numbers come out of one pass of both batches through the
# feature network; they differ only in which features they read and what
# they fit to them.

# %% jupyter={"source_hidden": true}
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

boxes = {  # name: (x centre, y centre, text, colour)
    "samples": (0.9, 3.0, "samples\nn generated images", "#dbe9f6"),
    "refs": (0.9, 1.2, "references\nm real images", "#dbe9f6"),
    "net": (3.3, 2.1, "feature network\nInception-v3\n(or a data-net)",
            "#fde2c8"),
    "pool": (5.8, 3.4, "pooled features\npool_3, 2048 per image",
             "#e8e8e8"),
    "spatial": (5.8, 2.1, "spatial features\nmixed_6/conv, 2023",
                "#e8e8e8"),
    "logits": (5.8, 0.8, "class logits\n" r"$p(y\,|\,x)$", "#e8e8e8"),
    "knn": (8.4, 4.0, "k-NN balls, k = 3\nradius: 3rd neighbour",
            "#e3f1dc"),
    "gauss": (8.4, 2.75, "Gaussian fits\n" r"$\mu, \Sigma$ of each set",
              "#e3f1dc"),
    "marginal": (8.4, 0.8, "samples only:\n" r"marginal $p(y)$",
                 "#e3f1dc"),
    "pr": (11.0, 4.0, "precision: samples in\nreal balls; recall:\n"
           "real in sample balls", "#f6dbe4"),
    "fid": (11.0, 2.75, "FID (pooled)\nsFID (spatial):\nFréchet distance",
            "#f6dbe4"),
    "is": (11.0, 0.8, "Inception Score\n"
           r"$\exp\,E_x\,KL(p(y|x)\,\|\,p(y))$", "#f6dbe4"),
}
arrows = [("samples", "net"), ("refs", "net"), ("net", "pool"),
          ("net", "spatial"), ("net", "logits"), ("pool", "knn"),
          ("pool", "gauss"), ("spatial", "gauss"), ("logits", "marginal"),
          ("knn", "pr"), ("gauss", "fid"), ("marginal", "is")]
width, height = 2.1, 0.95
fig, ax = plt.subplots(figsize=(10, 4.2))
extents = {}
for name, (x, y, text, colour) in boxes.items():
    ax.add_patch(FancyBboxPatch((x - width / 2, y - height / 2), width,
                                height, boxstyle="round,pad=0.05",
                                facecolor=colour, edgecolor="black",
                                lw=0.8))
    ax.text(x, y, text, ha="center", va="center", fontsize=7.5)
    extents[name] = (x - width / 2, x + width / 2, y - height / 2,
                     y + height / 2)
for a, b in arrows:
    (xa, ya), (xb, yb) = boxes[a][:2], boxes[b][:2]
    ax.add_patch(FancyArrowPatch(
        (xa + width / 2 + 0.05, ya), (xb - width / 2 - 0.05, yb),
        arrowstyle="-|>", mutation_scale=10, lw=0.9, color="black"))
for x, label in ((0.9, "inputs: uint8 images"), (3.3, "one forward pass"),
                 (5.8, "features"), (8.4, "fitted to the features"),
                 (11.0, "numbers")):
    ax.text(x, 4.85, label, ha="center", fontsize=8, style="italic")
ax.set(xlim=(-0.3, 12.2), ylim=(0.1, 5.1))
ax.axis("off")
ax.set_title("How FID, sFID, IS, precision and recall are computed",
             fontsize=10)
plt.show()
# Checkable: no two boxes overlap, and every arrow runs left to right
# between two boxes that exist.
names = list(extents)
for i, a in enumerate(names):
    for b in names[i + 1:]:
        (l1, r1, d1, u1), (l2, r2, d2, u2) = extents[a], extents[b]
        assert r1 <= l2 or r2 <= l1 or u1 <= d2 or u2 <= d1, (a, b)
assert all(boxes[a][0] < boxes[b][0] for a, b in arrows)

# %% [markdown]
# ## 5.6 Batches and `adm evaluate`
#
# The reference stores a batch of images as an `.npz` file whose `arr_0`
# is uint8 N x H x W x C (plus `arr_1`, the labels, for samples of a
# class-conditional model), and its published reference batches add the
# Inception statistics `mu`, `sigma`, `mu_s` and `sigma_s`, used as given.
# A sampler's output in $[-1, 1]$ is converted to uint8 exactly as the
# reference's sampling scripts do it (`viz.to_uint8`). A file that is not
# such a batch (empty, cut short, not an `.npz`) is refused with its name
# before any work. A grey batch against a colour one is scored, as the
# features take both, but with a warning: it is more often a mistake.

# %%
#| export
def write_batch(path: str | os.PathLike, images: np.ndarray | Tensor,
                labels: np.ndarray | Tensor | None = None) -> Path:
    """Save images as the reference's batch: arr_0 uint8 NHWC (+ arr_1).

    A float tensor N x C x H x W in [-1, 1] (a sampler's output) is
    converted as the reference converts it; uint8 arrays are kept.
    """
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

# %%
#| export
def evaluate(ref: str | os.PathLike | Batch,
             samples: str | os.PathLike | Batch,
             features: str = "inception",
             weights: str | os.PathLike | None = None,
             batch_size: int = 64, device: str | torch.device = "cpu",
             progress: bool = False) -> dict[str, float | str]:
    """Inception Score, FID, sFID, precision and recall of a sample batch.

    What the reference's evaluator computes. A reference batch's own mu,
    sigma, mu_s and sigma_s are used as given when the features are
    Inception's (they were made with Inception).
    """
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

# %% [markdown]
# The scores themselves come from the two batches' features. Chapter 6
# and the demo call this part directly, on features they have already
# computed, and add the accuracy of the samples against the labels they
# were drawn for.

# %%
#| export
def score_activations(
    ref: dict[str, np.ndarray], samples: dict[str, np.ndarray],
    labels: np.ndarray | None = None, device: str | torch.device = "cpu",
    ref_stats: tuple[FIDStatistics, FIDStatistics] | None = None,
) -> dict[str, float]:
    """IS, FID, sFID, precision, recall (and accuracy) of sample features.

    `ref` and `samples` are `compute_activations` outputs; `ref_stats`
    (pool, spatial) replace the reference's own statistics when given.
    With `labels`, accuracy is the share whose top logit is their label.
    """
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
        "precision": precision,
        "recall": recall,
    }
    if labels is not None:
        hits = samples["logits"].argmax(axis=1) == np.asarray(labels)
        scores["accuracy"] = float(hits.mean())
    return scores

# %% [markdown]
# And the evaluator's printout:

# %%
#| export
def format_scores(scores: dict[str, float | str]) -> str:
    """The evaluator's printout, each name labelled by its features."""
    label = feature_label(str(scores["features"]))
    names = {"inception_score": "Inception Score", "fid": "FID",
             "sfid": "sFID", "precision": "Precision", "recall": "Recall"}
    return "\n".join(f"{name}{label}: {scores[key]}"
                     for key, name in names.items())

# %% [markdown]
# The real images for the experiments: `num_images` of them in a seeded
# order, split into halves A (the reference batch) and B (a second real
# batch, the best any model could do).

# %%
dataset = load_dataset(data, resolution=32)
order = torch.randperm(len(dataset),
                       generator=torch.Generator().manual_seed(seed))
chosen = order[:num_images].tolist()
images = to_uint8(dataset.images(chosen))
labels = np.array([dataset[i][1] for i in chosen])
half = num_images // 2
ref_images, real_images = images[:half], images[half:]
work = Path("build/chapter5")
work.mkdir(parents=True, exist_ok=True)
write_batch(work / "ref.npz", ref_images, labels[:half])
write_batch(work / "real.npz", real_images, labels[half:])
print(read_batch(work / "ref.npz").images.shape, images.dtype)

# %% [markdown]
# `adm evaluate REF SAMPLES` prints what the reference evaluator prints,
# and `--json` keeps it; here it scores the two real halves against each
# other, which is as good as any model can score at this sample size:

# %%
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

# %% [markdown]
# ## 5.7 What each metric rewards and misses
#
# The experiments below compute features once per batch and then score
# them with the functions above; `activations` caches them.

# %%
extractor = feature_extractor(features, inception_weights or None, device)


def activations(images: np.ndarray) -> dict[str, np.ndarray]:
    """Pool, spatial and logit features of uint8 NHWC images."""
    return compute_activations(images, extractor, device=device)


def scores(images: np.ndarray, ref: dict[str, np.ndarray]) -> dict:
    """IS, FID, sFID, precision and recall of images against `ref`."""
    acts = activations(images)
    precision, recall = precision_recall(ref["pool"], acts["pool"],
                                         device=device)
    return {
        "IS": inception_score(softmax(acts["logits"])),
        "FID": frechet_distance(feature_statistics(acts["pool"]),
                                feature_statistics(ref["pool"])),
        "sFID": frechet_distance(feature_statistics(acts["spatial"]),
                                 feature_statistics(ref["spatial"])),
        "precision": precision, "recall": recall,
    }


ref_acts = activations(ref_images)
print({key: value.shape for key, value in ref_acts.items()})

# %% [markdown]
# ### FID depends on the number of samples
#
# FID is a biased estimate: with $n$ samples the covariance estimate is
# noisy, and the noise adds to the distance, roughly in proportion to
# $1/n$ (Chong & Forsyth, 2020). Two real batches, which should be at
# distance 0, are far apart at small $n$. This is why the paper always
# uses 50,000 samples, and why FIDs at different $n$ must not be compared.

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
# Now four batches against the reference half A: the real half B; B with
# only the digits (classes) 0 to 4, a dropped half of the modes; B
# blurred, every image worse but all modes present; and the samples of a
# small diffusion model trained here for `model_steps` steps with
# `adm_lib.train` (chapter 4).

# %%
def blurred(images: np.ndarray) -> np.ndarray:
    """Images down-sampled 2x and back: every one of them worse."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    small = F.avg_pool2d(x, 2)
    x = F.interpolate(small, size=images.shape[1:3], mode="bilinear")
    return x.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()


real_labels = labels[half:]
dropped = real_images[real_labels < dataset.num_classes // 2]

# %%
shutil.rmtree(work / "model", ignore_errors=True)  # a fresh run each time
run = train(make_config("diffusion", "mnist", {
    "data": data, "steps": model_steps, "batch_size": 32,
    "image_size": 32, "in_channels": dataset.channels, "device": device,
    "sample_interval": 0, "log_interval": 10**9, "seed": seed,
    **model_settings,
}), work / "model", progress=False)
model = load_run(run, device=device)
spaced = respace(model.diffusion, model_sampler)
sample_labels = torch.arange(len(real_images), device=device) % max(
    dataset.num_classes, 1)
with torch.no_grad():
    samples = torch.cat([
        ddim_sample_loop(spaced, model.model, torch.randn(
            len(chunk), dataset.channels, 32, 32, device=device),
            model_kwargs={"y": chunk})
        for chunk in sample_labels.split(250)])
write_batch(work / "samples.npz", samples, sample_labels.cpu())
sample_images = read_batch(work / "samples.npz").images
show_rows({"samples": samples[:10].cpu(),
           "blurred B": torch.from_numpy(blurred(real_images[:10]))
           .permute(0, 3, 1, 2).float() / 127.5 - 1})

# %%
table = {"real half B": scores(real_images, ref_acts),
         "B, classes 0-4": scores(dropped, ref_acts),
         "B, blurred": scores(blurred(real_images), ref_acts),
         f"model, {model_steps} steps": scores(sample_images, ref_acts)}
label = feature_label(features)
print(f"{'batch':<18}" + "".join(f"{k + label:>22}" for k in
                                  table["real half B"]))
for name, row in table.items():
    print(f"{name:<18}" + "".join(f"{v:>22.3f}" for v in row.values()))
real, dropped_row, blur = (table[k] for k in list(table)[:3])
assert dropped_row["recall"] < real["recall"] - 0.1
assert dropped_row["precision"] > real["precision"] - 0.1
assert blur["precision"] < real["precision"] - 0.1
assert real["FID"] < min(dropped_row["FID"], blur["FID"])

# %% [markdown]
# Dropping half the classes costs recall and leaves precision: the
# remaining images are perfectly realistic, and FID rises because the
# mean and covariance shift. Blurring costs precision: every image is now
# off the real manifold (and, this far off, their balls cover few real
# images, so recall falls too). FID punishes both, without saying which.
# The Inception Score of the dropped half falls, since its marginal
# covers fewer classes, but it would not notice if every "3" were the
# same 3. The briefly trained model's samples are far from everything
# in the smoke configuration; the recorded run below trains it longer.
#
# ### sFID sees layout
#
# Rearrange the real images of B in space: once by shifting them two
# pixels to the right (wrapping around), once by swapping their quadrants
# diagonally. The pooled features average over positions, so the shift
# barely moves FID, while sFID, whose features keep the layout, sees it
# at once. Swapping quadrants destroys the digits, which the pooled
# features see too: both distances explode.

# %%
def shuffled(images: np.ndarray) -> np.ndarray:
    """Images whose four quadrants are swapped diagonally."""
    h, w = images.shape[1] // 2, images.shape[2] // 2
    out = images.copy()
    out[:, :h, :w], out[:, h:, w:] = images[:, h:, w:], images[:, :h, :w]
    out[:, :h, w:], out[:, h:, :w] = images[:, h:, :w], images[:, :h, w:]
    return out


def as_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


moved = {"shifted 2 pixels": np.roll(real_images, 2, axis=2),
         "shuffled quadrants": shuffled(real_images)}
growth = {}
for name, batch in moved.items():
    row = scores(batch, ref_acts)
    growth[name] = {k: row[k] / real[k] for k in ("FID", "sFID")}
    print(f"{name}: FID {row['FID']:.3f} (x{growth[name]['FID']:.1f}), "
          f"sFID {row['sFID']:.3f} (x{growth[name]['sFID']:.1f}), "
          "relative to the real half B")
shift = growth["shifted 2 pixels"]
assert shift["sFID"] > 3 * shift["FID"]
show_rows({"B": as_tensor(real_images[:8]),
           **{name: as_tensor(batch[:8]) for name, batch in moved.items()}})

# %% [markdown]
# ## 5.8 A larger run, recorded
#
# The smoke configuration uses 2,000 images and a model trained for
# seconds. A larger run on a 2-core CPU, with the MNIST net's features
# (its machine, day and time: [appendix M.6](appendix_measurements.html)):
#
# ```sh
# adm book run 5 -p num_images 4000 \
#     -p sample_counts "[250, 500, 1000, 2000]" -p model_steps 1500 \
#     -p model_sampler ddim25 -p model_settings "{}"
# ```
#
# FID(mnist-net) of 2,000 real images against the other 2,000, with the
# first $n$ of them:
#
# | n | 250 | 500 | 1000 | 2000 |
# | --- | --- | --- | --- | --- |
# | FID(mnist-net) | 0.337 | 0.212 | 0.140 | 0.109 |
#
# A line in $1/n$ fits them, about $0.08 + 65/n$: at 250 samples three
# quarters of the distance between two real batches is small-sample bias.
#
# The batches against the reference half A (all with the mnist net):
#
# | batch | IS | FID | sFID | precision | recall |
# | --- | --- | --- | --- | --- | --- |
# | real half B | 6.144 | 0.109 | 2.277 | 0.881 | 0.872 |
# | B, classes 0-4 | 3.733 | 12.681 | 22.936 | 0.882 | 0.445 |
# | B, blurred | 4.188 | 11.335 | 44.154 | 0.220 | 0.028 |
# | model, 1,500 steps | 1.799 | 159.379 | 274.219 | 0.018 | 0.933 |
#
# The table is one draw of each batch (seed 0). Precision and recall are
# shares of 1,000 to 2,000 images, whose binomial standard error is at
# most $0.5/\sqrt{1000} = 0.016$; the gaps read here are many times
# that. Dropping half the classes halves recall and leaves precision
# where it was (0.882 against 0.881, well within that error); blurring
# does the opposite to precision. The model (chapter 4's
# MNIST preset after 1,500 steps of batch 32, sampled with 25 DDIM steps)
# shows a third pattern: its samples are still grainy, so almost none is
# inside the real manifold (precision 0.018), yet recall is 0.933: the
# samples are spread so widely that their $k$-NN balls are large and
# cover most real images. Recall alone would call this model excellent;
# precision and FID say otherwise. Shifting B by two pixels multiplied
# FID by 2.9 (from 0.11 to 0.32, small beside the 11 to 13 of the blurred
# and the dropped batches) and sFID by 17.6 (from 2.3 to 40); swapping
# quadrants multiplied them by 309 and 215, since it destroys the digits.
#
# The full run, on a GPU with Inception's features on CIFAR-10, is
#
# ```sh
# adm book run 5 -p device cuda -p features inception \
#     -p inception_weights PATH -p data ../shared/data/cifar10/train.zip \
#     -p sample_counts "[500, 1000, 2000, 5000, 10000]" \
#     -p num_images 20000 -p model_steps 20000 -p model_sampler ddim25 \
#     -p model_settings "{}"
# ```
#
# and has not been made yet (no GPU, and no Inception weights file, was
# available): its numbers belong here.

# %% [markdown]
# ## 5.9 Learned against fixed variance in few steps
#
# Chapter 2 derived the learned variance and the hybrid objective
# $L_\text{hybrid} = L_\text{simple} + \lambda L_\text{vlb}$ and promised
# what they are for: Nichol & Dhariwal (2021) found that a model with a
# fixed variance loses quality quickly when it is sampled *ancestrally*
# with fewer steps, while one with a learned variance keeps most of it.
# The claim is about ancestral sampling, where every step draws
# $x_{t-1} \sim \mathcal{N}(\mu_\theta, \Sigma_\theta)$. DDIM with
# $\eta = 0$, the sampler of the paper's 25-step results (Table 5's
# "25 steps" rows, `ddim25` here), draws no noise after $x_T$ and uses
# only the predicted $x_0$: $\Sigma_\theta$ plays no part in it, so
# those results owe nothing to the learned variance. It matters for the
# paper's ancestral samples (250 steps, or fewer), and that is what this
# section measures, with this chapter's metrics and two models trained
# by chapter 4's `train`.
#
# Two models follow `adm demo`'s recipe (chapter 4.9: the lean network,
# $x_0$ prediction, learning rate $10^{-3}$, EMA 0.95, batch 32), which
# makes digits in minutes on a CPU, from the same data and seed, on the
# same batches. They differ in one field, `learn_sigma`. With it the
# network also outputs the variance's interpolation $v$ and is trained
# with $L_\text{hybrid}$; without it the network outputs only the mean's
# prediction, is trained with $L_\text{simple}$, and can be sampled with
# either fixed variance. Four arms:
#
# * `learned`: the first model with its own $v$;
# * `fixed_large`: the second with $\sigma_t^2 = \beta_t$, the
#   reference's default for a model without a learned variance;
# * `fixed_small`: the second with the posterior's $\tilde\beta_t$;
# * `hybrid+small`: the first model's mean with $\tilde\beta_t$. The
#   bound's term of $L_\text{hybrid}$ trains only $v$ (its gradient stops
#   at the mean, chapter 2), but the two outputs share every layer
#   before the last; this arm separates what the learned variance does
#   at sampling time (`learned` against it: the same mean) from what
#   learning it did to the mean (it against `fixed_small`).
#
# For a respaced process both fixed variances are those of its own,
# shorter schedule. The arms are sampled with chapter 2's ancestral loop,
# respaced to each count of `variance_respacings`, and scored against
# the reference half A of 5.6. Both models train on `data` less
# `variance_held_out` images, which 5.11 needs: it asks whether the
# samples copy their training images, against real images the models
# never saw.

# %%
from adm_lib.demo import DemoSettings, demo_configs
from adm_lib.diffusion import GaussianDiffusion


def exact_pixels(source, ids: list[int]) -> np.ndarray:
    """The images `ids` of a data set as its uint8 N x H x W x C pixels."""
    # Rounded: to_uint8 truncates, as the reference does for samples, and
    # would lower some stored grey levels by one.
    pixels = source.images(ids).add(1).mul(127.5).round().byte()
    return pixels.permute(0, 2, 3, 1).numpy()


def rows_figure(rows: dict[str, np.ndarray], title: str) -> plt.Figure:
    """One labelled row per entry of uint8 N x H x W x C images."""
    columns = max(len(batch) for batch in rows.values())
    fig, axes = plt.subplots(len(rows), 1, squeeze=False,
                             figsize=(0.8 * columns + 2, 0.9 * len(rows)))
    for ax, (label, batch) in zip(axes[:, 0], rows.items(), strict=True):
        grid = pixel_grid(batch, columns)
        ax.imshow(grid[..., 0] if grid.shape[-1] == 1 else grid,
                  cmap="gray", vmin=0, vmax=255)
        ax.set_ylabel(label, rotation=0, ha="right", va="center",
                      fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    return fig


def keep(fig: plt.Figure, name: str) -> None:
    """Show a figure, and save it in `figures_dir` when that is set."""
    if figures_dir:
        fig.savefig(Path(figures_dir) / name, dpi=120, bbox_inches="tight")
    plt.show()


variance_runs = Path(variance_dir)
if variance_runs.exists() and not reuse_runs:
    shutil.rmtree(variance_runs)
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
    print(f"{name:<8} variance: {run.step} steps of batch "
          f"{config.batch_size} on {len(variance_train)} images, "
          f"{sum(p.numel() for p in run.model.parameters()):,} parameters,"
          f" {time.perf_counter() - start:.0f} s")
    assert run.step == variance_steps and run.config.learn_sigma == learned
learned_run, fixed_run = variance_models["learned"], variance_models["fixed"]
channels = dataset.channels


def with_variance(diffusion: GaussianDiffusion,
                  var_type: str) -> GaussianDiffusion:
    """The same diffusion with a fixed variance."""
    return GaussianDiffusion(diffusion.betas, diffusion.mean_type, var_type,
                             None, diffusion.lambda_vlb, diffusion.dtype,
                             diffusion.rescale_timesteps)


def mean_only(x: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
    """The learned model's mean output alone (its v dropped)."""
    return learned_run.model(x, t, **kwargs)[:, :channels]


arms = {"learned": (learned_run.model, learned_run.diffusion),
        "hybrid+small": (mean_only, with_variance(learned_run.diffusion,
                                                  "fixed_small")),
        "fixed_large": (fixed_run.model, fixed_run.diffusion),
        "fixed_small": (fixed_run.model, with_variance(fixed_run.diffusion,
                                                       "fixed_small"))}
assert fixed_run.diffusion.var_type == "fixed_large"

# %% [markdown]
# **What the network learned.** The learned model outputs, at every
# pixel, $v \in [-1, 1]$, and its log variance is the interpolation
# $\frac{1+v}{2} \log \beta_t + \frac{1-v}{2} \log \tilde\beta_t$:
# $v = 1$ is `fixed_large`, $v = -1$ `fixed_small`. The left panel shows
# $v$ over $t$, averaged over the pixels of 16 held-out digits noised to
# $x_t$ (the band: the spread over those images). The right panel shows
# what it means for the shortest respaced process, whose steps are large:
# its $\beta_t$ and $\tilde\beta_t$ differ far more than those of the
# 1,000-step process, and the learned $\sigma_t^2$ lies between them.

# %%
probe_ids = variance_held[:16] or variance_train[:16]
probe_x = dataset.images(probe_ids).to(device)
probe_y = torch.as_tensor(dataset.labels[probe_ids]).long().to(device)
probe_g = torch.Generator().manual_seed(seed + 3)
probe_noise = torch.randn(probe_x.shape, generator=probe_g).to(device)


@torch.no_grad()
def learned_v(diffusion: GaussianDiffusion, t: int) -> torch.Tensor:
    """Per-image mean of v at step t of `diffusion` (its own steps)."""
    steps = torch.full((len(probe_x),), t, device=device)
    x_t = diffusion.q_sample(probe_x, steps, probe_noise)
    out = learned_run.model(x_t, diffusion.model_timesteps(steps),
                            y=probe_y)
    return out[:, channels:].float().mean(dim=(1, 2, 3)).cpu()


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
ax_v.legend(fontsize=7)
short_t = np.arange(short.num_timesteps)
ax_s.semilogy(short_t, np.exp(log_large), "--", color="C3",
              label="fixed_large")
ax_s.semilogy(short_t, np.exp(log_small), ":", color="C2",
              label="fixed_small")
ax_s.semilogy(short_t, np.exp(log_learned), "o-", color="C0",
              label="learned (mean v)")
ax_s.set(xlabel=f"step t of the {short.num_timesteps}-step process",
         ylabel="variance (images scaled to [-1, 1])",
         title=f"{short.num_timesteps} respaced steps")
ax_s.legend(fontsize=7)
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
# **Seeded noise, shared by the arms.** For sampling seed $k$ a
# generator seeded with $k$ draws $x_T$ and then every step's noise
# (chapter 2's `noise_fn`). Every arm gets the same generator state at
# each step count and seed, so their samples start from the same noise
# and their differences are measured on paired draws. The labels are
# $0, 1, \dots, 9, 0, \dots$, as in chapter 6. As everywhere in this
# book, the models are trained once; the seeds vary only the sampling, so
# the error bars below (standard errors over seeds) are sampling error,
# not the spread between training runs.

# %%
variance_shape = (dataset.channels, 32, 32)
variance_labels = torch.arange(variance_samples, device=device) % max(
    dataset.num_classes, 1)


def few_step_samples(model, diffusion: GaussianDiffusion, steps: int,
                     sample_seed: int) -> np.ndarray:
    """Ancestral samples with `steps` respaced steps, uint8 NHWC."""
    spaced = respace(diffusion, str(steps))
    generator = torch.Generator(device).manual_seed(sample_seed)

    def noise_fn(like: torch.Tensor) -> torch.Tensor:
        return torch.randn(like.shape, generator=generator,
                           device=like.device)

    out = []
    for chunk in variance_labels.split(500):  # the memory of 500 images
        x_T = noise_fn(torch.empty(len(chunk), *variance_shape,
                                   device=device))
        with torch.no_grad():
            out.append(p_sample_loop(spaced, model, x_T,
                                     noise_fn=noise_fn,
                                     model_kwargs={"y": chunk}))
    return to_uint8(torch.cat(out))


few = {}  # (arm, steps, seed): samples
for arm, (net, diffusion) in arms.items():
    start = time.perf_counter()
    for steps in variance_respacings:
        for k in variance_seeds:
            few[arm, steps, k] = few_step_samples(net, diffusion, steps, k)
    print(f"{arm}: {len(variance_respacings)} step counts x "
          f"{len(variance_seeds)} seeds x {variance_samples} samples in "
          f"{time.perf_counter() - start:.0f} s")
assert few["learned", variance_respacings[0], variance_seeds[0]].shape == (
    variance_samples, 32, 32, dataset.channels)

# %% [markdown]
# Each batch is scored by `score_activations` against half A, with the
# accuracy of the features' own classifier on the labels the samples were
# drawn for (not with Inception's 1008 classes). A score is reported as
# the mean over seeds $\pm$ its standard error, the standard deviation
# over seeds (with $n - 1$) over $\sqrt{n}$. The row `real` scores, for
# each seed, a different set of as many real images of half B with their
# labels: the floor that FID's small-sample bias (5.7) leaves at this
# $n$, and the best any model could do.

# %%
with_labels = (variance_labels.cpu().numpy() if features != "inception"
               else None)
few_scores = {key: score_activations(ref_acts, activations(images),
                                     with_labels, device)
              for key, images in few.items()}
real_rows = {}
for i, k in enumerate(variance_seeds):
    part = slice(i * variance_samples, (i + 1) * variance_samples)
    if part.stop <= len(real_images):  # enough of half B left
        real_rows[k] = score_activations(
            ref_acts, activations(real_images[part]),
            real_labels[part] if with_labels is not None else None, device)
metric_names = ["fid", "precision", "recall", "inception_score"]
if with_labels is not None:
    metric_names.append("accuracy")


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (nan for a single value)."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return float(values.mean()), float("nan")
    return (float(values.mean()),
            float(values.std(ddof=1) / np.sqrt(len(values))))


few_summary = {(arm, steps): {m: mean_se([few_scores[arm, steps, k][m]
                                         for k in variance_seeds])
                              for m in metric_names}
               for arm in arms for steps in variance_respacings}
if real_rows:
    few_summary["real", 0] = {m: mean_se([row[m] for row in
                                          real_rows.values()])
                              for m in metric_names}
print(f"mean ± s.e. over {len(variance_seeds)} seeds "
      f"{variance_seeds}, {variance_samples} samples each, features "
      f"{features}")
print(f"{'arm, steps':<17}" + "".join(f"{m[:9]:>18}" for m in metric_names))
for (arm, steps), row in few_summary.items():
    print(f"{f'{arm}, {steps}' if steps else arm:<17}" + "".join(
        f"{m:>10.3f} ± {e:<5.3f}" for m, e in row.values()))
assert all(np.isfinite(row["fid"]) for row in few_scores.values())

# %% [markdown]
# The arms share their noise, so their differences are best taken seed
# by seed: the mean paired difference and its standard error, with the
# ratio of the two (a gap is claimed below only beyond 2).

# %%
pairs = [("learned", "fixed_large"), ("learned", "fixed_small"),
         ("fixed_small", "fixed_large"), ("learned", "hybrid+small")]
compared = ["fid"] + (["accuracy"] if with_labels is not None else [])
paired = {}
for steps in variance_respacings:
    for a, b in pairs:
        for m in compared:
            paired[steps, a, b, m] = mean_se(
                [few_scores[a, steps, k][m] - few_scores[b, steps, k][m]
                 for k in variance_seeds])
            gap, se = paired[steps, a, b, m]
            print(f"{steps:>3} steps, {m:<8} {a} - {b}: {gap:+8.3f} ± "
                  f"{se:.3f} ({abs(gap) / se if se > 0 else np.inf:.1f} "
                  "s.e.)")

# %%
fig, axes = plt.subplots(1, len(metric_names),
                         figsize=(3.2 * len(metric_names), 3))
for arm in arms:
    for ax, metric in zip(axes, metric_names, strict=True):
        means, errors = zip(*(few_summary[arm, steps][metric]
                              for steps in variance_respacings), strict=True)
        ax.errorbar(variance_respacings, means, yerr=errors, marker="o",
                    capsize=3, label=arm)
for ax, metric in zip(axes, metric_names, strict=True):
    if ("real", 0) in few_summary:
        ax.axhline(few_summary["real", 0][metric][0], color="gray", ls="--",
                   lw=1, label="real digits")
    ax.set_xscale("log")
    ax.set_xticks(variance_respacings, [str(s) for s in
                                        variance_respacings])
    ax.minorticks_off()  # the log axis would label 6, 7, 8, 9 as well
    unit = {"accuracy": " (share)", "fid": feature_label(features)}
    ax.set(title=metric.replace("_", " ") + unit.get(metric, ""),
           xlabel="ancestral sampling steps")
axes[0].legend(fontsize=7)
fig.suptitle(f"{variance_steps} training steps, {variance_samples} "
             f"samples: mean ± s.e. over {len(variance_seeds)} seeds")
fig.tight_layout()
keep(fig, "05_few_steps.png")

# %% [markdown]
# And the samples themselves: seed 0's first ten (the digits 0 to 9), a
# row per arm and step count, from the same noise in every row.

# %%
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
# Each model is the demo's lean network (878,434 parameters with the
# learned variance's channel, 878,145 without), trained 350 steps of
# batch 32 on 4,500 of MNIST-5k's digits (the demo's float32 budget).
# The learned model came from an earlier run of the same settings
# without `reuse_runs`; the recorded run loaded it, trained the fixed
# model and drew 4 arms x 2 step counts x 3 seeds x 150 samples.
#
# ![The learned v over t; the 5-step variances](figures/05_learned_v.png)
#
# **The learned $v$ left its range.** After 350 steps $v$ is about +6.2
# to +6.5 at every $t$ (mean over 16 held-out digits; the spread between
# them is smaller than the line), far outside $[-1, 1]$: the log variance
# is extrapolated beyond $\log \beta_t$, not interpolated. In the
# 1,000-step process this costs little, as $\beta_t$ and $\tilde\beta_t$
# are nearly equal there except at the first few steps, which is also
# why the bound hardly constrains $v$ and lets it drift. A respaced
# process has large steps, where the two differ by orders of magnitude:
# at step 1 of the 5-step process the extrapolated variance is
# $6.5 \times 10^{12}$ times $\tilde\beta_t$ (the right panel, on a log
# scale). Ancestral sampling with it destroys the samples, as the table
# shows.
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
# Mean $\pm$ standard error over the sampling seeds 0, 1 and 2, 150
# samples each, against half A's 1,000 images (mnist-net features,
# 128 dimensions; accuracy by chance 10%). The `real` row scores three
# sets of 150 real digits of half B: the FID floor at this $n$.
#
# Paired over the seeds (the arms share their noise), FID differences
# with their standard errors, and what they allow:
#
# * **The learned variance, as trained here, ruins ancestral sampling.**
#   `learned` minus `hybrid+small`, the same mean with $v$ against
#   $\tilde\beta_t$: +71.1 ± 0.6 FID at 5 steps and +72.9 ± 0.4 at 10
#   (over a hundred standard errors); its samples are blank or grey
#   (below), precision and recall 0, accuracy at chance.
# * **Learning it also damaged the mean.** `hybrid+small` against
#   `fixed_small` (two models, the same noise): FID 30.0 against 3.8 at
#   5 steps and 25.5 against 3.5 at 10, accuracy 11 to 14% against 74
#   to 76%, each gap tens of standard errors. The bound's term reaches
#   the shared layers through $v$, and with $v$ far out of range that
#   term is large and noisy.
# * **The two fixed variances do about equally.** `fixed_small` minus
#   `fixed_large`: $-0.17 \pm 0.15$ FID at 5 steps (1.1 s.e.: no
#   difference claimed) and $-0.025 \pm 0.011$ at 10 (2.3 s.e., a
#   hundredth of the FID); accuracy $+0.2 \pm 2.3$ and $+3.3 \pm 2.1$
#   points (no difference claimed). With 5 or 10 steps both sample
#   digits (FID 3.5 to 4.0 against the real floor's 1.2, three in four
#   in the class asked for).
#
# ![Scores against sampling steps](figures/05_few_steps.png)
#
# ![Samples of each arm](figures/05_few_step_samples.png)
#
# What the run does not show: the seeds vary the sampling only, so the
# spread between training runs is not measured; the models are small
# and briefly trained, and the paper's finding, that a learned variance
# keeps quality as ancestral steps are removed, is about models trained
# a hundred thousand steps and more at a learning rate ten times lower.
# The GPU run of the parameters cell's command (CIFAR-10, 20,000 steps,
# 5,000 samples per seed) has not been made yet.

# %% [markdown]
# ## 5.10 The architecture ablations, trained and measured
#
# Chapter 3 (section 3.11) wrote the paper's architecture ablations as
# switches: `ABLATIONS` maps each variant to a few `UNetModel` options on
# top of a Ho et al.-like baseline, and `ablation_unet` builds it. The paper
# trained every variant on ImageNet $128 \times 128$ and compared FID after
# 700K and 1.2M iterations. The same protocol, small, is a set of runs of
# chapter 4's loop, one per variant, that differ only in the network:
# the same seed, so the same batches, timesteps and noise at every step,
# chapter 2's diffusion (the `mnist` preset's cosine schedule, $\epsilon$
# prediction, `learned_range` variance and the hybrid loss), class
# conditioning, and the same held-out images to judge them on. Two
# comparisons come from each run:
#
# * **equal steps**: the weights after `ablation_steps` updates. What does
#   the change buy per update?
# * **equal time**: the weights after as many updates as
#   `ablation_seconds` of training buy at the variant's own speed. A change
#   that makes steps slower must pay for them; this is why the paper kept
#   two blocks per resolution and went wider instead.
#
# Exact resume (appendix R.4) means no step is trained twice: a run is
# trained to the smaller of its two step counts, then resumed to the larger.
# Each run first trains `ablation_timing_steps` steps, whose speed,
# read from its metrics log, sets its equal-time step count.
#
# The paper judged the variants by FID; this section judges them by
# another measure, chapter 2's estimate of the variational bound on
# held-out images (`vlb_estimate`, in bits/dim, which also judges the
# learned variance), with its $\epsilon$ error at the same timestep, on
# fixed held-out (image, $t$, noise) triples with stratified $t$. The
# reason is cost: FID needs thousands of samples per variant before its
# bias and noise (5.7) fall below the differences Table 1 reports, each
# sample a full sampling chain, while the bound needs one forward pass per
# held-out image. It judges the EMA weights that `load_run` returns, the
# weights the paper samples from. Every variant sees the same triples, so
# the standard error of its *difference* from the baseline is much smaller
# than that of its bound. A better bound is not the same claim as a better
# FID; the FID of each variant's few samples is added at the end, as a
# glance, not as evidence.

# %%
import math
import re
from typing import Any

from torch import Tensor

from adm_lib.checkpoints import read_metrics
from adm_lib.config import TrainConfig, build_model
from adm_lib.diffusion import stratified_timesteps, vlb_estimate
from adm_lib.models import TrainedModel
from adm_lib.unet import ABLATION_BASELINE, ABLATIONS, ablation_unet

# %% [markdown]
# A variant is a set of overrides of the `mnist` preset: the options of its
# `ABLATIONS` entry in the names of `TrainConfig`, with chapter 3's rules
# for the width (a multiple of 32, the group norm's groups), the levels
# (down to $8 \times 8$) and the attention resolutions, in pixels as the
# reference's flags give them.

# %%
def ablation_overrides(variant: str, image_size: int,
                       base_width: int) -> dict[str, Any]:
    """The make_config overrides of an ABLATIONS entry."""
    options = {**ABLATION_BASELINE, **ABLATIONS[variant]}
    levels = int(math.log2(image_size // 8)) + 1  # down to 8 x 8
    return {
        "num_channels": 32 * max(1, round(options["width"] * base_width
                                          / 32)),
        "channel_mult": ",".join(["1"] + ["2"] * (levels - 1)),
        "attention_resolutions": ",".join(map(str, options["attention_at"])),
        **{name: options[name] for name in (
            "num_res_blocks", "num_heads", "num_head_channels",
            "resblock_updown", "use_scale_shift_norm", "rescale_residual")},
    }


# %% [markdown]
# The data, at $32 \times 32$ as everywhere in this chapter:
# `ablation_eval_images` held-out images, drawn with the seed, and the
# training images after them (`ablation_train_images`, 0 for all).
# The loop trains on the whole of its data set, so the training images are
# written to their own `.npz`, the reference's format. Every variant then
# shares one base configuration; its network, built by `build_model`, has
# exactly the parameters of chapter 3's `ablation_unet`.

# %%
source = load_dataset(ablation_data, resolution=32)
assert source.num_classes, "the ablations are class-conditional"
split = torch.randperm(len(source),
                       generator=torch.Generator().manual_seed(seed))
held_out = split[:ablation_eval_images].tolist()
train_ids = split[ablation_eval_images:][:ablation_train_images or None]
ablation_runs = work / "ablations"
shutil.rmtree(ablation_runs, ignore_errors=True)  # fresh runs each time
ablation_runs.mkdir(parents=True)
train_npz = ablation_runs / "train.npz"
write_batch(train_npz, exact_pixels(source, train_ids.tolist()),
            source.labels[train_ids.numpy()])
ablation_base = {
    "data": str(train_npz), "image_size": source.resolution,
    "in_channels": source.channels, "num_classes": source.num_classes,
    "batch_size": ablation_batch_size, "lr": ablation_lr,
    "device": device, "seed": seed,
    # A checkpoint only where a run stops, no grids, and only the newest
    # checkpoint kept: each arm is evaluated before the run goes on.
    "save_interval": 10**9, "sample_interval": 0, "keep_checkpoints": 1,
}


def ablation_config(variant: str, steps: int) -> TrainConfig:
    """The run of a variant, trained to `steps`."""
    overrides = ablation_overrides(variant, source.resolution,
                                   ablation_channels)
    return make_config("diffusion", "mnist",
                       {**ablation_base, **overrides, "steps": steps})


for variant in ABLATIONS:
    with torch.device("meta"):  # shapes only: counting is instant
        built = build_model(ablation_config(variant, 1))
        expected = ablation_unet(variant, source.resolution,
                                 ablation_channels, source.num_classes,
                                 source.channels)
    assert (sum(p.numel() for p in built.parameters())
            == sum(p.numel() for p in expected.parameters())), variant
print(f"{source.source}: {len(train_ids)} training and {len(held_out)} "
      f"held-out images {tuple(source.images([0]).shape[1:])}, "
      f"{source.num_classes} classes; device {device}")

# %% [markdown]
# The fixed evaluation triples, from their own seeded generator: the
# held-out images with their labels, one stratified timestep and one noise
# each, and the starting noise and classes of the samples.

# %%
g = torch.Generator().manual_seed(seed + 1)
eval_x = source.images(held_out).to(device)
eval_y = torch.as_tensor(source.labels[held_out]).long().to(device)
num_timesteps = ablation_config("baseline", 1).diffusion_steps
eval_t = stratified_timesteps(len(held_out), num_timesteps, g).to(device)
eval_noise = torch.randn(eval_x.shape, generator=g).to(device)
sample_noise = torch.randn(ablation_samples, *eval_x.shape[1:],
                           generator=g).to(device)
sample_y = torch.arange(ablation_samples, device=device) % source.num_classes


def bound_terms(run: TrainedModel) -> dict[str, Tensor]:
    """A run's EMA on the triples: VLB and eps error per held-out image."""
    terms, n = [], ablation_batch_size
    for i in range(0, len(eval_x), n):
        terms.append(vlb_estimate(run.diffusion, run.model, eval_x[i:i + n],
                                  eval_t[i:i + n], eval_noise[i:i + n],
                                  model_kwargs={"y": eval_y[i:i + n]}))
    return {key: torch.cat([t[key] for t in terms]).cpu()
            for key in ("vlb", "mse")}


# %% [markdown]
# The speed of a run comes from its metrics log: each record covers the
# steps since the one before, at `steps_per_s`, so the training time up to
# a step is a sum over records (the loop's clock leaves out checkpoints and
# grids). On a GPU every step ends by copying its losses to the CPU, so the
# clock sees the work.

# %%
def train_seconds(out: Path, steps: int) -> float:
    """Seconds the run's loop spent on its first `steps` steps."""
    seconds, done = 0.0, 0
    for record in read_metrics(out):
        if "steps_per_s" in record and record["step"] <= steps:
            seconds += (record["step"] - done) / record["steps_per_s"]
            done = record["step"]
    assert done == steps, f"{out}: metrics end at {done}, not {steps}"
    return seconds


def train_variant(variant: str) -> dict[str, Any]:
    """Train a variant to both arms, resuming; evaluate each."""
    slug = re.sub(r"[^a-z0-9]+", "-", variant.lower()).strip("-")
    out = ablation_runs / slug
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
                  **bound_terms(run)}
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
# All variants, in turn: two or three calls of `train` each, each arm
# evaluated when the run reaches it, and `ablation_samples` images drawn
# with the DDIM respacing `ablation_sample_steps` (25 steps in the full
# run) from the equal-steps weights, the same noise and classes for every
# variant.

# %%
run_start = time.perf_counter()
results = {variant: train_variant(variant) for variant in ABLATIONS}
run_minutes = (time.perf_counter() - run_start) / 60
print(f"{len(results)} variants in {run_minutes:.1f} min on {device}")

# %% [markdown]
# The table. Per arm: steps reached, milliseconds per step, the held-out
# $\epsilon$ error, the VLB estimate with its standard error, and its
# difference from the baseline with the paired standard error (negative is
# better).

# %%
def vlb_columns(row: dict, arm: str) -> str:
    """VLB +- se and the paired difference from the baseline +- se."""
    vlb, ref = row[arm]["vlb"], results["baseline"][arm]["vlb"]
    se = vlb.std() / len(vlb) ** 0.5
    diff = vlb - ref
    diff_se = diff.std() / len(diff) ** 0.5
    return (f"{vlb.mean():7.3f} ±{se:5.3f} "
            f"{diff.mean():+7.3f} ±{diff_se:5.3f}")


print(f"{ablation_data}, {len(train_ids)} training images, batch "
      f"{ablation_batch_size}, base width {ablation_channels}, {device}; "
      f"VLB on {len(held_out)} held-out (image, t) pairs")
for arm in ("equal steps", "equal time"):
    print(f"\n{arm}:")
    print(f"{'variant':<29}{'params':>10}{'steps':>7}{'ms/step':>8}"
          f"{'eps MSE':>9}{'VLB bits/dim':>15}{'vs baseline':>15}")
    for variant, row in results.items():
        r = row[arm]
        print(f"{variant:<29}{row['parameters']:>10,}{r['steps']:>7}"
              f"{1000 * r['seconds'] / r['steps']:>8.1f}"
              f"{r['mse'].mean():>9.4f} {vlb_columns(row, arm)}")
assert list(results) == list(ABLATIONS)
for row in results.values():
    assert row["equal steps"]["steps"] == ablation_steps
    for arm in ("equal steps", "equal time"):
        assert torch.isfinite(row[arm]["mse"]).all()
        assert torch.isfinite(row[arm]["vlb"]).all()

# %% [markdown]
# The differences from the baseline as bars, both arms, with their paired
# standard errors: the comparison that the spread between images does not
# drown (below zero is better).

# %%
fig, ax = plt.subplots(figsize=(9, 3.5))
names = list(results)
for k, arm in enumerate(("equal steps", "equal time")):
    diffs = [results[n][arm]["vlb"] - results["baseline"][arm]["vlb"]
             for n in names]
    ax.bar([i + 0.4 * k for i in range(len(names))],
           [d.mean().item() for d in diffs], width=0.4, label=arm,
           yerr=[(d.std() / len(d) ** 0.5).item() for d in diffs])
ax.axhline(0, color="black", lw=0.8)
ax.set_xticks([i + 0.2 for i in range(len(names))], names, rotation=30,
              ha="right")
ax.set(ylabel="VLB - baseline (bits/dim)",
       title=f"ablations on {ablation_data}")
ax.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# And samples: one row per variant, the same noise and classes in every
# row, `ablation_sample_steps` DDIM steps, with their FID against half A
# of 5.6 in the chapter's features. That needs the ablations to train on
# the chapter's data (`ablation_data` equal to `data`), whose features and
# reference half they are; otherwise FID is left out. A FID of
# `ablation_samples` samples (4 in the smoke run) says little: 5.7 showed
# its bias growing as $1/n$ (5.8's fit for two real batches, about
# $65/n$, puts it at 16 for $n = 4$), and sample sets this small differ
# from each other by as much. Every variant carries the same bias and
# starts from the same noise and classes, so the FIDs compare only with
# each other, and they come without a standard error: read them as a
# glance at the samples, while the bound above, with its paired errors,
# is the measurement.

# %%
show_rows({variant: row["samples"] for variant, row in results.items()})
assert all(r["samples"].shape == sample_noise.shape
           for r in results.values())
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
# These numbers come from the smoke configuration and say nothing about
# the architectures. The one run at CPU scale (appendix M.4: an earlier
# version of the book, whose chapter 3 trained the variants with a loop
# of its own, 100 steps of batch 16 on 5,000 CIFAR-10 images) left every
# model at the start of training: at equal
# steps the variants' bounds differed from the baseline's by a few
# hundredths of a bit per dimension, up to about three paired standard
# errors; with every model at the start of training, such gaps neither
# confirm nor refute the paper's findings, which are about trained
# models judged by FID. At
# equal time it showed the other half of the paper's argument: attention
# at $32 \times 32$ cost 2.5 times the baseline's time per step, so the
# variants that use it (and ADM) reached 42 and 41 steps to its 107 and
# fell behind by $0.9 \pm 0.2$ bits/dim. The GPU run of appendix M.4's
# command has not been made yet. Neither command scores FIDs: their data,
# CIFAR-10, are not the chapter's `data`.

# %% [markdown]
# ## 5.11 Do the samples copy their training images?
#
# Every metric of this chapter would also reward a model that returns
# its training images: they are real, so their precision is high, and
# if there are enough of them, so are recall and FID. Whether the
# samples are new is a separate question, and on MNIST-5k it is cheap to
# ask directly. For each sample of 5.9's best arm (the lowest mean FID),
# find the nearest of the models' training images, by Euclidean distance
# in pixels (grey levels scaled to $[0, 1]$, 1,024 numbers) and in the
# data-net's pooled features; then do the same for the `variance_held_out`
# real images that the models never saw. Held-out digits show how close a
# *new* digit of this data set comes to the training set. A model that
# copies puts its samples much closer than that, many at distance near
# 0; a model that generalises puts them about as far, or farther.

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
    """Each query row's Euclidean distance to its nearest key row, and
    that row's index."""
    d = pairwise_distances(torch.as_tensor(queries, dtype=torch.float32),
                           torch.as_tensor(keys, dtype=torch.float32))
    best = d.min(dim=1)
    return best.values.sqrt().numpy(), best.indices.numpy()


def flat(pixels: np.ndarray) -> np.ndarray:
    return pixels.reshape(len(pixels), -1) / 255.0


train_features = activations(train_pixels)["pool"]
copies = {}  # space: {"samples", "held-out"}: (distances, indices)
for space, embed in (("pixels", flat),
                     ("features", lambda p: activations(p)["pool"])):
    keys = flat(train_pixels) if space == "pixels" else train_features
    copies[space] = {"samples": nearest(embed(generated), keys),
                     "held-out": nearest(embed(held_pixels), keys)}
print(f"{len(generated)} samples ({best_arm}, {best_steps} steps, seeds "
      f"{variance_seeds}) and {len(held_pixels)} held-out digits against "
      f"{len(train_pixels)} training digits: distance to the nearest")
for space, sets in copies.items():
    (mean_g, se_g), (mean_h, se_h) = (mean_se(sets[s][0])
                                      for s in ("samples", "held-out"))
    low = np.quantile(sets["held-out"][0], 0.01)
    below = (sets["samples"][0] < low).mean()
    print(f"{space:<9} samples {mean_g:7.3f} ± {se_g:.3f} (median "
          f"{np.median(sets['samples'][0]):.3f}), held-out {mean_h:7.3f} ± "
          f"{se_h:.3f} (median {np.median(sets['held-out'][0]):.3f}); "
          f"difference {mean_g - mean_h:+.3f} ± "
          f"{np.hypot(se_g, se_h):.3f}; samples below the held-out's 1% "
          f"quantile: {below:.1%} ± "
          f"{np.sqrt(below * (1 - below) / len(generated)):.1%}")
assert all(np.isfinite(sets[s][0]).all() for sets in copies.values()
           for s in sets)

# %% [markdown]
# The distributions, and the pairs themselves: the eight samples closest
# to a training image in pixels, then eight samples taken at random, each
# above the training image nearest to it.

# %%
fig, axes = plt.subplots(1, 2, figsize=(9, 3))
for ax, (space, sets) in zip(axes, copies.items(), strict=True):
    edges = np.histogram_bin_edges(np.concatenate(
        [sets[s][0] for s in sets]), bins=30)
    for s, (distances, _) in sets.items():
        ax.hist(distances, bins=edges, density=True, alpha=0.5,
                label=f"{s} (n = {len(distances)})")
    where = ("in pixels (grey levels scaled to [0, 1])" if space == "pixels"
             else f"in {features}-net pooled features")
    ax.set(xlabel="distance to the nearest training image",
           ylabel="density (per unit distance)", title=where)
    ax.legend(fontsize=7)
fig.tight_layout()
keep(fig, "05_nearest.png")

distances, indices = copies["pixels"]["samples"]
closest = np.argsort(distances)[:8]
chosen_at_random = np.random.default_rng(seed).choice(
    len(generated), size=min(8, len(generated)), replace=False)
pair_rows = {
    "closest: sample": generated[closest],
    "closest: training": train_pixels[indices[closest]],
    "random: sample": generated[chosen_at_random],
    "random: training": train_pixels[indices[chosen_at_random]],
}
keep(rows_figure(pair_rows, "samples above their nearest training images "
                 "(pixel distance)"), "05_nearest_pairs.png")
assert np.allclose(distances[closest], np.sqrt(((
    flat(generated[closest]) - flat(train_pixels[indices[closest]])) ** 2
).sum(axis=1)), atol=1e-3)

# %% [markdown]
# **The recorded run** (the command of 5.9) compared 450 samples of the
# best arm (`fixed_small`, 10 steps, seeds 0 to 2) and the 500 held-out
# digits with the 4,500 training digits:
#
# | nearest training image | samples | held-out digits | difference |
# | --- | --- | --- | --- |
# | in pixels, mean | 5.78±0.06 | 4.89±0.06 | +0.89±0.08 |
# | in pixels, median | 6.04 | 4.99 | |
# | in mnist-net features, mean | 2.11±0.04 | 1.20±0.02 | +0.91±0.04 |
# | in mnist-net features, median | 2.12 | 1.14 | |
#
# Mean $\pm$ standard error over the images (the two sets are
# independent, so the difference's error is the root of the sum of the
# squares).
#
# ![Nearest-neighbour distances](figures/05_nearest.png)
#
# ![Samples above their nearest training images](figures/05_nearest_pairs.png)
#
# No sample is a copy: none lies closer to the training set than the
# closest 1% of held-out digits (0 of 450, in pixels and in features),
# and on average the samples lie *farther* from their nearest training
# digit than new real digits do, by about 11 standard errors in pixels
# and 22 in features. The closest pairs are 1s, the simplest strokes,
# which held-out 1s match as closely. Farther than real digits is the
# other failure: the samples are less like any training digit than
# real digits are, which their FID, precision and accuracy in 5.9
# already said. A larger model trained longer could move the other way;
# this check is cheap enough to repeat for it.

# %% [markdown]
# ## Summary
#
# * Every metric compares features of a pretrained classifier: Inception's
#   `pool_3` for FID, precision and recall, its `mixed_6/conv` spatial
#   features for sFID, its logits for the Inception Score. Offline, the
#   data-set classifiers stand in, and their numbers are labelled so.
# * FID is the Fréchet distance of two Gaussians; it sees fidelity and
#   diversity together, through two moments, and is biased upwards at
#   small $n$: compare FIDs only at equal $n$ (the paper uses 50,000).
# * sFID keeps spatial layout, which pooled features average away.
# * The Inception Score rewards confident, varied class predictions and
#   never looks at real images.
# * Precision and recall separate fidelity from coverage: dropping modes
#   costs recall, degrading every image costs precision. Chapter 6 uses
#   them to show what classifier guidance trades.
# * `adm evaluate REF.npz SAMPLES.npz` prints all five as the reference's
#   evaluator does, from the same `.npz` batches.
# * 5.9 puts them to work on chapter 2's question, learned against fixed
#   variances sampled ancestrally in few steps (DDIM does not use the
#   variance), with the demo's models, several sampling seeds and
#   standard errors, and claims only the gaps those errors allow.
# * 5.10 trains chapter 3's ablations with chapter 4's loop, at equal steps
#   and equal time, and judges them by chapter 2's bound on held-out
#   images, paired with the baseline; the paper judged them by FID, which
#   needs far more samples than a small run can draw.
# * 5.11 asks what no metric here asks, whether the samples are new:
#   their distances to the nearest training image, against those of
#   held-out real images.

# %% [markdown]
# ## Exercises
#
# 1. Show that for one-dimensional features FID is $(\mu_a - \mu_b)^2 +
#    (\sigma_a - \sigma_b)^2$, and check it with `frechet_distance` on
#    `FIDStatistics` of one-element arrays. In $d$ dimensions, when is the
#    trace term zero?
# 2. For batches of $n$ and $m$ features from the same $\mathcal{N}(0,
#    I_d)$, show that FID's mean term $\lVert \hat\mu_a - \hat\mu_b
#    \rVert^2$ has expectation $d\,(1/n + 1/m)$. Simulate FID at $d = 8$ and
#    several $n$ with `rng.normal`; compare its slope in $1/n$ with $d$.
# 3. Show that $\log \text{IS} = H(p(y)) - \mathbb{E}_x H(p(y \mid x))$,
#    the mutual information of $x$ and $y$, so that $1 \le \text{IS} \le C$
#    for $C$ classes. Check the bounds with `inception_score` on
#    `rng.dirichlet` probabilities of several concentrations.
# 4. In the disk example of 5.5, call `precision_recall(real, half, k=k)`
#    and `precision_recall(real, wide, k=k)` for $k$ = 1, 3 and 10. Predict
#    in which direction precision and recall move as $k$ grows, then check.
# 5. Add `kernel_distance`, KID (Bińkowski et al., 2018): the unbiased
#    squared MMD of two feature sets with the kernel $k(u, v) = (u \cdot v /
#    d + 1)^3$. Repeat 5.7's "FID depends on the number of samples" with it
#    and predict whether two real batches still seem apart at small $n$.
# 6. Add to the table of 5.7 a batch "B, noisy": `real_images` plus Gaussian
#    noise of standard deviation 16 grey levels, rounded and clipped to 0 to
#    255 as `blurred` does. Predict whether it costs precision, recall or
#    both, like blurring or like dropping classes, then check.
# 7. Sample 5.9's four arms with a single ancestral step
#    (`few_step_samples(net, diffusion, 1, 0)` for each arm). Predict how
#    their samples differ, then check.
# 8. In 5.11, keep only the first 1,000 training images as the keys.
#    Predict how the held-out digits' nearest-neighbour distances move,
#    and what that means for comparing a model's samples with them, then
#    check.

# %% [markdown] jupyter={"source_hidden": true} tags=["solution"]
# **Solution 1.** In one dimension the covariances are the variances
# $\sigma_a^2, \sigma_b^2$, the root of their product is
# $\sigma_a \sigma_b$, and the trace term is
# $\sigma_a^2 + \sigma_b^2 - 2 \sigma_a \sigma_b = (\sigma_a - \sigma_b)^2$.
# In $d$ dimensions the trace term is the squared Bures distance of the
# two covariance matrices, zero exactly when $\Sigma_a = \Sigma_b$; then
# FID is the squared distance of the means. (For commuting covariances
# it is $\lVert \Sigma_a^{1/2} - \Sigma_b^{1/2} \rVert_F^2$, the
# one-dimensional formula eigenvalue by eigenvalue.)

# %% jupyter={"source_hidden": true} tags=["solution"]
one_d = frechet_distance(FIDStatistics(np.array([1.0]), np.array([[4.0]])),
                         FIDStatistics(np.array([3.0]), np.array([[9.0]])))
print(f"(1 - 3)^2 + (2 - 3)^2 = 5; frechet_distance: {one_d:.6f}")
assert abs(one_d - 5) < 1e-9
spread = np.diag([1.0, 4.0, 9.0])
equal = frechet_distance(FIDStatistics(np.zeros(3), spread),
                         FIDStatistics(np.ones(3), spread))
assert abs(equal - 3) < 1e-8  # equal covariances: |mu_a - mu_b|^2 only

# %% [markdown] jupyter={"source_hidden": true} tags=["solution"]
# **Solution 2.** $\hat\mu_a$ and $\hat\mu_b$ are independent, each
# component with mean 0 and variance $1/n$ and $1/m$, so
# $\mathbb{E} \lVert \hat\mu_a - \hat\mu_b \rVert^2 = \sum_{i=1}^d
# (1/n + 1/m) = d\,(1/n + 1/m)$. The simulation below takes the
# reference statistics as exact ($m \to \infty$): the mean term's slope
# in $1/n$ is $d = 8$. FID's slope is larger, because the covariance
# term is biased too: with $\hat\Sigma = I + E$, the trace term is about
# $\operatorname{tr}(E^2)/4$, whose expectation is $d(d+1)/(4n)$, so the
# whole slope is about $d + d(d+1)/4 = 26$. The covariance's share grows
# as $d^2$, which is why FID in 2,048 dimensions needs thousands of
# samples.

# %% jupyter={"source_hidden": true} tags=["solution"]
dims, repeats, sizes = 8, 200, np.array([100, 200, 400, 800])
exact = FIDStatistics(np.zeros(dims), np.eye(dims))
sim = np.random.default_rng(seed + 5)
mean_terms, fid_terms = [], []
for n in sizes:
    draws = [feature_statistics(sim.normal(size=(n, dims)))
             for _ in range(repeats)]
    mean_terms.append(np.mean([d.mu @ d.mu for d in draws]))
    fid_terms.append(np.mean([frechet_distance(d, exact) for d in draws]))
mean_slope = np.polyfit(1 / sizes, mean_terms, 1)[0]
fid_slope = np.polyfit(1 / sizes, fid_terms, 1)[0]
print(f"slope in 1/n: mean term {mean_slope:.1f} (d = {dims}), FID "
      f"{fid_slope:.1f} (d + d(d+1)/4 = {dims + dims * (dims + 1) / 4:.0f})")
# Tolerances: the mean term is a chi-square with d degrees of freedom
# over n (relative s.d. 0.5 a draw, 0.035 over 200): 10% is about 3 s.e.
assert abs(mean_slope - dims) < 0.1 * dims
assert abs(fid_slope - 26) < 0.15 * 26

# %% [markdown] jupyter={"source_hidden": true} tags=["solution"]
# **Solution 3.** $\log \text{IS} = \mathbb{E}_x \sum_y p(y \mid x)
# \log p(y \mid x) - \mathbb{E}_x \sum_y p(y \mid x) \log p(y)$. The first
# term is $-\mathbb{E}_x H(p(y \mid x))$; in the second,
# $\mathbb{E}_x p(y \mid x) = p(y)$, so it is $H(p(y))$. Their
# difference is the mutual information $I(x; y) \ge 0$, and it is at most
# $H(p(y)) \le \log C$: hence $1 \le \text{IS} \le C$. Dirichlet
# probabilities with a small concentration are nearly one-hot (confident)
# and spread over the classes, and score near $C$; a large concentration
# gives nearly uniform rows, and a score near 1.

# %% jupyter={"source_hidden": true} tags=["solution"]
def entropy(p: np.ndarray) -> np.ndarray:
    return -(p * np.log(p)).sum(axis=-1)


for concentration in (0.01, 0.1, 1.0, 10.0, 100.0):
    probs = sim.dirichlet(np.full(classes, concentration), size=5000)
    probs = np.clip(probs, 1e-300, None)  # no log(0) for tiny draws
    score = inception_score(probs)
    information = entropy(probs.mean(axis=0)) - entropy(probs).mean()
    print(f"concentration {concentration:>6}: IS {score:.3f}")
    assert 1 - 1e-9 <= score <= classes + 1e-9
    assert abs(np.log(score) - information) < 1e-6

# %% [markdown] jupyter={"source_hidden": true} tags=["solution"]
# **Solution 4.** Both rise (or stay) as $k$ grows. A point's radius is
# the distance to its $k$-th neighbour, which can only grow with $k$, so
# each set's union of balls grows, and a share of points inside the other
# set's union can only grow: precision with the real balls, recall with
# the samples'. For "right half" precision is already near 1 and recall
# grows slowly (balls on the cut reach a little into the left half); for
# "twice as wide" recall is near 1 and precision grows, as the real
# balls reach further out. Large $k$ flatters both numbers, which is why
# the definition fixes $k = 3$.

# %% jupyter={"source_hidden": true} tags=["solution"]
disk_real, disk_half = disk(2000), disk(4000)
disk_half = disk_half[disk_half[:, 0] > 0][:2000]
disk_wide = disk(2000, radius=2.0)
by_k = {k: {"right half": precision_recall(disk_real, disk_half, k=k),
            "twice as wide": precision_recall(disk_real, disk_wide, k=k)}
        for k in (1, 3, 10)}
for k, row in by_k.items():
    print(f"k = {k:>2}: " + "; ".join(f"{name} P {p:.3f} R {r:.3f}"
                                      for name, (p, r) in row.items()))
for name in ("right half", "twice as wide"):
    for which in (0, 1):
        values = [by_k[k][name][which] for k in (1, 3, 10)]
        assert values == sorted(values), (name, which, values)

# %% [markdown] jupyter={"source_hidden": true} tags=["solution"]
# **Solution 5.** The unbiased MMD estimate leaves out each set's
# diagonal $k(u, u)$ terms, so its expectation is the population MMD,
# 0 for two real batches, at every $n$: two real batches no longer seem
# apart at small $n$. The estimate is noisier at small $n$ and can be
# negative. Below, KID of disjoint sets of 100 images of half B against
# half A: their mean is within about two standard errors of 0, while FID
# of the same sets is clearly above 0 (its bias of 5.7).

# %% jupyter={"source_hidden": true} tags=["solution"]
def kernel_distance(a: np.ndarray, b: np.ndarray) -> float:
    """KID: the unbiased squared MMD with the kernel (u.v / d + 1)^3."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    d, n, m = a.shape[1], len(a), len(b)
    k_aa, k_bb = (a @ a.T / d + 1) ** 3, (b @ b.T / d + 1) ** 3
    k_ab = (a @ b.T / d + 1) ** 3
    return float((k_aa.sum() - np.trace(k_aa)) / (n * (n - 1))
                 + (k_bb.sum() - np.trace(k_bb)) / (m * (m - 1))
                 - 2 * k_ab.mean())


real_pool = activations(real_images)["pool"]
parts = [real_pool[i:i + 100] for i in range(0, len(real_pool) - 99, 100)]
kids = [kernel_distance(part, ref_acts["pool"]) for part in parts]
part_fids = [frechet_distance(feature_statistics(part),
                              feature_statistics(ref_acts["pool"]))
             for part in parts]
kid_mean = np.mean(kids)
kid_se = np.std(kids, ddof=1) / np.sqrt(len(kids))
fid_mean = np.mean(part_fids)
fid_se = np.std(part_fids, ddof=1) / np.sqrt(len(part_fids))
print(f"{len(parts)} sets of 100 real images: KID {kid_mean:+.5f} ± "
      f"{kid_se:.5f}, FID {fid_mean:.3f} ± {fid_se:.3f}")
assert abs(kid_mean) < 3 * kid_se and fid_mean > 10 * fid_se

# %% [markdown] jupyter={"source_hidden": true} tags=["solution"]
# **Solution 6.** Like blurring: it costs both. Noise of 16 grey levels
# on every pixel, the black background included, moves every image off
# the real manifold, so precision falls; and the noisy images form a
# cluster of their own in feature space, whose balls are small and far
# from most real images, so recall falls too. In the smoke configuration
# (mnist-net features, 1,000 images a batch) precision fell from 0.88 to
# 0.31 and recall from 0.86 to 0.10, both gaps over ten times the
# binomial standard error of a share of 1,000 (at most 0.016); FID rose
# from 0.4 to 5.6, less than blurring's 12.1.

# %% jupyter={"source_hidden": true} tags=["solution"]
noise = np.random.default_rng(seed + 6).normal(0, 16, real_images.shape)
noisy = np.clip(np.round(real_images + noise), 0, 255).astype(np.uint8)
noisy_row = scores(noisy, ref_acts)
for name, row in (("real half B", real), ("B, blurred", blur),
                  ("B, noisy", noisy_row)):
    print(f"{name:<12}" + "".join(f"  {k} {v:.3f}" for k, v in row.items()))
assert noisy_row["precision"] < real["precision"] - 0.1
assert noisy_row["recall"] < real["recall"] - 0.1
assert noisy_row["FID"] > real["FID"]

# %% [markdown] jupyter={"source_hidden": true} tags=["solution"]
# **Solution 7.** The arms that share a mean give identical images:
# `learned` the same as `hybrid+small`, `fixed_large` the same as
# `fixed_small`. A one-step process has only the step $t = 0$, and the
# ancestral loop adds no noise at $t = 0$ (it returns the mean, chapter
# 2): the variance is never used, as in DDIM. Only the two models'
# means differ. (All are poor: the one step that respacing "1" keeps is
# the original $t = 0$, so the networks read pure noise as an almost
# clean image.) The variance matters only through the noise of the steps
# before the last, which is why the arms part as soon as there are two
# or more steps.

# %% jupyter={"source_hidden": true} tags=["solution"]
one_step = {arm: few_step_samples(net, diffusion, 1, 0)
            for arm, (net, diffusion) in arms.items()}
print({arm: images.shape for arm, images in one_step.items()})
assert np.array_equal(one_step["learned"], one_step["hybrid+small"])
assert np.array_equal(one_step["fixed_large"], one_step["fixed_small"])

# %% [markdown] jupyter={"source_hidden": true} tags=["solution"]
# **Solution 8.** They grow: with fewer keys, the nearest one can only be
# as near or farther, for every held-out digit. A sample's distance
# shrinks or grows with the size of the training set in the same way, so
# samples must be compared with held-out images against the same keys,
# as 5.11 does; a distance threshold chosen on one data set's size says
# little about another's.

# %% jupyter={"source_hidden": true} tags=["solution"]
fewer_keys = flat(train_pixels[:1000])
held_all, _ = nearest(flat(held_pixels), flat(train_pixels))
held_fewer, _ = nearest(flat(held_pixels), fewer_keys)
print(f"held-out, mean distance to the nearest of {len(train_pixels)} "
      f"training images: {held_all.mean():.3f}; of 1,000: "
      f"{held_fewer.mean():.3f}")
assert np.all(held_fewer >= held_all - 1e-4)
