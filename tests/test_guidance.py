"""adm_lib.guidance (chapter 6): the classifier's gradient, guided and
classifier-free sampling, sampling in batches with per-sample noise.

Models here are tiny (8x8 grey images, a few training steps) and run on
one thread, so the file takes well under a minute on a 2-core CPU.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor

from adm_lib import guidance as gu
from adm_lib.diffusion import (
    GaussianDiffusion,
    ddim_sample_loop,
    p_sample,
    p_sample_loop,
    respace,
)
from adm_lib.forward import get_named_beta_schedule
from adm_lib.guidance import (
    classifier_cond_fn,
    classifier_free_model,
    classifier_grad,
    guided_sample,
    ignore_labels,
    sample_batches,
    sample_noise,
    sample_seed,
)
from adm_lib.models import load_run
from adm_lib.unet import EncoderUNetModel, UNetModel
from adm_lib.viz import to_uint8
from tests.helpers import tiny_guided_runs

from .reference import K_BF16, assert_parity, bf16_error

# Every test here, and the module's runs, with one intra-op thread.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny runs on 4-class 8x8 data (`tiny_guided_runs`)."""
    return tiny_guided_runs(tmp_path_factory.mktemp("runs"))


def small_classifier() -> EncoderUNetModel:
    """A random classifier; its zero-initialised output layer perturbed."""
    torch.manual_seed(0)
    model = EncoderUNetModel(
        image_size=8, in_channels=1, model_channels=32, out_channels=4,
        num_res_blocks=1, attention_resolutions=(), channel_mult=(1, 2),
        pool="adaptive").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def test_classifier_grad_is_the_gradient_of_each_log_probability() -> None:
    classifier = small_classifier()
    nets = {torch.float32: classifier,
            torch.float64: copy.deepcopy(classifier).double()}
    x = torch.randn(3, 1, 8, 8)
    t, y = torch.tensor([0, 20, 45]), torch.tensor([3, 0, 2])
    grad = classifier_grad(classifier, x, t, y)
    assert grad.abs().min() > 0
    for i in range(3):
        expected = {}
        for dtype, net in nets.items():
            xi = x[i:i + 1].to(dtype).requires_grad_(True)
            log_p = net(xi, t[i:i + 1]).log_softmax(-1)[0, y[i]]
            (expected[dtype],) = torch.autograd.grad(log_p, xi)
        # One image alone or in a batch: the convolutions may sum in another
        # order. The error model of tests/reference.py, float64 as exact.
        assert_parity({f"grad {i}": (*expected.values(), grad[i:i + 1])})
    scaled = classifier_cond_fn(classifier, 2.5)(x, t, y=y, other=None)
    # The same gradient times the same float: bit for bit.
    torch.testing.assert_close(scaled, 2.5 * grad, rtol=0, atol=0)


def test_classifier_grad_keeps_float64() -> None:
    """A float64 classifier's gradient has no float32 step in it, as the
    parity tests' float64 recomputation needs."""
    classifier = small_classifier().double()
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    t, y = torch.tensor([0, 20, 45]), torch.tensor([3, 0, 2])
    log_p = classifier(x, t).log_softmax(-1)[torch.arange(3), y].sum()
    (expected,) = torch.autograd.grad(log_p, x)
    grad = classifier_grad(classifier, x.detach(), t, y)
    assert grad.dtype == torch.float64
    # The same float64 operations, bit for bit (a float32 step would move
    # the gradient by ~1e-8 of itself).
    torch.testing.assert_close(grad, expected, rtol=0, atol=0)


def test_classifier_grad_works_inside_no_grad() -> None:
    classifier = small_classifier()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        grad = classifier_grad(classifier, x, torch.tensor([1, 2]),
                               torch.tensor([0, 1]))
    assert grad.abs().sum() > 0


