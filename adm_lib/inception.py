"""The Inception-v3 network behind FID, sFID, precision/recall and the Inception Score.

This is the TensorFlow "2015-12-05" Inception graph that the FID literature (and the
reference evaluator of *Diffusion Models Beat GANs*) measures with, written as a
PyTorch module with the layer names of torch-fidelity's ``FeatureExtractorInceptionV3``
so that torch-fidelity's converted weights file, :data:`WEIGHTS_FILE`, loads as is.
Nothing here downloads: :func:`find_weights` only looks in a few places.

:class:`InceptionV3` takes ``N x C x H x W`` images with values in [0, 255] (uint8 or
float, C = 1 or 3), resizes them to 299x299 with TensorFlow 1.x's bilinear resize,
maps [0, 255] to [-1, 1] and returns three float32 feature sets:

* ``"pool"``: ``N x 2048``, pool_3, the input of FID and precision/recall;
* ``"spatial"``: ``N x 2023``, the first 7 channels of ``mixed_6/conv`` (17x17),
  flattened in NHWC order, the input of sFID;
* ``"logits"``: ``N x 1008``, pool_3 times the classifier's weights *without* its
  bias, whose softmax gives the Inception Score's class probabilities.
"""

# Architecture, layer names and TF1-compatible resize follow torch-fidelity
# (https://github.com/toshas/torch-fidelity, Apache-2.0), rewritten here.

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adm_lib.files import safe_load

WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + WEIGHTS_FILE
)
WEIGHTS_ENV = "ADM_INCEPTION_WEIGHTS"
INPUT_SIZE = 299
SPATIAL_CHANNELS = 7


def resize_like_tf1(images: Tensor, size: int = INPUT_SIZE) -> Tensor:
    """Bilinear resize of float N x C x H x W to size x size as TF 1.x does it."""

    # TF1's resize_bilinear (align_corners=False, no half-pixel centres): output
    # pixel i samples the input at i * in / out, clamping the upper neighbour. The
    # float32 arithmetic and the order of the lerps follow torch-fidelity's "slow"
    # method, which it reports bit-exact with TF on CPU.
    def grid(n_in: int) -> tuple[Tensor, Tensor, Tensor]:
        # in / out rounded to float32 on the host: a tensor made on a GPU would be
        # a blocking copy at every batch. A float32 scalar multiplies a float32
        # tensor as that 0-d tensor did.
        scale = torch.tensor(n_in / size, dtype=torch.float32).item()
        pos = torch.arange(size, dtype=images.dtype, device=images.device) * scale
        lo = pos.long()
        return lo, (lo + 1).clamp_max(n_in - 1), pos - lo.to(pos.dtype)

    y_lo, y_hi, dy = grid(images.shape[2])
    x_lo, x_hi, dx = grid(images.shape[3])
    dx, dy = dx.view(1, 1, 1, -1), dy.view(1, 1, -1, 1)
    rows = [images.index_select(2, y_lo), images.index_select(2, y_hi)]
    top, bottom = (r.index_select(3, x_lo) for r in rows)
    top = top + (rows[0].index_select(3, x_hi) - top) * dx
    bottom = bottom + (rows[1].index_select(3, x_hi) - bottom) * dx
    return top + (bottom - top) * dy


class FrozenBatchNorm2d(nn.Module):
    """Inference-only batch norm: the four tensors of TF's batchnorm, no counter."""

    # nn.BatchNorm2d would add a ``num_batches_tracked`` buffer that the weights file
    # does not hold; this keeps the state_dict equal to the file's.
    def __init__(self, channels: int, eps: float = 1e-3) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: Tensor) -> Tensor:
        """Normalise with the stored statistics."""
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias,
            training=False, eps=self.eps,
        )  # fmt: skip


