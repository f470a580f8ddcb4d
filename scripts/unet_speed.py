"""Time chapter 3's UNet against its version at an earlier commit.

Loads `adm_lib/unet.py` as it was at `--before` (a git revision) beside
the current one, builds both networks of a benchmark model with the same
weights, checks that they agree, and times their forward passes and their
attention and up-sampling blocks, alternating old and new in each round
so that a busy machine slows both alike. Ratios are old time over new,
medians of the paired rounds with their range.

    python scripts/unet_speed.py --before 19e384d
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from adm_lib import unet
from adm_lib.bench import bench_config
from adm_lib.config import unet_arguments

ROOT = Path(__file__).resolve().parents[1]


def module_at(revision: str):
    """adm_lib/unet.py as it was at a git revision, imported."""
    source = subprocess.run(
        ["git", "show", f"{revision}:adm_lib/unet.py"], cwd=ROOT,
        capture_output=True, text=True)
    if source.returncode:
        sys.exit(f"unet_speed: {source.stderr.strip()}")
    path = Path(tempfile.mkdtemp()) / "unet_before.py"
    path.write_text(source.stdout)
    spec = importlib.util.spec_from_file_location("unet_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def paired(old: Callable[..., object], new: Callable[..., object],
           inputs: tuple, rounds: int,
           repeats: int) -> tuple[float, float, list[float]]:
    """Median ms of each on `inputs`, and the rounds' old/new ratios."""
    times: dict[str, list[float]] = {"old": [], "new": []}
    for r in range(rounds):
        order = [("old", old), ("new", new)]
        for name, fn in order[::-1] if r % 2 else order:
            start = time.perf_counter()
            for _ in range(repeats):
                fn(*inputs)
            times[name].append((time.perf_counter() - start) / repeats)
    ratios = [a / b for a, b in zip(times["old"], times["new"], strict=True)]
    return (1e3 * statistics.median(times["old"]),
            1e3 * statistics.median(times["new"]), ratios)


def row(name: str, result: tuple[float, float, list[float]],
        agree: str) -> str:
    old, new, ratios = result
    return (f"| {name} | {old:.2f} | {new:.2f} | "
            f"{statistics.median(ratios):.2f}x ({min(ratios):.2f} to "
            f"{max(ratios):.2f}) | {agree} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", required=True, help="a git revision")
    parser.add_argument("--model", default="cifar32")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=12)
    args = parser.parse_args()
    torch.manual_seed(0)
    before = module_at(args.before)
    config = bench_config(args.model, {"batch_size": args.batch}, "cpu")
    arguments = {**unet_arguments(config),
                 "use_new_attention_order": config.use_new_attention_order}
    new_net = unet.UNetModel(**arguments).eval()
    for p in new_net.parameters():  # a trained net's scale, not zeros
        torch.nn.init.normal_(p, std=0.02)
    old_net = before.UNetModel(**arguments).eval()
    old_net.load_state_dict(new_net.state_dict())
    size, n = config.image_size, args.batch
    x = torch.randn(n, config.in_channels, size, size)
    t = torch.randint(0, config.diffusion_steps, (n,))
    kwargs = ({"y": torch.randint(0, config.num_classes, (n,))}
              if config.class_cond else {})
    print(f"{args.model}, batch {n}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; before = {args.before}\n")
    print("| part | before, ms | now, ms | speed-up (range) | outputs |")
    print("| --- | --- | --- | --- | --- |")
    with torch.inference_mode():
        diff = (old_net(x, t, **kwargs) - new_net(x, t, **kwargs)).abs()
        channels = config.num_channels * 2
        for side in (size // 2, size // 4):
            h = torch.randn(n, channels, side, side)
            block = unet.AttentionBlock(
                channels, num_head_channels=config.num_head_channels).eval()
            torch.nn.init.normal_(block.proj_out.weight)
            old_block = before.AttentionBlock(
                channels, num_head_channels=config.num_head_channels).eval()
            old_block.load_state_dict(block.state_dict())
            d = (block(h) - old_block(h)).abs().max().item()
            print(row(f"attention, {channels} x {side}x{side}",
                      paired(old_block, block, (h,), args.rounds, 10),
                      f"max diff {d:.1e}"))
            up, old_up = unet.Upsample(channels, False), before.Upsample(
                channels, False)
            same = torch.equal(up(h), old_up(h))
            print(row(f"upsample, {channels} x {side}x{side}",
                      paired(old_up, up, (h,), args.rounds, 10),
                      "bit-equal" if same else "DIFFER"))
        print(row("whole forward", paired(
            partial(old_net, **kwargs), partial(new_net, **kwargs), (x, t),
            args.rounds, 1), f"max diff {diff.max().item():.1e}"))


if __name__ == "__main__":
    main()
