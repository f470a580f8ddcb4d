"""The reference implementation's flags and checkpoints, for adm_lib's models.

`openai/guided-diffusion` describes every model by command-line flags
(`--image_size 64 --num_channels 192 ...`) and releases its weights as plain
state dicts. This module reads those flags over the reference's defaults
(`parse_flags`), builds the matching `adm_lib.unet` model the way the
reference's `create_model`, `create_classifier` and `sr_create_model` build
theirs (`model_from_flags`, `classifier_from_flags`, `upsampler_from_flags`),
and loads reference state dicts with no key renaming (our module tree mirrors
the reference's), explaining a mismatch by the flag that is most likely wrong
(`load_reference_state_dict`, `load_checkpoint`). The head counts
(`--num_heads`, `--num_head_channels`, `--num_heads_upsample`) and
`--use_new_attention_order` change no parameter's shape, so no load can check
them: a checkpoint loaded with the wrong ones runs, and computes the wrong
thing. Take them from the flags the checkpoint was released with.

Three flags are adm_lib's own, so that the same builders serve `adm train` on
data sets other than ImageNet: `--in_channels` (3), `--num_classes` (1000),
and `--channel_mult` read by the classifier and upsampler builders too (the
reference derives theirs from the image size alone).

`--use_fp16` and `--classifier_use_fp16` are accepted and ignored: adm_lib's
models compute in whatever dtype their parameters have, and mixed precision is
the caller's choice (`torch.autocast`, or `model.half()`).
"""

from __future__ import annotations

import difflib
import re
import shlex
from collections.abc import Mapping
from dataclasses import fields
from os import PathLike
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from adm_lib.config import (
    CHANNEL_MULT,
    KINDS,
    SUPER_RES_CHANNEL_MULT,
    TrainConfig,
)
from adm_lib.diffusion import GaussianDiffusion, respace, space_timesteps
from adm_lib.files import safe_load
from adm_lib.forward import get_named_beta_schedule
from adm_lib.models import TrainedModel
from adm_lib.unet import EncoderUNetModel, SuperResModel, UNetModel
from adm_lib.values import coerce

__all__ = [
    "NUM_CLASSES",
    "DEFAULTS",
    "parse_flags",
    "unet_arguments",
    "model_from_flags",
    "classifier_from_flags",
    "upsampler_from_flags",
    "diffusion_from_flags",
    "BUILDERS",
    "RELEASED",
    "load_reference_state_dict",
    "load_checkpoint",
    "config_from_flags",
    "load_trained",
]

NUM_CLASSES = 1000  # ImageNet: the class-conditional models' label count

