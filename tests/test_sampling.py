"""`adm sample`'s options (adm_lib.sampling): each is checked before any work.

No model is trained here: loading one is made to fail, so a test passes only
if the option was refused before the model was loaded.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import pytest
import torch

from adm_lib import checkpoints as ck
from adm_lib import cli, devices, sampling, solvers, values
from adm_lib import config as cf
from adm_lib.compat import guided_diffusion as gd
from adm_lib.diffusion import respace
from adm_lib.guidance import classifier_cond_fn, guided_sample, sample_noise
from adm_lib.models import TrainedModel, load_run
from adm_lib.viz import to_uint8
from tests.helpers import tiny_guided_runs

from .reference import FIXTURES


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
    (["--sampler", "heun", "--eta", "0.5"],
     "--eta 0.5: --sampler heun adds no noise"),
    (["--classifier", "c.pt", "--sampler", "dpm++2m", "--guide-at", "mean"],
     "--guide-at mean needs a classifier and the ddpm sampler"),
    (["--sampler", "dpm++2m", "--respacing", "0"],
     "--respacing '0': expected steps >= 1"),
    (["--upsampler", "u", "--upsampler-respacing", "5,0"],
     "--upsampler-respacing '5,0': expected steps >= 1"),
    (["--respacing", "ten"], "--respacing 'ten': expected a step count"),
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
    # The library's options refuse what the command does, before any model
    # use: there are no options to sample with.
    with pytest.raises(sampling.SampleError, match="--eta nan"):
        sampling.SampleOptions(eta=float("nan"))
    with pytest.raises(sampling.SampleError, match="--cfg-scale nan"):
        sampling.SampleOptions(cfg_scale=float("nan"))


def sample_flags() -> dict[str, argparse.Action]:
    """The flags of `adm sample`, by option name."""
    parser = cli.build_parser()
    (commands,) = [a for a in parser._actions
                   if isinstance(a, argparse._SubParsersAction)]
    sample = commands.choices["sample"]
    sample.format_help()  # its arguments are added when it is first used
    return {a.dest: a for a in sample._actions}


def test_every_option_is_a_flag_with_its_default() -> None:
    flags = sample_flags()
    for field in fields(sampling.SampleOptions):
        action = flags[field.name]
        assert action.option_strings == [values.flag(field.name)]
        # Not given, the option keeps the dataclass's default: written once.
        assert action.default is None
        assert action.choices == field.metadata.get("choices")
        shown = field.default
        if isinstance(shown, float):
            shown = f"{shown:g}"
        if shown is not None:
            assert f"{shown} (default)" in action.help or (
                f"default {shown}" in action.help), action.help
    args = cli.build_parser().parse_args(["sample", "m"])
    assert cli._options(sampling.SampleOptions, args) == (
        sampling.SampleOptions())
    args = cli.build_parser().parse_args(
        ["sample", "m", "--sampler", "ddim", "--eta", "0.5", "--labels",
         "3,1", "--num-samples", "1e3", "--low-res-t", "2"])
    options = cli._options(sampling.SampleOptions, args)
    assert (options.sampler, options.eta, options.classes,
            options.num_samples, options.low_res_t) == (
        "ddim", 0.5, (3, 1), 1000, 2)
    # The choices are the library's own.
    assert flags["sampler"].choices == flags["upsampler_sampler"].choices \
        == solvers.ALL_SAMPLERS
    assert flags["precision"].choices == devices.PRECISIONS


# One bad value of each option that has one: refused by the options (once,
# wherever they are made) and by `adm sample`, naming the flag.
BAD = {"classifier_scale": -1.0, "cfg_scale": float("inf"),
       "sampler": "euler", "eta": 2.0, "guide_at": "x_0",
       "num_samples": 0, "labels": "3,x", "upsampler_sampler": "plms",
       "batch_size": -4, "seed": -1, "precision": "fp8", "respacing": "0",
       "upsampler_respacing": "ddim"}


def test_each_options_bad_value_is_refused_naming_its_flag(
        tmp_path: Path, capsys: pytest.CaptureFixture,
        no_loading: None, monkeypatch: pytest.MonkeyPatch) -> None:
    unchecked = {f.name for f in fields(sampling.SampleOptions)} - set(BAD)
    # Its value is checked against the upsampler, once loaded.
    assert unchecked == {"low_res_t"}
    for name in BAD:
        with pytest.raises(sampling.SampleError) as err:
            sampling.SampleOptions(**{name: BAD[name]})
        assert str(err.value).startswith(values.flag(name)), err.value
    # The command: past its parser (a choice, a seed), the same refusal.
    calls = []
    real = sampling.SampleOptions.__post_init__

    def counted(self: sampling.SampleOptions) -> None:
        calls.append(self)
        real(self)

    monkeypatch.setattr(sampling.SampleOptions, "__post_init__", counted)
    classifier = ["--classifier", str(tmp_path / "c")]
    for name in ("classifier_scale", "cfg_scale", "eta", "num_samples",
                 "labels", "batch_size"):
        calls.clear()
        code, err = adm_sample([str(tmp_path / "run"), *classifier,
                                values.flag(name), str(BAD[name]), "--out",
                                str(tmp_path / "x.npz")], capsys)
        assert code == 1 and err.startswith(
            f"adm sample: {values.flag(name)} "), err
        assert len(calls) == 1  # checked once, before any model loads


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


# Every output of a run is checked before any work: the grid beside --out,
# and a cascade's base samples and their grid (OUT_low_res.npz, .png).
@pytest.mark.parametrize(("cascade", "taken"), [
    (False, "x.png"), (True, "x.png"), (True, "x_low_res.npz"),
    (True, "x_low_res.png")])
def test_every_output_is_checked_before_any_work(
        tmp_path: Path, capsys: pytest.CaptureFixture, no_loading: None,
        cascade: bool, taken: str) -> None:
    (tmp_path / taken).mkdir()
    out = tmp_path / "x.npz"
    upsampler = ["--upsampler", str(tmp_path / "up")] if cascade else []
    code, err = adm_sample([str(tmp_path / "run"), *upsampler, "--out",
                            str(out)], capsys)
    assert code == 1 and err == (
        f"adm sample: --out {out}: it writes {tmp_path / taken} too, and "
        "that is a folder; move it or name another --out\n")
    assert sampling.sample_outputs(out, cascade)[0] == out


def test_a_second_writer_of_one_out_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture,
        no_loading: None) -> None:
    out = tmp_path / "x.npz"
    with sampling.lock_out(out):  # another run, writing x.npz and x.png
        code, err = adm_sample([str(tmp_path / "run"), "--out", str(out)],
                               capsys)
    assert code == 1 and err == (
        f"adm sample: --out {out} is being written by another process "
        f"(pid {os.getpid()}): wait for it to end, or choose another "
        "--out\n")
    with sampling.lock_out(out):  # free again once the first has ended
        pass


def fake(image_size: int, channels: int = 3, small_size: int = 0
         ) -> TrainedModel:
    """A loaded network of that size, that is never run."""
    config = cf.TrainConfig(
        kind="upsampler" if small_size else "diffusion",
        image_size=image_size, in_channels=channels,
        small_size=small_size or 8, class_cond=False)
    return TrainedModel(None, None, config, Path("a fake network"))


@pytest.mark.parametrize("count", ["100000000", "1e8", "1e12", str(2**62)])
def test_samples_that_cannot_fit_are_refused_before_sampling(
        tmp_path: Path, capsys: pytest.CaptureFixture,
        monkeypatch: pytest.MonkeyPatch, count: str) -> None:
    monkeypatch.setattr(sampling, "load_network",
                        lambda *args, **kwargs: fake(32))
    monkeypatch.setattr(sampling, "available_memory", lambda: 16 * 10**9)
    code, err = adm_sample([str(tmp_path / "run"), "--num-samples", count,
                            "--out", str(tmp_path / "x.npz")], capsys)
    n = int(float(count))
    assert code == 1 and err.startswith(
        f"adm sample: --num-samples {n}: {n} samples and their grid need "
        "about "), err
    assert "16.0 GB is available: refused, as samples are not streamed" in err
    assert err.count("\n") == 1


def test_memory_counts_every_stage_and_the_grid(
        monkeypatch: pytest.MonkeyPatch) -> None:
    per_sample = 8 + 32 * 32 * 3 + 2 * 32 * 32 * 3  # label, batch, grid
    monkeypatch.setattr(sampling, "available_memory",
                        lambda: 1000 * per_sample)
    sampling.check_memory("--num-samples 1000", 1000, fake(32))
    with pytest.raises(sampling.SampleError, match="; 1000 fit, so"):
        sampling.check_memory("--num-samples 1001", 1001, fake(32))
    # A cascade: the base images, the upsampled ones and their grid, and
    # the upsampler's float32 inputs (and their noised copy).
    up = fake(64, small_size=32)
    per_sample += 3 * 64 * 64 * 3 + 2 * 4 * 32 * 32 * 3 - 2 * 32 * 32 * 3
    monkeypatch.setattr(sampling, "available_memory",
                        lambda: 1000 * per_sample)
    sampling.check_memory("--num-samples 1000", 1000, fake(32), up)
    with pytest.raises(sampling.SampleError, match="; 1000 fit"):
        sampling.check_memory("--num-samples 1001", 1001, fake(32), up)
    assert sampling.available_memory() > 0  # this machine says how much


@pytest.mark.parametrize("seed", ["1e23", "-1", str(2**64), "1.5", "abc"])
def test_seeds_out_of_range_are_refused_by_the_parser(
        tmp_path: Path, capsys: pytest.CaptureFixture, no_loading: None,
        seed: str) -> None:
    for command in (["sample", str(tmp_path / "run")], ["demo"]):
        with pytest.raises(SystemExit) as exit_:
            cli.main([*command, "--seed", seed])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.splitlines()[-1].endswith(
            f"error: argument --seed: expected a whole number from 0 to "
            f"{2**64 - 1}, got {seed!r}"), err
        assert "Traceback" not in err
    with pytest.raises(sampling.SampleError, match="--seed"):
        sampling.SampleOptions(seed=2**64)
    args = cli.build_parser().parse_args(["sample", "m", "--seed",
                                          str(2**64 - 1)])
    assert args.seed == 2**64 - 1  # not rounded through a float


TINY = {"num_channels": 32, "channel_mult": (1, 2), "num_res_blocks": 1,
        "attention_resolutions": (8,), "diffusion_steps": 20,
        "in_channels": 1, "num_classes": 10, "precision": "fp32",
        "sample_steps": "4"}


def tiny(kind: str, **settings: object) -> TrainedModel:
    """An untrained network of `kind` and `settings`, never trained."""
    config = cf.make_config(kind, "mnist", {**TINY, **settings})
    torch.manual_seed(0)
    model = cf.build_model(config).eval().requires_grad_(False)
    return TrainedModel(model, cf.build_diffusion(config), config,
                        Path(kind))


@pytest.mark.usefixtures("one_thread")
def test_the_bar_counts_steps_and_any_seed_in_range_samples(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base = tiny("diffusion", image_size=4, attention_resolutions="4")
    up = tiny("upsampler", image_size=8, small_size=4)
    top = 2**64 - 1
    fp32 = sampling.SampleOptions(seed=top, precision="fp32", batch_size=2)
    images, labels = sampling.sample(
        base, options=replace(fp32, num_samples=5, respacing="3"),
        progress=True)
    assert images.shape == (5, 4, 4, 1) and len(labels) == 5
    # 3 batches of 3 steps: the bar moves at each step, not each batch.
    assert "9/9" in capsys.readouterr().err
    low, high, _ = sampling.sample_cascade(
        base, up, options=replace(fp32, num_samples=3, respacing="2",
                                  upsampler_respacing="4"), progress=True)
    assert high.shape == (3, 8, 8, 1)
    assert "12/12" in capsys.readouterr().err  # 2 x 2 + 2 x 4
    sampling.write_samples(tmp_path / "low.npz", low, None)
    sampling.upsample_files(up, tmp_path / "low.npz", replace(
        fp32, labels="1", upsampler_respacing="4"), progress=True)
    assert "8/8" in capsys.readouterr().err  # 2 x 4


def test_adm_sample_prepares_networks_as_the_bench_times_them(
        tmp_path: Path, capsys: pytest.CaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`adm sample --compile` and `adm bench --set compile=true` take one
    preparation (chapter 6's prepare_for_sampling), with one set of
    arguments, and sample with the network it returns."""
    from adm_lib import bench, guidance

    prepared: list[tuple[str, torch.device, str, str, bool]] = []
    returned: list[torch.nn.Module] = []

    def spy(model: torch.nn.Module, device: str | torch.device,
            precision: str = "auto", layout: str = "auto",
            compile: bool = False) -> torch.nn.Module:
        prepared.append((type(model).__name__, torch.device(device),
                         precision, layout, compile))
        returned.append(model)
        return model

    sampled: list[object] = []
    real_sample_batches = guidance.sample_batches

    def spy_sample(diffusion: object, model: object, *args: object,
                   **kwargs: object) -> object:
        sampled.append(model)
        return real_sample_batches(diffusion, model, *args, **kwargs)

    monkeypatch.setattr(guidance, "prepare_for_sampling", spy)
    monkeypatch.setattr(guidance, "sample_batches", spy_sample)
    loaded = tiny("diffusion", image_size=4, attention_resolutions="4")
    config = cf.make_config("diffusion", "mnist", {
        **TINY, "image_size": 4, "attention_resolutions": "4"})
    monkeypatch.setattr(sampling, "load_run", lambda *args: TrainedModel(
        loaded.model, loaded.diffusion, config, tmp_path / "run"))
    code, err = adm_sample([str(tmp_path / "run"), "--compile",
                            "--precision", "fp32",
                            "--num-samples", "1", "--respacing", "1",
                            "--out", str(tmp_path / "x.npz")], capsys)
    assert code == 0, err
    ours = bench.Ours(bench.bench_config("demo", {
        **TINY, "image_size": 4, "attention_resolutions": "4",
        "compile": True}, "cpu"), torch.device("cpu"))
    assert prepared == [("UNetModel", torch.device("cpu"), "fp32", "auto",
                         True)] * 2
    assert returned[1] is next(iter(ours.state.ema.values()))
    ours.sample(torch.tensor([0]), "1")
    assert sampled[-1] is returned[1]  # the bench times what it prepared


