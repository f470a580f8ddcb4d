"""Train the same run in float32 and under bf16 autocast; compare the losses.

Both runs are the demo's diffusion model (adm_lib.demo) with the same seed,
so they see the same batches, timesteps and noise: only the arithmetic
differs. Every step's loss is logged. For each window of `--window` steps
the two runs' mean losses are compared with the noise of their gap: the
runs share their batches, so the test is paired, the standard error of
the mean of the per-step differences (two independent runs' standard
error would count the batch-to-batch spread that the pairing cancels,
and pass gaps that are real). Prints a table;
with `--plot FILE` draws both curves and the difference in units of that
standard error; with `--json FILE` writes every loss, window and run time.
`--device auto` (the default) is a GPU where there is one, else the CPU.

    python scripts/precision_curves.py --steps 1000 --out build/precision \\
        --plot chapters/figures/04_bf16_fp32.png
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

PRECISIONS = ("fp32", "bf16")


def _train(precision: str, steps: int, batch: int, device: str,
           out: Path, progress: bool) -> Path:
    """The demo's diffusion run at `precision`, logging every step."""
    from adm_lib.config import make_config
    from adm_lib.demo import DemoSettings, demo_configs
    from adm_lib.train import train

    config = make_config("diffusion", base=demo_configs(
        DemoSettings(), device)["diffusion"], overrides={
        "steps": steps, "batch_size": batch, "precision": precision,
        "log_interval": 1, "save_interval": steps})
    run = out / precision
    train(config, run, resume=run.exists(), progress=progress)
    return run


def windows(losses: dict[str, list[float]], width: int) -> list[dict]:
    """Per window: each run's mean loss, the gap and its paired error."""
    rows = []
    fp32, bf16 = (losses[p] for p in PRECISIONS)
    for start in range(0, len(fp32) - width + 1, width):
        a, b = fp32[start:start + width], bf16[start:start + width]
        diffs = [y - x for x, y in zip(a, b, strict=True)]
        gap = sum(diffs) / width
        var = sum((d - gap) ** 2 for d in diffs) / (width - 1)
        rows.append({"steps": f"{start + 1}-{start + width}",
                     "fp32": sum(a) / width, "bf16": sum(b) / width,
                     "gap": gap, "se": math.sqrt(var / width)})
    return rows


def _plot(losses: dict[str, list[float]], rows: list[dict], width: int,
          path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (ax, gap) = plt.subplots(1, 2, figsize=(10, 3.4))
    kernel = np.ones(width) / width
    for precision in PRECISIONS:
        smooth = np.convolve(losses[precision], kernel, mode="valid")
        ax.plot(np.arange(width, width + len(smooth)), smooth,
                label=precision)
    ax.set(xlabel="step", ylabel=f"loss, mean of {width} steps",
           yscale="log", title="training loss")
    ax.legend()
    centres = [(i + 0.5) * width for i in range(len(rows))]
    gap.axhspan(-2, 2, color="0.9", label="within 2 standard errors")
    gap.plot(centres, [r["gap"] / r["se"] for r in rows], "ko-")
    gap.axhline(0, color="0.5", lw=0.8)
    gap.set(xlabel="step", ylabel="(bf16 - fp32) / paired s.e.",
            title=f"the gap of {width}-step means", ylim=(-4, 4))
    gap.legend(loc="lower right", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--window", type=int, default=100)
    parser.add_argument("--device", default="auto",
                        help="auto: a GPU if there is one, else the CPU")
    parser.add_argument("--out", type=Path, default=Path("build/precision"))
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bars")
    args = parser.parse_args()
    if args.steps < 2 * args.window or args.window < 2:
        parser.error("--steps must be at least two --window, which is >= 2")
    from adm_lib.checkpoints import read_metrics
    from adm_lib.devices import resolve_device

    try:
        device = str(resolve_device(args.device))
    except ValueError as err:
        parser.error(f"--device: {err}")
    losses, seconds = {}, {}
    for precision in PRECISIONS:
        start = time.perf_counter()
        run = _train(precision, args.steps, args.batch, device, args.out,
                     not args.quiet)
        seconds[precision] = time.perf_counter() - start
        losses[precision] = [r["loss"] for r in read_metrics(run)
                             if "loss" in r]
    rows = windows(losses, args.window)
    print("| steps | fp32 | bf16 | gap | standard error | gap / se |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['steps']} | {r['fp32']:.4f} | {r['bf16']:.4f} | "
              f"{r['gap']:+.4f} | {r['se']:.4f} | "
              f"{r['gap'] / r['se']:+.2f} |")
    if args.plot:
        _plot(losses, rows, args.window, args.plot,
              f"the demo's diffusion model, batch {args.batch}, the same "
              "seed: float32 and bf16 autocast")
    if args.json:
        args.json.write_text(json.dumps({
            "device": device, "steps": args.steps, "batch": args.batch,
            "window": args.window, "seconds": seconds, "windows": rows,
            "losses": losses}, indent=1) + "\n")


if __name__ == "__main__":
    main()
