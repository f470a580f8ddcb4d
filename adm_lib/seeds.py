"""Seeds: one 64-bit seed per purpose and step, and the global RNG's state.

Foundation (hand-written). Chapter 4 draws each training step from
`step_seed(seed, purpose, step)` so that any step can be replayed, and
chapter 6 draws each sample's noise the same way; a checkpoint keeps the
global state that dropout draws from (`rng_state`).
"""

from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor

__all__ = ["step_seed", "row_noise", "rng_state", "set_rng_state"]


def step_seed(*words: int) -> int:
    """A 64-bit seed that depends on every word (seed, purpose, step...).

    numpy's SeedSequence reads trailing zero words as absent: (s, 4, 0) and
    (s, 4) give one seed. So each purpose has a number of its own, the word
    after the seed: 1 the batch order, 2 a step's per-image draws, 3 its
    noise rows, 4 an upsampler's input steps, 5 the sample grids, 6 the
    held-out split, 7 to 9 evaluation, 10 dropout, 11 an upsampler's input
    noise rows.
    """
    return int(np.random.SeedSequence(list(words)).generate_state(
        1, np.uint64)[0])


def row_noise(words: tuple[int, ...], rows: range, shape: tuple[int, ...],
              device: torch.device) -> Tensor:
    """Standard normal noise of ``shape`` per row, row i seeded by words + i.

    A rank draws only its own rows, and gets what one process drawing the
    whole batch would.
    """
    g = torch.Generator(device)
    return torch.stack([
        torch.randn(shape, generator=g.manual_seed(step_seed(*words, i)),
                    device=device)
        for i in rows])


def rng_state(device: torch.device) -> dict[str, Tensor]:
    """This process's global RNG state (dropout draws from it)."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: Mapping[str, Tensor], device: torch.device) -> None:
    """Restore what `rng_state` saved."""
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
