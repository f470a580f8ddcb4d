"""Tests of the data-set feature nets (adm_lib.datanets) and their weight files."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from adm_lib import datanets
from adm_lib.data import load_dataset
from adm_lib.datanets import NETS, DataSetNet, load_data_set_net, mnist5k_split

ROOT = Path(__file__).resolve().parent.parent
CIFAR_TEST = ROOT / ".." / "shared" / "data" / "cifar10" / "test.zip"
# What data/make_feature_nets.py reached, less a margin (see data/README.md).
MIN_ACCURACY = {"mnist": 0.97, "cifar10": 0.83}


@pytest.fixture(scope="module", params=list(NETS))
def net(request: pytest.FixtureRequest) -> DataSetNet:
    """Each trained net, loaded once."""
    return load_data_set_net(request.param)


def _pixels(
    source: str | Path, indices: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen images of a data set as uint8 N x C x H x W, with their labels."""
    ds = load_dataset(source)
    images = ds.images(indices)
    labels = torch.tensor([ds[i][1] for i in indices])
    return ((images + 1) * 127.5).round().to(torch.uint8), labels


def _random_uint8(net: DataSetNet, n: int = 4, size: int = 32) -> torch.Tensor:
    """Random pixels shaped for ``net``."""
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, net.in_channels, size, size), generator=gen).to(
        torch.uint8
    )


def test_outputs_keys_shapes_dtypes(net: DataSetNet) -> None:
    """Float32 "pool", "spatial" and "logits" of the documented sizes."""
    out = net(_random_uint8(net))
    assert set(out) == {"pool", "spatial", "logits"}
    assert out["pool"].shape == (4, net.feature_dims["pool"])
    assert out["pool"].shape[1] >= 128
    assert out["spatial"].shape == (4, datanets.SPATIAL_CHANNELS * 64)
    assert 200 <= out["spatial"].shape[1] <= 500
    assert out["logits"].shape == (4, 10)
    assert all(v.dtype == torch.float32 for v in out.values())
    assert all(torch.isfinite(v).all() for v in out.values())


def test_uint8_and_float_input_agree(net: DataSetNet) -> None:
    """Pixels as uint8 or as float32 in [0, 255] give the same features."""
    x = _random_uint8(net)
    a, b = net(x), net(x.float())
    for key in a:  # the same float32 input: bit for bit
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


@pytest.mark.parametrize("size", [28, 64])
def test_other_sizes_are_resized(net: DataSetNet, size: int) -> None:
    """Other sizes are resized to 32x32 bilinearly (antialiased) before the net."""
    x = _random_uint8(net, size=size).float()
    out = net(x)
    resized = F.interpolate(
        x, size=(32, 32), mode="bilinear", align_corners=False, antialias=True
    )
    expected = net(resized)
    assert out["pool"].shape == (4, net.feature_dims["pool"])
    for key in out:  # the same resize, the same float32 input: bit for bit
        torch.testing.assert_close(out[key], expected[key], rtol=0, atol=0)


def test_spatial_is_nhwc_of_the_8x8_map(net: DataSetNet) -> None:
    """ "spatial" is the first channels of stage 2's 8x8 map, flattened as NHWC."""
    seen: list[torch.Tensor] = []
    handle = net.stage2.register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        out = net(_random_uint8(net))
    finally:
        handle.remove()
    (mid,) = seen
    assert mid.shape[-2:] == (8, 8)
    c = datanets.SPATIAL_CHANNELS
    nhwc = mid[:, :c].permute(0, 2, 3, 1).reshape(len(mid), -1)
    torch.testing.assert_close(out["spatial"], nhwc, rtol=0, atol=0)  # a copy
    # Element [h, w, ch] of image 0 sits at (h * 8 + w) * c + ch.
    assert out["spatial"][0, (3 * 8 + 5) * c + 2] == mid[0, 2, 3, 5]


@pytest.mark.parametrize("name", list(NETS))
def test_loaded_net_is_frozen_and_accurate(name: str) -> None:
    """Eval mode, no gradients, and a recorded accuracy above the threshold."""
    net = load_data_set_net(name)
    assert not net.training
    assert not any(p.requires_grad for p in net.parameters())
    assert all(p.dtype == torch.float32 for p in net.parameters())
    assert net.accuracy is not None and net.accuracy >= MIN_ACCURACY[name]


def standard_error(accuracy: float, n: int, population: int) -> float:
    """Standard error of the accuracy on n of `population` images (drawn
    without replacement) about the accuracy on all of them."""
    shrink = (population - n) / (population - 1)
    return (accuracy * (1 - accuracy) / n * shrink) ** 0.5


def test_mnist_accuracy_recomputed() -> None:
    """500 images of the held-out mnist5k split score near the recorded accuracy."""
    net = load_data_set_net("mnist")
    _, test_idx = mnist5k_split()
    images, labels = _pixels("mnist5k", test_idx[:500].tolist())
    acc = (net(images)["logits"].argmax(1) == labels).float().mean().item()
    # Recorded on all 1,000 held-out images: within 4 standard errors.
    se = standard_error(net.accuracy, 500, len(test_idx))
    assert abs(acc - net.accuracy) < 4 * se, (acc, net.accuracy)


@pytest.mark.skipif(
    not CIFAR_TEST.exists(),
    reason="CIFAR-10 test set ../shared/data/cifar10/test.zip is not present",
)
def test_cifar10_accuracy_recomputed() -> None:
    """Every 20th CIFAR-10 test image (500) scores near the recorded accuracy."""
    net = load_data_set_net("cifar10")
    images, labels = _pixels(CIFAR_TEST, list(range(0, 10000, 20)))
    acc = (net(images)["logits"].argmax(1) == labels).float().mean().item()
    # Recorded on all 10,000 test images: within 4 standard errors.
    se = standard_error(net.accuracy, 500, 10000)
    assert abs(acc - net.accuracy) < 4 * se, (acc, net.accuracy)


def test_unknown_name() -> None:
    """An unknown name is a ValueError that lists the known ones."""
    with pytest.raises(ValueError, match="known names: mnist, cifar10"):
        load_data_set_net("imagenet")


def test_missing_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A missing weights file says how to make it."""
    missing = dataclasses.replace(NETS["mnist"], path=tmp_path / "absent.pt")
    monkeypatch.setitem(NETS, "mnist", missing)
    with pytest.raises(FileNotFoundError, match=r"python data/make_feature_nets\.py"):
        load_data_set_net("mnist")


def test_constructor_sizes() -> None:
    """Untrained nets of other widths keep the interface."""
    net = DataSetNet(3, 7, width=32).eval()
    out = net(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    assert out["pool"].shape == (2, 256)
    assert out["logits"].shape == (2, 7)
    with pytest.raises(ValueError):
        DataSetNet(2, 10)
