"""The evaluator's pieces around chapter 5's scores: the user's own images.

Hand-written. `read_images` reads a folder, a `.zip` or an `.npz` of
images (resized as training resizes them: `adm_lib.data`); `write_reference`
writes them as the reference's batch, with its Inception statistics;
`bound_bpd` is chapter 2's estimate of the bound in bits/dim on held-out
images, with its standard error; and `TrainingFID` scores a run's EMA while
it trains (`train(..., fid=...)`), with the FID of real images at the same
n beside it, the small-sample bias that chapter 5 measures.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from adm_lib.checkpoints import MetricsLog
from adm_lib.config import TrainConfig
from adm_lib.data import DataError, ImageDataset, load_dataset
from adm_lib.devices import autocast_model, resolve_precision
from adm_lib.diffusion import (
    GaussianDiffusion,
    stratified_timesteps,
    vlb_estimate,
)
from adm_lib.errors import TrainError, with_article
from adm_lib.files import write_atomic
from adm_lib.metrics import (
    Batch,
    FIDStatistics,
    compute_activations,
    feature_extractor,
    feature_label,
    feature_statistics,
    frechet_distance,
    read_batch,
)
from adm_lib.models import TrainedModel
from adm_lib.runlog import sample_grid
from adm_lib.seeds import step_seed
from adm_lib.viz import to_uint8

__all__ = ["read_images", "write_reference", "bound_terms", "mean_se",
           "bound_bpd", "default_features", "TrainingFID", "draw_fid"]


def _pick(data: ImageDataset, count: int | None, seed: int) -> list[int]:
    """All of the data set's indices, or a seeded random `count` of them."""
    if count is None or count >= len(data):
        return list(range(len(data)))
    g = torch.Generator().manual_seed(step_seed(seed, 7))
    return torch.randperm(len(data), generator=g)[:count].sort().values.tolist()


def _pixels(data: ImageDataset, indices: list[int]) -> np.ndarray:
    """The images at `indices` as uint8 N x H x W x C."""
    return torch.stack([data.pixels(i)[0] for i in indices]).permute(
        0, 2, 3, 1).numpy()


def read_images(source: str | os.PathLike, image_size: int | None = None,
                count: int | None = None, seed: int = 0) -> Batch:
    """A folder, .zip or .npz of images (or "mnist5k") as a batch.

    `image_size` resizes and centre-crops as training does (None: the
    images' own size, which they must share); `count` takes a seeded
    random subset. A reference batch read whole keeps its statistics.
    """
    if count is not None and count < 1:
        raise ValueError(f"count={count}: expected >= 1")
    path = Path(source)
    if path.suffix.lower() == ".npz" and path.is_file() and count is None:
        try:  # a batch: the evaluator's own reading, at once
            batch = read_batch(path)
        except ValueError:  # not one (N x H x W, say): read as a data set
            batch = None
        size = None if batch is None else batch.images.shape[1:3]
        if size is not None and image_size in (None, size[0]) and (
                size[0] == size[1]):
            return batch
    try:
        data = load_dataset(source, resolution=image_size)
    except DataError as err:
        raise ValueError(str(err)) from None
    chosen = _pick(data, count, seed)
    labels = None if data.labels is None else data.labels[chosen]
    return Batch(_pixels(data, chosen), labels, None, None, str(source))


def write_reference(source: str | os.PathLike, out: str | os.PathLike,
                    image_size: int | None = None, count: int | None = None,
                    features: str = "inception",
                    weights: str | os.PathLike | None = None,
                    batch_size: int = 64, device: str | torch.device = "cpu",
                    seed: int = 0, progress: bool = False) -> Batch:
    """Write the reference's batch of `source`'s images to `out` (.npz).

    arr_0 uint8 N x H x W x C and arr_1 labels if the images have them;
    with Inception's features also mu, sigma, mu_s and sigma_s, which the
    evaluator then uses as given (a data-set net's statistics would not
    be: the evaluator computes those from arr_0).
    """
    extractor = None
    if features == "inception":  # its weights found before the reading
        extractor = feature_extractor(features, weights, device)
    batch = read_images(source, image_size, count, seed)
    arrays = {"arr_0": batch.images}
    if batch.labels is not None:
        arrays["arr_1"] = batch.labels.astype(np.int64)
    if extractor is not None:
        acts = compute_activations(batch.images, extractor, batch_size,
                                   device, progress)
        batch.stats = feature_statistics(acts["pool"])
        batch.stats_spatial = feature_statistics(acts["spatial"])
        arrays.update(mu=batch.stats.mu, sigma=batch.stats.sigma,
                      mu_s=batch.stats_spatial.mu,
                      sigma_s=batch.stats_spatial.sigma)
    write_atomic(Path(out), lambda f: np.savez(f, **arrays))
    return batch


