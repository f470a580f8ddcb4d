"""adm_lib.config (chapter 4): the settings, their checks, the presets, and
the network and diffusion a configuration builds."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import replace

import pytest
import torch

from adm_lib import config as cf
from adm_lib import train as tr
from adm_lib.compat import guided_diffusion as gd
from tests.helpers import ROOT, TINY

BASELINES = ROOT.parent / "shared" / "baselines" / "reference_h100.json"

pytestmark = pytest.mark.usefixtures("one_thread")


# --- settings ----------------------------------------------------------------


def test_unknown_setting_suggests_and_lists():
    with pytest.raises(cf.TrainError) as err:
        cf.make_config(overrides={"lrr": 1})
    message = str(err.value)
    assert "unknown setting 'lrr'" in message and "did you mean lr" in message
    assert "valid settings: data, val_data" in message
    assert "batch_size" in message and "kind," not in message


@pytest.mark.parametrize(("key", "value", "message"), [
    ("batch_size", "abc", "batch_size='abc': expected int"),
    ("batch_size", "8.5", "batch_size='8.5': expected int"),
    ("batch_size", 8.5, "batch_size=8.5: expected int"),
    ("lr", "fast", "lr='fast': expected float"),
    ("class_cond", "maybe", "class_cond='maybe': expected bool"),
    ("batch_size", "0", "batch_size=0 must be >= 1"),
    ("microbatch", "-1", "microbatch=-1 must be >= 0"),
    ("precision", "fp8", "precision='fp8': expected one of auto, fp32"),
    ("ema_rate", "0.9,1.5",
     "ema_rate=(0.9, 1.5): expected one or more rates in (0, 1)"),
])
def test_bad_values_are_named(key, value, message):
    with pytest.raises(cf.TrainError, match=re.escape(message)):
        cf.make_config(overrides={key: value})


def test_values_are_coerced_to_the_field_types():
    c = cf.make_config("classifier", "mnist", {
        "batch_size": "16", "steps": "1e3", "lr": "1e-4", "random_flip": "yes",
        "class_cond": "0", "ema_rate": "0.999,0.9999", "microbatch": 4.0})
    assert (c.batch_size, c.steps, c.lr) == (16, 1000, 1e-4)
    assert (c.random_flip, c.class_cond, c.microbatch) == (True, False, 4)
    assert type(c.steps) is int and type(c.lr) is float
    assert c.ema_rate == (0.999, 0.9999)
    assert c.weight_decay == 0.05 and c.kind == "classifier"  # the preset's
    base = replace(c, seed=7)
    assert cf.make_config("classifier", overrides={"lr": 1}, base=base).seed == 7
    with pytest.raises(cf.TrainError, match="kind must be one of"):
        cf.make_config("gan")
    with pytest.raises(cf.TrainError, match="presets: mnist, cifar10"):
        cf.make_config("upsampler", "imagenet64")


def test_non_integer_exponent_strings_are_refused():
    with pytest.raises(cf.TrainError, match="expected int"):
        cf.make_config(overrides={"microbatch": "2.5e0"})


def test_kind_is_not_suggested_for_kind():
    with pytest.raises(cf.TrainError) as err:
        cf.make_config(overrides={"kind": "classifier"})
    assert "did you mean kind" not in str(err.value)
    assert "first argument" in str(err.value)


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_non_finite_lr_is_refused(value):
    with pytest.raises(cf.TrainError, match="lr="):
        cf.make_config(overrides={"lr": value})


# --- typed lists ---------------------------------------------------------------

TUPLES = ("channel_mult", "attention_resolutions",
          "classifier_attention_resolutions", "ema_rate")


def test_list_settings_are_tuples():
    default = cf.TrainConfig()
    for name in TUPLES:
        assert type(getattr(default, name)) is tuple, name
    assert default.channel_mult == (1, 2, 2)
    c = cf.make_config(overrides={"channel_mult": "1,2",
                                  "attention_resolutions": "16"})
    assert c.channel_mult == (1, 2) and c.attention_resolutions == (16,)
    assert all(type(m) is int for m in c.channel_mult)
    # The same values as a tuple, or as a list (a JSON file's), read alike.
    for value in ((1, 2), [1, 2], "(1, 2)"):
        assert cf.make_config(overrides={
            "channel_mult": value, "attention_resolutions": "16"}) == c
    assert cf.make_config(overrides={"ema_rate": "0.99"}).ema_rate == (0.99,)


@pytest.mark.parametrize("name", TUPLES)
@pytest.mark.parametrize("value", ["a", "0", "-1", True])
def test_a_bad_tuple_value_is_named(name, value):
    with pytest.raises(cf.TrainError) as err:
        cf.make_config(overrides={name: value})
    assert str(err.value).startswith(f"{name}="), str(err.value)


# Every field of TrainConfig, with a value that cannot work: (kind, value).
BAD_SETTINGS = {
    "kind": ("diffusion", "gan"), "val_fraction": ("classifier", 1.0),
    "image_size": ("diffusion", 33), "small_size": ("upsampler", 0),
    "low_res_noise": ("upsampler", 1000),
    "in_channels": ("diffusion", 2), "num_classes": ("diffusion", -1),
    "class_cond": ("diffusion", "maybe"),
    "label_dropout": ("diffusion", 1.0), "random_flip": ("diffusion", 1),
    "num_channels": ("diffusion", 48), "num_res_blocks": ("diffusion", 0),
    "channel_mult": ("diffusion", "a,b"),
    "attention_resolutions": ("diffusion", (5,)),
    "num_heads": ("diffusion", 0), "num_head_channels": ("diffusion", 48),
    "num_heads_upsample": ("diffusion", 0), "dropout": ("diffusion", 1.0),
    "use_scale_shift_norm": ("diffusion", "x"),
    "resblock_updown": ("diffusion", "x"),
    "use_new_attention_order": ("diffusion", "x"),
    "use_checkpoint": ("diffusion", "x"),
    "classifier_width": ("classifier", 48),
    "classifier_depth": ("classifier", 0),
    "classifier_attention_resolutions": ("classifier", (16, 5)),
    "classifier_use_scale_shift_norm": ("classifier", "x"),
    "classifier_resblock_updown": ("classifier", "x"),
    "classifier_pool": ("classifier", "max"),
    "diffusion_steps": ("diffusion", 0), "noise_schedule": ("diffusion", "x"),
    "learn_sigma": ("diffusion", "x"), "use_kl": ("diffusion", "x"),
    "predict_xstart": ("diffusion", "x"),
    "rescale_learned_sigmas": ("diffusion", "x"),
    "rescale_residual": ("diffusion", "x"),
    "steps": ("diffusion", 0), "batch_size": ("diffusion", 0),
    "microbatch": ("diffusion", -1), "lr": ("diffusion", 0.0),
    "weight_decay": ("diffusion", float("nan")),
    "lr_anneal_steps": ("diffusion", -1), "grad_clip": ("diffusion", -1.0),
    "ema_rate": ("diffusion", "0.9,x"), "ema_warmup": ("diffusion", "x"),
    "schedule_sampler": ("diffusion", "x"), "precision": ("diffusion", "x"),
    "noised": ("classifier", "x"), "clean_fraction": ("classifier", 2.0),
    "seed": ("diffusion", -1), "num_workers": ("diffusion", -1),
    "log_interval": ("diffusion", 0), "save_interval": ("diffusion", 0),
    "keep_checkpoints": ("diffusion", 0),
    "sample_interval": ("diffusion", -1), "num_samples": ("diffusion", 0),
    "sample_steps": ("diffusion", "ddim999"),
    "eval_interval": ("classifier", -1), "eval_images": ("classifier", -1),
    "max_nonfinite": ("diffusion", 0), "tensorboard": ("diffusion", "x"),
    "compile": ("diffusion", "yes"),
    "memory_format": ("diffusion", "nhwc"),
    "deterministic": ("diffusion", "yes"),
}
# Checked when the run starts, before its first step (tests/test_train.py):
# where the data are, and which device.
CHECKED_AT_START = {"data", "val_data", "device"}


def test_every_setting_has_a_check():
    names = [f.name for f in dataclasses.fields(cf.TrainConfig)]
    assert sorted(BAD_SETTINGS.keys() | CHECKED_AT_START) == sorted(names)


@pytest.mark.parametrize("name", sorted(BAD_SETTINGS))
def test_each_bad_setting_is_named(name, tmp_path):
    kind, value = BAD_SETTINGS[name]
    good = cf.make_config(kind, overrides=TINY)
    cf.validate(good)
    with pytest.raises(cf.TrainError) as err:
        cf.validate(replace(good, **{name: value}))
    assert f"{name}=" in str(err.value) or f"{name} must" in str(err.value)
    with pytest.raises(cf.TrainError, match=re.escape(str(err.value))):
        tr.train(replace(good, **{name: value}), tmp_path / "run")
    assert not (tmp_path / "run").exists()


# --- presets ---------------------------------------------------------------------


def param_count(kind: str, preset: str) -> int:
    """Parameters of a preset's network, built on the meta device."""
    c = cf.make_config(kind, preset)
    with torch.device("meta"):
        model = cf.build_model(c)
    return sum(p.numel() for p in model.parameters())


