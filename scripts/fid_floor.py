"""FID's floor at a small sample count: real digits against real digits.

The demo's FIDs compare n = 200 samples with the 5,000 MNIST-5k digits in
the features of chapter 5's MNIST network. Real data scores above zero at
that n too; this prints what `--sets` disjoint sets of n real digits score
against all 5,000, against the rest, and against another set of n, as a
mean and standard deviation (chapter 4.9 quotes them).

    python scripts/fid_floor.py --n 200 --sets 10
"""

from __future__ import annotations

import argparse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--sets", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    import numpy as np

    from adm_lib.data import load_dataset
    from adm_lib.metrics import (
        compute_activations,
        feature_extractor,
        feature_statistics,
        frechet_distance,
    )
    from adm_lib.viz import to_uint8

    data = load_dataset("mnist5k", resolution=32, channels=1)
    if args.n < 2 or 2 * args.sets * args.n > len(data):
        parser.error(f"--n and --sets: need 2 <= n and 2 * sets * n <= "
                     f"{len(data)}")
    real = to_uint8(data.images(range(len(data))))
    features = compute_activations(real, feature_extractor("mnist"), 500,
                                   "cpu")["pool"]
    everything = feature_statistics(features)
    order = np.random.default_rng(args.seed).permutation(len(features))
    scores: dict[str, list[float]] = {"all": [], "rest": [], "another": []}
    for k in range(args.sets):
        part = order[k * args.n:(k + 1) * args.n]
        other = order[(k + args.sets) * args.n:(k + args.sets + 1) * args.n]
        rest = np.setdiff1d(np.arange(len(features)), part)
        mine = feature_statistics(features[part])
        scores["all"].append(frechet_distance(mine, everything))
        scores["rest"].append(frechet_distance(
            mine, feature_statistics(features[rest])))
        scores["another"].append(frechet_distance(
            mine, feature_statistics(features[other])))
    for name, values in scores.items():
        print(f"{args.n} real against {name}: mean {np.mean(values):.3f}, "
              f"sd {np.std(values, ddof=1):.3f} over {args.sets} sets")


if __name__ == "__main__":
    main()
