"""The `adm` command itself (adm_lib.cli): its version, its help, how it
shows the library's warnings, and how `adm train` reads `--set` and names
its flags in the library's errors. Each subcommand's behaviour is tested
with its module (tests/test_sampling.py for `adm sample`, ...).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from adm_lib import checkpoints as ck
from adm_lib import cli
from tests.helpers import RESUMABLE, adm_train

ROOT = Path(__file__).resolve().parents[1]


def test_version_comes_from_the_package_metadata(
        capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    version = importlib.metadata.version("adm-book")
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"adm {version}\n"

    def absent(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", absent)
    with pytest.raises(SystemExit):
        cli.main(["--version"])
    assert "not installed" in capsys.readouterr().out


def subcommands() -> dict[str, argparse.ArgumentParser]:
    """The parsers of `adm`'s subcommands, by name."""
    parser = cli.build_parser()
    (commands,) = [a for a in parser._actions
                   if isinstance(a, argparse._SubParsersAction)]
    return dict(commands.choices)


# `adm book`'s options are the book tooling's, documented with it.
@pytest.mark.parametrize("command", sorted(set(subcommands()) - {"book"}))
def test_every_option_says_its_default(command: str) -> None:
    parser = subcommands()[command]
    parser.format_help()  # every %(default)s expands
    for action in parser._actions:
        takes_value = action.option_strings and action.nargs != 0
        if takes_value and not action.required:
            assert "default" in (action.help or ""), (
                f"adm {command} {action.option_strings[-1]}: its help says "
                "no default")


def test_library_warnings_show_as_one_line_without_source(
        tmp_path: Path) -> None:
    run = tmp_path / "run"
    for step in (1, 2):  # damaged: each is skipped with a warning
        ck.checkpoint_path(run, step).parent.mkdir(parents=True,
                                                   exist_ok=True)
        ck.checkpoint_path(run, step).write_bytes(b"cut short")
    # A process of its own: under pytest, warnings are recorded, not shown.
    done = subprocess.run(
        [sys.executable, "-m", "adm_lib.cli", "sample", str(run), "--out",
         str(tmp_path / "x.npz"), "--device", "cpu"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    lines = done.stderr.splitlines()
    assert done.returncode == 1 and len(lines) == 3, done.stderr
    for step, line in zip((2, 1), lines[:2], strict=True):  # no source lines
        assert line.startswith(f"warning: {ck.checkpoint_path(run, step)} "
                               "is not a readable checkpoint"), done.stderr
        assert line.endswith("; trying the one before it"), done.stderr
    assert lines[2] == f"adm sample: {run} holds no checkpoint"


def test_main_leaves_the_warnings_format_as_it_was() -> None:
    formatted = warnings.formatwarning
    cli.main(["sample", "--device", "cpu"])  # refused: no MODEL
    assert warnings.formatwarning is formatted


# --- adm train: settings, named before any work ------------------------------


def test_adm_train_names_an_unknown_setting_and_a_bad_flag(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    argv = ["train", "diffusion", "--out", str(out), "--quiet"]
    assert cli.main([*argv, "--set", "lrr=1"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("adm train: unknown setting 'lrr'")
    assert "did you mean lr" in captured.err
    assert not out.exists()  # nothing started

    assert cli.main([*argv, "--set", "batch_size=abc"]) == 1
    assert "batch_size='abc': expected int" in capsys.readouterr().err
    assert cli.main([*argv, "--preset", "imagenet1024"]) == 1
    assert ("no diffusion preset 'imagenet1024'; presets: mnist, cifar10, "
            "imagenet64") in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        cli.main([*argv, "--set", "lr"])
    assert exit_.value.code == 2
    assert "expected KEY=VALUE, got 'lr'" in capsys.readouterr().err


@pytest.mark.parametrize(("setting", "message"), [
    ("image_size=33", "image_size=33 must be divisible by 4: channel_mult "
     "1,2,2 halves it 2 times"),
    ("sample_steps=abc", "sample_steps='abc': respacing spec 'abc' is not a "
     "step count"),
    ("channel_mult=a,b", "channel_mult='a,b': expected numbers, "
     "comma-separated"),
    ("attention_resolutions=5", "attention_resolutions=(5,): 5 is not one "
     "of the network's resolutions (32, 16, 8,"),
    ("num_channels=48", "num_channels=48: the channels at each resolution"),
    ("in_channels=2", "in_channels=2: expected one of 0, 1, 3"),
    ("seed=1e30", "seed=1000000000000000019884624838656: expected 0 to "
     "2**64 - 1 = 18446744073709551615"),
    (f"seed={2**64}", f"seed={2**64}: expected 0 to 2**64 - 1"),
    ("seed=-1", "seed=-1: expected 0 to 2**64 - 1"),
])
def test_adm_train_names_a_bad_setting_before_any_work(
        tmp_path: Path, capsys: pytest.CaptureFixture, setting: str,
        message: str) -> None:
    out = tmp_path / "run"
    assert cli.main(["train", "diffusion", "--out", str(out), "--quiet",
                     "--set", setting]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"adm train: {message}"), err
    assert err.count("\n") == 1 and not out.exists()


def test_adm_train_names_its_flag_where_the_library_names_an_argument(
        data: Path, reference: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    assert cli.main(adm_train(out, data, settings=RESUMABLE)) == 1
    assert capsys.readouterr().err == (
        f"adm train: {out} already holds a run (checkpoint at step 6): "
        "resume it (--resume), or choose another folder\n")


def test_a_command_loads_its_library_only_when_it_is_used() -> None:
    # `adm -h` and `adm book` start at once, and `adm book export` works
    # whatever state the generated modules are in: no command's arguments,
    # so no library module and no torch, are loaded before it is used.
    code = ("import sys; from adm_lib import cli; parser = cli.build_parser(); "
            "parser.format_help(); parser.parse_args(['book', 'check']); "
            "print(*(m for m in sys.modules if m == 'torch' or "
            "m.startswith('adm_lib.')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True,
                          text=True, cwd=ROOT, timeout=300, check=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    loaded = done.stdout.split()
    assert loaded and all(m.startswith(("adm_lib.book", "adm_lib.cli",
                                        "adm_lib.values")) for m in loaded), \
        loaded
    # Used, a command's parser has its arguments.
    help = subcommands()["sample"].format_help()
    assert "--classifier-scale" in help and "--precision" in help
