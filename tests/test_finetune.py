"""adm_lib.finetune: a run that starts from another run's weights or a
released file's, with a fresh optimizer and step count and the EMA from
the same weights; and a network that does not fit, refused by the settings
that differ before the run folder is touched.

Runs are tiny (tests/helpers.py): an lr of 1e-30 makes a run's one step
move its weights by about 1e-30 (float32 keeps that only where a weight is
0), so a test can compare them with where they started to ATOL.
"""

from __future__ import annotations

import dataclasses
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from adm_lib import cli
from adm_lib.checkpoints import latest_checkpoint
from adm_lib.compat import guided_diffusion as gd
from adm_lib.config import TrainConfig
from adm_lib.errors import TrainError
from adm_lib.finetune import NETWORK_SETTINGS, read_init
from adm_lib.train import train
from tests.helpers import adm_train, assert_same, config, weights

# The tiny config's network in the reference's flags (helpers.TINY on the
# fixture's 4 classes of grey images).
ATOL = 1e-28  # 100 AdamW steps of lr 1e-30 at most
TINY_FLAGS = ("--image_size 8 --num_channels 32 --num_res_blocks 1 "
              "--channel_mult 1,2 --attention_resolutions 4 "
              "--num_head_channels 32 --in_channels 1 --num_classes 4 "
              "--class_cond True --learn_sigma True --resblock_updown True "
              "--diffusion_steps 50 --noise_schedule cosine")


@pytest.fixture(scope="module")
def source(data: Path, tmp_path_factory: pytest.TempPathFactory,
           one_thread: None) -> Path:
    """A 3-step run: its EMA and raw weights differ."""
    out = tmp_path_factory.mktemp("source") / "run"
    train(config(data, steps=3), out, progress=False)
    return out


def _still(data: Path, **overrides) -> object:
    """A one-step run that leaves its weights where they started, to ATOL."""
    return config(data, steps=1, lr=1e-30, **overrides)


@pytest.mark.parametrize("which", ["ema", "model"])
def test_a_run_starts_from_the_chosen_weights_with_a_fresh_state(
        data: Path, source: Path, tmp_path: Path, which: str) -> None:
    assert not all(torch.equal(a, b) for a, b in zip(
        weights(source).values(), weights(source, "model").values(),
        strict=True))  # else the choice would not show
    out = tmp_path / "tuned"
    train(_still(data), out, progress=False,
          init=read_init(source, "diffusion", which))
    start = weights(source, which)
    assert_same(weights(out, "model"), start, ATOL)
    assert_same(weights(out), start, ATOL)  # the EMA starts there too
    _, saved = latest_checkpoint(out)
    assert saved["step"] == 1  # a fresh count, not the source's 3
    steps = [s["step"] for s in saved["optimizer"]["state"].values()]
    assert steps and all(float(s) == 1 for s in steps)  # a fresh AdamW


def test_a_released_file_starts_a_run_from_its_flags(
        data: Path, tmp_path: Path) -> None:
    torch.manual_seed(1)
    released = gd.model_from_flags(TINY_FLAGS)
    path = tmp_path / "released.pt"
    torch.save(released.state_dict(), path)
    out = tmp_path / "tuned"
    train(_still(data), out, progress=False,
          init=read_init(path, "diffusion", flags=TINY_FLAGS))
    assert_same(weights(out, "model"), released.state_dict(), ATOL)
    assert_same(weights(out), released.state_dict(), ATOL)

    # Flags that do not describe the file: compat names the flag.
    with pytest.raises(TrainError, match="--num_channels 32"):
        read_init(path, "diffusion",
                  flags=TINY_FLAGS.replace("channels 32", "channels 64"))
    # No flags: the file is not a run's, and the message says what to give.
    with pytest.raises(TrainError, match="give its flags=FLAGS"):
        read_init(path, "diffusion")


