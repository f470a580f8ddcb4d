"""Tests for adm_lib.inception: outputs, layer layout, TF1 resize, weight loading."""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from adm_lib.inception import (
    WEIGHTS_FILE,
    InceptionV3,
    find_weights,
    load_inception,
    resize_like_tf1,
)

from .reference import EPS32, assert_parity

# From torch-fidelity's utils/util_convert_inception_weights.py: 94 conv layers, each
# saved as conv.weight plus bn.{weight,bias,running_mean,running_var}, and the fc
# layer's weight and bias (no num_batches_tracked counters).
N_TENSORS = 94 * 5 + 2
SOME_SHAPES = {
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
    "Conv2d_4a_3x3.bn.running_var": (192,),
    "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
    "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
    "Mixed_6b.branch7x7dbl_5.conv.weight": (192, 128, 1, 7),
    "Mixed_6d.branch1x1.conv.weight": (192, 768, 1, 1),
    "Mixed_7a.branch7x7x3_3.conv.weight": (192, 192, 7, 1),
    "Mixed_7b.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
    "Mixed_7c.branch_pool.bn.weight": (192,),
    "fc.weight": (1008, 2048),
    "fc.bias": (1008,),
}


def random_net(seed: int = 0) -> InceptionV3:
    """A frozen, randomly initialised network with non-trivial batch-norm tensors."""
    torch.manual_seed(seed)
    net = InceptionV3()
    with torch.no_grad():
        for name, tensor in net.state_dict().items():
            if ".bn." in name or name == "fc.bias":
                tensor.uniform_(0.5, 1.5)
    return net.eval().requires_grad_(False)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Run this module's small forwards on one thread, then restore the setting."""
    # Two intra-op threads on a 2-core machine that is also running something else
    # made these tests ~10x slower (threads spin waiting for each other).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def net() -> InceptionV3:
    """One random network shared by the module's tests."""
    return random_net()


