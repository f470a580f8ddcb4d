"""`adm bench` (adm_lib.bench) and the fast path it times (chapter 4)."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from adm_lib import bench, cli
from adm_lib import config as cf
from adm_lib import train as tr
from adm_lib.data import Pixels, load_dataset

ROOT = Path(__file__).resolve().parents[1]
# A checkout of openai/guided-diffusion, for the side-by-side test; never
# committed (see docs/guide.md, Tests).
CHECKOUT = Path(os.environ.get("ADM_REFERENCE_CHECKOUT", ROOT / "reference"))
TINY = {"num_channels": 32, "channel_mult": "1,2", "num_res_blocks": 1,
        "attention_resolutions": "16", "image_size": 32,
        "diffusion_steps": 50, "precision": "fp32"}


@pytest.mark.parametrize("name", sorted(bench.BENCH_MODELS))
def test_bench_configs_build(name):
    config = bench.bench_config(name, device="cpu")
    assert config.in_channels in (1, 3) and config.class_cond
    if name == "cifar32":  # the 11M configuration
        model = cf.build_model(config)
        assert 11e6 < sum(p.numel() for p in model.parameters()) < 11.5e6


def test_bench_refuses_unknown_models_and_settings():
    with pytest.raises(bench.BenchError, match="no benchmark model 'big'"):
        bench.bench_config("big")
    with pytest.raises(bench.BenchError, match="precision"):
        bench.bench_config("demo", {"precision": "fp8"}, "cpu")


def test_run_bench_times_both_workloads():
    # Not the demo's batch of 32: the step draws for the batch it runs.
    config = bench.bench_config("demo", {**TINY, "batch_size": 3}, "cpu")
    report = bench.run_bench(config, rounds=2, warmup=0,
                             sample_steps="3", progress=False)
    for workload in ("train", "sample"):
        assert len(report[workload]["adm_lib"]["seconds"]) == 2
        assert report[workload]["adm_lib"]["rate"] > 0
        assert "ratio" not in report[workload]
    assert report["forward_gflop_per_image"] > 0
    assert "| train, images/s |" in bench.format_report("demo", report)
    assert report["batch"] == 3
    with pytest.raises(bench.BenchError, match="--rounds 0: expected"):
        bench.run_bench(config, rounds=0)


@pytest.fixture
def no_model(monkeypatch):
    """Building the model fails the test: the flags come first."""
    def built(*args, **kwargs):
        raise AssertionError("the model was built before the flags were "
                             "checked")

    monkeypatch.setattr(bench, "Ours", built)


@pytest.mark.parametrize(("flag", "value", "expected"), [
    ("--sample-batch", "0", "a whole number >= 1"),
    ("--sample-batch", "-3", "a whole number >= 1"),
    ("--batch", "0", "a whole number >= 1"),
    ("--rounds", "0", "a whole number >= 1"),
    ("--rounds", "two", "a whole number >= 1"),
    ("--warmup", "-1", "a whole number >= 0"),
    ("--warmup", "0.5", "a whole number >= 0"),
])
def test_bench_flags_are_checked_by_the_parser(capsys, no_model, flag, value,
                                               expected):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", "demo", "--device", "cpu", flag, value])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.splitlines()[-1].endswith(
        f"argument {flag}: expected {expected}, got {value!r}"), err


@pytest.mark.parametrize(("value", "expected"), [
    ("abc", "is not a step count"), ("0", "keeps no step"),
    ("0,0", "keeps no step"), ("ddim0", "cannot take exactly 0"),
    ("5000", "cannot take 5000 steps"),
])
def test_sample_steps_are_checked_before_the_model_is_built(
        capsys, no_model, value, expected):
    code = cli.main(["bench", "demo", "--device", "cpu", "--quiet",
                     "--sample-steps", value])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith(
        f"adm bench: --sample-steps {value!r}"), err
    assert expected in err and err.count("\n") == 1, err


def test_a_sample_batch_of_zero_is_not_replaced(no_model):
    config = bench.bench_config("demo", {**TINY, "batch_size": 3}, "cpu")
    with pytest.raises(bench.BenchError, match="--sample-batch 0"):
        bench.run_bench(config, sample_batch=0)


@pytest.mark.parametrize("json_path", ["absent/bench.json", "folder"])
def test_bench_json_is_checked_before_the_work(tmp_path, capsys, no_model,
                                               json_path):
    (tmp_path / "folder").mkdir()
    code = cli.main(["bench", "demo", "--device", "cpu", "--quiet",
                     "--json", str(tmp_path / json_path)])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith(
        f"adm bench: --json {tmp_path / json_path}"), err
    assert err.count("\n") == 1


def test_a_folder_that_is_not_the_reference_is_named(tmp_path, capsys):
    assert cli.main(["bench", "demo", "--device", "cpu", "--quiet",
                     "--reference", str(tmp_path)]) == 1
    assert "not a checkout of openai/guided-diffusion" in \
        capsys.readouterr().err


@pytest.mark.skipif(not (CHECKOUT / "guided_diffusion").is_dir(),
                    reason=f"no guided-diffusion checkout at {CHECKOUT} "
                    "(set ADM_REFERENCE_CHECKOUT)")
def test_bench_runs_the_reference_side_by_side(tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = ["bench", "demo", "--device", "cpu", "--batch", "2", "--rounds",
            "1", "--warmup", "0", "--sample-steps", "2", "--quiet",
            "--json", str(out)]
    for key, value in TINY.items():
        args += ["--set", f"{key}={value}"]
    assert cli.main([*args, "--reference", str(CHECKOUT)]) == 0
    report = json.loads(out.read_text())
    assert report["train"]["ratio"] > 0 and report["sample"]["ratio"] > 0
    assert "x (" in capsys.readouterr().out


def test_training_batches_cross_as_uint8():
    data = load_dataset("mnist5k", resolution=32)
    pixels, label = Pixels(data)[5]
    image, same = data[5]
    assert pixels.dtype == torch.uint8 and label == same
    # Normalised on the device, bit for bit what the data set gives.
    assert torch.equal(pixels.float() / 127.5 - 1, image)


def test_the_optimizer_is_fused_and_compile_wraps_only_the_steps(
        monkeypatch, tmp_path):
    compiled = []

    def fake_compile(model):
        compiled.append(model)
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    config = cf.make_config("diffusion", "mnist", {
        **TINY, "image_size": 8, "attention_resolutions": "4", "steps": 2,
        "batch_size": 4, "device": "cpu", "compile": True,
        "sample_steps": "ddim2", "num_samples": 2})
    state = tr.TrainState.create(
        replace(config, in_channels=1, num_classes=10), torch.device("cpu"))
    assert state.optimizer.param_groups[0]["fused"]
    last = tr.train(config, tmp_path / "run", progress=False)
    assert len(compiled) == 1
    saved = torch.load(last, weights_only=True)
    assert not any(k.startswith("_orig_mod") for k in saved["model"])


def test_train_only_times_no_sampling(monkeypatch):
    sampled = []
    monkeypatch.setattr(bench.Ours, "sample",
                        lambda self, *args: sampled.append(args))
    config = bench.bench_config("demo", {**TINY, "batch_size": 2}, "cpu")
    report = bench.run_bench(config, rounds=1, warmup=0, progress=False,
                             sample=False)
    assert sampled == [] and "sample" not in report
    assert report["train"]["adm_lib"]["rate"] > 0
    table = bench.format_report("demo", report)
    assert "| train, images/s |" in table and "| sample" not in table