def test_gradient_at_the_mean_is_taken_at_the_unguided_mean(
        runs: dict[str, Path]) -> None:
    run = load_run(runs["unconditional"])
    spaced = respace(run.diffusion, "5")
    x = torch.randn(2, 1, 8, 8)
    t = torch.tensor([3, 3])
    seen: list[Tensor] = []

    def cond_fn(point: Tensor, t: Tensor, **_: Any) -> Tensor:
        seen.append(point.clone())
        return torch.ones_like(point)

    model = ignore_labels(run.model)
    kwargs = {"y": torch.tensor([0, 1])}
    with torch.no_grad():
        p = spaced.p_mean_variance(model, x, t, model_kwargs=kwargs)
        noise = torch.randn_like(x)
        at_x = p_sample(spaced, model, x, t, cond_fn=cond_fn,
                        model_kwargs=kwargs, noise=noise)
        at_mean = p_sample(spaced, model, x, t, cond_fn=cond_fn,
                           model_kwargs=kwargs, noise=noise,
                           guide_at_mean=True)
    # The same tensors, and the same float32 operations: bit for bit.
    torch.testing.assert_close(seen[0], x, rtol=0, atol=0)
    torch.testing.assert_close(seen[1], p["mean"], rtol=0, atol=0)
    # With the same gradient, both shift the mean by the variance.
    torch.testing.assert_close(at_x["sample"], at_mean["sample"], rtol=0,
                               atol=0)


def toy_model(x: Tensor, t: Tensor, y: Tensor,
              low_res: Tensor | None = None) -> Tensor:
    """eps = x * (y + 1) (+ low_res), and a variance channel of t."""
    eps = x * (y[:, None, None, None] + 1).float()
    if low_res is not None:
        eps = eps + low_res
    return torch.cat([eps, t[:, None, None, None].float().expand_as(x)], 1)


def test_classifier_free_model_mixes_eps_and_keeps_the_variance() -> None:
    x = torch.randn(3, 1, 4, 4)
    t, y = torch.tensor([1, 2, 3]), torch.tensor([0, 2, 5])
    low = torch.randn(3, 1, 4, 4)
    out = classifier_free_model(toy_model, 3.0, null_label=9)(
        x, t, y, low_res=low)
    cond = x * (y[:, None, None, None] + 1) + low
    uncond = x * 10 + low
    # The formula's float32 operations in its order: bit for bit.
    torch.testing.assert_close(out[:, :1], cond + 3.0 * (cond - uncond),
                               rtol=0, atol=0)
    torch.testing.assert_close(out[:, 1:], toy_model(x, t, y)[:, 1:],
                               rtol=0, atol=0)
    assert torch.equal(classifier_free_model(toy_model, 0.0, 9)(x, t, y),
                       toy_model(x, t, y))


def test_guided_sample_refuses_what_cannot_work(
        runs: dict[str, Path]) -> None:
    run = load_run(runs["conditional"])
    spaced, noise = respace(run.diffusion, "3"), torch.randn(1, 1, 8, 8)
    hook = classifier_cond_fn(load_run(runs["classifier"]).model, 1.0)
    with pytest.raises(ValueError, match="sampler must be one of"):
        guided_sample(spaced, run.model, noise, sampler="euler")
    for kwargs in (None, {}, {"y": None}):
        with pytest.raises(ValueError, match=r"guidance needs labels: pass "
                           r"model_kwargs=\{'y': labels\}"):
            guided_sample(spaced, run.model, noise, cond_fn=hook,
                          model_kwargs=kwargs)
    with pytest.raises(ValueError, match="ancestral sampling"):
        guided_sample(spaced, run.model, noise, sampler="ddim", cond_fn=hook,
                      guide_at_mean=True, model_kwargs={"y": torch.tensor([1])})