class Float64Images(torch.Tensor):
    """Images whose cast to float32 is skipped: InceptionV3's forward, which
    casts its input, then runs in float64 (the exact value of the error
    model of tests/reference.py) on a float64 copy of the network."""

    def to(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.as_subclass(torch.Tensor)


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty torch hub folder, no $ADM_INCEPTION_WEIGHTS; returns the cache path."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.delenv("ADM_INCEPTION_WEIGHTS", raising=False)
    return tmp_path / "hub" / "checkpoints" / WEIGHTS_FILE


@pytest.mark.parametrize("size", [32, 64])
def test_outputs_for_uint8_and_float_gray_and_rgb(net: InceptionV3, size: int) -> None:
    torch.manual_seed(size)
    gray = torch.randint(0, 256, (1, 1, size, size), dtype=torch.uint8)
    other = torch.randint(0, 256, (1, 3, size, size), dtype=torch.uint8)
    rgb = torch.cat([gray.repeat(1, 3, 1, 1), other])
    results = {}
    with torch.no_grad():
        for name, images in [("gray", gray), ("rgb", rgb)]:
            out = results[name] = net(images)
            assert {k: tuple(v.shape) for k, v in out.items()} == {
                "pool": (len(images), 2048),
                "spatial": (len(images), 2023),
                "logits": (len(images), 1008),
            }
            assert all(v.dtype == torch.float32 for v in out.values())
            assert all(v.isfinite().all() for v in out.values())
            as_float = net(images.float())
            for key in out:  # the same float32 input: bit for bit
                torch.testing.assert_close(as_float[key], out[key], rtol=0, atol=0)
        exact = copy.deepcopy(net).double()(gray.double().as_subclass(Float64Images))
    # One channel is read as grey RGB. Batch size may change the convolutions'
    # order of summation: two float32 evaluations, by the error model.
    assert_parity({key: (value, exact[key], results["rgb"][key][:1])
                   for key, value in results["gray"].items()})


def test_bad_shape_is_refused(net: InceptionV3) -> None:
    with pytest.raises(ValueError, match="N x 1|3"):
        net(torch.zeros(1, 4, 32, 32))


def test_spatial_is_nhwc_of_mixed_6d_branch1x1(net: InceptionV3) -> None:
    captured = []
    hook = net.Mixed_6d.branch1x1.register_forward_hook(
        lambda module, args, output: captured.append(output.clone())
    )
    try:
        with torch.no_grad():
            out = net(torch.rand(2, 3, 40, 40) * 255)
    finally:
        hook.remove()
    (branch,) = captured
    assert branch.shape == (2, 192, 17, 17)
    assert (branch >= 0).all()  # after the ReLU
    expected = branch[:, :7].permute(0, 2, 3, 1).reshape(2, -1)
    torch.testing.assert_close(out["spatial"], expected, rtol=0, atol=0)  # a copy


def test_logits_are_unbiased(net: InceptionV3) -> None:
    with torch.no_grad():
        out = net(torch.rand(1, 3, 32, 32) * 255)
        # The same float32 product: bit for bit.
        torch.testing.assert_close(out["logits"], out["pool"] @ net.fc.weight.T,
                                   rtol=0, atol=0)
        # The bias, drawn from [0.5, 1.5], is far beyond allclose's 1e-5.
        assert not torch.allclose(out["logits"], net.fc(out["pool"]))


def test_state_dict_matches_torch_fidelity_weights_file(net: InceptionV3) -> None:
    state = net.state_dict()
    assert len(state) == N_TENSORS
    for key, shape in SOME_SHAPES.items():
        assert tuple(state[key].shape) == shape, key
    assert not any("num_batches_tracked" in key for key in state)
    assert all(value.dtype == torch.float32 for value in state.values())
    assert sum(key.endswith(".conv.weight") for key in state) == 94


def test_resize_constant_stays_constant() -> None:
    for height, width in [(32, 32), (17, 45), (400, 300)]:
        images = torch.full((1, 2, height, width), 77.0)
        out = resize_like_tf1(images)
        assert out.shape == (1, 2, 299, 299)
        assert (out == 77.0).all()


def test_resize_299_is_identity() -> None:
    images = torch.rand(2, 3, 299, 299) * 255
    assert torch.equal(resize_like_tf1(images), images)


def test_resize_samples_like_tf1() -> None:
    # TF1 without half-pixel centres: output i reads input i * in / out, and the
    # last samples clamp to the last input pixel.
    row = torch.tensor([0.0, 10.0]).view(1, 1, 1, 2).expand(1, 1, 2, 2)
    out = resize_like_tf1(row, size=4)
    assert out[0, 0, 0].tolist() == [0.0, 5.0, 10.0, 10.0]


def test_resize_positions_are_rounded_to_float32_as_tf_does() -> None:
    """The sampling positions i * (in / out) take in / out rounded to float32
    (TF's arithmetic), whether the scale is a tensor or a host number."""
    for n_in in (7, 28, 32, 64, 100, 256, 333):
        for dtype in (torch.float32, torch.float64):
            scale = torch.tensor(n_in / 299, dtype=torch.float32)
            pos = torch.arange(299, dtype=dtype) * scale
            column = torch.arange(n_in, dtype=dtype).view(1, 1, 1, n_in)
            lo = pos.long()
            hi = (lo + 1).clamp_max(n_in - 1)
            expected = lo + (hi - lo) * (pos - lo.to(dtype))
            out = resize_like_tf1(column.expand(1, 1, 2, n_in))[0, 0, 0]
            assert torch.equal(out, expected), (n_in, dtype)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_resize_never_syncs_a_gpu() -> None:
    images = torch.rand(2, 3, 32, 32, device="cuda") * 255
    resize_like_tf1(images)  # warm-up: kernels loaded
    torch.cuda.set_sync_debug_mode("error")
    try:
        resize_like_tf1(images)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_find_weights_order(hub: Path, tmp_path: Path, monkeypatch) -> None:
    explicit, from_env = tmp_path / "explicit.pth", tmp_path / "env.pth"
    for file in (explicit, from_env, hub):
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_bytes(b"")
    monkeypatch.setenv("ADM_INCEPTION_WEIGHTS", str(from_env))
    assert find_weights(explicit) == explicit
    assert find_weights(str(explicit)) == explicit
    assert find_weights() == from_env
    monkeypatch.delenv("ADM_INCEPTION_WEIGHTS")
    assert find_weights() == hub


def test_a_missing_path_that_was_asked_for_is_an_error(hub: Path, tmp_path,
                                                        monkeypatch) -> None:
    hub.parent.mkdir(parents=True)
    hub.write_bytes(b"")  # there is a file in the cache, but it was not asked for
    with pytest.raises(FileNotFoundError, match="given.pth"):
        find_weights(tmp_path / "given.pth")
    monkeypatch.setenv("ADM_INCEPTION_WEIGHTS", str(tmp_path / "env.pth"))
    with pytest.raises(FileNotFoundError) as info:
        find_weights()
    message = str(info.value)
    for place in ("env.pth", "ADM_INCEPTION_WEIGHTS", str(hub)):
        assert place in message
    assert "torch-fidelity" in message and "releases/download" in message


def test_load_inception_round_trip(net: InceptionV3, tmp_path: Path) -> None:
    file = tmp_path / "w.pth"
    torch.save(net.state_dict(), file)
    loaded = load_inception(file)
    assert not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    for key, value in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    images = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        for key, value in net(images).items():
            assert torch.equal(loaded(images)[key], value), key


def test_load_inception_accepts_batchnorm_counters(net, tmp_path: Path) -> None:
    # A state_dict saved from torch-fidelity's own module (nn.BatchNorm2d) also
    # holds `num_batches_tracked` counters; they are dropped.
    state = dict(net.state_dict())
    state["Mixed_5b.branch1x1.bn.num_batches_tracked"] = torch.tensor(0)
    torch.save(state, tmp_path / "w.pth")
    loaded = load_inception(tmp_path / "w.pth").state_dict()
    assert loaded.keys() == net.state_dict().keys()  # the counter dropped
    for name, value in net.state_dict().items():
        assert torch.equal(loaded[name], value), name


def test_load_inception_mismatch_is_explained(net, tmp_path: Path) -> None:
    state = dict(net.state_dict())
    del state["fc.bias"]
    state["classifier.weight"] = torch.zeros(3)
    state["fc.weight"] = torch.zeros(1000, 2048)
    torch.save(state, tmp_path / "w.pth")
    with pytest.raises(RuntimeError) as info:
        load_inception(tmp_path / "w.pth")
    message = str(info.value)
    for part in ("missing", "fc.bias", "unexpected", "classifier.weight", "shape"):
        assert part in message
    assert "fc.weight (1000, 2048) != (1008, 2048)" in message


def test_load_inception_corrupt_file(tmp_path: Path) -> None:
    file = tmp_path / "w.pth"
    file.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="cannot read Inception weights"):
        load_inception(file)
    torch.save([1, 2, 3], file)
    with pytest.raises(RuntimeError, match="not a state_dict"):
        load_inception(file)


def test_real_weights_give_finite_features() -> None:
    try:
        path = find_weights()
    except FileNotFoundError:
        pytest.skip(f"{WEIGHTS_FILE} not found (set ADM_INCEPTION_WEIGHTS to run)")
    model = load_inception(path)
    torch.manual_seed(0)
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        out = model(images)
    assert all(v.isfinite().all() for v in out.values())
    assert (out["pool"] >= 0).all() and out["pool"].abs().sum() > 0
    probs = out["logits"].softmax(dim=1)
    # The normaliser and this sum each add 1008 positive float32 terms (in a
    # tree: log2(1008) roundings deep), and each p_i is rounded once.
    atol = (2 * math.log2(1008) + 1) * EPS32
    assert torch.allclose(probs.sum(dim=1), torch.ones(2), rtol=0, atol=atol)
    assert os.fspath(path).endswith(".pth")
