"""Measure training recipes for `adm demo`: accuracy and FID against minutes.

Each recipe is the demo's diffusion config with some fields changed. It is
trained once, with a checkpoint every `--every` images; every checkpoint is
then sampled (20 of each digit per seed, DDIM or ancestral sampling at
`--respacing`, at one guidance scale, with the demo's classifier, at the
demo's precision: bf16 where the CPU has it natively) with its
raw weights, the last also with each EMA, or with `--weights` at every
checkpoint, and scored with chapter 5's MNIST network. One JSON line per checkpoint and
weights goes to results.jsonl; `--plot FILE` draws accuracy and FID against
training minutes for the rows of the same weights, scale and sampler.

    python scripts/demo_recipes.py eps x0 --out build/demo_recipes
    python scripts/demo_recipes.py --out build/demo_recipes --plot fig.png
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from adm_lib.demo import LEAN

SAMPLES = 200  # scored per checkpoint: 20 of each digit

# The network the first recipes were measured with: the MNIST preset's
# resampling and widths, one residual block per level. LEAN is the
# demo's network.
PRESET_NET = {"channel_mult": "1,2,2", "resblock_updown": True}
X0_SIMPLE = {"predict_xstart": True, "learn_sigma": False, "lr": 1e-3}

# What each recipe sets in the demo's diffusion config, and why.
RECIPES = {
    "eps": ({**PRESET_NET, "predict_xstart": False, "learn_sigma": True,
             "lr": 1e-3},
            "the reference's: predict the noise, learned variances"),
    "x0": ({**PRESET_NET, "predict_xstart": True, "learn_sigma": True,
            "lr": 1e-3},
           "predict the clean image instead"),
    "x0-simple": ({**PRESET_NET, **X0_SIMPLE},
                  "and fixed variances: L_simple alone, no L_vlb"),
    "x0-simple-lr2e-3": ({**PRESET_NET, **X0_SIMPLE, "lr": 2e-3},
                         "x0-simple at twice the learning rate"),
    "x0-simple-lean": ({**X0_SIMPLE, **LEAN},
                       "x0-simple with 32 channels at 16x16, not 64, and "
                       "resampling by convolution (the demo's)"),
    # The learning rate decays linearly to 0 over the run's steps.
    "lean-decay": ({**X0_SIMPLE, **LEAN, "lr_anneal_steps": -1},
                   "x0-simple-lean, its learning rate decayed to 0"),
    "lean-decay-lr2e-3": ({**X0_SIMPLE, **LEAN, "lr_anneal_steps": -1,
                           "lr": 2e-3},
                          "lean-decay from twice the learning rate"),
}


def _train(name: str, images: int, every: int, seed: int,
           out: Path) -> tuple[Path, float]:
    """Train recipe `name` on `images` images; its run, seconds per step."""
    from adm_lib.checkpoints import read_metrics
    from adm_lib.config import make_config
    from adm_lib.demo import DemoSettings, demo_configs
    from adm_lib.train import train

    fields = asdict(demo_configs(DemoSettings(seed=seed), "cpu")["diffusion"])
    del fields["kind"]
    fields.update(RECIPES[name][0], keep_checkpoints=10**6,
                  ema_rate="0.95,0.999")
    # Every recipe sees the same images, and checkpoints at the same ones.
    fields.update(steps=images // fields["batch_size"],
                  save_interval=every // fields["batch_size"])
    if fields["lr_anneal_steps"] == -1:  # decay over the whole run
        fields["lr_anneal_steps"] = fields["steps"]
    run = out / name
    train(make_config("diffusion", None, fields), run, resume=run.exists())
    rates = sorted(r["steps_per_s"] for r in read_metrics(run))
    return run, 1 / rates[len(rates) // 2]


def _score(name: str, run: Path, per_step: float, scale: float,
           sampler: str, respacing: str, seeds: int, every_checkpoint: bool,
           weights: str | None, train_seed: int, out: Path) -> None:
    """Sample and score every checkpoint of `run`; append to results.

    Each of `seeds` sampling seeds draws SAMPLES digits, scored on their
    own (so FID is at the demo's sample count); a row keeps their means.
    """
    import statistics

    import torch

    from adm_lib.data import load_dataset
    from adm_lib.demo import DemoSettings, demo_configs
    from adm_lib.diffusion import respace
    from adm_lib.guidance import classifier_cond_fn, sample_batches
    from adm_lib.metrics import (
        compute_activations,
        feature_extractor,
        score_activations,
    )
    from adm_lib.models import load_run
    from adm_lib.train import train
    from adm_lib.viz import to_uint8

    hook = None
    if scale:
        classifier = out / "classifier"
        if not classifier.exists():
            train(demo_configs(DemoSettings(seed=train_seed), "cpu")[
                "classifier"], classifier)
        hook = classifier_cond_fn(load_run(classifier).model, scale)
    judge = feature_extractor("mnist")
    labels = torch.arange(SAMPLES) % 10
    data = load_dataset("mnist5k", resolution=32, channels=1)
    real = to_uint8(data.images(range(len(data))))
    reference = compute_activations(real, judge, 500, "cpu")
    checkpoints = sorted((run / "checkpoints").glob("*.pt"))
    if not every_checkpoint:
        checkpoints = checkpoints[-1:]
    for checkpoint in checkpoints:
        # By default the EMAs at the end only: early on they trail the raw
        # weights.
        last = checkpoint == checkpoints[-1]
        chosen = ((weights,) if weights else
                  ("model", "0.95", "0.999") if last else ("model",))
        for which in chosen:
            net = load_run(checkpoint, weights=which)
            seen = []
            for seed in range(seeds):
                images, _ = sample_batches(
                    respace(net.diffusion, respacing), net.model, SAMPLES,
                    (1, 32, 32), labels, 100, "cpu", seed, False,
                    precision="auto", sampler=sampler, cond_fn=hook)
                scores = score_activations(
                    reference, compute_activations(images, judge, 500, "cpu"),
                    labels.numpy(), "cpu")
                seen.append((scores["accuracy"], scores["fid"],
                             float(images.mean())))
            accuracy, fid, mean = (list(column) for column in zip(*seen, strict=True))
            row = {"recipe": name, "step": net.step, "weights": which,
                   "scale": scale, "sampler": sampler,
                   "respacing": respacing, "samples": SAMPLES * seeds,
                   "train_seed": train_seed,
                   "minutes": net.step * per_step / 60,
                   "accuracy": statistics.mean(accuracy),
                   "fid": statistics.mean(fid),
                   "mean_intensity": statistics.mean(mean),
                   "data_mean_intensity": float(real.mean()),
                   **({"accuracy_seeds": accuracy, "fid_seeds": fid}
                      if seeds > 1 else {})}
            print(json.dumps(row), flush=True)
            with open(out / "results.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")


def plot(out: Path, path: Path, weights: str, scale: float,
         sampler: str, respacing: str) -> None:
    """Accuracy and FID against training minutes, a line per recipe."""
    import matplotlib.pyplot as plt

    rows = [json.loads(line)
            for line in (out / "results.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["weights"] == weights
            and r["scale"] == scale and r["sampler"] == sampler
            and r.get("respacing", "25") == respacing]
    if not rows:
        raise SystemExit(f"no results for weights {weights}, scale {scale}, "
                         f"sampler {sampler}, respacing {respacing} in "
                         f"{out / 'results.jsonl'}")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for recipe in dict.fromkeys(r["recipe"] for r in rows):
        mine = sorted((r["minutes"], r["accuracy"], r["fid"],
                       r.get("samples", SAMPLES))
                      for r in rows if r["recipe"] == recipe)
        minutes, accuracy, fid, counts = zip(*mine, strict=True)
        # One standard error of a share of the samples.
        error = [(a * (1 - a) / n) ** 0.5
                 for a, n in zip(accuracy, counts, strict=True)]
        axes[0].errorbar(minutes, accuracy, error, marker="o", capsize=3,
                         label=recipe)
        axes[1].plot(minutes, fid, marker="o", label=recipe)
    axes[0].set(xlabel="training minutes (2-core CPU)",
                ylabel="accuracy on the samples")
    for target in (0.85, 0.9):
        axes[0].axhline(target, color="grey", lw=0.5)
    axes[1].set(xlabel="training minutes (2-core CPU)",
                ylabel="FID (mnist-net)", yscale="log")
    axes[0].legend(fontsize=7)
    name = "raw weights" if weights == "model" else f"EMA {weights}"
    guide = f"guided at scale {scale:g}" if scale else "unguided"
    steps = "DDIM" if sampler == "ddim" else "ancestral"
    fig.suptitle(f"{name}, {guide}, {steps} sampling, respacing "
                 f"{respacing}; {SAMPLES} samples a seed", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("recipes", nargs="*", help=", ".join(RECIPES))
    parser.add_argument("--out", type=Path, default=Path("build/recipes"))
    parser.add_argument("--images", type=int, default=25600,
                        help="training images (steps x batch)")
    parser.add_argument("--every", type=int, default=6400,
                        help="images between checkpoints")
    parser.add_argument("--scale", type=float, default=0.0,
                        help="classifier guidance scale (0: none)")
    parser.add_argument("--sampler", choices=("ddim", "ddpm"),
                        default="ddim", help="DDIM or ancestral sampling")
    parser.add_argument("--respacing", default="25",
                        help="the sampler's steps (a respacing spec)")
    parser.add_argument("--seeds", type=int, default=1,
                        help="sampling seeds per checkpoint, SAMPLES each")
    parser.add_argument("--train-seed", type=int, default=0,
                        help="seed of both networks' training runs (use "
                        "a new --out for each)")
    parser.add_argument("--last", action="store_true",
                        help="score the last checkpoint only")
    parser.add_argument("--weights", choices=("model", "0.95", "0.999"),
                        help="score these weights at every checkpoint")
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    unknown = set(args.recipes) - set(RECIPES)
    if unknown:
        parser.error(f"no recipe {', '.join(sorted(unknown))}: choose from "
                     f"{', '.join(RECIPES)}")
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.recipes:
        run, per_step = _train(name, args.images, args.every,
                               args.train_seed, args.out)
        _score(name, run, per_step, args.scale, args.sampler, args.respacing,
               args.seeds, not args.last, args.weights, args.train_seed,
               args.out)
    if args.plot:
        plot(args.out, args.plot, args.weights or "model", args.scale,
             args.sampler, args.respacing)


if __name__ == "__main__":
    main()