class BasicConv2d(nn.Module):
    """Convolution without bias, batch norm (eps 0.001), ReLU."""

    def __init__(self, c_in: int, c_out: int, **conv: int | tuple[int, int]) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, bias=False, **conv)
        self.bn = FrozenBatchNorm2d(c_out)

    def forward(self, x: Tensor) -> Tensor:
        """Apply conv, norm and ReLU."""
        return F.relu(self.bn(self.conv(x)))


def _chain(x: Tensor, *layers: nn.Module) -> Tensor:
    """Apply layers one after another."""
    for layer in layers:
        x = layer(x)
    return x


def _avg_pool(x: Tensor) -> Tensor:
    """3x3 stride-1 average pool that, like TF, leaves padding out of the mean."""
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block (TF mixed, mixed_1, mixed_2)."""

    def __init__(self, c_in: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(c_in, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(c_in, pool_features, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        """Concatenate the four branches."""
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3)
        bp = self.branch_pool(_avg_pool(x))
        return torch.cat([self.branch1x1(x), b5, b3, bp], 1)


class InceptionB(nn.Module):
    """35x35 -> 17x17 reduction block (TF mixed_3)."""

    def __init__(self, c_in: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(c_in, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        """Concatenate the two conv branches and a max pool."""
        b3 = _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3)
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([self.branch3x3(x), b3, bp], 1)


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (TF mixed_4 to mixed_7)."""

    def __init__(self, c_in: int, c7: int) -> None:
        super().__init__()
        row = {"kernel_size": (1, 7), "padding": (0, 3)}
        col = {"kernel_size": (7, 1), "padding": (3, 0)}
        self.branch1x1 = BasicConv2d(c_in, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(c_in, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, **row)
        self.branch7x7_3 = BasicConv2d(c7, 192, **col)
        self.branch7x7dbl_1 = BasicConv2d(c_in, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, **col)
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, **row)
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, **col)
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, **row)
        self.branch_pool = BasicConv2d(c_in, 192, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        """Concatenate the four branches; channels 0-191 are ``branch1x1``'s."""
        b7 = _chain(x, self.branch7x7_1, self.branch7x7_2, self.branch7x7_3)
        d7 = _chain(
            x, self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
            self.branch7x7dbl_4, self.branch7x7dbl_5,
        )  # fmt: skip
        bp = self.branch_pool(_avg_pool(x))
        return torch.cat([self.branch1x1(x), b7, d7, bp], 1)


class InceptionD(nn.Module):
    """17x17 -> 8x8 reduction block (TF mixed_8)."""

    def __init__(self, c_in: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(c_in, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(c_in, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        """Concatenate the two conv branches and a max pool."""
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = _chain(
            x, self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3,
            self.branch7x7x3_4,
        )  # fmt: skip
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b7, bp], 1)


class InceptionE(nn.Module):
    """8x8 block with split 3x3 convolutions (TF mixed_9, mixed_10)."""

    def __init__(self, c_in: int, max_pool: bool) -> None:
        super().__init__()
        # TF's mixed_10 (the last block) pools its fourth branch with a max pool,
        # mixed_9 with an average pool; torch-fidelity keeps that quirk, and so do we.
        self.max_pool = max_pool
        row = {"kernel_size": (1, 3), "padding": (0, 1)}
        col = {"kernel_size": (3, 1), "padding": (1, 0)}
        self.branch1x1 = BasicConv2d(c_in, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(c_in, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, **row)
        self.branch3x3_2b = BasicConv2d(384, 384, **col)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, **row)
        self.branch3x3dbl_3b = BasicConv2d(384, 384, **col)
        self.branch_pool = BasicConv2d(c_in, 192, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        """Concatenate the branches (six tensors, 2048 channels)."""
        b3 = self.branch3x3_1(x)
        d3 = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        if self.max_pool:
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:
            pooled = _avg_pool(x)
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch3x3_2a(b3),
                self.branch3x3_2b(b3),
                self.branch3x3dbl_3a(d3),
                self.branch3x3dbl_3b(d3),
                self.branch_pool(pooled),
            ],
            1,
        )


class InceptionV3(nn.Module):
    """TF 2015-12-05 Inception-v3 giving FID, sFID and IS features (float32)."""

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """Features "pool", "spatial" and "logits" of images in [0, 255]."""
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected N x 1|3 x H x W images, got {images.shape}")
        x = images.to(torch.float32)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        # torch-fidelity (and the TF graph) always resize, even 299x299 input, then
        # map [0, 255] to [-1, 1]; the graph computes (x - 128) * 0.0078125, which
        # torch-fidelity notes equals (x - 128) / 128 bit for bit.
        x = (resize_like_tf1(x) - 128) / 128
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # N x 64 x 73 x 73
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # N x 192 x 35 x 35
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))
        x = self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))  # N x 768 x 17 x 17
        x = self.Mixed_6d(x)
        # The reference evaluator's sFID reads TF's "mixed_6/conv" (Mixed_6d's 1x1
        # branch after BN and ReLU, the first 192 channels of the block's output),
        # keeps channels [..., :7] and flattens NHWC: 17 * 17 * 7 = 2023 values.
        spatial = x[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(len(x), -1)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(self.Mixed_6e(x))))
        pool = F.adaptive_avg_pool2d(x, 1).flatten(1)  # pool_3: N x 2048
        # Inception Score uses logits WITHOUT the fc bias: the reference evaluator
        # multiplies pool_3 by "softmax/logits/MatMul"'s weight only, and
        # torch-fidelity's default IS layer is "logits_unbiased" (pool @ W.T).
        logits = pool @ self.fc.weight.T
        return {"pool": pool, "spatial": spatial.contiguous(), "logits": logits}


