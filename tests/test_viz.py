"""adm_lib.viz: batches to uint8 pixels and grids."""

from __future__ import annotations

import numpy as np
import torch

from adm_lib.viz import image_grid, to_uint8


def test_to_uint8_converts_as_the_reference() -> None:
    x = torch.tensor([-1.5, -1.0, 0.0, 0.999, 1.0, 2.0]).view(1, 1, 2, 3)
    expected = ((x + 1) * 127.5).clamp(0, 255).to(torch.uint8)
    pixels = to_uint8(x)
    assert pixels.shape == (1, 2, 3, 1) and pixels.dtype == np.uint8
    assert pixels.ravel().tolist() == expected.ravel().tolist()
    assert pixels.ravel().tolist() == [0, 0, 127, 254, 255, 255]


def test_image_grid_places_images_in_rows() -> None:
    images = torch.stack([torch.full((3, 4, 5), v) for v in (-1.0, 0.0, 1.0)])
    grid = image_grid(images, columns=2, pad=1)
    assert grid.shape == (2 * 5 + 1, 2 * 6 + 1, 3)
    assert (grid[1:5, 1:6] == 0).all() and (grid[1:5, 7:12] == 127).all()
    assert (grid[6:10, 1:6] == 255).all()
    assert (grid[6:10, 7:12] == 255).all()  # the empty cell is padding
    assert image_grid(images[:, :1]).shape == (4 + 4, 3 * 7 + 2, 1)
