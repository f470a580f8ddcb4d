"""`adm demo` (adm_lib.demo): its settings, its budget of steps, and the
whole pipeline at a few steps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from adm_lib import cli


# `adm demo`, at a few steps (10 samples: a singular covariance for FID).
@pytest.mark.slow
def test_adm_demo_trains_samples_scores_and_reports(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--steps", "2", "--classifier-steps",
            "2", "--per-class", "1", "--respacing", "2", "--scales", "0,3",
            "--device", "cpu", "--quiet"]
    assert cli.main(args) == 0
    text = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert set(report["scores"]) == {"0", "3"}
    for scale, scores in report["scores"].items():
        assert 0 <= scores["accuracy"] <= 1 and np.isfinite(scores["fid"])
        assert 0 <= scores["mean_intensity"] <= 255
        # Each scale's samples: a batch of the reference's format.
        path = out / f"samples_scale_{scale}.npz"
        assert report["files"][f"samples_scale_{scale}"] == str(path)
        with np.load(path) as batch:
            assert batch["arr_0"].shape == (10, 32, 32, 1)
            assert batch["arr_0"].dtype == np.uint8
            assert batch["arr_1"].dtype == np.int64
            assert batch["arr_1"].tolist() == list(range(10))
            # numpy's mean of the same array, through JSON's exact repr.
            assert scores["mean_intensity"] == batch["arr_0"].mean()
    assert 0 < report["data_mean_intensity"] < 255
    assert 0 <= report["classifier_accuracy_held_out"] <= 1
    assert report["timings_s"]["total"] > 0
    assert (out / "guided_digits.png").stat().st_size > 0
    assert (out / "report.md").read_text() in text
    # A second run reuses the finished runs: no step is trained again.
    logged = (out / "diffusion" / "metrics.jsonl").read_text()
    assert cli.main(args) == 0
    assert (out / "diffusion" / "metrics.jsonl").read_text() == logged
    # Other settings in the same folder are refused, naming the way out.
    for changed in (["--classifier-steps", "3"], ["--seed", "1"]):
        assert cli.main([*args, *changed]) == 1
        assert "made with other demo settings" in capsys.readouterr().err
    assert (report["settings"]["seed"], report["settings"]["steps"]) == (0, 2)


def test_adm_demo_steps_default_to_the_devices_budget(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from adm_lib import demo, devices

    for native, steps in ((True, demo.STEPS_BF16),
                          (False, demo.STEPS_FP32_CPU)):
        monkeypatch.setattr(devices, "native_bf16",
                            lambda device, n=native: n)
        configs = demo.demo_configs(demo.DemoSettings(), "cpu")
        assert configs["diffusion"].steps == steps
        given = demo.demo_configs(demo.DemoSettings(steps=7), "cpu")
        assert given["diffusion"].steps == 7


def test_adm_demo_says_why_a_float32_cpu_trains_fewer_steps(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from adm_lib import demo, devices, train

    class Stop(Exception):
        pass

    def stop(*args: object, **kwargs: object) -> None:
        raise Stop

    monkeypatch.setattr(devices, "native_bf16", lambda device: False)
    monkeypatch.setattr(train, "train", stop)  # no need to train here
    said: list[str] = []
    with pytest.raises(Stop):
        demo.run_demo(tmp_path, demo.DemoSettings(device="cpu"),
                      say=said.append)
    assert said[0].startswith(f"adm demo: {demo.STEPS_FP32_CPU} diffusion")
    assert f"--steps {demo.STEPS_BF16}" in said[0]
    assert f"({demo.STEPS_FP32_CPU} steps, cpu)" in said[1]


def test_adm_demo_refuses_bad_settings(capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["demo", "--steps", "0", "--device", "cpu"]) == 1
    assert "--steps must be >= 1" in capsys.readouterr().err
    assert cli.main(["demo", "--classifier-batch", "0", "--device",
                     "cpu"]) == 1
    assert "--classifier-batch must be >= 1" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert cli.main(["demo", "--device", "cuda"]) == 1
        assert "sees no GPU" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["demo", "--scales", "1,x"])