# The reference's defaults (script_util.py), by the function that holds them.
MODEL_DEFAULTS: dict[str, Any] = {
    "image_size": 64,
    "num_channels": 128,
    "num_res_blocks": 2,
    "num_heads": 4,
    "num_heads_upsample": -1,
    "num_head_channels": -1,
    "attention_resolutions": "16,8",
    "channel_mult": "",
    "dropout": 0.0,
    "class_cond": False,
    "use_checkpoint": False,
    "use_scale_shift_norm": True,
    "resblock_updown": False,
    "use_fp16": False,
    "use_new_attention_order": False,
}
DIFFUSION_DEFAULTS: dict[str, Any] = {
    "learn_sigma": False,
    "diffusion_steps": 1000,
    "noise_schedule": "linear",
    "timestep_respacing": "",
    "use_kl": False,
    "predict_xstart": False,
    "rescale_timesteps": False,
    "rescale_learned_sigmas": False,
}
CLASSIFIER_DEFAULTS: dict[str, Any] = {
    "image_size": 64,
    "classifier_use_fp16": False,
    "classifier_width": 128,
    "classifier_depth": 2,
    "classifier_attention_resolutions": "32,16,8",
    "classifier_use_scale_shift_norm": True,
    "classifier_resblock_updown": True,
    "classifier_pool": "attention",
}
SUPER_RES_DEFAULTS: dict[str, Any] = {"large_size": 256, "small_size": 64}
# adm_lib's own flags, for data that is not ImageNet: the image channels and
# the class count of class-conditional models and classifiers. The reference
# fixes them at 3 and 1000; `adm train` sets them from the data set. And the
# paper's ablation of residual connections scaled by 1/sqrt(2) (its Table 1),
# which the reference's code does not have: off, as in every released model.
# And an upsampler's conditioning augmentation (chapter 7): the largest step
# its low-resolution input is noised to in training; above 0 the network
# embeds that step (`low_res_level`). 0, the reference's, has no such layer.
EXTENSION_DEFAULTS: dict[str, Any] = {
    "in_channels": 3,
    "num_classes": NUM_CLASSES,
    "rescale_residual": False,
    "low_res_noise": 0,
}
# The scripts' own flags (sampling first, then training), accepted so that a
# whole command line parses; the model builders do not use them.
SCRIPT_DEFAULTS: dict[str, Any] = {
    "clip_denoised": True,
    "num_samples": 10000,
    "batch_size": 16,
    "use_ddim": False,
    "model_path": "",
    "classifier_path": "",
    "classifier_scale": 1.0,
    "base_samples": "",
    "data_dir": "",
    "val_data_dir": "",
    "noised": True,
    "iterations": 150000,
    "lr": 1e-4,
    "weight_decay": 0.0,
    "anneal_lr": False,
    "lr_anneal_steps": 0,
    "microbatch": -1,
    "schedule_sampler": "uniform",
    "resume_checkpoint": "",
    "log_interval": 10,
    "eval_interval": 5,
    "save_interval": 10000,
    "ema_rate": "0.9999",
    "fp16_scale_growth": 1e-3,
}
DEFAULTS: dict[str, Any] = {
    **SCRIPT_DEFAULTS,
    **MODEL_DEFAULTS,
    **DIFFUSION_DEFAULTS,
    **CLASSIFIER_DEFAULTS,
    **SUPER_RES_DEFAULTS,
    **EXTENSION_DEFAULTS,
}

def _typed(name: str, value: Any) -> Any:
    """A flag value converted to the type of the flag's default."""
    default = DEFAULTS[name]
    if isinstance(default, str) and isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    try:
        return coerce(value, default)
    except ValueError:
        wanted = ("True or False" if isinstance(default, bool)
                  else type(default).__name__)
        raise ValueError(f"--{name} expects {wanted}, got {value!r}") from None


def _split(flags: str) -> dict[str, str]:
    """A `--name value` (or `--name=value`) command line as a dict."""
    words, pairs = shlex.split(flags), {}
    i = 0
    while i < len(words):
        word = words[i]
        if not word.startswith("--"):
            raise ValueError(f"expected a --flag, got {word!r} in {flags!r}")
        name, eq, value = word[2:].partition("=")
        if not eq:
            if i + 1 >= len(words) or words[i + 1].startswith("--"):
                raise ValueError(f"--{name} has no value in {flags!r}")
            value, i = words[i + 1], i + 1
        pairs[name] = value
        i += 1
    return pairs


def parse_flags(flags: str | Mapping[str, Any]) -> dict[str, Any]:
    """The reference's flags (string or dict), typed, over its defaults."""
    given = _split(flags) if isinstance(flags, str) else dict(flags)
    unknown = [name for name in given if name not in DEFAULTS]
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, DEFAULTS, n=3)
            maybe = f" (did you mean {', '.join('--' + c for c in close)}?)"
            hints.append(f"--{name}" + (maybe if close else ""))
        raise ValueError(
            "unknown guided-diffusion flag(s): " + "; ".join(hints)
        )
    return {**DEFAULTS, **{k: _typed(k, v) for k, v in given.items()}}