@pytest.mark.usefixtures("one_thread")
def test_the_classifier_guides_at_the_samplings_precision() -> None:
    base = tiny("diffusion", image_size=4, attention_resolutions="4")
    judge = tiny("classifier", image_size=4,
                 classifier_attention_resolutions="4", classifier_width=64)
    seen: set[torch.dtype | None] = set()

    class Spy(torch.nn.Module):
        def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            seen.add(torch.get_autocast_dtype("cpu")
                     if torch.is_autocast_enabled("cpu") else None)
            return judge.model(x, t)

    guided = replace(judge, model=Spy())
    for precision, dtype in (("bf16", torch.bfloat16), ("fp32", None)):
        seen.clear()
        sampling.sample(base, guided, sampling.SampleOptions(
            num_samples=2, respacing="2", labels="1", precision=precision))
        assert seen == {dtype}, precision


# `adm sample` on tiny trained runs (tests.helpers.tiny_guided_runs).
@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny runs on 4-class 8x8 data: conditional, unconditional, classifier."""
    return tiny_guided_runs(tmp_path_factory.mktemp("runs"))


def sample(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    code = cli.main(["sample", *args, "--quiet", "--device", "cpu"])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_adm_sample_writes_the_reference_batch_and_a_grid(
        runs: dict[str, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "guided.npz"
    code, text = sample([str(runs["unconditional"]), "--classifier",
                         str(runs["classifier"]), "--classifier-scale", "3",
                         "--num-samples", "6", "--labels", "1,3",
                         "--respacing", "4", "--batch-size", "4",
                         "--out", str(out)], capsys)
    assert code == 0, text
    with np.load(out) as batch:
        assert batch["arr_0"].shape == (6, 8, 8, 1)
        assert batch["arr_0"].dtype == np.uint8
        assert batch["arr_1"].tolist() == [1, 3, 1, 3, 1, 3]
    assert out.with_suffix(".png").stat().st_size > 0
    assert "scale 3.0" in text


def _plain_cfg_and_classifier(
        runs: dict[str, Path], common: list[str], tmp_path: Path,
        capsys: pytest.CaptureFixture
) -> tuple[dict[str, np.ndarray], torch.Tensor]:
    """`adm sample` unguided, classifier-free and classifier-guided: the
    three batches' images, and the labels (the same in each)."""
    batches = {}
    for name, extra in {"plain": [], "cfg": ["--cfg-scale", "2"],
                        "classifier": ["--classifier", str(runs["classifier"]),
                                       "--classifier-scale", "5"]}.items():
        out = tmp_path / f"{name}.npz"
        code, text = sample([*common, *extra, "--out", str(out)], capsys)
        assert code == 0, text
        with np.load(out) as batch:
            batches[name] = batch["arr_0"]
            labels = torch.from_numpy(batch["arr_1"])
    return batches, labels