def find_weights(path: str | os.PathLike | None = None) -> Path:
    """Locate the weights: ``path``, else $ADM_INCEPTION_WEIGHTS, else the hub cache."""
    hub = Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE
    if path is not None:
        where, place = "the path given", Path(path)
    elif os.environ.get(WEIGHTS_ENV):
        where, place = f"${WEIGHTS_ENV}", Path(os.environ[WEIGHTS_ENV])
    else:
        where, place = "the torch hub cache", hub
    if place.is_file():
        return place
    raise FileNotFoundError(
        f"Inception weights {WEIGHTS_FILE} not found at {place} ({where}). "
        f"Nothing is downloaded. Get the file from torch-fidelity's release "
        f"({WEIGHTS_URL}) and pass its path, point ${WEIGHTS_ENV} at it, or put "
        f"it at {hub}."
    )


def load_inception(
    path: str | os.PathLike | None = None, device: str | torch.device = "cpu"
) -> InceptionV3:
    """Build the network, load the weights strictly, freeze it and move it to device."""
    file = find_weights(path)
    try:
        state = safe_load(file)
    except (ValueError, OSError) as err:
        message = f"cannot read Inception weights from {file}: {err}"
        raise RuntimeError(message) from None
    if not isinstance(state, dict):
        raise RuntimeError(f"{file} holds a {type(state).__name__}, not a state_dict")
    # A state_dict saved from an nn.BatchNorm2d model carries unused step counters.
    state = {k: v for k, v in state.items() if not k.endswith(".num_batches_tracked")}
    model = InceptionV3()
    expected = model.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    reshaped = sorted(
        f"{k} {tuple(getattr(v, 'shape', ()))} != {tuple(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and getattr(v, "shape", None) != expected[k].shape
    )
    if missing or unexpected or reshaped:
        problems = [
            f"{len(keys)} {what} (e.g. {', '.join(keys[:3])})"
            for what, keys in [
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("wrong shapes", reshaped),
            ]
            if keys
        ]
        raise RuntimeError(
            f"{file} is not torch-fidelity's Inception weights ({WEIGHTS_FILE}): "
            + "; ".join(problems)
        )
    model.load_state_dict(state, strict=True)
    return model.eval().requires_grad_(False).to(device)