@torch.no_grad()
def bound_terms(trained: TrainedModel, source: str | os.PathLike,
                count: int | None = None, seed: int = 0, batch_size: int = 64,
                device: str | torch.device = "cpu",
                progress: bool = False) -> dict[str, torch.Tensor]:
    """Per-image bound (bits/dim, "vlb") and eps error ("mse") on `source`.

    Chapter 2's unbiased estimate, one stratified timestep per image:
    L_T + L_0 + (T - 1) L_t. The images, timesteps and noise depend on
    `seed` and the data only, so two models given the same ones see the
    same draws: their difference is paired.
    """
    if trained.kind != "diffusion":
        raise ValueError(f"the bound is a diffusion model's; {trained.path} "
                         f"is {with_article(trained.kind)}")
    try:
        data = load_dataset(source, resolution=trained.image_size,
                            channels=trained.in_channels)
    except DataError as err:
        raise ValueError(str(err)) from None
    conditional = trained.num_classes > 0
    if conditional and data.labels is None:
        raise ValueError(f"{source} has no labels, and {trained.path} is "
                         "class-conditional")
    chosen = _pick(data, count, seed)
    g = torch.Generator().manual_seed(step_seed(seed, 8))
    diffusion = trained.diffusion
    t_all = stratified_timesteps(len(chosen), diffusion.num_timesteps, g)
    t_all = t_all[torch.randperm(len(chosen), generator=g)]
    terms: dict[str, list[torch.Tensor]] = {"vlb": [], "mse": []}
    for start in tqdm(range(0, len(chosen), batch_size), disable=not progress,
                      desc="bound"):
        rows = chosen[start:start + batch_size]
        x = data.images(rows)
        noise = torch.randn(x.shape, generator=g)
        kwargs = {}
        if conditional:
            kwargs["y"] = torch.as_tensor(data.labels[rows]).long().to(device)
        got = vlb_estimate(diffusion, trained.model, x.to(device),
                           t_all[start:start + len(rows)], noise.to(device),
                           model_kwargs=kwargs)
        for key in terms:
            terms[key].append(got[key].double().cpu())
    return {key: torch.cat(values) for key, values in terms.items()}


def mean_se(values: torch.Tensor) -> tuple[float, float]:
    """The mean of independent values and its standard error."""
    n = len(values)
    se = values.std().item() / math.sqrt(n) if n > 1 else math.nan
    return values.mean().item(), se


def bound_bpd(trained: TrainedModel, source: str | os.PathLike,
              count: int | None = None, seed: int = 0, batch_size: int = 64,
              device: str | torch.device = "cpu",
              progress: bool = False) -> dict[str, float]:
    """The bound (bits/dim) on `source`'s images, with its standard error.

    The mean of `bound_terms`. Its standard error is the images' spread
    over sqrt(n), which counts the timestep's draw too (and, treating the
    stratified draws as independent, slightly overstates it).
    """
    terms = bound_terms(trained, source, count, seed, batch_size, device,
                        progress)
    bpd, se = mean_se(terms["vlb"])
    return {"bpd": bpd, "bpd_se": se, "mse": terms["mse"].mean().item(),
            "n": len(terms["vlb"])}


def default_features(channels: int) -> str:
    """The data-set net for images of `channels`: MNIST's grey, CIFAR's."""
    return "mnist" if channels == 1 else "cifar10"


