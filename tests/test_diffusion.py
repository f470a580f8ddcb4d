"""adm_lib.diffusion (chapter 2): reverse process, losses, respacing, samplers."""

from __future__ import annotations

import copy
import functools
import hashlib
import itertools
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from adm_lib import guidance
from adm_lib.compat.guided_diffusion import (
    classifier_from_flags,
    diffusion_from_flags,
    load_reference_state_dict,
    model_from_flags,
)
from adm_lib.diffusion import (
    GaussianDiffusion,
    LossAwareSampler,
    UniformSampler,
    calc_bpd_loop,
    condition_mean,
    ddim_reverse_sample_loop,
    ddim_sample,
    ddim_sample_loop,
    ddim_sample_loop_progressive,
    normal_kl,
    p_sample,
    p_sample_loop,
    p_sample_loop_progressive,
    respace,
    space_timesteps,
    stratified_timesteps,
    training_losses,
    vb_terms_bpd,
    vlb_estimate,
)
from adm_lib.forward import ForwardProcess, get_named_beta_schedule
from tests.reference import (
    EPS32,
    EPS64,
    FLOOR_ULPS,
    K,
    ParityError,
    assert_parity,
    load,
    reference_files,
)

BETAS = get_named_beta_schedule("linear", 100)
Tensor = torch.Tensor


class TinyModel(torch.nn.Module):
    """A per-pixel model: enough to exercise every code path quickly."""

    def __init__(self, channels: int = 2, out: int = 4) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, out, 1)
        self.seen: list[Tensor] = []

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        self.seen.append(t)
        return self.conv(x) * (1 + t.float().view(-1, 1, 1, 1) / 1000)



@pytest.mark.parametrize("mean_type", ["eps", "x0", "prev"])
@pytest.mark.parametrize(
    ("var_type", "loss"),
    [("fixed_small", "simple"), ("fixed_large", "simple"),
     ("learned", "hybrid"), ("learned_range", "hybrid"),
     ("learned_range", "kl"), ("fixed_large", "kl")],
)
def test_every_configuration_trains_and_samples(
    mean_type: str, var_type: str, loss: str
) -> None:
    torch.manual_seed(0)
    diffusion = GaussianDiffusion(BETAS, mean_type, var_type, loss)
    out = 4 if diffusion.learns_variance else 2
    model = TinyModel(out=out)
    x = torch.rand(3, 2, 4, 4) * 2 - 1
    terms = training_losses(diffusion, model, x, torch.tensor([0, 50, 99]))
    assert terms["loss"].shape == (3,) and torch.isfinite(terms["loss"]).all()
    assert ("mse" in terms) == (loss != "kl")
    assert ("vb" in terms) == (loss != "simple")
    terms["loss"].sum().backward()
    assert model.conv.weight.grad is not None
    spaced = respace(diffusion, "10")
    noise = torch.randn(2, 2, 4, 4)
    for sample in (p_sample_loop(spaced, model, noise),
                   ddim_sample_loop(spaced, model, noise, eta=0.5)):
        assert sample.shape == noise.shape and torch.isfinite(sample).all()


def test_configuration_errors_name_the_option() -> None:
    with pytest.raises(ValueError, match="mean_type 'v'"):
        GaussianDiffusion(BETAS, mean_type="v")
    with pytest.raises(ValueError, match="var_type"):
        GaussianDiffusion(BETAS, var_type="small")
    with pytest.raises(ValueError, match="no gradient"):
        GaussianDiffusion(BETAS, var_type="learned", loss="simple")
    with pytest.raises(ValueError, match="fixed"):
        GaussianDiffusion(BETAS, var_type="fixed_small", loss="hybrid")
    diffusion = GaussianDiffusion(BETAS)
    x = torch.zeros(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"model output \(2, 3, 4, 4\), "
                                         r"expected \(2, 6, 4, 4\)"):
        diffusion.p_mean_variance_from_output(x, x, torch.tensor([1, 2]))


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize(("var_type", "loss"), [
    ("fixed_small", "simple"), ("fixed_large", "kl"),
    ("learned", "hybrid"), ("learned_range", "hybrid"),
    ("learned_range", "kl")])
