"""Where the reference implementation's parity fixtures are, how to read them,
and when our numbers equal theirs.

Parity tests read the folder named by ADM_REFERENCE_FIXTURES (default
`../shared/reference/guided_diffusion`, relative to the project root), are
parametrized over every file matching their pattern (the test id names the file)
and skip with a reason where there is none.

The error model (`assert_parity`). The reference ran in float32, so its numbers
are the exact values plus float32 round-off, and that round-off is not a fixed
size: at t = T - 1 of a linear schedule, x_0 = sqrt(1/abar) x_t - ... multiplies
the rounding of x_t and eps by sqrt(1/abar) ~ 157, so a correct pred_xstart is
off by ~1e-4 where the pixels at t = 0 are off by ~1e-7. A fixed atol either
fails the first or misses real faults in the second. So each quantity is
computed three ways: `ours32` (adm_lib in float32, as the reference), `ours64`
(the same code with the diffusion's `dtype` and the networks in float64: the
exact value to ~1e-16, with inputs read from the float32 fixture) and `ref32`
(the fixture). The float32 error budget of each sample (leading index: each
image has its own t, hence its own coefficients and its own error) is

    err = max(max |ours32 - ours64|, FLOOR_ULPS * eps32 * max |ours64|)

the floor keeping a quantity that float32 happens to get exactly (pred_xstart
near t = T - 1 of a cosine schedule, every pixel clipped to -1 or 1) from a
zero budget. Then

    max |ref32 - ours64| <= K * err   and   max |ours32 - ref32| <= K * err.

K = 8, from the model rather than from the fixtures: ours32 and ref32 are two
float32 evaluations of one formula from the same inputs, with rounding errors of
one distribution, but (i) in a different order and number of operations (the
reference gathers float64 tables like 1 - abar before casting, fuses other
steps, and may use other conv kernels): up to a factor 2; (ii) the largest of a
few thousand rounding errors fluctuates from one evaluation to the next: a
factor 2; (iii) |ours32 - ref32| is the sum of two such errors (triangle
inequality): a factor 2. FLOOR_ULPS = 4: eps32 |x| is one to two ulps of x,
and a quantity computed in a few roundings is within a few ulps of exact. The
budget is then at least 32 eps32 |x| (~4e-6 relative), while a real fault moves
numbers by far more: perturbing one coefficient by 1e-4 relative is ~840 eps32.
The mutation tests in tests/test_diffusion.py check that the comparison catches
such faults. Quantities with no float32 step (the float64 betas, respacing's
integer steps) are compared exactly or to float64 round-off instead.
"""

from __future__ import annotations

import math
import os
import shlex
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / os.environ.get(
    "ADM_REFERENCE_FIXTURES", "../shared/reference/guided_diffusion"
)


def reference_files(pattern: str) -> list[Any]:
    """pytest params, one per fixture file matching `pattern`, or one skip."""
    files = sorted(FIXTURES.glob(pattern)) if FIXTURES.is_dir() else []
    if not files:
        reason = f"no {pattern} in {FIXTURES} (set ADM_REFERENCE_FIXTURES)"
        return [pytest.param(None, id=pattern, marks=pytest.mark.skip(reason))]
    return [pytest.param(path, id=path.name) for path in files]


def load(path: Path) -> dict[str, Any]:
    """A fixture file: a plain dict of tensors and strings."""
    return torch.load(path, map_location="cpu", weights_only=True)


def parse_flags(flags: str) -> dict[str, str]:
    """The reference's `--name value` command-line string as a dict."""
    words = shlex.split(flags)
    if len(words) % 2 or not all(w.startswith("--") for w in words[::2]):
        raise ValueError(f"not a --name value flags string: {flags!r}")
    pairs = zip(words[::2], words[1::2], strict=True)
    return {name[2:]: value for name, value in pairs}


# --- the error model -----------------------------------------------------

