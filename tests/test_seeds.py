"""adm_lib.seeds (foundation): per-purpose seeds and per-row noise."""

from __future__ import annotations

import torch

from adm_lib.seeds import row_noise, step_seed
from tests.helpers import CPU


def test_step_seed_depends_on_every_word_and_its_place():
    # numpy's SeedSequence reads (0,) and (0, 0) alike, so the words vary
    # here anywhere but in trailing zeros.
    words = [(0,), (1,), (0, 1), (1, 1), (0, 2, 0, 7), (0, 2, 7, 1)]
    seeds = {step_seed(*w) for w in words}
    assert len(seeds) == len(words)
    assert step_seed(3, 1, 4) == step_seed(3, 1, 4)
    assert all(0 <= s < 2**64 for s in seeds)


def test_row_noise_is_independent_standard_normal_noise():
    """Rows seeded by consecutive words share nothing: the mean squared
    correlation of two rows of d numbers is 1/(d-1) for independent noise
    (one degree of freedom goes to each row's mean)."""
    rows, d = 400, 64
    noise = row_noise((0, 3, 0, 7), range(rows), (d,), CPU).double()
    n = noise.numel()
    assert abs(noise.mean()) < 5 / n**0.5
    assert abs(noise.var() - 1) < 5 * (2 / n) ** 0.5
    r = torch.corrcoef(noise)[~torch.eye(rows, dtype=torch.bool)]
    # r^2 of independent rows: mean 1/(d-1), variance about 2/d^2.
    pairs = rows * (rows - 1) / 2
    assert abs(r.pow(2).mean() - 1 / (d - 1)) < 5 * (2 / d**2 / pairs) ** 0.5
    other = row_noise((0, 3, 0, 8), range(rows), (d,), CPU).double()
    across = torch.corrcoef(torch.cat([noise, other]))[:rows, rows:]
    assert (abs(across.pow(2).mean() - 1 / (d - 1))
            < 5 * (2 / d**2 / rows**2) ** 0.5)
