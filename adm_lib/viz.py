"""Pictures of image batches, for the chapters and the command line.

Hand-written helpers (not exported from a chapter). Images are tensors
N x C x H x W in [-1, 1], C being 1 (drawn in grey) or 3.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor


def to_uint8(images: Tensor) -> np.ndarray:
    """N x C x H x W in [-1, 1] to uint8 N x H x W x C, as the reference."""
    pixels = ((images.detach().float().cpu() + 1) * 127.5).clamp(0, 255)
    return pixels.to(torch.uint8).permute(0, 2, 3, 1).numpy()


def image_grid(images: Tensor, columns: int | None = None,
               pad: int = 2) -> np.ndarray:
    """One uint8 H x W x C picture of a batch, `columns` images a row."""
    return pixel_grid(to_uint8(images), columns, pad)


def pixel_grid(pixels: np.ndarray, columns: int | None = None,
               pad: int = 2) -> np.ndarray:
    """`image_grid` of uint8 N x H x W x C images (a batch file's)."""
    count, height, width, channels = pixels.shape
    columns = min(columns or count, count)
    rows = -(-count // columns)
    grid = np.full((rows * (height + pad) + pad,
                    columns * (width + pad) + pad, channels), 255, np.uint8)
    for i, image in enumerate(pixels):
        top = pad + (i // columns) * (height + pad)
        left = pad + (i % columns) * (width + pad)
        grid[top:top + height, left:left + width] = image
    return grid


def show_images(
    images: Tensor, titles: Sequence[str] | None = None, axes=None,
    size: float = 1.6,
) -> None:
    """Draw each image of a batch on its own axis, with optional titles."""
    import matplotlib.pyplot as plt

    if axes is None:
        _, axes = plt.subplots(1, len(images),
                               figsize=(size * len(images), size + 0.2))
    titles = titles or [""] * len(images)
    for ax, image, title in zip(np.atleast_1d(axes), to_uint8(images),
                                titles, strict=True):
        ax.imshow(image.squeeze(-1) if image.shape[-1] == 1 else image,
                  cmap="gray", vmin=0, vmax=255)
        ax.set_title(title, fontsize=9)
        ax.axis("off")


def show_rows(rows: Mapping[str, Tensor], size: float = 1.1) -> None:
    """Draw one labelled row of images per entry of `rows`."""
    import matplotlib.pyplot as plt

    columns = max(len(batch) for batch in rows.values())
    _, axes = plt.subplots(len(rows), 1, squeeze=False,
                           figsize=(size * columns, 1.2 * size * len(rows)))
    for ax, (label, batch) in zip(axes[:, 0], rows.items(), strict=True):
        grid = image_grid(batch, columns)
        ax.imshow(grid.squeeze(-1) if grid.shape[-1] == 1 else grid,
                  cmap="gray", vmin=0, vmax=255)
        ax.set_ylabel(label, rotation=0, ha="right", va="center")
        ax.set_xticks([])
        ax.set_yticks([])
    plt.show()