def test_adm_sample_guidance_moves_samples_towards_the_class(
        runs: dict[str, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture) -> None:
    common = [str(runs["conditional"]), "--num-samples", "8", "--sampler",
              "ddim", "--respacing", "ddim4", "--labels", "0,1,2,3"]
    batches, labels = _plain_cfg_and_classifier(runs, common, tmp_path,
                                                 capsys)
    assert labels.tolist() == [0, 1, 2, 3] * 2
    assert not np.array_equal(batches["plain"], batches["cfg"])
    # Guidance climbs log p(y | x) of its classifier: on the clean samples,
    # the classifier gives the asked-for classes more probability than on
    # the unguided samples drawn from the same noise. (A flipped gradient,
    # or one dropped, fails this; "the samples changed" would not.)
    judge = load_run(runs["classifier"]).model

    def log_p(images: np.ndarray) -> float:
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
        logits = judge(x, torch.zeros(len(x), dtype=torch.long))
        return logits.log_softmax(1).gather(1, labels[:, None]).mean().item()

    assert log_p(batches["classifier"]) > log_p(batches["plain"])


def test_adm_sample_without_labels_for_an_unconditional_model(
        runs: dict[str, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "plain.npz"
    code, text = sample([str(runs["unconditional"]), "--num-samples", "2",
                         "--respacing", "3", "--out", str(out)], capsys)
    assert code == 0, text
    with np.load(out) as batch:
        assert set(batch) == {"arr_0"}


@pytest.mark.parametrize("extra, message", [
    (["--cfg-scale", "1"], "trained with label dropout"),
    (["--labels", "7"], "outside the model's 4 classes"),
    (["--labels", "two"], "expected 'random' or class numbers"),
    (["--guide-at", "mean"], "needs a classifier and the ddpm"),
    (["--respacing", "ddim70"], "--respacing 'ddim70'"),
    (["--out", "samples.png"], "must end in .npz"),
    (["--classifier-flags", "--image_size 8"], "needs --classifier"),
    (["--classifier-scale", "2"], "--classifier-scale needs --classifier"),
])
def test_adm_sample_names_the_problem(
        runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture,
        extra: list[str], message: str) -> None:
    out = ["--out", str(tmp_path / "x.npz")] if "--out" not in extra else []
    code, text = sample([str(runs["unconditional"]
                             if "--cfg-scale" in extra
                             else runs["conditional"]), *out, *extra],
                        capsys)
    assert code == 1 and message in text, text


def test_adm_sample_refuses_a_classifier_that_does_not_fit(
        runs: dict[str, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture) -> None:
    out = str(tmp_path / "x.npz")
    code, text = sample([str(runs["conditional"]), "--classifier",
                         str(runs["conditional"]), "--out", out], capsys)
    assert code == 1 and "is a diffusion run, not a classifier" in text
    code, text = sample([str(runs["classifier"]), "--out", out], capsys)
    assert code == 1 and "is a classifier run, not a diffusion" in text
    code, text = sample([str(runs["data"]), "--out", out], capsys)
    assert code == 1 and "--model-flags" in text


@pytest.mark.parity
@pytest.mark.skipif(not (FIXTURES / "unet_a.pt").exists(),
                    reason=f"no unet_a.pt in {FIXTURES}")
def test_adm_sample_loads_the_reference_checkpoints(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Released-style checkpoints through --model-flags: the same samples
    as guided_sample with the weights loaded by hand, from the seed's
    per-sample noise."""

    unet = torch.load(FIXTURES / "unet_a.pt", weights_only=True)
    clf = torch.load(FIXTURES / "classifier_a.pt", weights_only=True)
    out = tmp_path / "ref.npz"
    code, text = sample([str(FIXTURES / "unet_a.pt"), "--model-flags",
                         unet["flags"], "--classifier",
                         str(FIXTURES / "classifier_a.pt"),
                         "--classifier-flags", clf["flags"],
                         "--classifier-scale", "3", "--sampler", "ddim",
                         "--respacing", "ddim2", "--num-samples", "2",
                         "--labels", "5,900", "--precision", "fp32",
                         "--out", str(out)], capsys)
    assert code == 0, text
    model = gd.load_checkpoint(FIXTURES / "unet_a.pt", unet["flags"])
    classifier = gd.load_checkpoint(FIXTURES / "classifier_a.pt",
                                    clf["flags"], "classifier")
    spaced = respace(gd.diffusion_from_flags(unet["flags"]), "ddim2")
    noise_fn = sample_noise(0, range(2))  # --seed 0
    x_T = noise_fn(torch.empty(2, 3, 64, 64))
    expected = to_uint8(guided_sample(
        spaced, model, x_T, "ddim", classifier_cond_fn(classifier, 3.0),
        noise_fn=noise_fn, model_kwargs={"y": torch.tensor([5, 900])}))
    with np.load(out) as batch:
        assert np.array_equal(batch["arr_0"], expected)
        assert batch["arr_1"].tolist() == [5, 900]


@pytest.mark.parametrize("sampler", solvers.SOLVERS)
def test_adm_sample_with_a_solver_plain_guided_and_free(
        runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture,
        sampler: str) -> None:
    common = [str(runs["conditional"]), "--num-samples", "4", "--sampler",
              sampler, "--respacing", "3", "--labels", "0,1,2,3",
              "--precision", "fp32"]
    batches, _ = _plain_cfg_and_classifier(runs, common, tmp_path, capsys)
    assert not np.array_equal(batches["plain"], batches["cfg"])
    assert not np.array_equal(batches["plain"], batches["classifier"])
    # The command draws what the library's solver draws from the seed.
    model = load_run(runs["conditional"])
    spaced = respace(model.diffusion, "3")
    noise_fn = sample_noise(0, range(4))
    x_T = noise_fn(torch.empty(4, 1, 8, 8))
    expected = to_uint8(solvers.solver_sample(
        spaced, model.model, x_T, sampler,
        model_kwargs={"y": torch.tensor([0, 1, 2, 3])}))
    np.testing.assert_array_equal(batches["plain"], expected)


def test_a_solvers_default_steps_and_network_calls() -> None:
    assert sampling.default_respacing("dpm++2m", 1000) == "20"
    assert sampling.default_respacing("heun", 1000) == "10"
    assert sampling.default_respacing("heun", 4) == "4"
