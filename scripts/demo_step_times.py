"""Time the demo's training steps: the MNIST preset's network against LEAN.

Both of `adm demo`'s networks (the diffusion model and the noisy
classifier), each with the preset's resampling and widths and with the
demo's (adm_lib.demo.LEAN), run their full training step (loss,
backward, AdamW, EMA) on the same random batch, alternating round by
round in one process so that the machine's drifts fall on both alike.
Prints a markdown table of parameters and median seconds per step.

    python scripts/demo_step_times.py --rounds 6
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

PRESET_NET = {"channel_mult": "1,2,2", "resblock_updown": True,
              "classifier_resblock_updown": True}


def _step(kind: str, net: dict) -> tuple[Callable[[], None], int, int]:
    """A training step of the demo's `kind` with `net`; params, batch."""
    import torch

    from adm_lib.config import build_diffusion, make_config
    from adm_lib.demo import DemoSettings, demo_configs
    from adm_lib.ranks import Ranks
    from adm_lib.train import TrainState, train_step

    config = make_config(kind, base=demo_configs(DemoSettings(), "cpu")[kind],
                         overrides={**net, "in_channels": 1,
                                    "num_classes": 10})
    cpu = torch.device("cpu")
    state = TrainState.create(config, cpu)
    diffusion = build_diffusion(config)
    batch = config.batch_size
    pixels = torch.randint(0, 256, (batch, 1, 32, 32), dtype=torch.uint8)
    y = torch.arange(batch) % 10
    ranks = Ranks(0, 1, cpu, False)

    def step() -> None:
        train_step(config, diffusion, state.model, state, pixels, y,
                   slice(0, batch), ranks)

    params = sum(p.numel() for p in state.model.parameters())
    return step, params, batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    from adm_lib.demo import LEAN

    nets = {"preset": PRESET_NET,
            "lean": {**LEAN, "classifier_resblock_updown": False}}
    steps = {(kind, name): _step(kind, net)
             for kind in ("diffusion", "classifier")
             for name, net in nets.items()}
    seconds: dict[tuple[str, str], list[float]] = {key: [] for key in steps}
    for step, _, _ in steps.values():  # warm-up
        step()
    for _ in range(args.rounds):
        for key, (step, _, _) in steps.items():
            start = time.perf_counter()
            step()
            seconds[key].append(time.perf_counter() - start)
    print("| model | network | parameters | batch | s/step | lean / preset |")
    print("| --- | --- | --- | --- | --- | --- |")
    for (kind, name), (_, params, batch) in steps.items():
        median = statistics.median(seconds[kind, name])
        ratio = median / statistics.median(seconds[kind, "preset"])
        print(f"| {kind} | {name} | {params / 1e6:.2f}M | {batch} | "
              f"{median:.3f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
