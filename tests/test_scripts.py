"""The measurement scripts under scripts/ that the chapters quote."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from .reference import EPS64

ROOT = Path(__file__).resolve().parents[1]
# scripts/gpu_check.sh's steps, in order, and those that time the reference.
GPU_STEPS = ["env", "tests", "imagenet64", "cifar32", "precision",
             "imagenet64_compiled"]
NEEDS_REFERENCE = {"imagenet64", "cifar32"}


def _script(name: str):
    spec = importlib.util.spec_from_file_location(
        name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(script: str, *args: str,
         timeout: int = 300) -> subprocess.CompletedProcess:
    """scripts/<script>.py run from the project root, output captured."""
    return subprocess.run(
        [sys.executable, f"scripts/{script}.py", *args], cwd=ROOT,
        capture_output=True, text=True, timeout=timeout)


def test_precision_windows_are_the_gap_and_its_paired_standard_error(
) -> None:
    curves = _script("precision_curves")
    rng = np.random.default_rng(0)
    fp32 = rng.normal(1.0, 0.1, 300)
    bf16 = fp32[::-1] + 0.05  # another spread, and shifted
    rows = curves.windows({"fp32": fp32.tolist(), "bf16": bf16.tolist()},
                          100)
    assert [r["steps"] for r in rows] == ["1-100", "101-200", "201-300"]
    # Python's running sums against numpy's pairwise ones, in float64: a sum
    # of n terms is within n eps64 of their sizes, here and there, for each
    # run. The squared deviations are all positive: relative. The error is
    # the paired one: bf16 is fp32 reversed, so the unpaired one (both
    # runs' spreads) is another number, and a shift alone has none.
    n = 100
    for i, row in enumerate(rows):
        a, b = fp32[n * i:n * (i + 1)], bf16[n * i:n * (i + 1)]
        size = np.abs(np.r_[a, b]).max()
        assert row["gap"] == pytest.approx(b.mean() - a.mean(),
                                           abs=4 * n * EPS64 * size)
        se = np.sqrt((b - a).var(ddof=1) / n)
        assert row["se"] == pytest.approx(se, rel=4 * n * EPS64)
        assert row["se"] != pytest.approx(
            np.sqrt(a.var(ddof=1) / n + b.var(ddof=1) / n), rel=0.01)
    shifted = curves.windows({"fp32": fp32.tolist(),
                              "bf16": (fp32 + 0.05).tolist()}, 100)
    assert all(r["se"] < 1e-12 for r in shifted)  # a constant gap is exact


@pytest.mark.slow
def test_precision_curves_trains_both_and_plots(tmp_path: Path) -> None:
    plot, numbers = tmp_path / "curves.png", tmp_path / "curves.json"
    # The device left at its default, auto, as chapter 4 runs it.
    done = _run("precision_curves", "--steps", "4", "--window", "2",
                "--batch", "2", "--out", str(tmp_path / "runs"),
                "--plot", str(plot), "--json", str(numbers), "--quiet")
    assert done.returncode == 0, done.stderr
    table = [line for line in done.stdout.splitlines()
             if line.startswith("| 1-2 ") or line.startswith("| 3-4 ")]
    assert len(table) == 2
    assert plot.stat().st_size > 0
    report = json.loads(numbers.read_text())
    assert report["device"] in ("cpu", "cuda")
    assert [len(report["losses"][p]) for p in ("fp32", "bf16")] == [4, 4]
    assert [w["steps"] for w in report["windows"]] == ["1-2", "3-4"]
    for precision in ("fp32", "bf16"):
        records = [json.loads(line) for line in (
            tmp_path / "runs" / precision / "metrics.jsonl").open()]
        assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
        config = json.loads((tmp_path / "runs" / precision /
                             "config.json").read_text())
        assert config["precision"] == precision


def test_precision_curves_names_a_bad_device() -> None:
    done = _run("precision_curves", "--steps", "4", "--window", "2",
                "--device", "tpu", timeout=60)
    assert done.returncode == 2
    assert "--device: device='tpu' is not a device" in done.stderr


def test_precision_curves_refuses_too_few_steps() -> None:
    done = _run("precision_curves", "--steps", "150", timeout=60)
    assert done.returncode == 2
    assert "--steps must be at least two --window" in done.stderr


@pytest.mark.slow
def test_unet_speed_compares_against_a_commit() -> None:
    done = _run("unet_speed", "--before", "HEAD", "--batch", "2",
                "--rounds", "1")
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines()
            if line.startswith("| ") and "---" not in line][1:]
    assert [r.split(" | ")[0] for r in rows] == [
        "| attention, 128 x 16x16", "| upsample, 128 x 16x16",
        "| attention, 128 x 8x8", "| upsample, 128 x 8x8",
        "| whole forward"]
    assert all("bit-equal" in r for r in rows if "upsample" in r)


def test_unet_speed_names_a_bad_revision() -> None:
    done = _run("unet_speed", "--before", "no-such-rev", timeout=60)
    assert done.returncode == 1
    assert "no-such-rev" in done.stderr


def _gpu_check(tmp_path: Path, **env: str
               ) -> tuple[subprocess.CompletedProcess, dict]:
    """scripts/gpu_check.sh run with `env`; its output and its JSON."""
    done = subprocess.run(
        ["bash", "scripts/gpu_check.sh"], cwd=ROOT, capture_output=True,
        text=True, timeout=600, env={
            **os.environ, "OUT": str(tmp_path / "out"),
            "BUILD": str(tmp_path / "build"), "PYTHON": sys.executable,
            **env})
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    return done, report


@pytest.mark.slow
def test_the_gpu_check_runs_every_step_at_toy_size(tmp_path: Path) -> None:
    # SIZE=toy: the GPU branch's own commands, at toy sizes on the CPU
    # (and against the reference where a checkout is at ./reference).
    done, report = _gpu_check(tmp_path, SIZE="toy")
    assert done.returncode == 0, done.stdout + done.stderr
    steps = {step["name"]: step for step in report["steps"]}
    assert list(steps) == [p["name"] for p in report["plan"]] == GPU_STEPS
    checkout = (ROOT / "reference" / "guided_diffusion").is_dir()
    for name, step in steps.items():
        skipped = name in NEEDS_REFERENCE and not checkout
        assert step["status"] == ("skipped" if skipped else "ok"), step
        assert step["expected_h100_s"] > 0
    assert steps["env"]["result"]["gpu"] is None
    assert "3 skipped" in steps["tests"]["last_line"]  # the GPU's tests
    compiled = steps["imagenet64_compiled"]["result"]
    assert compiled["compile"] and "sample" not in compiled
    assert compiled["train"]["adm_lib"]["rate"] > 0
    assert [w["steps"] for w in steps["precision"]["result"]["windows"]] == [
        "1-2", "3-4"]
    for name in NEEDS_REFERENCE & {n for n, s in steps.items()
                                   if s["status"] == "ok"}:
        assert steps[name]["result"]["train"]["ratio"] > 0
    # At the top of the results: the JSON, the whole log, one figure.
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "04_bf16_fp32.png", "gpu_check.json", "gpu_check.log"]
    log = (out / "gpu_check.log").read_text()
    for line in ("SKIPPED [1] tests/test_train.py", "| 3-4 |",
                 "adm bench imagenet64:", "| imagenet64_compiled | ok |"):
        assert line in log


def test_a_failing_or_hanging_gpu_step_loses_only_itself(
        tmp_path: Path) -> None:
    # A python that fails the tests and hangs (with a child) in the curves;
    # no checkout, one step left out, and too short a budget for the last.
    fake = tmp_path / "python"
    fake.write_text(f"""#!/bin/sh
