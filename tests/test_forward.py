"""adm_lib.forward (chapter 1): schedules, q_sample and the posterior."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from adm_lib.forward import (
    ForwardProcess,
    cosine_beta_schedule,
    get_named_beta_schedule,
    linear_beta_schedule,
)
from tests.reference import (
    EPS64,
    FLOOR_ULPS,
    K,
    assert_parity,
    load,
    parse_flags,
    reference_files,
)


@pytest.mark.parametrize("num_timesteps", [1, 50, 1000, 4000])
def test_linear_schedule_scales_with_length(num_timesteps: int) -> None:
    betas = linear_beta_schedule(num_timesteps)
    scale = 1000 / num_timesteps
    assert betas.dtype == np.float64 and betas.shape == (num_timesteps,)
    # linspace's ends are its arguments: one float64 product each, as here.
    assert betas[0] == pytest.approx(1e-4 * scale, rel=EPS64, abs=0)
    if num_timesteps > 1:
        assert betas[-1] == pytest.approx(0.02 * scale, rel=EPS64, abs=0)


def test_cosine_schedule_follows_alpha_bar_and_clips() -> None:
    num_timesteps, s = 1000, 0.008
    betas = cosine_beta_schedule(num_timesteps)
    f = np.cos((np.arange(num_timesteps + 1) / num_timesteps + s)
               / (1 + s) * np.pi / 2) ** 2
    alpha_bar = np.cumprod(1 - betas)
    # Each factor 1 - beta = f(t + 1) / f(t) (>= 1/4 before the clipped
    # last) is off by <= 2 float64 roundings (the quotient, 1 - beta) and
    # the product adds one: <= 3 eps64 per step, over T steps.
    np.testing.assert_allclose(alpha_bar[:-1], (f / f[0])[1:-1],
                               rtol=3 * num_timesteps * EPS64)
    assert betas.max() == 0.999 and np.flatnonzero(betas == 0.999).tolist() == [999]
    assert cosine_beta_schedule(10, max_beta=0.5).max() == 0.5


def test_bad_schedules_are_named() -> None:
    with pytest.raises(ValueError, match="unknown noise schedule 'sqrt'"):
        get_named_beta_schedule("sqrt", 10)
    with pytest.raises(ValueError, match="num_timesteps"):
        get_named_beta_schedule("linear", 0)
    with pytest.raises(ValueError, match="betas"):
        ForwardProcess(np.array([0.1, 0.0]))
    with pytest.raises(ValueError, match="betas"):
        ForwardProcess(np.ones((2, 2)) * 0.1)


def test_q_sample_shapes_and_noise_check() -> None:
    process = ForwardProcess(get_named_beta_schedule("cosine", 100))
    x = torch.randn(5, 3, 8, 8)
    t = torch.tensor([0, 10, 50, 98, 99])
    noise = torch.randn_like(x)
    x_t = process.q_sample(x, t, noise)

    def formula(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        coef = torch.from_numpy(process.sqrt_alphas_cumprod)[t].to(x)
        return (coef[1] * x[1] + (1 - coef[1] ** 2).sqrt() * noise[1])[None]

    # The formula in float32 and float64 against q_sample, by the error
    # model of tests/reference.py (1 - coef^2 cancels at small t).
    assert_parity({"x_t": (formula(x, noise),
                           formula(x.double(), noise.double()), x_t[1:2])})
    assert process.q_sample(x, t).shape == x.shape
    with pytest.raises(ValueError, match="noise"):
        process.q_sample(x, t, noise[:, :1])
    with pytest.raises(ValueError, match="x_start"):
        process.q_posterior_mean_variance(x, x[:2], t)


def test_posterior_first_step_is_clipped() -> None:
    process = ForwardProcess(get_named_beta_schedule("linear", 1000))
    assert process.posterior_variance[0] == 0
    assert np.isfinite(process.posterior_log_variance_clipped).all()
    assert (process.posterior_log_variance_clipped[0]
            == np.log(process.posterior_variance[1]))


def test_dtype_is_the_precision_of_every_table() -> None:
    process = ForwardProcess(get_named_beta_schedule("linear", 1000))
    t = torch.tensor([0, 999])
    single = process.extract("sqrt_recip_alphas_cumprod", t, 4)
    assert process.dtype == torch.float32 and single.dtype == torch.float32
    process.dtype = torch.float64  # a knob: the cache is per dtype
    double = process.extract("sqrt_recip_alphas_cumprod", t, 4)
    assert double.dtype == torch.float64 and double.shape == (2, 1, 1, 1)
    exact = torch.from_numpy(process.sqrt_recip_alphas_cumprod[[0, 999]])
    assert torch.equal(double.view(-1), exact)
    assert torch.equal(double.float(), single)
    x = torch.randn(2, 3, 4, 4)
    assert process.q_sample(x, t, x).dtype == torch.float64


def test_predict_xstart_from_eps_inverts_q_sample() -> None:
    process = ForwardProcess(get_named_beta_schedule("linear", 1000))
    x, t = torch.rand(4, 1, 6, 6) * 2 - 1, torch.tensor([0, 300, 600, 900])
    eps = torch.randn_like(x)
    recovered = {}
    for dtype in (torch.float32, torch.float64):
        process.dtype = dtype
        x_t = process.q_sample(x.to(dtype), t, eps.to(dtype))
        recovered[dtype] = process.predict_xstart_from_eps(x_t, t,
                                                           eps.to(dtype))
    # sqrt(1 / abar) ~ 59 at t = 900 multiplies float32's rounding: each
    # image's budget is its own, by the error model of tests/reference.py.
    assert_parity({"x_start": (recovered[torch.float32],
                               recovered[torch.float64], x)})


def _diffusion_settings(path: Path) -> tuple[str, int]:
    """Noise schedule and length from the flags of the matching unet fixture."""
    unet = path.with_name(path.name.replace("diffusion_", "unet_"))
    if not unet.is_file():
        pytest.skip(f"{unet.name} (the model and flags of {path.name}) is missing")
    flags = parse_flags(load(unet)["flags"])
    steps = int(flags.get("diffusion_steps", 1000))
    return flags.get("noise_schedule", "linear"), steps


@pytest.mark.parity
@pytest.mark.parametrize("path", reference_files("diffusion_*.pt"))
def test_betas_equal_reference(path: Path) -> None:
    fixture = load(path)
    keys = [k for k in fixture if re.fullmatch(r"betas_[a-z]+_\d+", k)]
    assert keys, f"{path.name} has no betas_<schedule>_<T> entries"
    for key in keys:
        _, name, steps = key.split("_")
        # beta = 1 - f(t + 1) / f(t) in float64 both sides: the quotient
        # (<= 1) within a few ulps of 1 of exact, so beta is too, absolutely.
        np.testing.assert_allclose(
            get_named_beta_schedule(name, int(steps)), fixture[key].numpy(),
            rtol=0, atol=K * FLOOR_ULPS * EPS64, err_msg=key,
        )


@pytest.mark.parity
@pytest.mark.parametrize("path", reference_files("diffusion_*.pt"))
def test_forward_process_equals_reference(path: Path) -> None:
    """q_sample and the posterior, by the error model of tests/reference.py:
    float32 and the fixture within K times float32's error of float64."""
    fixture = load(path)
    schedule, steps = _diffusion_settings(path)
    ours = {}
    for dtype in (torch.float32, torch.float64):
        process = ForwardProcess(get_named_beta_schedule(schedule, steps),
                                 dtype=dtype)
        x_start, noise, x_t = (fixture[k].to(dtype)
                               for k in ("x_start", "noise", "x_t"))
        t = fixture["t"]
        mean, variance, log_variance = process.q_posterior_mean_variance(
            x_start, x_t, t
        )
        ours[dtype] = {
            "x_t": process.q_sample(x_start, t, noise),
            "q_posterior_mean": mean,
            "q_posterior_variance": variance,
            "q_posterior_log_variance_clipped": log_variance,
        }
    assert_parity({key: (ours[torch.float32][key], ours[torch.float64][key],
                         fixture[key]) for key in ours[torch.float32]})