@pytest.mark.parametrize(("sampler", "loop", "options"), [
    ("ddpm", p_sample_loop, {}), ("ddpm", p_sample_loop,
                                  {"guide_at_mean": True}),
    ("ddim", ddim_sample_loop, {}), ("ddim", ddim_sample_loop, {"eta": 0.5}),
])
def test_guided_sample_takes_labels_as_the_samplers_do(
        sampler: str, loop: Any, options: dict[str, Any]) -> None:
    """One way to pass labels: model_kwargs={"y": ...}, to guided_sample
    as to chapter 2's loops, with the same samples from the same noise."""
    model, classifier = tiny_unet(num_classes=4), small_classifier()
    hook = classifier_cond_fn(classifier, 2.0)
    spaced = respace(GaussianDiffusion(get_named_beta_schedule("cosine",
                                                               100)), "3")
    y = torch.tensor([0, 3, 1])
    x_T = torch.randn(3, 1, 8, 8)
    drawn = []
    for sample in (guided_sample, loop):
        torch.manual_seed(1)
        kwargs = {"sampler": sampler} if sample is guided_sample else {}
        drawn.append(sample(spaced, model, x_T, cond_fn=hook,
                            model_kwargs={"y": y}, **kwargs, **options))
    assert torch.equal(*drawn)
    torch.manual_seed(1)
    other = guided_sample(spaced, model, x_T, sampler, cond_fn=hook,
                          model_kwargs={"y": y.flip(0)}, **options)
    assert not torch.equal(other, drawn[0])  # the labels are used


def test_sample_batches_do_not_depend_on_the_batch_size(
        runs: dict[str, Path]) -> None:
    run = load_run(runs["conditional"])
    spaced = respace(run.diffusion, "ddim4")
    labels = torch.tensor([0, 1, 2, 3, 0])
    hook = classifier_cond_fn(load_run(runs["classifier"]).model, 2.0)
    whole, y = sample_batches(spaced, run.model, 5, (1, 8, 8), labels, 5,
                              seed=3, sampler="ddim", cond_fn=hook)
    parts, _ = sample_batches(spaced, run.model, 5, (1, 8, 8), labels, 2,
                              seed=3, sampler="ddim", cond_fn=hook)
    assert whole.dtype == np.uint8 and whole.shape == (5, 8, 8, 1)
    assert y.tolist() == labels.tolist()
    # Batches of 2 sum the convolutions in another order: float32 round-off,
    # far below a grey level (2 / 255), moves a value across one edge at most.
    assert np.abs(whole.astype(int) - parts.astype(int)).max() <= 1
    other, _ = sample_batches(spaced, run.model, 5, (1, 8, 8), labels, 5,
                              seed=4, sampler="ddim", cond_fn=hook)
    assert not np.array_equal(whole, other)


