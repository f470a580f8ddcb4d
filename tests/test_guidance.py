"""adm_lib.guidance (chapter 6), `adm sample` and `adm demo`.

Models here are tiny (8x8 grey images, a few training steps) and run on
one thread, so the file takes well under a minute on a 2-core CPU; the
demo test runs the whole pipeline at a few steps.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor

from adm_lib import batches as bt
from adm_lib import cli
from adm_lib import config as cf
from adm_lib import guidance as gu
from adm_lib import objectives as ob
from adm_lib import train as tr
from adm_lib.diffusion import (
    GaussianDiffusion,
    UniformSampler,
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

from .reference import FIXTURES, K_BF16, assert_parity, bf16_error

TINY = {
    "image_size": 8, "num_channels": 32, "num_res_blocks": 1,
    "channel_mult": "1,2", "attention_resolutions": "4",
    "num_head_channels": 32, "classifier_width": 32, "classifier_depth": 1,
    "classifier_attention_resolutions": "4", "diffusion_steps": 50,
    "batch_size": 4, "steps": 2, "num_workers": 0, "device": "cpu",
    "log_interval": 1, "save_interval": 1000, "sample_interval": 1000,
    "eval_interval": 1000, "eval_images": 8, "val_fraction": 0.25,
}


# Every test here, and the module's runs, with one intra-op thread.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny runs on 4-class 8x8 data: conditional with label dropout,
    unconditional, and a classifier."""
    root = tmp_path_factory.mktemp("runs")
    data = root / "tiny.npz"
    rng = np.random.default_rng(0)
    labels = np.arange(24) % 4
    images = rng.integers(0, 256, (24, 8, 8)).astype(np.uint8)
    np.savez(data, images, labels)
    # A high learning rate: after a few steps the labels matter.
    settings = {**TINY, "data": str(data), "steps": 4, "lr": 1e-2}
    kinds = {
        "conditional": ("diffusion", {"label_dropout": 0.25}),
        "unconditional": ("diffusion", {"class_cond": False}),
        "classifier": ("classifier", {}),
    }
    for name, (kind, extra) in kinds.items():
        tr.train(cf.make_config(kind, "mnist", {**settings, **extra}),
                 root / name, progress=False)
    return {name: root / name for name in kinds} | {"data": data}


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


