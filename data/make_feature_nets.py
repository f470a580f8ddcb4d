"""Train the data-set feature nets: adm_lib/assets/featnet_{mnist5k,cifar10}.pt.

Each file holds ``{"format", "name", "config", "state_dict" (float16), "test_accuracy",
"meta"}`` and is read by ``adm_lib.datanets.load_data_set_net``. Training is seeded
and single-process, so a rerun on the same machine and PyTorch build repeats it.

    python data/make_feature_nets.py                  # both nets
    python data/make_feature_nets.py --nets mnist --epochs 15
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from adm_lib.data import load_dataset
from adm_lib.datanets import (
    FILE_FORMAT,
    MNIST_SPLIT_SEED,
    NETS,
    DataSetNet,
    mnist5k_split,
)

ROOT = Path(__file__).resolve().parent.parent
# The checkout's package folder, whose files the wheel ships (adm_lib.assets).
ASSETS = ROOT / "adm_lib" / "assets"
CIFAR_DIR = ROOT.parent / "shared" / "data" / "cifar10"

# Per net: width, epochs, batch, peak lr, weight decay, padding, flips.
RECIPES: dict[str, dict] = {
    "mnist": {
        "width": 16,
        "epochs": 15,
        "batch": 128,
        "lr": 0.1,
        "wd": 5e-4,
        "pad": 2,
        "flip": False,
    },
    "cifar10": {
        "width": 16,
        "epochs": 18,
        "batch": 256,
        "lr": 0.2,
        "wd": 5e-4,
        "pad": 4,
        "flip": True,
    },
}


def to_uint8(source: str | os.PathLike[str]) -> tuple[Tensor, Tensor]:
    """Decode a whole data set once into uint8 N x C x H x W pixels and labels."""
    ds = load_dataset(source)
    pixels = torch.empty(
        len(ds), ds.channels, ds.resolution, ds.resolution, dtype=torch.uint8
    )
    labels = torch.empty(len(ds), dtype=torch.long)
    for i in range(len(ds)):
        x, y = ds[i]
        pixels[i] = ((x + 1) * 127.5).round_().clamp_(0, 255).to(torch.uint8)
        labels[i] = y
    return pixels, labels


def augment(x: Tensor, pad: int, flip: bool, gen: torch.Generator) -> Tensor:
    """Random crops of the zero-padded batch and, optionally, horizontal flips."""
    n, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]
    out = padded[
        torch.arange(n)[:, None, None, None],
        torch.arange(c)[None, :, None, None],
        rows,
        cols,
    ]
    if flip:
        mask = torch.rand(n, generator=gen) < 0.5
        out = torch.where(mask[:, None, None, None], out.flip(3), out)
    return out


@torch.no_grad()
def accuracy(
    net: DataSetNet, pixels: Tensor, labels: Tensor, batch: int = 500
) -> float:
    """Top-1 accuracy of the eval-mode net through its public forward."""
    net.eval()
    correct = 0
    for i in range(0, len(pixels), batch):
        logits = net(pixels[i : i + batch])["logits"]
        correct += int((logits.argmax(1) == labels[i : i + batch]).sum())
    return correct / len(pixels)


def train(
    name: str, data: tuple[Tensor, Tensor, Tensor, Tensor], recipe: dict, seed: int
) -> tuple[DataSetNet, float]:
    """Train one net with SGD, Nesterov momentum and a one-cycle schedule."""
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    info = NETS[name]
    net = DataSetNet(info.in_channels, info.num_classes, recipe["width"])
    net = net.to(memory_format=torch.channels_last)
    batch, epochs = recipe["batch"], recipe["epochs"]
    steps = math.ceil(len(x_train) / batch)
    decay = [p for p in net.parameters() if p.ndim > 1]
    other = [p for p in net.parameters() if p.ndim <= 1]
    opt = torch.optim.SGD(
        [{"params": decay, "weight_decay": recipe["wd"]}, {"params": other}],
        lr=recipe["lr"],
        momentum=0.9,
        nesterov=True,
    )
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=recipe["lr"], total_steps=epochs * steps, pct_start=0.25
    )
    start = time.time()
    for epoch in range(epochs):
        net.train()
        order = torch.randperm(len(x_train), generator=gen)
        total = 0.0
        for step in range(steps):
            idx = order[step * batch : (step + 1) * batch]
            x = augment(x_train[idx], recipe["pad"], recipe["flip"], gen)
            x = (x.float() / 127.5 - 1).contiguous(memory_format=torch.channels_last)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = net.classify(x)
            loss = F.cross_entropy(logits.float(), y_train[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.detach().item()
        acc = accuracy(net, x_test, y_test)
        print(
            f"  {name} epoch {epoch + 1:2d}/{epochs}: loss {total / steps:.4f}, "
            f"test accuracy {acc:.4f}, {time.time() - start:.0f} s",
            flush=True,
        )
    return net.to(memory_format=torch.contiguous_format), time.time() - start


def half_state(net: DataSetNet) -> dict[str, Tensor]:
    """The state dict with floating-point tensors stored as float16."""
    return {
        k: v.half() if v.is_floating_point() else v.clone()
        for k, v in net.state_dict().items()
    }


def save(blob: dict, path: Path) -> None:
    """Write ``blob`` with torch.save through a temporary file and os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(blob, f)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def load_data(name: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Train and test pixels (uint8) and labels for one net."""
    if name == "mnist":
        pixels, labels = to_uint8("mnist5k")
        train_idx, test_idx = mnist5k_split()
        return pixels[train_idx], labels[train_idx], pixels[test_idx], labels[test_idx]
    return (*to_uint8(CIFAR_DIR / "train.zip"), *to_uint8(CIFAR_DIR / "test.zip"))


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, train the chosen nets and write their files."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", nargs="+", choices=list(NETS), default=list(NETS))
    parser.add_argument("--epochs", type=int, help="override every net's epochs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=ASSETS,
        help="default: adm_lib/assets/ of this checkout",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = shlex.join(["python", *(sys.argv if argv is None else ["", *argv])])
    results = []
    for name in args.nets:
        recipe = dict(RECIPES[name])
        if args.epochs is not None:
            recipe["epochs"] = args.epochs
        t0 = time.time()
        data = load_data(name)
        print(
            f"{name}: {len(data[0])} train / {len(data[2])} test images decoded "
            f"in {time.time() - t0:.0f} s; recipe {recipe}",
            flush=True,
        )
        net, seconds = train(name, data, recipe, args.seed)
        state = half_state(net)
        # Record the accuracy of what is stored: the float16 weights cast back.
        net.load_state_dict(
            {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
        )
        acc = accuracy(net, data[2], data[3])
        meta = {
            "seed": args.seed,
            "train_images": len(data[0]),
            "test_images": len(data[2]),
            "torch": str(torch.__version__),
            "threads": args.threads,
            **{f"recipe_{k}": v for k, v in recipe.items()},
        }
        if name == "mnist":
            meta["split_seed"] = MNIST_SPLIT_SEED
        blob = {
            "format": FILE_FORMAT,
            "name": name,
            "config": net.config,
            "state_dict": state,
            "test_accuracy": acc,
            "meta": meta,
        }
        path = args.output_dir / NETS[name].path.name
        save(blob, path)
        results.append((name, acc, seconds, path))
    print(f"command: {command}")
    for name, acc, seconds, path in results:
        print(
            f"{name}: test accuracy {acc:.4f} (float16 weights), trained in "
            f"{seconds:.0f} s, {path} ({path.stat().st_size:,} bytes)"
        )


if __name__ == "__main__":
    main()
