"""A wheel install works: built, installed in a fresh venv, run outside the checkout.

The wheel is built offline from a copy of the checkout and installed with
``--no-deps`` in a new virtual environment. That environment sees this one's
dependencies (torch, numpy, ...) through a ``.pth`` path line, which, unlike
``site.addsitedir``, does not run this environment's own ``.pth`` files: the
editable install's finder stays out, so ``adm_lib`` can only come from the wheel.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest

from adm_lib.data import load_dataset
from adm_lib.metrics import write_batch
from adm_lib.viz import to_uint8

ROOT = Path(__file__).resolve().parent.parent
ASSETS = {"mnist5k.npz", "featnet_mnist5k.pt", "featnet_cifar10.pt", "presets.toml"}
NOT_SOURCES = shutil.ignore_patterns(
    ".git", ".venv", "build", "*.egg-info", "__pycache__", ".*_cache", "adm-demo"
)


def _run(args: list, cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run a command with no PYTHONPATH, failing with its output on error."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([str(a) for a in args], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=timeout)
    assert done.returncode == 0, (
        f"{args} exited {done.returncode}\n{done.stdout}\n{done.stderr}")
    return done


# Wheels, fresh virtual environments, the demo outside the checkout.
pytestmark = pytest.mark.slow

@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's wheel, built offline with this environment's setuptools."""
    # From a copy: setuptools leaves a build/ folder in the source tree, whose
    # stale files would otherwise slip into later wheels built from the checkout.
    src = tmp_path_factory.mktemp("src") / "adm-book"
    shutil.copytree(ROOT, src, ignore=NOT_SOURCES)
    out = tmp_path_factory.mktemp("wheel")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
          "--no-index", "--quiet", "--wheel-dir", out, src], cwd=out)
    (path,) = out.glob("adm_book-*.whl")
    return path


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel installed and this environment's packages."""
    venv = tmp_path_factory.mktemp("venv")
    _run([sys.executable, "-m", "venv", "--without-pip", "--clear", venv], cwd=venv)
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps",
          "--no-index", "--quiet", wheel], cwd=venv)
    site = _run([python, "-c", "import sysconfig; print(sysconfig.get_path("
                 "'purelib'))"], cwd=venv).stdout.strip()
    ours = dict.fromkeys(sysconfig.get_path(k) for k in ("purelib", "platlib"))
    (Path(site) / "deps_of_the_test_env.pth").write_text("\n".join(ours) + "\n")
    return venv


def test_wheel_ships_the_assets(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        assert {f"adm_lib/assets/{name}" for name in ASSETS} <= names
        assert "adm_lib/py.typed" in names  # PEP 561: a typed package
        sizes = {info.filename: info.file_size for info in archive.infolist()}
    for name in ASSETS:
        packed = sizes[f"adm_lib/assets/{name}"]
        assert packed == (ROOT / "adm_lib" / "assets" / name).stat().st_size


def test_installed_wheel_runs_demo_and_evaluate_outside_the_checkout(
        venv: Path, tmp_path: Path) -> None:
    work = tmp_path / "elsewhere"
    work.mkdir()
    # adm_lib, and its assets, come from the new venv, not from the checkout.
    where = _run([venv / "bin" / "python", "-c", "import adm_lib.assets as a, "
                  "adm_lib; print(adm_lib.__file__); print(a.asset('mnist5k.npz'))"],
                 cwd=work).stdout.split()
    for path in where:
        assert Path(path).resolve().is_relative_to(venv.resolve()), where
    adm = venv / "bin" / "adm"

    # A few steps of every stage: training, guided sampling, scoring.
    _run([adm, "demo", "--out", "demo", "--steps", "2", "--classifier-steps", "2",
          "--per-class", "1", "--respacing", "2", "--scales", "0,3",
          "--device", "cpu", "--quiet"], cwd=work)
    report = json.loads((work / "demo" / "report.json").read_text())
    assert set(report["scores"]) == {"0", "3"}
    for scores in report["scores"].values():
        assert 0 <= scores["accuracy"] <= 1 and np.isfinite(scores["fid"])
    assert (work / "demo" / "guided_digits.png").stat().st_size > 0

    # The mnist feature net, read from the installed package.
    digits = to_uint8(load_dataset("mnist5k").images(range(300)))
    write_batch(work / "ref.npz", digits[:150])
    write_batch(work / "samples.npz", digits[150:])
    done = _run([adm, "evaluate", "ref.npz", "samples.npz", "--features", "mnist",
                 "--device", "cpu", "--quiet", "--json", "scores.json"], cwd=work)
    assert "FID(mnist-net)" in done.stdout
    scores = json.loads((work / "scores.json").read_text())
    assert scores["features"] == "mnist"
    for key in ("inception_score", "fid", "sfid", "precision", "recall"):
        assert np.isfinite(scores[key]), (key, scores)
    assert 0 <= scores["precision"] <= 1 and 0 <= scores["recall"] <= 1


# What the script gets wrong, and mypy's words for it: one error a line.
WRONG_TYPES = {
    5: 'Argument 1 to "UNetModel" has incompatible type "str"; expected "int"',
    7: 'Argument "var_type" to "GaussianDiffusion" has incompatible type '
       '"int"; expected "str"',
    8: 'Argument 2 to "respace" has incompatible type "int"; expected "str"',
}


@pytest.mark.skipif(importlib.util.find_spec("mypy") is None,
                    reason="mypy is not installed (pip install -e .[dev])")
def test_mypy_reads_the_package_as_typed(tmp_path: Path) -> None:
    """`import adm_lib` in a user's script: mypy checks the calls against
    adm_lib's annotations (py.typed), instead of skipping the package as
    one "missing library stubs". Only adm_lib is analysed (its own errors
    silenced); torch and the rest are skipped, which keeps mypy to seconds."""
    script = tmp_path / "user.py"
    script.write_text(textwrap.dedent("""\
        from adm_lib.diffusion import GaussianDiffusion, respace
        from adm_lib.forward import get_named_beta_schedule
        from adm_lib.unet import UNetModel

        model = UNetModel("32", 3, 64, 6, 2, attention_resolutions=(2,))
        diffusion = GaussianDiffusion(get_named_beta_schedule("linear", 50),
                                      var_type=1)
        spaced = respace(diffusion, 10)
        fine = UNetModel(32, 3, 64, 6, 2, attention_resolutions=(2,))
        """))
    (tmp_path / "mypy.ini").write_text(textwrap.dedent("""\
        [mypy]
        follow_imports = skip
        [mypy-adm_lib.*]
        follow_imports = silent
        """))
    # The checkout first on the path, where mypy looks for installed
    # packages (and where an editable install's finder is not read).
    path = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", "mypy.ini",
         "--cache-dir", str(tmp_path / "cache"), "--no-error-summary",
         "--hide-error-context", "--no-color-output", script.name],
        cwd=tmp_path, env=env, text=True, capture_output=True, timeout=300)
    assert "py.typed" not in done.stdout, done.stdout
    errors = {}
    for line in done.stdout.splitlines():
        where, _, message = line.partition(": error: ")
        errors[int(where.split(":")[1])] = message.rsplit("  [", 1)[0]
    assert errors == WRONG_TYPES, done.stdout + done.stderr
