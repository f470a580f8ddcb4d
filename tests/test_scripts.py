"""The measurement scripts under scripts/ that the chapters quote."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


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


def test_precision_windows_are_the_gap_of_means_and_its_standard_error(
) -> None:
    curves = _script("precision_curves")
    rng = np.random.default_rng(0)
    fp32 = rng.normal(1.0, 0.1, 300)
    bf16 = fp32[::-1] + 0.05  # another spread, and shifted
    rows = curves.windows({"fp32": fp32.tolist(), "bf16": bf16.tolist()},
                          100)
    assert [r["steps"] for r in rows] == ["1-100", "101-200", "201-300"]
    for i, row in enumerate(rows):
        a, b = fp32[100 * i:100 * (i + 1)], bf16[100 * i:100 * (i + 1)]
        assert row["gap"] == pytest.approx(b.mean() - a.mean(), abs=1e-12)
        se = np.sqrt(a.var(ddof=1) / 100 + b.var(ddof=1) / 100)
        assert row["se"] == pytest.approx(se, rel=1e-12)


def test_precision_curves_trains_both_and_plots(tmp_path: Path) -> None:
    plot = tmp_path / "curves.png"
    done = _run("precision_curves", "--steps", "4", "--window", "2",
                "--batch", "2", "--device", "cpu",
                "--out", str(tmp_path / "runs"), "--plot", str(plot))
    assert done.returncode == 0, done.stderr
    table = [line for line in done.stdout.splitlines()
             if line.startswith("| 1-2 ") or line.startswith("| 3-4 ")]
    assert len(table) == 2
    assert plot.stat().st_size > 0
    for precision in ("fp32", "bf16"):
        records = [json.loads(line) for line in (
            tmp_path / "runs" / precision / "metrics.jsonl").open()]
        assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
        config = json.loads((tmp_path / "runs" / precision /
                             "config.json").read_text())
        assert config["precision"] == precision


def test_precision_curves_refuses_too_few_steps() -> None:
    done = _run("precision_curves", "--steps", "150", timeout=60)
    assert done.returncode == 2
    assert "--steps must be at least two --window" in done.stderr


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