# Label dropout: the training side of classifier-free guidance (chapter 4).
def test_label_dropout_adds_a_null_label_and_drops_that_share() -> None:
    config = cf.make_config("diffusion", "mnist", {
        **TINY, "num_classes": 4, "in_channels": 1, "label_dropout": 0.3,
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


@pytest.mark.parametrize("settings, message", [
    ({"label_dropout": 1.0}, "label_dropout=1.0 must be in"),
    ({"label_dropout": -0.1}, "must be in"),
    ({"label_dropout": 0.1, "class_cond": False}, "needs a class-cond"),
])
def test_label_dropout_is_checked(settings: dict, message: str) -> None:
    with pytest.raises(cf.TrainError, match=message):
        cf.make_config("diffusion", "mnist", settings)
    with pytest.raises(cf.TrainError, match="needs a class-cond"):
        cf.make_config("classifier", "mnist", {"label_dropout": 0.1})


def test_dropping_no_labels_leaves_the_training_draws_unchanged() -> None:
    config = cf.make_config("diffusion", "mnist", {**TINY})
    draws = bt.draw_step(config, UniformSampler(50), 7, (1, 2, 2),
                         torch.device("cpu"))
    assert not draws.drop.any()


# `adm sample`.
def sample(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    code = cli.main(["sample", *args, "--quiet", "--device", "cpu"])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_adm_sample_writes_the_reference_batch_and_a_grid(
        runs: dict[str, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "guided.npz"
    code, text = sample([str(runs["unconditional"]), "--classifier",
                         str(runs["classifier"]), "--classifier-scale", "3",
                         "--num-samples", "6", "--labels", "1,3",
                         "--respacing", "4", "--batch-size", "4",
                         "--out", str(out)], capsys)
    assert code == 0, text
    with np.load(out) as batch:
        assert batch["arr_0"].shape == (6, 8, 8, 1)
        assert batch["arr_0"].dtype == np.uint8
        assert batch["arr_1"].tolist() == [1, 3, 1, 3, 1, 3]
    assert out.with_suffix(".png").stat().st_size > 0
    assert "scale 3.0" in text


def test_adm_sample_guidance_moves_samples_towards_the_class(
        runs: dict[str, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture) -> None:
    common = [str(runs["conditional"]), "--num-samples", "8", "--sampler",
              "ddim", "--respacing", "ddim4", "--labels", "0,1,2,3"]
    batches = {}
    for name, extra in {"plain": [], "cfg": ["--cfg-scale", "2"],
                        "classifier": ["--classifier", str(runs["classifier"]),
                                       "--classifier-scale", "5"]}.items():
        out = tmp_path / f"{name}.npz"
        code, text = sample([*common, *extra, "--out", str(out)], capsys)
        assert code == 0, text
        with np.load(out) as batch:
            batches[name] = batch["arr_0"]
            labels = torch.from_numpy(batch["arr_1"])
    assert labels.tolist() == [0, 1, 2, 3] * 2
    assert not np.array_equal(batches["plain"], batches["cfg"])
    # Guidance climbs log p(y | x) of its classifier: on the clean samples,
    # the classifier gives the asked-for classes more probability than on
    # the unguided samples drawn from the same noise. (A flipped gradient,
    # or one dropped, fails this; "the samples changed" would not.)
    judge = load_run(runs["classifier"]).model

    def log_p(images: np.ndarray) -> float:
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
        logits = judge(x, torch.zeros(len(x), dtype=torch.long))
        return logits.log_softmax(1).gather(1, labels[:, None]).mean().item()

    assert log_p(batches["classifier"]) > log_p(batches["plain"])


def test_adm_sample_without_labels_for_an_unconditional_model(
        runs: dict[str, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "plain.npz"
    code, text = sample([str(runs["unconditional"]), "--num-samples", "2",
                         "--respacing", "3", "--out", str(out)], capsys)
    assert code == 0, text
    with np.load(out) as batch:
        assert set(batch) == {"arr_0"}


@pytest.mark.parametrize("extra, message", [
    (["--cfg-scale", "1"], "trained with label dropout"),
    (["--labels", "7"], "outside the model's 4 classes"),
    (["--labels", "two"], "expected 'random' or class numbers"),
    (["--guide-at", "mean"], "needs a classifier and the ddpm"),
    (["--respacing", "ddim70"], "--respacing 'ddim70'"),
    (["--out", "samples.png"], "must end in .npz"),
    (["--classifier-flags", "--image_size 8"], "needs --classifier"),
    (["--classifier-scale", "2"], "--classifier-scale needs --classifier"),
])
def test_adm_sample_names_the_problem(
        runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture,
        extra: list[str], message: str) -> None:
    out = ["--out", str(tmp_path / "x.npz")] if "--out" not in extra else []
    code, text = sample([str(runs["unconditional"]
                             if "--cfg-scale" in extra
                             else runs["conditional"]), *out, *extra],
                        capsys)
    assert code == 1 and message in text, text


def test_adm_sample_refuses_a_classifier_that_does_not_fit(
        runs: dict[str, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture) -> None:
    out = str(tmp_path / "x.npz")
    code, text = sample([str(runs["conditional"]), "--classifier",
                         str(runs["conditional"]), "--out", out], capsys)
    assert code == 1 and "is a diffusion run, not a classifier" in text
    code, text = sample([str(runs["classifier"]), "--out", out], capsys)
    assert code == 1 and "is a classifier run, not a diffusion" in text
    code, text = sample([str(runs["data"]), "--out", out], capsys)
    assert code == 1 and "--model-flags" in text


@pytest.mark.parity
@pytest.mark.skipif(not (FIXTURES / "unet_a.pt").exists(),
                    reason=f"no unet_a.pt in {FIXTURES}")
def test_adm_sample_loads_the_reference_checkpoints(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Released-style checkpoints through --model-flags: the same samples
    as guided_sample with the weights loaded by hand, from the seed's
    per-sample noise."""
    from adm_lib.compat import guided_diffusion as gd

    unet = torch.load(FIXTURES / "unet_a.pt", weights_only=True)
    clf = torch.load(FIXTURES / "classifier_a.pt", weights_only=True)
    out = tmp_path / "ref.npz"
    code, text = sample([str(FIXTURES / "unet_a.pt"), "--model-flags",
                         unet["flags"], "--classifier",
                         str(FIXTURES / "classifier_a.pt"),
                         "--classifier-flags", clf["flags"],
                         "--classifier-scale", "3", "--sampler", "ddim",
                         "--respacing", "ddim2", "--num-samples", "2",
                         "--labels", "5,900", "--precision", "fp32",
                         "--out", str(out)], capsys)
    assert code == 0, text
    model = gd.load_checkpoint(FIXTURES / "unet_a.pt", unet["flags"])
    classifier = gd.load_checkpoint(FIXTURES / "classifier_a.pt",
                                    clf["flags"], "classifier")
    spaced = respace(gd.diffusion_from_flags(unet["flags"]), "ddim2")
    noise_fn = sample_noise(0, range(2))  # --seed 0
    x_T = noise_fn(torch.empty(2, 3, 64, 64))
    expected = to_uint8(guided_sample(
        spaced, model, x_T, "ddim", classifier_cond_fn(classifier, 3.0),
        noise_fn=noise_fn, model_kwargs={"y": torch.tensor([5, 900])}))
    with np.load(out) as batch:
        assert np.array_equal(batch["arr_0"], expected)
        assert batch["arr_1"].tolist() == [5, 900]


# `adm demo`, at a few steps (10 samples: a singular covariance for FID).
@pytest.mark.slow
def test_adm_demo_trains_samples_scores_and_reports(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--steps", "2", "--classifier-steps",
            "2", "--per-class", "1", "--respacing", "2", "--scales", "0,3",
            "--device", "cpu", "--quiet"]
    assert cli.main(args) == 0
    text = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert set(report["scores"]) == {"0", "3"}
    for scale, scores in report["scores"].items():
        assert 0 <= scores["accuracy"] <= 1 and np.isfinite(scores["fid"])
        assert 0 <= scores["mean_intensity"] <= 255
        # Each scale's samples: a batch of the reference's format.
        path = out / f"samples_scale_{scale}.npz"
        assert report["files"][f"samples_scale_{scale}"] == str(path)
        with np.load(path) as batch:
            assert batch["arr_0"].shape == (10, 32, 32, 1)
            assert batch["arr_0"].dtype == np.uint8
            assert batch["arr_1"].dtype == np.int64
            assert batch["arr_1"].tolist() == list(range(10))
            # numpy's mean of the same array, through JSON's exact repr.
            assert scores["mean_intensity"] == batch["arr_0"].mean()
    assert 0 < report["data_mean_intensity"] < 255
    assert 0 <= report["classifier_accuracy_held_out"] <= 1
    assert report["timings_s"]["total"] > 0
    assert (out / "guided_digits.png").stat().st_size > 0
    assert (out / "report.md").read_text() in text
    # A second run reuses the finished runs: no step is trained again.
    logged = (out / "diffusion" / "metrics.jsonl").read_text()
    assert cli.main(args) == 0
    assert (out / "diffusion" / "metrics.jsonl").read_text() == logged
    # Other settings in the same folder are refused, naming the way out.
    for changed in (["--classifier-steps", "3"], ["--seed", "1"]):
        assert cli.main([*args, *changed]) == 1
        assert "made with other demo settings" in capsys.readouterr().err
    assert (report["settings"]["seed"], report["settings"]["steps"]) == (0, 2)


def test_adm_demo_steps_default_to_the_devices_budget(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from adm_lib import demo, devices

    for native, steps in ((True, demo.STEPS_BF16),
                          (False, demo.STEPS_FP32_CPU)):
        monkeypatch.setattr(devices, "native_bf16",
                            lambda device, n=native: n)
        configs = demo.demo_configs(demo.DemoSettings(), "cpu")
        assert configs["diffusion"].steps == steps
        given = demo.demo_configs(demo.DemoSettings(steps=7), "cpu")
        assert given["diffusion"].steps == 7


def test_adm_demo_says_why_a_float32_cpu_trains_fewer_steps(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from adm_lib import demo, devices, train

    class Stop(Exception):
        pass

    def stop(*args: object, **kwargs: object) -> None:
        raise Stop

    monkeypatch.setattr(devices, "native_bf16", lambda device: False)
    monkeypatch.setattr(train, "train", stop)  # no need to train here
    said: list[str] = []
    with pytest.raises(Stop):
        demo.run_demo(tmp_path, demo.DemoSettings(device="cpu"),
                      say=said.append)
    assert said[0].startswith(f"adm demo: {demo.STEPS_FP32_CPU} diffusion")
    assert f"--steps {demo.STEPS_BF16}" in said[0]
    assert f"({demo.STEPS_FP32_CPU} steps, cpu)" in said[1]


def test_adm_demo_refuses_bad_settings(capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["demo", "--steps", "0", "--device", "cpu"]) == 1
    assert "--steps must be >= 1" in capsys.readouterr().err
    assert cli.main(["demo", "--classifier-batch", "0", "--device",
                     "cpu"]) == 1
    assert "--classifier-batch must be >= 1" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert cli.main(["demo", "--device", "cuda"]) == 1
        assert "sees no GPU" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["demo", "--scales", "1,x"])


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
