"""Small classifiers trained on the project's data sets, as offline feature nets.

The ADM paper measures samples with activations of an ImageNet Inception-V3: the
pooled features (FID, precision, recall), the first 7 channels of an intermediate
map (sFID) and the class logits (IS). Where Inception weights are out of reach, or
the images are 32x32 digits or CIFAR-10 pictures unlike ImageNet, a
:class:`DataSetNet` trained on the data set itself stands in for it with the same
``{"pool", "spatial", "logits"}`` interface as ``adm_lib.inception``. Numbers made
with one are labelled by the net, e.g. "FID(cifar10-net)", never "FID".

The weights ship in ``adm_lib/assets/``, made by ``python data/make_feature_nets.py``
and read by :func:`load_data_set_net`; ``data/README.md`` records how, and their
accuracies.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.resources.abc import Traversable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adm_lib.assets import asset

FILE_FORMAT = "adm-book datanet v1"
RESOLUTION = 32
SPATIAL_CHANNELS = 7
MNIST_SPLIT_SEED = 0
MNIST_TEST_SIZE = 1000


@dataclass(frozen=True)
class NetInfo:
    """Where a data-set net's weights live and what it reads and predicts."""

    path: Traversable  # a packaged file (adm_lib.assets) or any Path
    in_channels: int
    num_classes: int
    data: str


NETS: dict[str, NetInfo] = {
    "mnist": NetInfo(asset("featnet_mnist5k.pt"), 1, 10, "mnist5k"),
    "cifar10": NetInfo(asset("featnet_cifar10.pt"), 3, 10, "CIFAR-10"),
}


def _conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    """A 3x3 convolution (no bias), batch norm and ReLU."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class _Residual(nn.Module):
    """``x + f(x)`` with ``f`` two conv-BN-ReLU blocks of unchanged width."""

    def __init__(self, channels: int) -> None:
        """Build the two blocks."""
        super().__init__()
        self.body = nn.Sequential(
            _conv_bn(channels, channels), _conv_bn(channels, channels)
        )

    def forward(self, x: Tensor) -> Tensor:
        """Add the blocks' output to the input."""
        return x + self.body(x)


class _Stage(nn.Module):
    """Widen with conv-BN-ReLU, halve the size by max-pooling, maybe a residual."""

    def __init__(self, c_in: int, c_out: int, residual: bool) -> None:
        """Build the widening block, the pooling and the optional residual block."""
        super().__init__()
        self.conv = _conv_bn(c_in, c_out)
        self.pool = nn.MaxPool2d(2)
        self.res = _Residual(c_out) if residual else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """Widen, pool, refine."""
        return self.res(self.pool(self.conv(x)))


class DataSetNet(nn.Module):
    """A ResNet-9-style 32x32 classifier returning Inception-like feature dicts.

    Layout (``w = width``): stem conv ``w`` at 32x32; stage 1 ``2w`` at 16x16 with a
    residual block; stage 2 ``4w`` at 8x8 (the "spatial" features: its first
    :data:`SPATIAL_CHANNELS` channels, flattened in NHWC order); stage 3 ``8w`` at
    4x4 with a residual block; global average pool ("pool", ``8w`` numbers); a
    linear head ("logits").
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 16) -> None:
        """Build the net for ``in_channels`` inputs and ``num_classes`` outputs."""
        super().__init__()
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, not {in_channels}")
        if 4 * width < SPATIAL_CHANNELS or 8 * width < 128:
            raise ValueError(f"width must be at least 16, not {width}")
        self.config = {
            "in_channels": in_channels,
            "num_classes": num_classes,
            "width": width,
        }
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.accuracy: float | None = None
        self.stem = _conv_bn(in_channels, width)
        self.stage1 = _Stage(width, 2 * width, residual=True)
        self.stage2 = _Stage(2 * width, 4 * width, residual=False)
        self.stage3 = _Stage(4 * width, 8 * width, residual=True)
        self.head = nn.Linear(8 * width, num_classes)

    @property
    def feature_dims(self) -> dict[str, int]:
        """The length of each output's rows."""
        return {
            "pool": self.head.in_features,
            "spatial": SPATIAL_CHANNELS * (RESOLUTION // 4) ** 2,
            "logits": self.num_classes,
        }

    def prepare(self, images: Tensor) -> Tensor:
        """Map N x C x H x W pixels in [0, 255] to normalised 32x32 input in [-1, 1]."""
        if images.ndim != 4:
            raise ValueError(f"images must be N x C x H x W, not {tuple(images.shape)}")
        x = images.to(self.head.weight.device, torch.float32)
        if x.shape[1] != self.in_channels:
            if x.shape[1] == 3 and self.in_channels == 1:
                x = x.mean(dim=1, keepdim=True)
            elif x.shape[1] == 1 and self.in_channels == 3:
                x = x.expand(-1, 3, -1, -1)
            else:
                raise ValueError(
                    f"images have {x.shape[1]} channels; the net reads "
                    f"{self.in_channels}"
                )
        if x.shape[-2:] != (RESOLUTION, RESOLUTION):
            x = F.interpolate(
                x,
                size=(RESOLUTION, RESOLUTION),
                mode="bilinear",
                align_corners=False,
                antialias=True,
            )
        return x / 127.5 - 1.0

    def classify(self, x: Tensor) -> Tensor:
        """Logits for already normalised 32x32 input (the training path)."""
        return self._run(x)[2]

    def _run(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Pooled features, the 8x8 map and the logits for normalised input."""
        h = self.stage1(self.stem(x))
        mid = self.stage2(h)
        pool = self.stage3(mid).mean(dim=(2, 3))
        return pool, mid, self.head(pool)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """Features of pixels in [0, 255]: "pool", "spatial" (NHWC) and "logits"."""
        pool, mid, logits = self._run(self.prepare(images))
        spatial = mid[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(len(mid), -1)
        return {
            "pool": pool.float(),
            "spatial": spatial.float().contiguous(),
            "logits": logits.float(),
        }


def mnist5k_split(
    size: int = 5000, num_test: int = MNIST_TEST_SIZE, seed: int = MNIST_SPLIT_SEED
) -> tuple[Tensor, Tensor]:
    """The fixed (train, test) index split of mnist5k that the mnist net was made on."""
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed))
    return order[num_test:].sort().values, order[:num_test].sort().values


def load_data_set_net(name: str, device: str | torch.device = "cpu") -> DataSetNet:
    """Load a trained net of :data:`NETS` in eval mode with frozen parameters."""
    if name not in NETS:
        raise ValueError(
            f"unknown data-set net {name!r}; known names: {', '.join(NETS)}"
        )
    path = NETS[name].path
    if not path.is_file():
        raise FileNotFoundError(
            f"no weights for the {name!r} data-set net at {path}; make them with "
            "`python data/make_feature_nets.py`"
        )
    with path.open("rb") as f:
        blob = torch.load(f, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != FILE_FORMAT:
        raise ValueError(f"{path} is not a data-set net file ({FILE_FORMAT!r})")
    net = DataSetNet(**blob["config"])
    state = {
        k: v.float() if v.is_floating_point() else v
        for k, v in blob["state_dict"].items()
    }
    net.load_state_dict(state)
    net.accuracy = float(blob["test_accuracy"])
    net.eval().requires_grad_(False)
    return net.to(device)
