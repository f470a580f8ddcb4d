"""The toy mixture's exact quantities against independent computations."""
import math

import pytest
import torch

from adm_lib.forward import ForwardProcess, get_named_beta_schedule
from adm_lib.toy import GaussianMixture, ring_mixture

# Everything is float64 and closed-form: agreement to ~1e-10 is the error
# model (a few dozen float64 roundings), far below any real discrepancy.
ATOL = 1e-9


def _mixture() -> GaussianMixture:
    """Unequal weights, widths and a class with two components."""
    return GaussianMixture(
        means=torch.tensor([[0.5, 0.1], [-0.4, 0.3], [0.0, -0.6]],
                           dtype=torch.float64),
        stds=torch.tensor([0.1, 0.2, 0.15], dtype=torch.float64),
        weights=torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64),
        labels=torch.tensor([0, 1, 0]))


@pytest.mark.parametrize("alpha_bar", [1.0, 0.9, 0.3, 1e-3])
def test_score_is_the_gradient_of_the_log_density(alpha_bar: float) -> None:
    toy = _mixture()
    x = torch.randn(16, 2, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(toy.log_prob(x, alpha_bar).sum(), x)
    assert torch.allclose(toy.score(x.detach(), alpha_bar), grad, atol=ATOL)
    y = torch.randint(0, 2, (16,))
    log_joint = toy.log_prob(x, alpha_bar) + toy.class_log_probs(
        x, alpha_bar).gather(1, y[:, None]).squeeze(1)
    (grad,) = torch.autograd.grad(log_joint.sum(), x)
    assert torch.allclose(toy.score(x.detach(), alpha_bar, y), grad,
                          atol=ATOL)


def test_log_density_integrates_to_one_and_posteriors_sum_to_one() -> None:
    toy = _mixture()
    side = torch.linspace(-3, 3, 601, dtype=torch.float64)
    grid = torch.cartesian_prod(side, side)
    for alpha_bar in (1.0, 0.5):
        mass = toy.log_prob(grid, alpha_bar).exp().sum() * (6 / 600) ** 2
        assert math.isclose(mass.item(), 1.0, abs_tol=1e-3)  # grid's error
        total = toy.class_log_probs(grid, alpha_bar).exp().sum(1)
        assert torch.allclose(total, torch.ones_like(total), atol=ATOL)


def test_exact_eps_gives_tweedies_posterior_mean() -> None:
    toy = _mixture()
    process = ForwardProcess(get_named_beta_schedule("cosine", 50),
                             dtype=torch.float64)
    model = toy.eps_model(process.alphas_cumprod)
    x = torch.randn(32, 2, dtype=torch.float64)
    t = torch.randint(0, 50, (32,))
    a = torch.as_tensor(process.alphas_cumprod)[t][:, None]
    x0 = (x - (1 - a).sqrt() * model(x, t)) / a.sqrt()
    # E[x_0 | x_t] componentwise: mu_k + sqrt(a) s_k^2 / var_k (x - sqrt(a) mu_k)
    var = a * toy.stds**2 + 1 - a
    resp = torch.stack([toy._components(x[i:i + 1], a[i])[0][0]
                        for i in range(32)]).softmax(1)
    mean_k = toy.means + (a.sqrt() * toy.stds**2 / var)[..., None] * (
        x[:, None] - a.sqrt()[..., None] * toy.means)
    assert torch.allclose(x0, (resp[..., None] * mean_k).sum(1), atol=ATOL)


def test_cond_fn_is_the_scaled_gradient_of_the_class_posterior() -> None:
    toy = ring_mixture()
    process = ForwardProcess(get_named_beta_schedule("linear", 40),
                             dtype=torch.float64)
    cond_fn = toy.cond_fn(process.alphas_cumprod, scale=3.0)
    x = torch.randn(8, 2, dtype=torch.float64, requires_grad=True)
    t, y = torch.randint(0, 40, (8,)), torch.randint(0, 3, (8,))
    a = torch.as_tensor(process.alphas_cumprod)[t]
    log_py = toy.class_log_probs(x, a).gather(1, y[:, None]).sum()
    (grad,) = torch.autograd.grad(log_py, x)
    assert torch.allclose(cond_fn(x.detach(), t, y=y), 3.0 * grad, atol=ATOL)


def test_sample_draws_each_component_at_its_weight() -> None:
    toy = _mixture()
    x, y = toy.sample(40_000, torch.Generator().manual_seed(0))
    # class 0 holds weights 0.5 + 0.2; binomial s.e. 0.0023, 5 s.e. allowed
    assert abs((y == 0).double().mean().item() - 0.7) < 5 * 0.0023
    assert x.dtype == torch.float64 and x.shape == (40_000, 2)
