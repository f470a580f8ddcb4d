"""Tiny training runs and what the tests read from them.

Shared by the tests of chapter 4's modules and the foundation beneath them
(test_config, test_batches, test_objectives, test_checkpoints, test_train,
test_models, test_runlog, test_cli). Every run here is tiny (8x8 grey
images, a 32-channel UNet, a few steps) so that a file runs in well under a
minute on a 2-core CPU; the fixtures that make the data and the reference
run are in conftest.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from adm_lib import checkpoints as ck
from adm_lib import config as cf
from adm_lib.models import load_run
from adm_lib.train import train

ROOT = Path(__file__).resolve().parents[1]
TIMING = {"steps_per_s", "images_per_s"}  # wall-clock: differs run to run
CPU = torch.device("cpu")

# A model that builds and steps in milliseconds: 8x8 images, channel_mult
# 1,2 (resolutions 8 and 4), attention at 4x4. Strings, as `--set` gives
# them: make_config reads them as the fields' tuples.
TINY = {
    "image_size": 8, "small_size": 4, "num_channels": 32,
    "num_res_blocks": 1, "channel_mult": "1,2", "attention_resolutions": "4",
    "num_head_channels": 32, "classifier_width": 32, "classifier_depth": 1,
    "classifier_attention_resolutions": "4", "diffusion_steps": 50,
    "batch_size": 4, "steps": 2, "sample_steps": "ddim2", "num_samples": 4,
    "num_workers": 0, "device": "cpu", "log_interval": 1,
    "save_interval": 1000, "sample_interval": 1000, "eval_interval": 1000,
    "eval_images": 8, "val_fraction": 0.25,
    # The tolerances below are float32's; "auto" would train in bf16 on a
    # CPU with native bf16.
    "precision": "fp32",
}
# Dropout and the loss-aware sampler: the RNG and the sampler's history must
# both come back on resume. Two diffusion steps fill the sampler's history
# (10 losses per t) within the first few steps, so its weights then matter.
RESUMABLE = {
    "dropout": 0.1, "schedule_sampler": "loss-second-moment",
    "diffusion_steps": 2, "batch_size": 8, "steps": 6, "save_interval": 1,
    "keep_checkpoints": 10,
}


def config(data: Path, kind: str = "diffusion", **overrides) -> cf.TrainConfig:
    """A tiny config of `kind` on the fixture's data."""
    return cf.make_config(kind, overrides={**TINY, "data": str(data),
                                           **overrides})


def set_args(values: dict) -> list[str]:
    """`--set k=v` arguments for the CLI."""
    args = []
    for key, value in values.items():
        text = str(value).lower() if isinstance(value, bool) else str(value)
        args += ["--set", f"{key}={text}"]
    return args


def adm_train(out: Path, data: Path, *extra: str,
              settings: dict | None = None) -> list[str]:
    """`adm train diffusion` in this process, tiny: its argv."""
    return ["train", "diffusion", "--out", str(out), "--data", str(data),
            "--quiet", *set_args({**TINY, **(settings or {})}), *extra]


def env() -> dict[str, str]:
    """A subprocess environment: one thread, this checkout importable."""
    path = os.pathsep.join(filter(None, [str(ROOT),
                                         os.environ.get("PYTHONPATH")]))
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "PYTHONPATH": path}


def metrics(out: Path) -> list[dict]:
    """A run's metric records without the wall-clock fields."""
    return [{k: v for k, v in r.items() if k not in TIMING}
            for r in ck.read_metrics(out)]


def weights(out: Path, which: str = "ema") -> dict[str, torch.Tensor]:
    """The weights of a run's newest checkpoint: EMA, "model" (raw), a rate."""
    return load_run(out, which).model.state_dict()


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor],
                atol: float = 0.0) -> None:
    """Same keys; tensors bit-identical (atol 0) or close."""
    assert a.keys() == b.keys()
    for name in a:
        if atol:
            torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0,
                                       msg=name)
        else:
            assert torch.equal(a[name], b[name]), name


def steps_of(out: Path) -> list[int]:
    """The steps of the checkpoint files in a run folder."""
    return [int(p.stem.split("_")[1])
            for p in sorted((out / "checkpoints").glob("step_*.pt"))]


def damage(path: Path) -> None:
    """Cut a file to half its size, as a crash on a lax file system might."""
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


# The guidance and sampling tests' runs: 4 classes of 8x8 noise images.
GUIDED = {
    "image_size": 8, "num_channels": 32, "num_res_blocks": 1,
    "channel_mult": "1,2", "attention_resolutions": "4",
    "num_head_channels": 32, "classifier_width": 32, "classifier_depth": 1,
    "classifier_attention_resolutions": "4", "diffusion_steps": 50,
    "batch_size": 4, "steps": 2, "num_workers": 0, "device": "cpu",
    "log_interval": 1, "save_interval": 1000, "sample_interval": 1000,
    "eval_interval": 1000, "eval_images": 8, "val_fraction": 0.25,
}


def tiny_guided_runs(root: Path) -> dict[str, Path]:
    """Tiny runs on 4-class 8x8 data: conditional with label dropout,
    unconditional, and a classifier."""
    data = root / "tiny.npz"
    rng = np.random.default_rng(0)
    labels = np.arange(24) % 4
    images = rng.integers(0, 256, (24, 8, 8)).astype(np.uint8)
    np.savez(data, images, labels)
    # A high learning rate: after a few steps the labels matter.
    settings = {**GUIDED, "data": str(data), "steps": 4, "lr": 1e-2}
    kinds = {
        "conditional": ("diffusion", {"label_dropout": 0.25}),
        "unconditional": ("diffusion", {"class_cond": False}),
        "classifier": ("classifier", {}),
    }
    for name, (kind, extra) in kinds.items():
        train(cf.make_config(kind, "mnist", {**settings, **extra}),
                 root / name, progress=False)
    return {name: root / name for name in kinds} | {"data": data}