def _attention_factors(resolutions: str, image_size: int,
                       channel_mult: tuple[float, ...]) -> tuple[int, ...]:
    """Attention resolutions (e.g. "32,16,8") as down-sampling factors.

    "" is no attention (the reference's parser would fail on it). A
    resolution that no level has adds nothing, as in the reference, whose
    checkpoints built so load (the parity fixtures' model: 16,8 at 64 px
    with channel_mult 1,2,2, no level at 8 px); UNetModel refuses it.
    """
    levels = {2**level for level in range(len(channel_mult))}
    factors = (image_size // int(r) for r in coerce(resolutions, ()))
    return tuple(f for f in factors if f in levels)


def _unet_options(f: Mapping[str, Any], size: int,
                  channel_mult: tuple[float, ...]) -> dict[str, Any]:
    """The UNet arguments that the model and the upsampler share."""
    return {
        "image_size": size,
        "in_channels": f["in_channels"],
        "model_channels": f["num_channels"],
        "out_channels": f["in_channels"] * (2 if f["learn_sigma"] else 1),
        "num_res_blocks": f["num_res_blocks"],
        "attention_resolutions": _attention_factors(
            f["attention_resolutions"], size, channel_mult
        ),
        "dropout": f["dropout"],
        "channel_mult": channel_mult,
        "num_classes": f["num_classes"] if f["class_cond"] else None,
        "use_checkpoint": f["use_checkpoint"],
        "num_heads": f["num_heads"],
        "num_head_channels": f["num_head_channels"],
        "num_heads_upsample": f["num_heads_upsample"],
        "use_scale_shift_norm": f["use_scale_shift_norm"],
        "resblock_updown": f["resblock_updown"],
        "rescale_residual": f["rescale_residual"],
    }


def _channel_mult(f: Mapping[str, Any], table: dict, size_flag: str
                  ) -> tuple[float, ...]:
    """--channel_mult if given, else the default for the image size."""
    if f["channel_mult"]:
        return coerce(f["channel_mult"], ())
    size = f[size_flag]
    if size not in table:
        sizes = ", ".join(str(s) for s in sorted(table))
        raise ValueError(
            f"no default channel_mult for --{size_flag} {size} (the "
            f"reference has {sizes}); pass --channel_mult"
        )
    return table[size]


def unet_arguments(flags: str | Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments of the diffusion UNet that flags describe.

    The reference's `UNetModel` takes the same ones but `rescale_residual`
    (an adm_lib extension).
    """
    f = parse_flags(flags)
    size = f["image_size"]
    channel_mult = _channel_mult(f, CHANNEL_MULT, "image_size")
    return {**_unet_options(f, size, channel_mult),
            "use_new_attention_order": f["use_new_attention_order"]}


def model_from_flags(flags: str | Mapping[str, Any]) -> UNetModel:
    """The diffusion UNet the reference's create_model builds from flags."""
    return UNetModel(**unet_arguments(flags))


def classifier_from_flags(flags: str | Mapping[str, Any]) -> EncoderUNetModel:
    """The noisy-image classifier of the reference's create_classifier."""
    f = parse_flags(flags)
    size = f["image_size"]
    channel_mult = _channel_mult(f, CHANNEL_MULT, "image_size")
    return EncoderUNetModel(
        image_size=size,
        in_channels=f["in_channels"],
        model_channels=f["classifier_width"],
        out_channels=f["num_classes"],
        num_res_blocks=f["classifier_depth"],
        attention_resolutions=_attention_factors(
            f["classifier_attention_resolutions"], size, channel_mult
        ),
        channel_mult=channel_mult,
        num_head_channels=64,
        use_scale_shift_norm=f["classifier_use_scale_shift_norm"],
        resblock_updown=f["classifier_resblock_updown"],
        pool=f["classifier_pool"],
    )


def upsampler_from_flags(flags: str | Mapping[str, Any]) -> SuperResModel:
    """The super-resolution UNet of the reference's sr_create_model."""
    f = parse_flags(flags)
    size = f["large_size"]
    channel_mult = _channel_mult(f, SUPER_RES_CHANNEL_MULT, "large_size")
    # sr_create_model leaves use_new_attention_order at its default, False.
    return SuperResModel(**_unet_options(f, size, channel_mult),
                         low_res_level=f["low_res_noise"] > 0)


def diffusion_from_flags(flags: str | Mapping[str, Any]) -> GaussianDiffusion:
    """The diffusion of the reference's create_gaussian_diffusion."""
    f = parse_flags(flags)
    steps = f["diffusion_steps"]
    learned = f["learn_sigma"]
    kept = (space_timesteps(steps, f["timestep_respacing"])
            if f["timestep_respacing"] else range(steps))
    # The reference's loss types: use_kl is the rescaled bound (T * L_t); the
    # hybrid adds the vb term unscaled (lambda = 1/T, T the steps it trains
    # on, respaced or not) unless rescale_learned_sigmas scales it by T/1000
    # (lambda = 0.001).
    if f["use_kl"]:
        loss = "kl"
    else:
        loss = "hybrid" if learned else "simple"
    diffusion = GaussianDiffusion(
        get_named_beta_schedule(f["noise_schedule"], steps),
        mean_type="x0" if f["predict_xstart"] else "eps",
        var_type="learned_range" if learned else "fixed_large",
        loss=loss,
        lambda_vlb=0.001 if f["rescale_learned_sigmas"] else 1 / len(kept),
        rescale_timesteps=f["rescale_timesteps"],
    )
    return respace(diffusion, f["timestep_respacing"])


# Model builders by kind; "diffusion" is official_models.json's name for
# a diffusion model.
BUILDERS = {
    "model": model_from_flags,
    "diffusion": model_from_flags,
    "classifier": classifier_from_flags,
    "upsampler": upsampler_from_flags,
}

# The reference's released checkpoints (file models/<name>.pt): their kind
# and the flags its README gives for each.
_LSUN = (
    "--attention_resolutions 32,16,8 --class_cond False "
    "--diffusion_steps 1000 --dropout 0.1 --image_size 256 --learn_sigma True "
    "--noise_schedule linear --num_channels 256 --num_head_channels 64 "
    "--num_res_blocks 2 --resblock_updown True --use_fp16 True "
    "--use_scale_shift_norm True"
)
RELEASED: dict[str, tuple[str, str]] = {
    "64x64_diffusion": ("diffusion", (
        "--attention_resolutions 32,16,8 --class_cond True "
        "--diffusion_steps 1000 --dropout 0.1 --image_size 64 "
        "--learn_sigma True --noise_schedule cosine --num_channels 192 "
        "--num_head_channels 64 --num_res_blocks 3 --resblock_updown True "
        "--use_new_attention_order True --use_fp16 True "
        "--use_scale_shift_norm True")),
    "64x64_classifier": ("classifier", "--image_size 64 --classifier_depth 4"),
    "128x128_diffusion": ("diffusion", (
        "--attention_resolutions 32,16,8 --class_cond True "
        "--diffusion_steps 1000 --image_size 128 --learn_sigma True "
        "--noise_schedule linear --num_channels 256 --num_heads 4 "
        "--num_res_blocks 2 --resblock_updown True --use_fp16 True "
        "--use_scale_shift_norm True")),
    "128x128_classifier": ("classifier", "--image_size 128"),
    "256x256_diffusion": ("diffusion", (
        "--attention_resolutions 32,16,8 --class_cond True "
        "--diffusion_steps 1000 --image_size 256 --learn_sigma True "
        "--noise_schedule linear --num_channels 256 --num_head_channels 64 "
        "--num_res_blocks 2 --resblock_updown True --use_fp16 True "
        "--use_scale_shift_norm True")),
    "256x256_diffusion_uncond": ("diffusion", (
        "--attention_resolutions 32,16,8 --class_cond False "
        "--diffusion_steps 1000 --image_size 256 --learn_sigma True "
        "--noise_schedule linear --num_channels 256 --num_head_channels 64 "
        "--num_res_blocks 2 --resblock_updown True --use_fp16 True "
        "--use_scale_shift_norm True")),
    "256x256_classifier": ("classifier", "--image_size 256"),
    "512x512_diffusion": ("diffusion", (
        "--attention_resolutions 32,16,8 --class_cond True "
        "--diffusion_steps 1000 --image_size 512 --learn_sigma True "
        "--noise_schedule linear --num_channels 256 --num_head_channels 64 "
        "--num_res_blocks 2 --resblock_updown True --use_fp16 False "
        "--use_scale_shift_norm True")),
    "512x512_classifier": ("classifier", "--image_size 512"),
    "64_256_upsampler": ("upsampler", (
        "--attention_resolutions 32,16,8 --class_cond True "
        "--diffusion_steps 1000 --large_size 256  --small_size 64 "
        "--learn_sigma True --noise_schedule linear --num_channels 192 "
        "--num_heads 4 --num_res_blocks 2 --resblock_updown True "
        "--use_fp16 True --use_scale_shift_norm True")),
    "128_512_upsampler": ("upsampler", (
        "--attention_resolutions 32,16 --class_cond True "
        "--diffusion_steps 1000 --large_size 512 --small_size 128 "
        "--learn_sigma True --noise_schedule linear --num_channels 192 "
        "--num_head_channels 64 --num_res_blocks 2 --resblock_updown True "
        "--use_fp16 True --use_scale_shift_norm True")),
    "lsun_bedroom": ("diffusion", _LSUN),
    "lsun_cat": ("diffusion", _LSUN),
    "lsun_horse": ("diffusion", _LSUN),
    "lsun_horse_nodropout": ("diffusion", _LSUN.replace("0.1", "0.0")),
}

# The flags of a classifier and an upsampler that play the model's roles.
_CLASSIFIER_FLAGS = {
    "num_channels": "classifier_width",
    "num_res_blocks": "classifier_depth",
    "attention_resolutions": "classifier_attention_resolutions",
    "use_scale_shift_norm": "classifier_use_scale_shift_norm",
    "resblock_updown": "classifier_resblock_updown",
    "channel_mult": "image_size",
}


def _flag(module: nn.Module, name: str) -> str:
    """The flag that sets `name` for this kind of model, as --flag."""
    if isinstance(module, EncoderUNetModel):
        name = _CLASSIFIER_FLAGS.get(name, name)
    elif isinstance(module, SuperResModel) and name == "channel_mult":
        name = "large_size"
    return f"--{name}"


def _pool_of(keys: Mapping[str, Tensor]) -> str | None:
    """The classifier pooling a state dict's `out` keys belong to."""
    if "out.2.positional_embedding" in keys:
        return "attention"
    if "out.3.weight" in keys:
        return "spatial_v2" if keys["out.3.weight"].ndim == 2 else "adaptive"
    if "out.2.weight" in keys and keys["out.2.weight"].ndim == 2:
        return "spatial"
    return None


def _diagnose(
    module: nn.Module,
    ours: Mapping[str, Tensor],
    theirs: Mapping[str, Tensor],
    missing: list[str],
    unexpected: list[str],
    misshaped: list[str],
) -> list[str]:
    """The flags most likely wrong, as sentences, best guess first."""
    hints: list[str] = []
    if "label_emb.weight" in unexpected:
        hints.append("the checkpoint is class-conditional: --class_cond True")
    if "label_emb.weight" in missing:
        hints.append("the checkpoint is unconditional: --class_cond False")

    def ratio(key: str, dim: int = 0) -> float | None:
        if key not in misshaped:
            return None
        return theirs[key].shape[dim] / ours[key].shape[dim]

    first_in = ratio("input_blocks.0.0.weight", 1)
    if first_in == 2:
        hints.append("the checkpoint sees twice the input channels: it is "
                     "a super-resolution model (kind='upsampler')")
    elif first_in == 0.5:
        hints.append("the checkpoint sees half the input channels: it is "
                     "not a super-resolution model (kind='model')")
    if "time_embed.0.weight" in misshaped:
        width = theirs["time_embed.0.weight"].shape[1]
        hints.append(f"the checkpoint's base width is {width}: "
                     f"{_flag(module, 'num_channels')} {width}")
    if isinstance(module, UNetModel) and "out.2.weight" in misshaped:
        if ratio("out.2.weight") == 2:
            hints.append("the checkpoint predicts a variance too (twice the "
                         "output channels): --learn_sigma True")
        elif ratio("out.2.weight") == 0.5:
            hints.append("the checkpoint predicts no variance (half the "
                         "output channels): --learn_sigma False")
    emb = [k for k in misshaped if k.endswith("emb_layers.1.weight")]
    ratios = {ratio(k) for k in emb}
    flag = _flag(module, "use_scale_shift_norm")
    if emb and ratios == {2}:
        hints.append(f"the checkpoint uses AdaGN (scale and shift): {flag} "
                     "True")
    elif emb and ratios == {0.5}:
        hints.append(f"the checkpoint adds the embedding: {flag} False")
    if any(k.endswith(".op.weight") for k in unexpected):
        hints.append("the checkpoint resamples with separate layers: "
                     f"{_flag(module, 'resblock_updown')} False")
    if any(k.endswith(".op.weight") for k in missing):
        hints.append("the checkpoint resamples in residual blocks: "
                     f"{_flag(module, 'resblock_updown')} True")
    if isinstance(module, EncoderUNetModel):
        pool = _pool_of(theirs)
        if pool and pool != module.pool:
            hints.append(f"the checkpoint's head is {pool} pooling: "
                         f"--classifier_pool {pool}")
        elif "out.2.positional_embedding" in misshaped:
            hints.append("the attention pooling's size differs: "
                         "--image_size")
    attn = re.compile(r"\.(qkv|proj_out|norm)\.")
    if any(attn.search(k) for k in missing + unexpected):
        hints.append("attention blocks are where the model has none (or "
                     "the reverse): "
                     f"{_flag(module, 'attention_resolutions')}")

    def blocks(keys) -> int:
        found = {re.match(r"input_blocks\.(\d+)\.", k) for k in keys}
        return 1 + max((int(m.group(1)) for m in found if m), default=-1)

    if blocks(theirs) != blocks(ours):
        hints.append(
            f"the checkpoint has {blocks(theirs)} input blocks, the model "
            f"{blocks(ours)}: {_flag(module, 'num_res_blocks')} or "
            f"{_flag(module, 'channel_mult')}"
        )
    if not hints and any(k.startswith("input_blocks") for k in misshaped):
        hints.append("channel counts differ: "
                     f"{_flag(module, 'num_channels')} or "
                     f"{_flag(module, 'channel_mult')}")
    return hints


def _some(keys: list[str], limit: int = 4) -> str:
    """A few keys, and how many more there are."""
    shown = ", ".join(keys[:limit])
    return shown + (f" (and {len(keys) - limit} more)" if len(keys) > limit
                    else "")


def load_reference_state_dict(
    module: nn.Module, state_dict: Mapping[str, Tensor]
) -> nn.Module:
    """Load a reference state dict strictly, or explain which flag is off."""
    ours = module.state_dict()
    theirs = dict(state_dict)
    missing = [k for k in ours if k not in theirs]
    unexpected = [k for k in theirs if k not in ours]
    misshaped = [
        k for k in ours
        if k in theirs and tuple(theirs[k].shape) != tuple(ours[k].shape)
    ]
    if missing or unexpected or misshaped:
        lines = [
            f"the state dict does not fit this {type(module).__name__}: "
            f"{len(missing)} missing, {len(unexpected)} unexpected and "
            f"{len(misshaped)} mis-shaped key(s)"
        ]
        if missing:
            lines.append(f"  missing: {_some(missing)}")
        if unexpected:
            lines.append(f"  unexpected: {_some(unexpected)}")
        for key in misshaped[:4]:
            lines.append(f"  mis-shaped: {key} is {tuple(theirs[key].shape)}"
                         f" in the checkpoint, {tuple(ours[key].shape)} here")
        if len(misshaped) > 4:
            lines.append(f"  (and {len(misshaped) - 4} more mis-shaped)")
        hints = _diagnose(module, ours, theirs, missing, unexpected,
                          misshaped)
        if hints:
            lines.append("likely wrong flag(s), best guess first:")
            lines += [f"  - {hint}" for hint in hints]
        else:
            lines.append("check the flags against those the checkpoint was "
                         "trained with (the reference's README lists them)")
        raise ValueError("\n".join(lines))
    module.load_state_dict(theirs, strict=True)
    return module


def load_checkpoint(
    path: str | PathLike,
    flags: str | Mapping[str, Any],
    kind: str = "model",
) -> nn.Module:
    """Build a model of `kind` from flags and load a checkpoint; eval mode."""
    if kind not in BUILDERS:
        raise ValueError(
            f"unknown kind {kind!r}; known: {', '.join(BUILDERS)}"
        )
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no checkpoint at {path.resolve()}: download the released "
            "file (links in the README of openai/guided-diffusion) and put "
            "it there, or pass its path"
        )
    try:
        loaded = safe_load(path)
    except ValueError as err:
        raise ValueError(f"cannot read checkpoint {path}: {err}") from None
    if isinstance(loaded, Mapping) and isinstance(
        loaded.get("state_dict"), Mapping
    ):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping) or not all(
        isinstance(v, Tensor) for v in loaded.values()
    ):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    module = BUILDERS[kind](flags)
    try:
        load_reference_state_dict(module, loaded)
    except ValueError as err:
        raise ValueError(f"{path} ({kind}): {err}") from None
    return module.eval()