def test_a_model_of_the_wrong_output_channels_is_refused_by_name(
        channels: int, var_type: str, loss: str) -> None:
    """Training and sampling both refuse any output but C channels for a
    fixed variance and 2C for a learned one, naming out_channels; the
    fixed variance's MSE used to read the first C of 2C in silence."""
    diffusion = GaussianDiffusion(BETAS, var_type=var_type, loss=loss)
    need = channels * (2 if diffusion.learns_variance else 1)
    x, t = torch.rand(2, channels, 4, 4) * 2 - 1, torch.tensor([1, 50])
    for out in (channels, 2 * channels, 3 * channels):
        model = TinyModel(channels, out)
        if out == need:
            training_losses(diffusion, model, x, t)
            p_sample_loop(respace(diffusion, "2"), model, x)
            continue
        message = (f"model output (2, {out}, 4, 4), expected (2, {need}, 4, "
                   f"4): var_type '{var_type}' needs a model with "
                   f"out_channels={need}, ")
        with pytest.raises(ValueError) as trained:
            training_losses(diffusion, model, x, t)
        with pytest.raises(ValueError) as sampled:
            p_sample_loop(respace(diffusion, "2"), model, x)
        for err in (trained, sampled):
            assert str(err.value).startswith(message), out


def test_hybrid_weight_is_lambda_times_t() -> None:
    diffusion = GaussianDiffusion(get_named_beta_schedule("linear", 4000))
    model = TinyModel()
    x, t = torch.rand(2, 2, 4, 4), torch.tensor([5, 3000])
    noise = torch.randn_like(x)
    terms = training_losses(diffusion, model, x, t, noise=noise)
    # lambda T = 0.001 * 4000 is 4.0 in float64: the same float32 operations
    # as the code's, bit for bit.
    torch.testing.assert_close(terms["loss"], terms["mse"] + 4 * terms["vb"],
                               rtol=0, atol=0)


def _reference_rule(num_timesteps: int, counts: list[int]) -> list[int]:
    """The reference's section rule, restated from its respace.py.

    Each section walks a float position by its stride and rounds every
    partial sum; written with itertools.accumulate so that it shares no
    code with adm_lib's loop, only the order of the float additions.
    """
    size, extra = divmod(num_timesteps, len(counts))
    sizes = [size + (i < extra) for i in range(len(counts))]
    starts = itertools.accumulate(sizes, initial=0)
    kept: set[int] = set()
    for start, section, count in zip(starts, sizes, counts, strict=False):
        stride = (section - 1) / (count - 1) if count > 1 else 1
        walk = itertools.accumulate([stride] * (count - 1), initial=0.0)
        kept.update(start + round(p) for p in walk if count > 0)
    return sorted(kept)


@pytest.mark.parametrize("num_timesteps", [1000, 4000])
def test_respacing_every_count_equals_reference_rule(num_timesteps: int) -> None:
    differs = [n for n in range(1, num_timesteps + 1)
               if space_timesteps(num_timesteps, str(n))
               != _reference_rule(num_timesteps, [n])]
    assert differs == []
    for n in (1, 7, 21, 35, 999, num_timesteps):
        assert len(space_timesteps(num_timesteps, str(n))) == n


def test_respacing_known_disagreement_with_round_stride_times_k() -> None:
    # 21 of 1000: stride 49.95, and 49.95 * 10 is exactly 499.5, which
    # rounds to 500 (half to even), while the walked sum is 499.4999...
    assert space_timesteps(1000, "21")[10] == 499


def test_respacing_multi_section_specs_equal_reference_rule() -> None:
    rng = np.random.default_rng(0)
    for _ in range(300):
        num_timesteps = int(rng.integers(1, 4001))
        sections = int(rng.integers(1, min(num_timesteps, 6) + 1))
        size = num_timesteps // sections
        counts = [int(c) for c in rng.integers(0, size + 1, sections)]
        spec = ",".join(map(str, counts))
        if not any(counts):
            continue
        assert space_timesteps(num_timesteps, spec) == _reference_rule(
            num_timesteps, counts), spec


def test_respacing_corner_cases() -> None:
    # A section of one step, counts of 1 and 0, a section taken whole.
    assert space_timesteps(3, "1,1,1") == [0, 1, 2]
    assert space_timesteps(10, "1,0") == [0]
    assert space_timesteps(10, "5,5") == list(range(10))
    assert space_timesteps(11, "6,1") == list(range(6)) + [6]
    # ddimN whose stride does not divide T: the first stride giving N.
    assert space_timesteps(1000, "ddim30") == list(range(0, 1000, 34))
    assert space_timesteps(4000, "ddim7") == list(range(0, 4000, 572))
    with pytest.raises(ValueError, match="section of 5"):
        space_timesteps(10, "6,1")
    for bad in ["", "ddim", "ddimx", "10,", "-3", "2.5", "abc"]:
        with pytest.raises(ValueError, match="respacing spec|integer stride"):
            space_timesteps(1000, bad)