# One change of each kind of network setting, and what names it.
@pytest.mark.parametrize(("overrides", "named"), [
    ({"num_channels": 64}, "num_channels=32 there, 64 here"),
    ({"num_res_blocks": 2}, "num_res_blocks=1 there, 2 here"),
    ({"channel_mult": "1,1"}, "channel_mult="),
    ({"attention_resolutions": "8"}, "attention_resolutions="),
    ({"learn_sigma": False}, "learn_sigma=True there, False here"),
    ({"class_cond": False}, "class_cond=True there, False here"),
    ({"label_dropout": 0.1}, "label_dropout=0.0 there, 0.1 here"),
    ({"num_heads": 2, "num_head_channels": -1}, "num_head_channels="),
    ({"use_scale_shift_norm": False}, "use_scale_shift_norm="),
    ({"use_new_attention_order": True}, "use_new_attention_order="),
])
def test_a_network_that_does_not_fit_is_named_by_its_settings(
        data: Path, source: Path, tmp_path: Path, overrides: dict,
        named: str) -> None:
    init = read_init(source, "diffusion")
    out = tmp_path / "tuned"
    with pytest.raises(TrainError) as err:
        train(_still(data, **overrides), out, progress=False, init=init)
    assert f"init={init.source}" in str(err.value)
    assert named in str(err.value)
    assert not out.exists()  # refused before the folder was made


def test_every_network_setting_is_a_setting() -> None:
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for kind, names in NETWORK_SETTINGS.items():
        assert set(names) <= fields, kind


def test_what_does_not_change_the_network_may_change(
        data: Path, source: Path, tmp_path: Path) -> None:
    train(config(data, steps=1, dropout=0.1, noise_schedule="linear",
                 lr=1e-3, ema_rate="0.99,0.999", channel_mult="1,2.0"),
          tmp_path / "tuned", progress=False,
          init=read_init(source, "diffusion"))


def test_weights_that_no_setting_explains_are_refused(
        data: Path, source: Path, tmp_path: Path) -> None:
    init = read_init(source, "diffusion")
    init.state_dict.pop(next(iter(init.state_dict)))
    with pytest.raises(TrainError, match="1 missing"):
        train(_still(data), tmp_path / "tuned", progress=False, init=init)
    init = replace(read_init(source, "diffusion"))
    init.config = replace(init.config, kind="classifier")
    with pytest.raises(TrainError, match="is a classifier model, and this "
                       "run trains a diffusion model"):
        train(_still(data), tmp_path / "tuned", progress=False, init=init)


def test_read_init_names_its_arguments(source: Path, tmp_path: Path) -> None:
    with pytest.raises(TrainError, match="init=.*nothing: no such file"):
        read_init(tmp_path / "nothing", "diffusion")
    with pytest.raises(TrainError, match="weights='0.5'.* has ema, model"):
        read_init(source, "diffusion", "0.5")
    with pytest.raises(TrainError, match="weights='model': a released file"):
        read_init(source, "diffusion", "model", flags=TINY_FLAGS)
    with pytest.raises(TrainError, match="is a folder; flags="):
        read_init(source, "diffusion", flags=TINY_FLAGS)
    with pytest.raises(TrainError, match="is a diffusion model, and this "
                       "run trains a classifier model"):
        read_init(source, "classifier")


# `adm train`: every problem one line naming the flag, and the options
# that do not go together refused before anything loads.
@pytest.mark.parametrize(("extra", "message"), [
    (["--init-weights", "model"], "--init-weights needs --init"),
    (["--init-flags", "--image_size 8"], "--init-flags needs --init"),
    (["--init", "nowhere"], "--init nowhere: no such file or folder"),
    (["--init", "{source}", "--init-flags", "--image_size 8"],
     "--init-flags: --init {source} is a folder"),
    (["--init", "{file}", "--init-flags", "--imagesize 8"],
     "--init-flags: unknown guided-diffusion flag(s): --imagesize"),
    (["--init", "{file}", "--init-flags", "--image_size 8",
      "--init-weights", "model"], "--init-weights: a released file"),
    (["--init", "{source}", "--init-weights", "0.5"],
     "--init {source}: --init-weights '0.5'"),
    (["--init", "{source}", "--set", "num_channels=64"],
     "--init {checkpoint} (step 3, ema weights): its network differs from "
     "this run's: num_channels=32 there, 64 here"),
    (["--fid-samples", "8"], "--fid-samples needs --fid-interval"),
])
def test_adm_train_names_the_init_flags(
        data: Path, source: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture, extra: list[str],
        message: str) -> None:
    file = tmp_path / "released.pt"
    file.write_bytes(b"")
    names = {"source": source, "file": file,
             "checkpoint": latest_checkpoint(source)[0]}
    out = tmp_path / "run"
    argv = adm_train(out, data, *(a.format(**names) for a in extra))
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"adm train: {message.format(**names)}"), err
    assert err.count("\n") == 1 and not out.exists()