def config_from_flags(flags: str | Mapping[str, Any],
                      kind: str = "diffusion") -> TrainConfig:
    """Our configuration of the model of `kind` that flags describe.

    It describes the network (sizes, labels, diffusion) for sampling; the
    training fields keep adm_lib's defaults. An attention resolution that
    no level of the network has is left out, as the reference ignores it.
    """
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: expected one of {', '.join(KINDS)}")
    f = parse_flags(flags)
    up = kind == "upsampler"
    size = f["large_size"] if up else f["image_size"]
    table = SUPER_RES_CHANNEL_MULT if up else CHANNEL_MULT
    mult = coerce(f["channel_mult"], ())
    levels = len(mult or table.get(size, ()))

    def resolutions(flag: str) -> tuple[int, ...]:
        kept = _attention_factors(f[flag], size, mult or (1,) * levels)
        return tuple(size // factor for factor in kept)

    names = {field.name for field in fields(TrainConfig)}
    model = {k: v for k, v in f.items()
             if k in names and k not in SCRIPT_DEFAULTS}
    return TrainConfig(**{
        **model, "kind": kind, "data": "", "image_size": size,
        "small_size": f["small_size"] if up else TrainConfig.small_size,
        "channel_mult": mult,
        "attention_resolutions": resolutions("attention_resolutions"),
        "classifier_attention_resolutions": resolutions(
            "classifier_attention_resolutions")})



def load_trained(path: str | PathLike, flags: str | Mapping[str, Any],
                 kind: str = "diffusion",
                 device: str | torch.device = "cpu") -> TrainedModel:
    """A released checkpoint of `kind` and the flags it was released with,
    as chapter 4's trained-model type (no gradients, eval mode)."""
    f = parse_flags(flags)
    respacing = f["timestep_respacing"]
    model = load_checkpoint(path, f, "model" if kind == "diffusion" else kind)
    model.to(device).requires_grad_(False)
    return TrainedModel(
        model, diffusion_from_flags({**f, "timestep_respacing": ""}),
        config_from_flags(f, kind), Path(path), weights="reference",
        respacing=respacing)