def test_respacing_specs_and_errors() -> None:
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert space_timesteps(10, "10") == list(range(10))
    assert space_timesteps(100, "1") == [0]
    with pytest.raises(ValueError, match="integer stride"):
        space_timesteps(1000, "ddim999")
    with pytest.raises(ValueError, match="section of 50"):
        space_timesteps(100, "60,1")
    base = GaussianDiffusion(BETAS)
    spaced = respace(base, "ddim10")
    twice = respace(spaced, "5")
    kept = [spaced.timestep_map[i].item() for i in space_timesteps(10, "5")]
    assert twice.timestep_map.tolist() == kept == [0, 20, 40, 70, 90]
    # Each respacing takes abar to betas 1 - abar_k / abar_j and back in
    # float64: 1 - (1 - r) is off by eps64 / r (r the smallest ratio of
    # kept abar), the quotient and product by 2 roundings more, per step
    # of either respacing (10 + 5).
    abar = base.alphas_cumprod[kept]
    per_step = (1 / (abar[1:] / abar[:-1]).min() + 2) * EPS64
    np.testing.assert_allclose(twice.alphas_cumprod, abar,
                               rtol=(10 + 5) * per_step)


def test_samplers_show_the_model_original_timesteps() -> None:
    model = TinyModel()
    spaced = respace(GaussianDiffusion(BETAS), "ddim10")
    steps = list(ddim_sample_loop_progressive(spaced, model,
                                              torch.randn(2, 2, 4, 4)))
    assert [s["step"] for s in steps] == list(range(9, -1, -1))
    assert [t[0].item() for t in model.seen] == list(range(90, -1, -10))
    assert all(set(s) >= {"sample", "pred_xstart"} for s in steps)


def test_callback_and_progress_bar(capsys: pytest.CaptureFixture[str]) -> None:
    seen: list[int] = []
    spaced = respace(GaussianDiffusion(BETAS), "5")
    p_sample_loop(spaced, TinyModel(), torch.randn(1, 2, 4, 4),
                  progress=True, callback=lambda out: seen.append(out["step"]))
    assert seen == [4, 3, 2, 1, 0]
    assert "p_sample" in capsys.readouterr().err


@pytest.mark.parametrize("loop, step", [(p_sample_loop, p_sample),
                                        (ddim_sample_loop, ddim_sample)])
def test_loops_take_each_steps_noise_from_noise_fn(loop: Any,
                                                   step: Any) -> None:
    spaced = respace(GaussianDiffusion(BETAS), "5")
    model = TinyModel()
    x_T = torch.randn(2, 2, 4, 4)
    draws = torch.randn(5, 2, 2, 4, 4)
    seen: list[Tensor] = []

    def noise_fn(x: Tensor) -> Tensor:
        seen.append(x)
        return draws[len(seen) - 1]

    options = {} if step is p_sample else {"eta": 0.7}
    out = loop(spaced, model, x_T, noise_fn=noise_fn, **options)
    x = x_T
    with torch.no_grad():
        for k, i in enumerate(range(4, -1, -1)):
            # The same steps from the same noise: bit for bit.
            torch.testing.assert_close(seen[k], x, rtol=0, atol=0)
            x = step(spaced, model, x, torch.full((2,), i), noise=draws[k],
                     **options)["sample"]
    assert len(seen) == 5
    torch.testing.assert_close(out, x, rtol=0, atol=0)


def test_dtype_sets_the_precision_of_the_maths() -> None:
    """float32 by default, half outputs upcast; float64 end to end, kept by
    respacing, when the parity tests ask for it."""
    t = torch.tensor([0, 50, 99])
    x = torch.rand(3, 2, 4, 4) * 2 - 1
    single = GaussianDiffusion(BETAS)
    half = single.p_mean_variance_from_output(torch.randn(3, 4, 4, 4).half(),
                                              x, t)
    assert {v.dtype for v in half.values()} == {torch.float32}
    diffusion = GaussianDiffusion(BETAS, dtype=torch.float64)
    spaced = respace(diffusion, "10")
    assert spaced.dtype == torch.float64
    model, x = TinyModel().double(), x.double()
    terms = training_losses(diffusion, model, x, t)
    assert {v.dtype for v in terms.values()} == {torch.float64}

    def cond_fn(x: Tensor, t: Tensor, **_: Any) -> Tensor:
        return torch.ones_like(x)

    steps = torch.tensor([9, 5, 0])
    with torch.no_grad():
        for step in (p_sample, ddim_sample):
            out = step(spaced, model, x, steps, cond_fn=cond_fn)
            assert {v.dtype for v in out.values()} == {torch.float64}


def test_ddim_eta_one_matches_ancestral_with_fixed_small() -> None:
    model = TinyModel(out=2)
    x, t = torch.randn(2, 2, 4, 4), torch.tensor([30, 70])
    noise = torch.randn_like(x)
    ancestral = {}
    for dtype, net in ((torch.float32, model),
                       (torch.float64, copy.deepcopy(model).double())):
        diffusion = GaussianDiffusion(BETAS, var_type="fixed_small",
                                      dtype=dtype)
        ancestral[dtype] = p_sample(diffusion, net, x.to(dtype), t,
                                    noise=noise.to(dtype))["sample"]
    diffusion = GaussianDiffusion(BETAS, var_type="fixed_small")
    b = ddim_sample(diffusion, model, x, t, noise=noise, eta=1.0)["sample"]
    # Two float32 evaluations of one step: the error model of
    # tests/reference.py, p_sample in float64 as the exact value.
    assert_parity({"sample": (ancestral[torch.float32],
                              ancestral[torch.float64], b)})


