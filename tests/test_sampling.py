"""`adm sample`'s options (adm_lib.sampling): each is checked before any work.

No model is trained here: loading one is made to fail, so a test passes only
if the option was refused before the model was loaded.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from adm_lib import checkpoints as ck
from adm_lib import cli, sampling


@pytest.fixture
def no_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading a network fails the test: options come first."""

    def load_network(*args, **kwargs):
        raise AssertionError("a network was loaded before the options "
                             "were checked")

    monkeypatch.setattr(sampling, "load_network", load_network)


def adm_sample(args: list[str], capsys: pytest.CaptureFixture
               ) -> tuple[int, str]:
    """Run `adm sample` in this process; its exit code and stderr."""
    code = cli.main(["sample", *args, "--quiet", "--device", "cpu"])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(("extra", "message"), [
    (["--classifier", "c.pt", "--classifier-scale", "nan"],
     "--classifier-scale nan: expected a finite number >= 0"),
    (["--classifier", "c.pt", "--classifier-scale", "-1"],
     "--classifier-scale -1.0: expected a finite number >= 0"),
    (["--cfg-scale", "nan"], "--cfg-scale nan: expected a finite number"),
    (["--cfg-scale", "inf"], "--cfg-scale inf: expected a finite number"),
    (["--eta", "nan"], "--eta nan: expected a number in [0, 1]"),
    (["--eta", "1.5"], "--eta 1.5: expected a number in [0, 1]"),
    (["--eta", "-0.1"], "--eta -0.1: expected a number in [0, 1]"),
    (["--grid-columns", "-2"], "--grid-columns -2: expected a number >= 1"),
    (["--grid-columns", "0"], "--grid-columns 0: expected a number >= 1"),
    (["--num-samples", "0"], "--num-samples 0: expected a number >= 1"),
    (["--batch-size", "0"], "--batch-size 0: expected a number >= 1"),
    (["--labels", "two"], "--labels 'two': expected 'random' or class"),
    (["--labels", "1,-1"], "--labels '1,-1': expected 'random' or class"),
    (["--guide-at", "mean"], "--guide-at mean needs a classifier"),
    (["--out", "samples.png"], "--out samples.png: the batch file must end "
     "in .npz"),
])
def test_each_bad_option_is_named_before_any_work(
        tmp_path: Path, capsys: pytest.CaptureFixture, no_loading: None,
        extra: list[str], message: str) -> None:
    out = [] if "--out" in extra else ["--out", str(tmp_path / "x.npz")]
    code, err = adm_sample([str(tmp_path / "run"), *out, *extra], capsys)
    assert code == 1
    assert err.startswith(f"adm sample: {message}"), err
    assert err.count("\n") == 1, err  # one line, no traceback
    assert list(tmp_path.iterdir()) == []


def test_an_out_that_cannot_be_written_is_named_before_any_work(
        tmp_path: Path, capsys: pytest.CaptureFixture,
        no_loading: None) -> None:
    model = str(tmp_path / "run")
    missing = tmp_path / "absent" / "x.npz"
    code, err = adm_sample([model, "--out", str(missing)], capsys)
    assert code == 1 and err == (f"adm sample: --out {missing}: no folder "
                                 f"{missing.parent}\n")
    folder = tmp_path / "batch.npz"
    folder.mkdir()
    code, err = adm_sample([model, "--out", str(folder)], capsys)
    assert code == 1 and err == (f"adm sample: --out {folder} is a folder; "
                                 "name a file in it\n")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root ignores folder permissions")
def test_an_out_in_a_read_only_folder_is_named_before_any_work(
        tmp_path: Path, capsys: pytest.CaptureFixture,
        no_loading: None) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code, err = adm_sample([str(tmp_path / "run"), "--out",
                                str(locked / "x.npz")], capsys)
    finally:
        locked.chmod(0o700)
    assert code == 1 and f"cannot write in {locked}" in err


def test_sample_checks_its_options_too() -> None:
    # The library call refuses what the command does, before any model use.
    with pytest.raises(sampling.SampleError, match="--eta nan"):
        sampling.sample(None, eta=float("nan"))
    with pytest.raises(sampling.SampleError, match="--cfg-scale nan"):
        sampling.sample(None, cfg_scale=float("nan"))


class Pickled:
    """Not a tensor: a file holding one needs code to load."""


def test_unloadable_checkpoints_never_advise_weights_only_false(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ours = ck.checkpoint_path(tmp_path / "run", 1)
    ours.parent.mkdir(parents=True)
    torch.save({"format": ck.CHECKPOINT_FORMAT, "model": Pickled()}, ours)
    theirs = tmp_path / "released.pt"
    torch.save({"input_blocks.0.0.weight": Pickled()}, theirs)
    out = str(tmp_path / "x.npz")
    runs = [[str(ours), "--out", out],
            [str(theirs), "--model-flags", "--image_size 8", "--out", out]]
    for args in runs:
        code, err = adm_sample(args, capsys)
        assert code == 1 and "holds objects other than tensors" in err, err
        assert "weights_only=False" not in err
        assert "weights_only` set to `False`" not in err
        assert "Pickled" in err and err.count("\n") == 1
