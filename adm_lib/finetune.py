"""Fine-tuning: a run's first weights from another run or a released file.

Hand-written. `read_init` reads the weights a run starts from: a run folder
or checkpoint of `adm train` (its EMA, an EMA rate or its raw weights), or
a released checkpoint of the reference described by its flags (through
`adm_lib.compat`). `train(..., init=...)` (chapter 4) then starts from them
with a fresh optimizer and step count, every EMA starting from the loaded
weights; before the run folder is touched, an `InitWeights` refuses a
network that does not fit the run's configuration, naming the settings
that differ.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from adm_lib.compat import guided_diffusion as gd
from adm_lib.config import TrainConfig, channel_mults
from adm_lib.errors import TrainError, with_article
from adm_lib.models import load_run

__all__ = ["InitWeights", "read_init", "network_differences"]

# The settings that make a network of each kind: its shapes, or what its
# weights compute (head counts, attention order). dropout and the
# diffusion's schedule are the run's to choose.
_UNET = ("image_size", "in_channels", "num_channels", "num_res_blocks",
         "channel_mult", "attention_resolutions", "num_heads",
         "num_head_channels", "num_heads_upsample", "use_scale_shift_norm",
         "resblock_updown", "rescale_residual", "learn_sigma", "class_cond",
         "num_classes", "label_dropout")
NETWORK_SETTINGS: dict[str, tuple[str, ...]] = {
    "diffusion": _UNET + ("use_new_attention_order",),
    "upsampler": _UNET + ("small_size", "low_res_noise"),
    "classifier": ("image_size", "in_channels", "num_classes",
                   "channel_mult", "classifier_width", "classifier_depth",
                   "classifier_attention_resolutions",
                   "classifier_use_scale_shift_norm",
                   "classifier_resblock_updown", "classifier_pool"),
}


def _network_value(config: TrainConfig, name: str) -> Any:
    """What a setting means for the network, not how it was written."""
    labelled = config.kind == "classifier" or config.class_cond
    if name == "channel_mult":  # () is the default for the image size
        return tuple(float(m) for m in channel_mults(config))
    if name == "num_classes":
        return config.num_classes if labelled else None
    if name == "label_dropout":  # > 0 adds the null label's embedding
        return labelled and config.label_dropout > 0
    if name == "low_res_noise":  # > 0 adds the level's embedding
        return config.low_res_noise > 0
    return getattr(config, name)


def network_differences(there: TrainConfig, here: TrainConfig) -> list[str]:
    """The network settings of `here` that differ from `there`'s, as text."""
    return [f"{name}={getattr(there, name)!r} there, "
            f"{getattr(here, name)!r} here"
            for name in NETWORK_SETTINGS[here.kind]
            if _network_value(there, name) != _network_value(here, name)]


@dataclass
class InitWeights:
    """The weights a run starts from, and the configuration that made them."""

    state_dict: dict[str, Tensor]
    config: TrainConfig
    source: str  # for messages: the path and which weights

    def __call__(self, config: TrainConfig, model: nn.Module,
                 emas: Iterable[nn.Module]) -> None:
        """Load the weights into a fresh run's model and its EMAs.

        `config` is the run's, resolved from its data; a network it does
        not describe is refused, naming the settings that differ.
        """
        if self.config.kind != config.kind:
            there, here = self.config.kind, config.kind
            raise TrainError(f"init={self.source} is {with_article(there)} "
                             f"model, and this run trains {with_article(here)}"
                             " model")
        differ = network_differences(self.config, config)
        if differ:
            raise TrainError(
                f"init={self.source}: its network differs from this "
                f"run's: {'; '.join(differ)}. Give the run the init's "
                "settings, or init from a network like this run's")
        try:  # what no setting explains: say which keys do not fit
            gd.load_reference_state_dict(model, self.state_dict)
        except ValueError as err:
            first = str(err).splitlines()[0]
            raise TrainError(f"init={self.source}: {first}") from None
        for ema in emas:
            ema.load_state_dict(model.state_dict())


def read_init(init: str | os.PathLike, kind: str, weights: str | None = None,
              flags: str | None = None) -> InitWeights:
    """The weights a run of `kind` starts from: a run's, or a released file's.

    `init` is a run folder (its newest checkpoint) or checkpoint of adm
    train, whose `weights` are "ema" (the default: the first EMA rate), an
    EMA rate such as "0.9999" or "model" (the raw weights); or, with the
    reference's `flags`, a released checkpoint of the reference.
    """
    path = Path(init)
    if not path.exists():
        raise TrainError(f"init={path}: no such file or folder")
    if flags is not None:
        if weights is not None:
            raise TrainError(f"weights={weights!r}: a released file has one "
                             "set of weights; weights= is for adm train runs")
        if path.is_dir():
            raise TrainError(f"init={path} is a folder; flags= describe a "
                             "released checkpoint file")
        try:
            trained = gd.load_trained(path, flags, kind)
        except (ValueError, FileNotFoundError) as err:
            raise TrainError(f"init={path} with flags={flags!r}: "
                             f"{err}") from None
    else:
        try:
            trained = load_run(path, weights or "ema")
        except TrainError as err:
            foreign = "not an adm train checkpoint" in str(err)
            hint = ("; for a released checkpoint of the reference, give its"
                    " flags=FLAGS" if foreign else "")
            raise TrainError(f"init={path}: {err}{hint}") from None
    if trained.kind != kind:
        raise TrainError(f"init={trained.source} is "
                         f"{with_article(trained.kind)} model, and this run "
                         f"trains {with_article(kind)} model")
    return InitWeights(trained.model.state_dict(), trained.config,
                       trained.source)