@pytest.mark.parametrize("var_type", ["learned_range", "fixed_small",
                                      "fixed_large"])
@pytest.mark.parametrize("spec", ["1", "2", "ddim2"])
def test_one_and_two_step_respacings_sample(var_type: str, spec: str) -> None:
    """Every respacing space_timesteps accepts samples, down to one step."""
    diffusion = respace(GaussianDiffusion(BETAS, var_type=var_type), spec)
    model = TinyModel(out=4 if var_type == "learned_range" else 2)
    noise = torch.randn(2, 2, 4, 4)
    loop = ddim_sample_loop if spec.startswith("ddim") else p_sample_loop
    assert torch.isfinite(loop(diffusion, model, noise)).all()
    logs = diffusion.posterior_log_variance_clipped
    assert np.isfinite(logs).all()
    if diffusion.num_timesteps == 1:  # no next step: its beta stands in
        assert logs[0] == np.log(diffusion.betas[0])


def test_importance_sampler_warms_up_then_follows_losses() -> None:
    sampler = LossAwareSampler(4, history_per_term=2, uniform_prob=0.0)
    sampler.update(torch.tensor([0, 1, 2, 3, 0, 1, 2]),
                   torch.tensor([1.0, 1, 1, 1, 1, 1, 1]))
    assert np.array_equal(sampler.weights(), np.ones(4))  # t=3 not full yet
    sampler.update(torch.tensor([3, 3, 3]), torch.tensor([9.0, 9, 3]))
    assert sampler.history[3].tolist() == [9.0, 3.0]  # oldest dropped
    weights = sampler.weights()
    # sqrt, mean, sum and quotient in float64: a few roundings.
    assert weights[3] == pytest.approx(np.sqrt(45) / (3 + np.sqrt(45)),
                                       rel=FLOOR_ULPS * EPS64, abs=0)
    n = 1000
    t, w = sampler.sample(n)
    # A Monte-Carlo share: within 5 standard errors of its probability.
    se = np.sqrt(weights[3] * (1 - weights[3]) / n)
    assert abs((t == 3).float().mean().item() - weights[3]) < 5 * se
    # float64 quotients a few ulps apart, each rounded to float32 once.
    torch.testing.assert_close(
        w, torch.from_numpy(1 / (4 * weights[t.numpy()])).float(),
        rtol=EPS32, atol=0)
    t, w = UniformSampler(7).sample(50, "cpu")
    assert t.max() < 7 and torch.all(w == 1)


def test_calc_bpd_loop_columns_start_at_the_last_step() -> None:
    diffusion = GaussianDiffusion(get_named_beta_schedule("cosine", 20))
    model, x = TinyModel(), torch.rand(3, 2, 4, 4) * 2 - 1
    torch.manual_seed(0)
    out = calc_bpd_loop(diffusion, model, x)
    assert out["vb"].shape == out["mse"].shape == (3, 20)
    # Here and below: the code's own float32 operations, bit for bit.
    torch.testing.assert_close(out["total_bpd"],
                               out["vb"].sum(1) + out["prior_bpd"],
                               rtol=0, atol=0)
    # Column 0 is t = T - 1, the loop's first step and its first noise draw.
    torch.manual_seed(0)
    t = torch.full((3,), 19)
    x_t = diffusion.q_sample(x, t, torch.randn_like(x))
    with torch.no_grad():
        p = diffusion.p_mean_variance(model, x_t, t)
    torch.testing.assert_close(out["vb"][:, 0],
                               vb_terms_bpd(diffusion, p, x, x_t, t),
                               rtol=0, atol=0)


@pytest.mark.parametrize("steps,spec", [(4000, ""), (4000, "ddim40"),
                                        (1000, "10,15,20"), (7, "3")])