@dataclass
class TrainingFID:
    """FID of the EMA's samples against real images, every `interval` steps.

    `samples` images are drawn with fixed noise (and labels, each class in
    turn) by the run's grid sampler (`sample_steps`), and scored with
    `features` (default: the data-set net for the images' channels)
    against `ref_images` of `ref` (a folder, .zip or .npz; default: up to
    1000 training images, apart from those of the floor). Each record also
    holds `fid_floor`: the FID of `samples` other real images against the
    same reference, the bias a FID of that n carries (chapter 5.7);
    compare only FIDs of one n.
    """

    interval: int
    samples: int = 256
    features: str | None = None
    ref: str | None = None
    ref_images: int | None = None
    batch_size: int = 64
    _ref: FIDStatistics | None = field(default=None, init=False, repr=False)
    _floor: float = field(default=math.nan, init=False, repr=False)
    _ref_n: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("interval", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: expected "
                                 ">= 1")
        for name in ("samples", "ref_images"):  # a covariance needs two
            if (getattr(self, name) or 2) < 2:
                raise ValueError(f"{name}={getattr(self, name)}: expected "
                                 ">= 2")

    def note(self) -> str:
        """What a record's numbers mean, for a log or a printout."""
        net = (feature_label(self.features) if self.features
               else "(the data set's net)")
        real = f"{self.ref_images or 'up to 1000'} real images"
        return (f"FID{net} of {self.samples} EMA samples against {real} "
                f"({self.ref or 'training images'}); fid_floor is"
                f" real images' FID at the same n, its small-sample bias "
                "(chapter 5.7): compare only FIDs of one n")

    def _prepare(self, config: TrainConfig, data: ImageDataset,
                 extractor: nn.Module, device: torch.device) -> None:
        """The reference's statistics and the floor, once per run."""
        g = torch.Generator().manual_seed(step_seed(config.seed, 9))
        order = torch.randperm(len(data), generator=g).tolist()
        wanted = self.ref_images or 1000
        if self.ref is None:
            if len(data) < (self.ref_images or 2) + self.samples:
                raise TrainError(
                    f"the training data has {len(data)} images: too few "
                    f"for fid samples={self.samples} and ref_images="
                    f"{wanted} apart")
            real = _pixels(data, order[:self.samples])
            ref = _pixels(data, order[self.samples:][:wanted])
        else:
            try:
                ref = read_images(self.ref, config.image_size, wanted,
                                  config.seed).images
            except ValueError as err:
                raise TrainError(f"fid ref={self.ref}: {err}") from None
            real = _pixels(data, order[:self.samples])
        acts = [compute_activations(x, extractor, self.batch_size, device)
                for x in (ref, real)]
        self._ref = feature_statistics(acts[0]["pool"])
        self._ref_n = len(ref)
        self._floor = frechet_distance(feature_statistics(acts[1]["pool"]),
                                       self._ref)

    @torch.no_grad()
    def __call__(self, config: TrainConfig, diffusion: GaussianDiffusion,
                 ema: nn.Module, data: ImageDataset, out: Path,
                 log: MetricsLog, step: int, device: torch.device) -> None:
        """Score the EMA at `step`; append the record and redraw fid.png."""
        if config.kind != "diffusion":
            raise TrainError("FID while training scores a diffusion model's "
                             f"samples, not a {config.kind}'s")
        self.features = self.features or default_features(config.in_channels)
        extractor = feature_extractor(self.features, device=device)
        if self._ref is None:
            self._prepare(config, data, extractor, device)
        precision = resolve_precision(config.precision, device)
        images = sample_grid(replace(config, num_samples=self.samples),
                             diffusion, autocast_model(ema, precision,
                                                       device),
                             data, torch.arange(0), device)
        acts = compute_activations(to_uint8(images), extractor,
                                   self.batch_size, device)
        fid = frechet_distance(feature_statistics(acts["pool"]), self._ref)
        log.append({"step": step, "fid": fid, "fid_floor": self._floor,
                    "fid_n": self.samples, "fid_ref_n": self._ref_n})
        draw_fid(out, self.features)


def draw_fid(out: Path, features: str) -> Path:
    """The run's FID records (made with `features`) as out/fid.png."""
    import matplotlib

    matplotlib.use("Agg")  # a file, with or without a display
    import matplotlib.pyplot as plt

    from adm_lib.checkpoints import read_metrics

    records = [r for r in read_metrics(out) if "fid" in r]
    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(steps, [r["fid"] for r in records], "o-", label="EMA samples")
    ax.plot(steps, [r["fid_floor"] for r in records], "--",
            label="real images (bias at this n)")
    n = records[-1]["fid_n"]
    ax.set(xlabel="training step", ylabel=f"FID{feature_label(features)}, "
           f"n = {n}",
           title="FID while training")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "fid.png"
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return path
