"""Fine-tuning against training from scratch, on a small data set of another kind.

A small class-conditional model trains on MNIST-5k (`--base-steps`); then
two runs train for the same `--steps` on `--images` grey 32x32 CIFAR-10
training images: one fine-tuned from the MNIST run's EMA (`init=`), one
from fresh weights, with the same seed (same batches, timesteps and noise).
Both EMAs are scored on `--held-out` grey CIFAR-10 test images with chapter
2's bound in bits/dim (one stratified timestep per image, the same draws
for both: a paired difference with its standard error), and sampled with
the same noise and labels (one PNG grid beside the table).

    python scripts/finetune_measure.py --cifar ../shared/data/cifar10 \\
        --out build/finetune --json build/finetune/result.json
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch


def grey_cifar(zip_path: Path, count: int, seed: int, out: Path) -> Path:
    """`count` seeded random images of a CIFAR-10 zip, grey, as an .npz."""
    from adm_lib.data import load_dataset

    data = load_dataset(zip_path, resolution=32, channels=1)
    chosen = torch.randperm(len(data), generator=torch.Generator()
                            .manual_seed(seed))[:count].sort().values.tolist()
    pixels = torch.stack([data.pixels(i)[0][0] for i in chosen]).numpy()
    np.savez(out, pixels, data.labels[chosen].astype(np.int64))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cifar", type=Path, required=True,
                        help="folder with CIFAR-10's train.zip and test.zip")
    parser.add_argument("--out", type=Path, default=Path("build/finetune"))
    parser.add_argument("--base-steps", type=int, default=100)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--held-out", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from adm_lib.config import make_config
    from adm_lib.evaluation import bound_terms, mean_se
    from adm_lib.files import save_png
    from adm_lib.finetune import read_init
    from adm_lib.models import load_run
    from adm_lib.runlog import sample_grid
    from adm_lib.train import train
    from adm_lib.viz import to_uint8

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    train_npz = grey_cifar(args.cifar / "train.zip", args.images, args.seed,
                           out / "cifar_grey_train.npz")
    test_npz = grey_cifar(args.cifar / "test.zip", args.held_out, args.seed,
                          out / "cifar_grey_test.npz")
    small = {"num_channels": 32, "num_res_blocks": 1, "channel_mult": "1,2,2",
             "attention_resolutions": "8", "batch_size": args.batch,
             "seed": args.seed, "precision": "fp32", "device": "cpu",
             "log_interval": 25, "sample_interval": 0, "keep_checkpoints": 1,
             "in_channels": 1, "num_classes": 10}
    base = make_config("diffusion", "mnist", {
        **small, "steps": args.base_steps, "save_interval": args.base_steps})
    times = {}
    for name, config, init in (
            ("base", base, None),
            ("finetuned", None, "base"),
            ("scratch", None, None)):
        run = out / name
        if config is None:
            config = replace(base, data=str(train_npz), steps=args.steps,
                             save_interval=args.steps)
        if (run / "checkpoints").exists():  # done in an earlier call
            continue
        clock = time.perf_counter()
        train(config, run, progress=False,
              init=read_init(out / init, "diffusion") if init else None)
        times[name] = time.perf_counter() - clock
        print(f"{name}: {config.steps} steps in {times[name]:.0f} s",
              flush=True)

    terms, grids = {}, []
    for name in ("finetuned", "scratch", "base"):
        trained = load_run(out / name)
        terms[name] = bound_terms(trained, test_npz, seed=args.seed,
                                  batch_size=50)
        config = replace(trained.config, num_samples=10,
                         sample_steps="ddim25")
        grids.append(sample_grid(config, trained.diffusion, trained.model,
                                 None, torch.arange(0), torch.device("cpu")))
    save_png(out / "samples.png", to_uint8(torch.cat(grids)), 10)
    result = {"held_out": args.held_out, "images": args.images,
              "base_steps": args.base_steps, "steps": args.steps,
              "batch": args.batch, "seed": args.seed,
              "train_seconds": times,
              "seconds": time.perf_counter() - started}
    print(f"bound on {args.held_out} held-out grey CIFAR-10 test images, "
          "bits/dim (EMA weights):")
    for name, values in terms.items():
        bpd, se = mean_se(values["vlb"])
        mse, mse_se = mean_se(values["mse"])
        result[name] = {"bpd": bpd, "bpd_se": se, "mse": mse,
                        "mse_se": mse_se}
        print(f"  {name:<10} {bpd:.3f} +- {se:.3f}   eps mse "
              f"{mse:.4f} +- {mse_se:.4f}")
    for key in ("vlb", "mse"):
        diff, se = mean_se(terms["finetuned"][key] - terms["scratch"][key])
        result[f"{key}_finetuned_minus_scratch"] = {"mean": diff, "se": se}
        print(f"  finetuned - scratch, {key}: {diff:.4f} +- {se:.4f} "
              f"({diff / se:.1f} s.e.)")
    print(f"rows of {out / 'samples.png'}: finetuned, scratch, base (MNIST)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