def test_rescale_timesteps_shows_the_model_1000_t_over_t_max(
        steps: int, spec: str) -> None:
    """The reference's rescale_timesteps: the model and cond_fn see
    1000 k / T for the original step k of each (spaced) step, as floats."""
    diffusion = diffusion_from_flags({
        "diffusion_steps": steps, "timestep_respacing": spec,
        "noise_schedule": "cosine", "rescale_timesteps": True,
        "learn_sigma": True})
    kept = space_timesteps(steps, spec) if spec else list(range(steps))
    expected = torch.tensor(kept, dtype=torch.float64) * 1000 / steps
    t = torch.arange(diffusion.num_timesteps)
    seen = diffusion.model_timesteps(t)
    assert seen.dtype == torch.float32
    # float32: the scale and the product each rounded once.
    torch.testing.assert_close(seen.double(), expected, rtol=2 * EPS32,
                               atol=0)
    model, x = TinyModel(), torch.rand(len(t), 2, 4, 4) * 2 - 1
    training_losses(diffusion, model, x, t)
    diffusion.p_mean_variance(model, x, t)
    shown: list[Tensor] = []
    condition_mean(
        diffusion, lambda x, t: shown.append(t) or torch.zeros_like(x),
        diffusion.p_mean_variance(model, x, t), x, t)
    for got in [*model.seen, *shown]:  # the same tensor passed on
        torch.testing.assert_close(got, seen, rtol=0, atol=0)


def test_without_rescale_timesteps_the_model_sees_integer_steps() -> None:
    diffusion = diffusion_from_flags({"diffusion_steps": 100,
                                      "timestep_respacing": "ddim10"})
    seen = diffusion.model_timesteps(torch.arange(10))
    assert seen.dtype == torch.long
    assert seen.tolist() == list(range(0, 100, 10))


@pytest.mark.parametrize("steps,spec,rescale,weight", [
    (100, "39", False, 1.0), (100, "39", True, 39 / 1000),
    (4000, "", False, 1.0), (4000, "", True, 4.0)])
def test_reference_flags_weight_the_bound_as_its_loss_types(
        steps: int, spec: str, rescale: bool, weight: float) -> None:
    """MSE adds the vb term once; RESCALED_MSE scales it by T / 1000,
    with T the steps trained on, respaced or not."""
    diffusion = diffusion_from_flags({
        "diffusion_steps": steps, "timestep_respacing": spec,
        "learn_sigma": True, "rescale_learned_sigmas": rescale})
    x = torch.rand(3, 2, 4, 4) * 2 - 1
    t = torch.tensor([0, 5, diffusion.num_timesteps - 1])
    terms = training_losses(diffusion, TinyModel(), x, t)
    assert (terms["vb"] > 0).all()
    # The code's weight (lambda T, times T / 1000) may round otherwise in
    # float64 than `weight`: the float32 loss then moves by one ulp.
    torch.testing.assert_close(terms["loss"],
                               terms["mse"] + weight * terms["vb"],
                               rtol=EPS32, atol=0)