def tiny_unet(num_classes: int | None = None) -> UNetModel:
    """A random 8x8 UNet with a learned variance, its output perturbed."""
    torch.manual_seed(0)
    model = UNetModel(image_size=8, in_channels=1, model_channels=32,
                      out_channels=2, num_res_blocks=1,
                      attention_resolutions=(), channel_mult=(1,),
                      num_classes=num_classes).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_samples_are_the_same_for_batch_sizes_1_7_and_64(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Per-sample noise: the x_T of each sample is exactly the same, and
    its image the same to float rounding, with step noise or without."""
    model = tiny_unet()
    spaced = respace(GaussianDiffusion(get_named_beta_schedule("cosine",
                                                               100)), "4")
    starts: list[Tensor] = []
    real_guided_sample = gu.guided_sample

    def spy(diffusion: Any, model: Any, noise: Tensor, *args: Any,
            **kwargs: Any) -> Tensor:
        starts.append(noise.clone())
        return real_guided_sample(diffusion, model, noise, *args, **kwargs)

    monkeypatch.setattr(gu, "guided_sample", spy)
    for options in ({"sampler": "ddpm"}, {"sampler": "ddim"},
                    {"sampler": "ddim", "eta": 0.5}):
        drawn, x_T = {}, {}
        for size in (1, 7, 64):
            starts.clear()
            drawn[size], _ = sample_batches(spaced, model, 65, (1, 8, 8),
                                            batch_size=size, seed=5,
                                            **options)
            x_T[size] = torch.cat(starts)
            assert len(starts) == -(-65 // size)  # batches, ragged last
        assert drawn[64].std() > 10, options  # not a flat image
        for size in (1, 7):
            assert torch.equal(x_T[size], x_T[64]), (options, size)
            gap = np.abs(drawn[size].astype(int) - drawn[64].astype(int))
            assert gap.max() <= 1, (options, size)


def test_sample_noise_rows_are_their_samples_streams() -> None:
    whole = sample_noise(3, range(64))
    part = sample_noise(3, range(10, 20))
    for _ in range(3):  # x_T, then steps' noise, in turn
        like = torch.empty(64, 2, 4, 4)
        assert torch.equal(part(like[10:20]), whole(like)[10:20])
    with pytest.raises(ValueError, match="noise for 10 samples, asked for 3"):
        part(like[:3])


def test_another_seed_gives_other_noise() -> None:
    like = torch.empty(8, 1, 4, 4)
    one, other = sample_noise(0, range(8))(like), sample_noise(1, range(8))(
        like)
    assert (one != other).flatten(1).any(1).all()
    # No two (seed, index) share a stream, even in the 32 bits CPU
    # generators keep.
    seeds = {sample_seed(s, i) % 2**32 for s in range(20)
             for i in range(0, 1_000_003, 997)}
    assert len(seeds) == 20 * len(range(0, 1_000_003, 997))


def test_sample_batches_makes_noise_for_one_batch_at_a_time(
        monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[int] = []  # the rows of every noise tensor drawn
    streams: list[int] = []
    real_sample_noise = gu.sample_noise

    def spy_noise(seed: int, indices: range, device: Any = "cpu",
                  stream: int = 0) -> Any:
        streams.append(len(indices))
        noise_fn = real_sample_noise(seed, indices, device, stream)

        def counted(like: Tensor) -> Tensor:
            made.append(len(like))
            return noise_fn(like)
        return counted

    def spy_randn(*args: Any, **kwargs: Any) -> Tensor:
        raise AssertionError("noise must come from sample_noise")

    def model(x: Tensor, t: Tensor) -> Tensor:
        return torch.cat([0.1 * x, torch.zeros_like(x)], 1)

    monkeypatch.setattr(gu, "sample_noise", spy_noise)
    monkeypatch.setattr(torch, "randn", spy_randn)
    monkeypatch.setattr(torch, "randn_like", spy_randn)
    spaced = respace(GaussianDiffusion(get_named_beta_schedule("linear",
                                                               50)), "3")
    images, _ = sample_batches(spaced, model, 10, (1, 4, 4), batch_size=3)
    assert images.shape == (10, 4, 4, 1)
    assert streams == [3, 3, 3, 1]
    assert made == [3] * 4 * 3 + [1] * 4  # x_T and 3 steps per batch


def test_the_classifier_runs_at_the_sampling_precision() -> None:
    """Under guidance the classifier's forward (and so its backward) runs
    in the precision asked; its log-softmax in float32."""
    inner = small_classifier()
    seen: list[torch.dtype | None] = []

    def classifier(x: Tensor, t: Tensor) -> Tensor:
        seen.append(torch.get_autocast_dtype("cpu")
                    if torch.is_autocast_enabled("cpu") else None)
        return inner(x, t)

    x = torch.randn(2, 1, 8, 8)
    t, y = torch.tensor([3, 30]), torch.tensor([1, 2])
    exact = classifier_cond_fn(classifier, 2.0)(x, t, y=y)
    low = classifier_cond_fn(classifier, 2.0, "bf16")(x, t, y=y)
    assert seen == [None, torch.bfloat16]
    assert low.dtype == exact.dtype == torch.float32
    # bf16 keeps 8 significant bits: the gradient agrees to a few percent,
    # by the error model of tests/reference.py (forward and backward).
    error = (low - exact).norm() / exact.norm()
    assert 0 < error < K_BF16 * bf16_error(inner, passes=2), error


def test_channels_last_networks_sample_the_same_images() -> None:
    """A network in channels_last (a GPU's layout, `prepare_for_sampling`)
    draws the samples of the contiguous one: the layout changes the order
    of a convolution's sums, never the noise."""
    torch.manual_seed(0)
    unet = UNetModel(image_size=8, in_channels=3, model_channels=32,
                     out_channels=6, num_res_blocks=1,
                     attention_resolutions=(), channel_mult=(1, 2)).eval()
    with torch.no_grad():  # its output layer starts at zero
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    last = copy.deepcopy(unet).to(memory_format=torch.channels_last)
    spaced = respace(GaussianDiffusion(get_named_beta_schedule("cosine",
                                                               100)), "8")
    # Ancestral: noise at every step, drawn like the sampler's x_t.
    drawn = [sample_batches(spaced, net, 3, (3, 8, 8), seed=4)[0]
             for net in (unet, last)]
    gap = np.abs(drawn[0].astype(int) - drawn[1].astype(int))
    # float32 rounding moves a value across a grey level's edge at most (and
    # the image is not flat).
    assert gap.max() <= 1 and drawn[0].std() > 10
    # The noise does not follow the layout of the x_t it is drawn for.
    like = torch.empty(3, 3, 8, 8)
    assert torch.equal(
        sample_noise(4, range(3))(like),
        sample_noise(4, range(3))(like.contiguous(
            memory_format=torch.channels_last)))


def test_prepare_for_sampling_takes_the_devices_fast_path(
        monkeypatch: pytest.MonkeyPatch) -> None:
    compiled: list[torch.nn.Module] = []
    monkeypatch.setattr(torch, "compile",
                        lambda model: compiled.append(model) or model)
    unet = small_classifier()
    assert gu.prepare_for_sampling(unet, "cpu") is unet and not compiled
    assert gu.prepare_for_sampling(unet, "cpu", compile=True) is unet
    assert compiled == [unet]
    # The layout is chapter 4's for the device: contiguous on a CPU.
    monkeypatch.setattr(gu, "memory_format",
                        lambda layout, device: torch.channels_last)
    gu.prepare_for_sampling(unet, "cpu")
    weight = unet.input_blocks[0][0].weight
    assert weight.is_contiguous(memory_format=torch.channels_last)


def test_deterministic_ddim_draws_only_x_T(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """eta 0 scales the steps' noise by zero: sample_batches draws each
    sample's x_T alone, and its samples are those of the drawn noise, bit
    for bit; eta > 0 still draws every step."""
    made: list[int] = []
    real_sample_noise = gu.sample_noise

    def spy_noise(*args: Any) -> Any:
        noise_fn = real_sample_noise(*args)

        def counted(like: Tensor) -> Tensor:
            made.append(len(like))
            return noise_fn(like)
        return counted

    torch.manual_seed(0)
    model = UNetModel(image_size=8, in_channels=1, model_channels=32,
                      out_channels=2, num_res_blocks=1,
                      attention_resolutions=(), channel_mult=(1, 2)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    spaced = respace(GaussianDiffusion(get_named_beta_schedule("cosine",
                                                               100)), "5")
    monkeypatch.setattr(gu, "sample_noise", spy_noise)
    images, _ = sample_batches(spaced, model, 3, (1, 8, 8), batch_size=2,
                               seed=7, sampler="ddim")
    assert made == [2, 1]  # x_T of each batch
    noise_fn = real_sample_noise(7, range(3))
    x_T = noise_fn(torch.empty(3, 1, 8, 8))
    with torch.inference_mode():
        drawn = guided_sample(spaced, model, x_T, "ddim", noise_fn=noise_fn)
    assert np.array_equal(images, to_uint8(drawn))
    made.clear()
    sample_batches(spaced, model, 3, (1, 8, 8), batch_size=3, seed=7,
                   sampler="ddim", eta=0.5)
    assert made == [3] * 6  # x_T and 5 steps
