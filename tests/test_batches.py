"""adm_lib.batches (chapter 4): the data a run opens and checks, and what
each step draws (noise, timesteps, flips), row by row."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor

from adm_lib import batches as bt
from adm_lib import cli
from adm_lib import config as cf
from adm_lib import objectives as ob
from adm_lib.diffusion import UniformSampler
from tests.helpers import CPU, GUIDED, adm_train, config

pytestmark = pytest.mark.usefixtures("one_thread")


# --- the data ----------------------------------------------------------------


@pytest.fixture(scope="module")
def rgb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 colour 8x8 images in 4 classes, as an .npz."""
    path = tmp_path_factory.mktemp("rgb") / "rgb.npz"
    images = np.random.default_rng(1).integers(0, 256, (12, 8, 8, 3))
    np.savez(path, images.astype(np.uint8), np.arange(12) % 4)
    return path


def test_data_whose_channels_differ_from_in_channels_is_refused(rgb, data,
                                                                capsys,
                                                                tmp_path):
    c = config(rgb)  # the mnist preset: in_channels=1
    with pytest.raises(cf.TrainError, match=re.escape(
            f"data '{rgb}' has colour images (3 channel(s)) but "
            "in_channels=1: set in_channels=3, or 0 to take the data's")):
        bt.open_data(c)
    out = tmp_path / "run"
    assert cli.main(adm_train(out, rgb)) == 1
    assert "but in_channels=1" in capsys.readouterr().err
    assert not out.exists()
    resolved = bt.resolve_config(replace(c, in_channels=0),
                                 bt.open_data(replace(c, in_channels=0)))
    assert resolved.in_channels == 3
    with pytest.raises(cf.TrainError, match="has greyscale images"):
        bt.open_data(config(data, in_channels=3))


def test_a_label_far_above_the_others_is_refused(tmp_path):
    path = tmp_path / "typo.npz"
    labels = np.arange(12) % 4
    labels[7] = 1_000_000
    np.savez(path, np.zeros((12, 8, 8), np.uint8), labels)
    c = config(path)
    dataset = bt.open_data(c)
    with pytest.raises(cf.TrainError, match=re.escape(
            f"{path}[7] has label 1000000, but {path} has 5 distinct labels: "
            "that makes a 1000001-class model; if that is meant, set "
            "num_classes=1000001")):
        bt.resolve_config(c, dataset)
    meant = bt.resolve_config(replace(c, num_classes=1_000_001), dataset)
    assert meant.num_classes == 1_000_001  # set explicitly: accepted
    labels[7] = 9  # 10 classes, 5 seen: a subset, not a typo
    np.savez(path, np.zeros((12, 8, 8), np.uint8), labels)
    assert bt.resolve_config(c, bt.open_data(c)).num_classes == 10


# --- each step's draws ---------------------------------------------------------


@pytest.mark.parametrize("world", [2, 3, 4])
def test_a_rank_draws_only_its_rows_as_the_whole_batch_draws_them(
        data, world):
    """Split a batch of 12 over `world` ranks: each draws its rows' noise
    and nothing more, and together they are the single process's draw."""
    c = config(data, "upsampler", batch_size=12, low_res_noise=30,
               random_flip=True, clean_fraction=0.5)
    shape = (1, c.image_size, c.image_size)
    sampler = UniformSampler(c.diffusion_steps)
    whole = bt.draw_step(c, sampler, 5, shape, CPU)
    share = 12 // world
    parts = [bt.draw_step(c, sampler, 5, shape, CPU,
                          rows=slice(r * share, (r + 1) * share))
             for r in range(world)]
    for field in dataclasses.fields(whole):
        mine = [getattr(p, field.name) for p in parts]
        assert all(len(m) == share for m in mine), field.name
        torch.testing.assert_close(torch.cat(mine), getattr(whole, field.name),
                                   rtol=0, atol=0)


# Label dropout: the training side of classifier-free guidance (chapter 4).
def test_label_dropout_adds_a_null_label_and_drops_that_share() -> None:
    config = cf.make_config("diffusion", "mnist", {
        **GUIDED, "num_classes": 4, "in_channels": 1, "label_dropout": 0.3,
        "batch_size": 4000})
    assert cf.unet_arguments(config)["num_classes"] == 5
    assert cf.build_model(config).label_emb.num_embeddings == 5
    draws = bt.draw_step(config, UniformSampler(50), 0, (1, 2, 2),
                         torch.device("cpu"))
    # A Monte-Carlo share of 4000 (seeded) draws: within 4 standard errors.
    se = (0.3 * 0.7 / 4000) ** 0.5
    assert abs(draws.drop.float().mean().item() - 0.3) < 4 * se
    seen = {}

    def model(x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        seen["y"] = y
        return torch.zeros(len(x), 2, *x.shape[2:])

    y = torch.arange(4000) % 4
    ob.diffusion_terms(config, cf.build_diffusion(config), model,
                       torch.zeros(4000, 1, 2, 2), y, draws)
    assert torch.equal(seen["y"], torch.where(draws.drop, 4, y))


def test_dropping_no_labels_leaves_the_training_draws_unchanged() -> None:
    config = cf.make_config("diffusion", "mnist", {**GUIDED})
    draws = bt.draw_step(config, UniformSampler(50), 7, (1, 2, 2),
                         torch.device("cpu"))
    assert not draws.drop.any()