K = 8
FLOOR_ULPS = 4
EPS32 = torch.finfo(torch.float32).eps
# For quantities computed in float64 only (schedules, statistics): their
# round-off, in the same terms.
EPS64 = torch.finfo(torch.float64).eps
# bfloat16 keeps 8 significant bits: a rounding's relative error is uniform
# in [-2^-8, 2^-8], of standard deviation 2^-8 / sqrt(3). Its comparisons
# allow K_BF16 times the estimate of `bf16_error`, a standard deviation of
# many independent roundings (near-Gaussian), not a measured error.
K_BF16 = 4


def bf16_error(network: torch.nn.Module, passes: int = 1) -> float:
    """Relative error (an rms) of a network's output in bfloat16.

    Each of its convolutions and linear layers rounds its input and its
    weights, once per pass (forward; and backward, for a gradient); the
    errors are independent and add in quadrature.
    """
    kinds = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d,
             torch.nn.Linear)
    layers = sum(isinstance(m, kinds) for m in network.modules())
    return 2**-8 * math.sqrt(2 * layers * passes / 3)


class ParityError(AssertionError):
    """Some quantity differs from the reference by more than float32 allows."""


def _per_sample(x: Tensor) -> Tensor:
    """max |x| of each sample (leading index), in float64."""
    x = x.detach().double().abs()
    return x.reshape(len(x), -1).amax(1) if x.ndim > 1 else x.reshape(-1)


def float32_error(ours32: Tensor, ours64: Tensor) -> Tensor:
    """Each sample's float32 error: max |ours32 - ours64|, floored."""
    floor = FLOOR_ULPS * EPS32 * _per_sample(ours64)
    return torch.maximum(_per_sample(ours32.double() - ours64), floor)


def assert_parity(
    quantities: dict[str, tuple[Tensor, Tensor, Tensor]], k: float = K
) -> dict[str, dict[str, float]]:
    """Check (ours32, ours64, ref32) of each quantity against the model.

    Raises ParityError naming every quantity outside its budget. Returns
    and prints, per quantity, the largest |ours32 - ours64|,
    |ref32 - ours64| and |ours32 - ref32|, and the largest share of its
    budget a sample uses (at most 1 to pass).
    """
    failures, measured = [], {}
    for what, (ours32, ours64, ref32) in quantities.items():
        if (ours32.dtype, ours64.dtype) != (torch.float32, torch.float64):
            raise TypeError(f"{what}: expected float32 and float64, got "
                            f"{ours32.dtype} and {ours64.dtype}")
        ours32, ours64 = ours32.expand_as(ref32), ours64.expand_as(ref32)
        budget = k * float32_error(ours32, ours64)
        from_exact = _per_sample(ref32.double() - ours64)
        from_ours = _per_sample(ours32.double() - ref32.double())
        used = torch.maximum(from_exact, from_ours) / budget
        used = torch.where(used.isnan(), 0.0, used)  # 0 / 0: both exact
        measured[what] = {
            "ours32_vs_exact": _per_sample(ours32.double() - ours64).max()
            .item(),
            "ref_vs_exact": from_exact.max().item(),
            "ours_vs_ref": from_ours.max().item(),
            "budget_used": used.max().item(),
        }
        print(f"{what}: |ours32 - exact| "
              f"{measured[what]['ours32_vs_exact']:.1e}, |ref - exact| "
              f"{measured[what]['ref_vs_exact']:.1e}, |ours - ref| "
              f"{measured[what]['ours_vs_ref']:.1e}; budget used "
              f"{measured[what]['budget_used']:.2f}")
        bad = ~((from_exact <= budget) & (from_ours <= budget))
        if bad.any():
            i = int(bad.nonzero()[0])
            failures.append(
                f"{what}: sample {i}: |ref - exact| {from_exact[i]:.2e}, "
                f"|ours - ref| {from_ours[i]:.2e}, over {k:g} x float32 "
                f"error {budget[i] / k:.2e} (|ours32 - ours64|, floor "
                f"{FLOOR_ULPS} ulps)"
            )
    if failures:
        raise ParityError("; ".join(failures))
    return measured