case "$*" in
    */env_check.py*) exit 0 ;;
    "-m pytest"*) echo "E   a failing test"; exit 3 ;;
    scripts/precision_curves.py*) sleep 60 & wait; exit 0 ;;
esac
exec {sys.executable} "$@"
""")
    fake.chmod(0o755)
    start = time.monotonic()
    done, report = _gpu_check(tmp_path, SIZE="toy", PYTHON=str(fake),
                              REF=str(tmp_path / "none"), BUDGET="6",
                              MIN_STEP="2", ONLY=" ".join(
                                  n for n in GPU_STEPS if n != "imagenet64"))
    # Well under the hung step's 60 s: its child was stopped too.
    assert time.monotonic() - start < 30
    assert done.returncode == 1
    steps = {step["name"]: step for step in report["steps"]}
    assert list(steps) == GPU_STEPS
    assert [steps[n]["status"] for n in GPU_STEPS] == [
        "ok", "failed", "skipped", "skipped", "timeout", "skipped"]
    assert steps["tests"]["exit_code"] == 3
    assert steps["tests"]["last_line"] == "E   a failing test"
    assert steps["imagenet64"]["reason"] == "not in ONLY"
    assert "no guided-diffusion checkout" in steps["cifar32"]["reason"]
    # Cut at the budget's rest (6 s less the first steps' second or two),
    # or by `timeout -k 10` 10 s later; start-up takes seconds.
    assert 4 < steps["precision"]["seconds"] < 20
    assert "s left of the 6 s budget" in steps["imagenet64_compiled"][
        "reason"]
    assert "E   a failing test" in (tmp_path / "out" /
                                    "gpu_check.log").read_text()