def test_imagenet_diffusion_presets_match_the_reference_builds():
    expected = {"imagenet64": 295_904_454, "imagenet128": 421_529_606}
    if BASELINES.exists():  # the measured reference runs, where present
        rows = json.loads(BASELINES.read_text())
        recorded = {r["config"]: r["params"] for r in rows if "params" in r}
        for name, count in expected.items():
            if name in recorded:
                assert recorded[name] == count
    for name, count in expected.items():
        c = cf.make_config("diffusion", name)
        assert (c.in_channels, c.num_classes, c.class_cond) == (3, 1000, True)
        assert param_count("diffusion", name) == count


@pytest.mark.parametrize(("size", "millions"), [(64, 65), (128, 43), (256, 54),
                                                (512, 54)])
def test_imagenet_classifier_presets_match_table_12(size, millions):
    assert round(param_count("classifier", f"imagenet{size}") / 1e6) == millions


ALL_PRESETS = [(kind, name) for kind, presets in cf.PRESETS.items()
               for name in presets]


@pytest.mark.parametrize(("kind", "name"), ALL_PRESETS)
def test_every_preset_validates_and_builds(kind, name):
    c = cf.make_config(kind, name)
    assert c.kind == kind
    # The data fill in what a preset leaves at 0; any count will do here.
    c = replace(c, in_channels=c.in_channels or 3,
                num_classes=c.num_classes or 10)
    cf.validate(c)
    with torch.device("meta"):  # shapes only: no memory, no time
        cf.build_model(c)