@pytest.mark.parametrize("n", [1, 7, 19, 64])
def test_stratified_timesteps_draw_once_per_slice(n: int) -> None:
    t = stratified_timesteps(n, 20, torch.Generator().manual_seed(n))
    k = torch.arange(n)
    assert t.dtype == torch.long and t.shape == (n,)
    assert torch.all((1 + k * 19 // n <= t) & (t <= 1 + (k + 1) * 19 // n))
    assert t.min() >= 1 and t.max() <= 19
    again = stratified_timesteps(n, 20, torch.Generator().manual_seed(n))
    assert torch.equal(t, again)
    with pytest.raises(ValueError, match="num_timesteps must be >= 2"):
        stratified_timesteps(n, 1)


def test_vlb_estimate_is_unbiased_for_the_full_bound() -> None:
    """Its mean over draws is calc_bpd_loop's bound, within the error model.

    Both are random (calc_bpd_loop draws one noise per term), so the
    tolerance is 4 standard errors of the difference of the two means.
    """
    torch.manual_seed(0)
    diffusion = GaussianDiffusion(get_named_beta_schedule("cosine", 20))
    model = TinyModel()
    images = torch.rand(2, 2, 4, 4) * 2 - 1
    full = calc_bpd_loop(diffusion, model, images.repeat(100, 1, 1, 1))
    bound = full["total_bpd"]
    n = 4000
    g = torch.Generator().manual_seed(1)
    t = stratified_timesteps(n, 20, g)[torch.randperm(n, generator=g)]
    estimate = vlb_estimate(diffusion, model, images.repeat(n // 2, 1, 1, 1),
                            t)["vlb"]
    se = (estimate.var() / n + bound.var() / len(bound)).sqrt()
    assert abs(estimate.mean() - bound.mean()) < 4 * se
    # The spread is that of the one KL term, not of round-off: above even
    # one estimate's float32 budget (tests/reference.py's model).
    assert se > K * FLOOR_ULPS * EPS32 * estimate.abs().max()


def test_vlb_estimate_terms_and_errors() -> None:
    diffusion = GaussianDiffusion(get_named_beta_schedule("cosine", 20))
    model = TinyModel()
    x = torch.rand(3, 2, 4, 4) * 2 - 1
    t, noise = torch.tensor([1, 9, 19]), torch.randn_like(x)
    out = vlb_estimate(diffusion, model, x, t, noise)
    x_t = diffusion.q_sample(x, t, noise)
    p = diffusion.p_mean_variance(model, x_t, t)
    eps = diffusion.predict_eps_from_xstart(x_t, t, p["pred_xstart"])
    expected = ((eps - noise) ** 2).mean((1, 2, 3))
    # The code's own float32 operations, bit for bit.
    torch.testing.assert_close(out["mse"], expected, rtol=0, atol=0)
    assert out["vlb"].shape == (3,) and torch.isfinite(out["vlb"]).all()
    for bad in (torch.tensor([0, 3, 4]), torch.tensor([1, 2, 20])):
        with pytest.raises(ValueError, match=r"t must lie in \[1, 20\)"):
            vlb_estimate(diffusion, model, x, bad, noise)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_the_bound_never_syncs_a_gpu() -> None:
    """calc_bpd_loop, and vlb_estimate given t on the CPU, queue their work
    without waiting on the GPU."""
    cuda = torch.device("cuda")
    diffusion = GaussianDiffusion(get_named_beta_schedule("cosine", 20))
    model = TinyModel().to(cuda)
    x = torch.rand(3, 2, 4, 4, device=cuda) * 2 - 1
    t = torch.tensor([1, 9, 19])
    calc_bpd_loop(diffusion, model, x)  # tables uploaded, kernels loaded
    vlb_estimate(diffusion, model, x, t)
    torch.cuda.set_sync_debug_mode("error")
    try:
        calc_bpd_loop(diffusion, model, x)
        vlb_estimate(diffusion, model, x, t)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_normal_kl_takes_numbers_at_the_tensors_precision() -> None:
    """A number is the 0-d tensor of it (as the reference converts it), and
    a float64 KL stays float64."""
    for dtype in (torch.float32, torch.float64):
        mean, logvar = torch.randn(2, 5, dtype=dtype), torch.randn(2, 5,
                                                                   dtype=dtype)
        for value in (0.0, 0.3):
            kl = normal_kl(mean, logvar, value, value)
            as_tensor = torch.tensor(value).to(logvar)
            assert kl.dtype == dtype
            assert torch.equal(kl, normal_kl(mean, logvar, value,
                                             as_tensor))


# --- parity with the reference implementation -----------------------------
#
# Every quantity is computed by adm_lib twice, in float32 (as the reference)
# and in float64 (the diffusion's `dtype` and the networks in float64: the
# exact value), and compared with the fixture by the error model of
# tests/reference.py (`assert_parity`): the reference and ours must each lie
# within K = 8 times our own float32 error of the exact value, per sample.
# The mutation tests at the end show that the comparison catches real faults.

PRECISIONS = (torch.float32, torch.float64)


def _fingerprint(value: Any) -> Any:
    """A hashable key that is equal exactly when the values are."""
    if isinstance(value, Tensor):
        data = value.detach().cpu().contiguous().numpy().tobytes()
        return (str(value.dtype), tuple(value.shape),
                hashlib.sha1(data).hexdigest())
    if isinstance(value, (tuple, list)):
        return tuple(_fingerprint(v) for v in value)
    return repr(value)


class Memoised:
    """A network whose outputs are remembered by their exact inputs.

    The mutation tests change the diffusion's coefficients, not what the
    networks see, so they rerun the maths without rerunning the UNet.
    """

    def __init__(self, net: torch.nn.Module) -> None:
        self.net, self.seen = net, {}

    def __call__(self, *args: Any, **kwargs: Any) -> Tensor:
        key = _fingerprint((args, sorted(kwargs.items())))
        if key not in self.seen:
            with torch.no_grad():
                self.seen[key] = self.net(*args, **kwargs)
        return self.seen[key].clone()


@functools.cache
def _reference(path: Path) -> dict[str, Any]:
    """The fixture, its UNet and classifier in float32 and float64."""
    fixture = load(path)
    tag = path.name.removeprefix("diffusion_")
    for kind, build in [("unet", model_from_flags),
                        ("classifier", classifier_from_flags)]:
        source = path.with_name(f"{kind}_{tag}")
        if not source.is_file():
            pytest.skip(f"{source.name} (needed by {path.name}) is missing")
        saved = load(source)
        module = build(saved["flags"])
        load_reference_state_dict(module, saved["state_dict"])
        module.eval()
        fixture[kind] = {torch.float32: module,
                         torch.float64: copy.deepcopy(module).double()}
        fixture[f"{kind}_flags"] = saved["flags"]
    fixture["unet"] = {d: Memoised(m) for d, m in fixture["unet"].items()}
    fixture["model_kwargs"] = (
        {"y": fixture["y"]} if fixture.get("y") is not None else {}
    )
    return fixture


def _diffusion(ref: dict[str, Any], dtype: torch.dtype) -> GaussianDiffusion:
    """The fixture's diffusion, computing in dtype."""
    diffusion = diffusion_from_flags(ref["unet_flags"])
    diffusion.dtype = dtype
    return diffusion


def _one_step(ref: dict[str, Any], dtype: torch.dtype) -> dict[str, Tensor]:
    """Training terms, posterior and p_mean_variance, named as the fixture."""
    diffusion, model = _diffusion(ref, dtype), ref["unet"][dtype]
    x_start, noise, x_t = (ref[k].to(dtype) for k in ("x_start", "noise",
                                                      "x_t"))
    t, kwargs = ref["t"], ref["model_kwargs"]
    with torch.no_grad():
        out = {"x_t": diffusion.q_sample(x_start, t, noise)}
        mean, variance, log_variance = diffusion.q_posterior_mean_variance(
            x_start, x_t, t)
        out.update(q_posterior_mean=mean, q_posterior_variance=variance,
                   q_posterior_log_variance_clipped=log_variance)
        out.update(training_losses(diffusion, model, x_start, t, kwargs,
                                   noise=noise))
        p = diffusion.p_mean_variance(model, x_t, t, clip_denoised=True,
                                      model_kwargs=kwargs)
    out.update(p_mean=p["mean"], p_variance=p["variance"],
               p_log_variance=p["log_variance"],
               pred_xstart=p["pred_xstart"])
    return out


def _sampler(ref: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """The respaced diffusion, model, guidance hook and labels in dtype."""
    spaced = respace(_diffusion(ref, dtype), ref["ddim_respacing"])
    assert spaced.dtype == dtype  # respacing keeps the precision
    unet, conditional = ref["unet"][dtype], bool(ref["model_kwargs"])

    def model_fn(x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        # As the reference's sampling script: labels reach the classifier
        # always, and the model only if it is class-conditional.
        return unet(x, t, y if conditional else None)

    cond_fn = guidance.classifier_cond_fn(ref["classifier"][dtype],
                                          float(ref["guidance_scale"]))
    return {"diffusion": spaced, "model": model_fn, "cond_fn": cond_fn,
            "model_kwargs": {"y": ref["guide_y"]}}


def _guided_step(ref: dict[str, Any], dtype: torch.dtype
                 ) -> dict[str, Tensor]:
    """One guided ancestral step (Algorithm 1) from the fixture's x."""
    s = _sampler(ref, dtype)
    with torch.no_grad():
        step = p_sample(s["diffusion"], s["model"],
                        ref["ddpm_step_x"].to(dtype), ref["ddpm_step_t"],
                        cond_fn=s["cond_fn"], model_kwargs=s["model_kwargs"],
                        noise=ref["ddpm_step_noise"].to(dtype))
    return {"ddpm_step_guided_sample": step["sample"],
            "ddpm_step_guided_pred_xstart": step["pred_xstart"]}


def _ddim(ref: dict[str, Any], dtype: torch.dtype) -> dict[str, Tensor]:
    """Deterministic DDIM from x_T, without and with guidance."""
    s = _sampler(ref, dtype)
    x_T = ref["x_T"].to(dtype)
    return {"ddim_eta0": ddim_sample_loop(s["diffusion"], s["model"], x_T,
                                          model_kwargs=s["model_kwargs"]),
            "ddim_eta0_guided": ddim_sample_loop(
                s["diffusion"], s["model"], x_T,
                model_kwargs=s["model_kwargs"], cond_fn=s["cond_fn"])}


def _check(ref: dict[str, Any], compute: Callable[..., dict[str, Tensor]]
           ) -> None:
    """compute in float32 and float64, against the fixture's numbers."""
    ours32, ours64 = (compute(ref, dtype) for dtype in PRECISIONS)
    missing = set(ours32) - set(ref)
    assert not missing, f"the fixture lacks {sorted(missing)}"
    assert_parity({key: (ours32[key], ours64[key], ref[key])
                   for key in ours32})


@pytest.mark.parity
@pytest.mark.parametrize("path", reference_files("diffusion_*.pt"))
def test_respacing_equals_reference(path: Path) -> None:
    fixture = load(path)
    keys = [k for k in fixture if k.startswith("respace_")]
    assert keys, f"{path.name} has no respace_<spec>_<T> entries"
    for key in keys:
        spec, steps = re.fullmatch(r"respace_(.+)_(\d+)", key).groups()
        assert space_timesteps(int(steps), spec) == fixture[key].tolist(), key


@pytest.mark.parity
@pytest.mark.parametrize("path", reference_files("diffusion_*.pt"))
def test_losses_and_p_mean_variance_equal_reference(path: Path) -> None:
    """x_t, the posterior, loss/mse/vb and p_mean_variance at every t."""
    _check(_reference(path), _one_step)


# Whole DDIM chains of the 64x64 UNet in float64 too: about a minute on
# one core, so in the full run only (the one-step tests above are quick).
@pytest.mark.slow
@pytest.mark.parity
@pytest.mark.parametrize("path", reference_files("diffusion_*.pt"))
def test_sampling_with_and_without_guidance_equals_reference(path: Path) -> None:
    ref = _reference(path)
    _check(ref, _guided_step)
    _check(ref, _ddim)


def _scaled(table: str) -> Callable[[str], tuple[str, float]]:
    return lambda name: (name, 1 + 1e-4 if name == table else 1.0)


def _swapped(name: str) -> tuple[str, float]:
    swap = {"posterior_mean_coef1": "posterior_mean_coef2",
            "posterior_mean_coef2": "posterior_mean_coef1"}
    return swap.get(name, name), 1.0


# A fault, what it changes, and a quantity the comparison must flag.
MUTATIONS = {
    "sqrt_recip_alphas_cumprod_1e-4": (_scaled("sqrt_recip_alphas_cumprod"),
                                       _one_step, "pred_xstart"),
    "posterior_mean_coef1_1e-4": (_scaled("posterior_mean_coef1"), _one_step,
                                  "q_posterior_mean"),
    "posterior_log_variance_1e-4": (
        _scaled("posterior_log_variance_clipped"), _one_step,
        "q_posterior_log_variance_clipped"),
    "posterior_mean_coefs_swapped": (_swapped, _one_step, "q_posterior_mean"),
    "guidance_scale_dropped": (None, _guided_step, "ddpm_step_guided_sample"),
}


@pytest.mark.parity
@pytest.mark.parametrize("mutation", list(MUTATIONS))
@pytest.mark.parametrize("path", reference_files("diffusion_*.pt"))
def test_parity_catches_a_mutated_diffusion(
    path: Path, mutation: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fault in the code, in float32 and float64 alike, must fail parity.

    Coefficient faults are applied where every table is read, in
    `extract`; the guidance fault is a hook that ignores its scale (1
    instead of the fixture's 3).
    """
    ref = _reference(path)
    rename, compute, flagged = MUTATIONS[mutation]
    if rename is not None:
        extract = ForwardProcess.extract

        def mutated(self: ForwardProcess, name: str, t: Tensor,
                    ndim: int) -> Tensor:
            name, factor = rename(name)
            return extract(self, name, t, ndim) * factor

        monkeypatch.setattr(ForwardProcess, "extract", mutated)
    else:
        cond_fn = guidance.classifier_cond_fn
        monkeypatch.setattr(guidance, "classifier_cond_fn",
                            lambda classifier, scale: cond_fn(classifier, 1.0))
    with pytest.raises(ParityError, match=flagged):
        _check(ref, compute)


def _exact_model_samples(x_star: Tensor, x_T: Tensor,
                         dtype: torch.dtype) -> dict[str, Tensor]:
    """DDIM's round trip from x_star, and ancestral sampling from x_T, with
    the exact eps of the data set {x_star}, in dtype."""
    base = GaussianDiffusion(BETAS, var_type="fixed_small", dtype=dtype)
    star = x_star.to(dtype).expand(len(x_T), -1, -1, -1)

    def exact(x: Tensor, t: Tensor) -> Tensor:
        a = base.extract("sqrt_alphas_cumprod", t, x.ndim)
        s = base.extract("sqrt_one_minus_alphas_cumprod", t, x.ndim)
        return (x - a * star) / s

    spaced = respace(base, "ddim20")
    inverted = ddim_reverse_sample_loop(spaced, exact, star)
    draws = iter(torch.randn(20, *x_T.shape,
                             generator=torch.Generator().manual_seed(0)))
    final = list(p_sample_loop_progressive(
        spaced, exact, x_T.to(dtype), noise_fn=lambda x: next(draws).to(x)))
    return {"ddim": ddim_sample_loop(spaced, exact, inverted),
            "ancestral": final[-1]["sample"]}


def test_ddim_inversion_round_trips_with_an_exact_model() -> None:
    """For a one-image data set the exact eps is known; DDIM must invert."""
    x_star, x_T = torch.rand(1, 2, 4, 4) * 2 - 1, torch.randn(3, 2, 4, 4)
    ours32, ours64 = (_exact_model_samples(x_star, x_T, dtype)
                      for dtype in PRECISIONS)
    # Both are x_star in exact arithmetic: float32's round-off of each
    # sample, measured against float64, by the error model of
    # tests/reference.py.
    assert_parity({name: (ours32[name], ours64[name],
                          x_star.expand(3, -1, -1, -1)) for name in ours32})