# The presets of the reference's released models, and the file each
# describes (compat.RELEASED: its kind and the flags its README gives).
RELEASED = {
    ("diffusion", "imagenet64"): "64x64_diffusion",
    ("diffusion", "imagenet128"): "128x128_diffusion",
    ("diffusion", "imagenet256"): "256x256_diffusion",
    ("diffusion", "imagenet512"): "512x512_diffusion",
    ("diffusion", "lsun"): "lsun_bedroom",
    **{("classifier", f"imagenet{n}"): f"{n}x{n}_classifier"
       for n in (64, 128, 256, 512)},
    ("upsampler", "imagenet64-256"): "64_256_upsampler",
    ("upsampler", "imagenet128-512"): "128_512_upsampler",
}
# What a classifier's network is built from (build_model's EncoderUNetModel).
CLASSIFIER_NETWORK = ("image_size", "in_channels", "num_classes",
                      "classifier_width", "classifier_depth",
                      "classifier_attention_resolutions",
                      "classifier_use_scale_shift_norm",
                      "classifier_resblock_updown", "classifier_pool")
# The diffusion a diffusion model or upsampler samples with.
DIFFUSION = ("diffusion_steps", "noise_schedule", "learn_sigma", "use_kl",
             "predict_xstart", "rescale_learned_sigmas")


def network(c: cf.TrainConfig) -> dict:
    """What builds the network of `c`, the channel multipliers resolved."""
    if c.kind == "classifier":
        built = {name: getattr(c, name) for name in CLASSIFIER_NETWORK}
    else:
        built = {**cf.unet_arguments(c), "small_size": c.small_size,
                 "low_res_noise": c.low_res_noise,
                 "use_new_attention_order": c.use_new_attention_order}
    return {**built, "channel_mult": cf.channel_mults(c)}


def test_every_released_model_has_its_preset():
    names = {name for kind, name in ALL_PRESETS}
    assert set(RELEASED) <= set(ALL_PRESETS)
    assert set(RELEASED.values()) <= set(gd.RELEASED)
    assert {n for n in names if n.startswith("imagenet")} | {"lsun"} == {
        name for kind, name in RELEASED}


@pytest.mark.parametrize(("kind", "name"), sorted(RELEASED))
def test_a_released_models_preset_builds_its_network(kind, name):
    preset = cf.make_config(kind, name)
    released_kind, flags = gd.RELEASED[RELEASED[kind, name]]
    assert released_kind == kind
    theirs = gd.config_from_flags(flags, kind)
    assert network(preset) == network(theirs)
    if kind != "classifier":
        assert ({k: getattr(preset, k) for k in DIFFUSION}
                == {k: getattr(theirs, k) for k in DIFFUSION})
    with torch.device("meta"):  # shapes only: 512px models too, at no cost
        ours = cf.build_model(preset)
        reference = gd.BUILDERS[kind](flags)
    assert type(ours) is type(reference)
    assert ([p.shape for p in ours.parameters()]
            == [p.shape for p in reference.parameters()])


@pytest.mark.parametrize("settings, message", [
    ({"label_dropout": 1.0}, "label_dropout=1.0 must be in"),
    ({"label_dropout": -0.1}, "must be in"),
    ({"label_dropout": 0.1, "class_cond": False}, "needs a class-cond"),
])
def test_label_dropout_is_checked(settings: dict, message: str) -> None:
    with pytest.raises(cf.TrainError, match=message):
        cf.make_config("diffusion", "mnist", settings)
    with pytest.raises(cf.TrainError, match="needs a class-cond"):
        cf.make_config("classifier", "mnist", {"label_dropout": 0.1})
