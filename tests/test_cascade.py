"""The cascade of `adm sample` (adm_lib.sampling, adm_lib.cli): a base
model's samples upsampled, and given low-resolution images upsampled.

Tiny runs on MNIST-5k, trained once for the module: an 8px base model, 8 to
16px upsamplers with and without conditioning augmentation, a 4 to 8px one
and classifiers; each samples in 3 steps.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from adm_lib import cascade as cs
from adm_lib import cli, sampling
from adm_lib import config as cf
from adm_lib import train as tr
from adm_lib.compat import guided_diffusion as gd
from adm_lib.models import TrainedModel

TINY = {
    "steps": 4, "batch_size": 4, "num_channels": 32, "num_res_blocks": 1,
    "channel_mult": "1,2", "attention_resolutions": "8",
    "classifier_width": 32, "classifier_depth": 1,
    "classifier_attention_resolutions": "8", "diffusion_steps": 50,
    "sample_steps": "10", "sample_interval": 10**9, "save_interval": 4,
    "eval_interval": 10**9, "eval_images": 8, "log_interval": 1,
    "data": "mnist5k", "lr": 1e-2, "device": "cpu", "num_workers": 0,
    "precision": "fp32",
}
RUNS = {  # name: kind, settings
    "base": ("diffusion", {"image_size": 8, "label_dropout": 0.25}),
    "up": ("upsampler", {"image_size": 16, "small_size": 8}),
    "aug": ("upsampler", {"image_size": 16, "small_size": 8,
                          "low_res_noise": 10, "class_cond": False}),
    "up4": ("upsampler", {"image_size": 8, "small_size": 4}),
    "clf8": ("classifier", {"image_size": 8,
                            "classifier_attention_resolutions": "4"}),
    "clf16": ("classifier", {"image_size": 16}),
}
KINDS = {name: kind for name, (kind, _) in RUNS.items()}
FAST = {"respacing": "3", "upsampler_respacing": "3", "precision": "fp32"}
UP_FLAGS = ("--large_size 16 --small_size 8 --num_channels 32 "
            "--num_res_blocks 1 --channel_mult 1,2 --attention_resolutions 8 "
            "--in_channels 1 --class_cond True --num_classes 10 "
            "--diffusion_steps 50 --learn_sigma True")


# Every test here, and the module's runs, with one intra-op thread.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny runs, by name, and a released-style upsampler ("ref")."""
    root = tmp_path_factory.mktemp("runs")
    for name, (kind, settings) in RUNS.items():
        config = cf.make_config(kind, "mnist", {**TINY, **settings})
        tr.train(config, root / name, progress=False)
    torch.manual_seed(0)
    torch.save(gd.upsampler_from_flags(UP_FLAGS).state_dict(),
               root / "ref.pt")
    return {name: root / name for name in RUNS} | {"ref": root / "ref.pt"}


@pytest.fixture(scope="module")
def nets(runs: dict[str, Path]) -> dict[str, TrainedModel]:
    """The runs loaded."""
    return {name: sampling.load_network(runs[name], kind)
            for name, kind in KINDS.items()}


def cascade(nets: dict[str, TrainedModel], up: str = "up",
            classifier: TrainedModel | None = None,
            **options) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """3 cascade samples of labels 3, 5, 7, fast."""
    options = sampling.SampleOptions(**{
        **FAST, "num_samples": 3, "labels": "3,5,7", **options})
    return sampling.sample_cascade(nets["base"], nets[up], classifier,
                                   options)


def adm_sample(args: list[str], capsys: pytest.CaptureFixture
               ) -> tuple[int, str, str]:
    """Run `adm sample` in this process: exit code, stdout, stderr."""
    code = cli.main(["sample", *args, "--quiet", "--device", "cpu",
                     "--precision", "fp32"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_loaded_upsamplers_know_their_sizes(
        runs: dict[str, Path], nets: dict[str, TrainedModel]) -> None:
    up, aug = nets["up"], nets["aug"]
    assert (up.image_size, up.small_size, up.low_res_noise) == (16, 8, 0)
    assert (aug.small_size, aug.low_res_noise, aug.num_classes) == (8, 10, 0)
    assert up.num_classes == 10 and nets["base"].small_size == 0
    ref = sampling.load_network(runs["ref"], "upsampler", UP_FLAGS)
    assert (ref.image_size, ref.small_size, ref.in_channels,
            ref.num_classes) == (16, 8, 1, 10)
    stage = sampling.to_stage(ref, sampler="ddim")
    assert (stage.trained.small_size, stage.trained.num_classes,
            stage.respacing) == (8, 10, "ddim25")
    with pytest.raises(sampling.SampleError, match="--upsampler-flags"):
        sampling.load_network(runs["ref"], "upsampler")
    with pytest.raises(sampling.SampleError,
                       match="is a diffusion run, not an upsampler run"):
        sampling.load_network(runs["base"], "upsampler")
    with pytest.raises(sampling.SampleError,
                       match="is an upsampler run, not a diffusion run"):
        sampling.load_network(runs["up"], "diffusion")
    with pytest.raises(sampling.SampleError,
                       match="--upsampler-respacing 'ddim70'"):
        sampling.to_stage(up, "ddim70")
    with pytest.raises(sampling.SampleError, match="--respacing 'ddim70'"):
        sampling.to_stage(nets["base"], "ddim70")


def test_cascade_shapes_labels_and_determinism(
        nets: dict[str, TrainedModel]) -> None:
    low, high, labels = cascade(nets)
    assert low.dtype == high.dtype == np.uint8
    assert low.shape == (3, 8, 8, 1) and high.shape == (3, 16, 16, 1)
    assert labels.tolist() == [3, 5, 7]
    again = cascade(nets)
    assert np.array_equal(low, again[0]) and np.array_equal(high, again[1])
    other = cascade(nets, seed=1)
    assert not np.array_equal(low, other[0])
    assert not np.array_equal(high, other[1])
    assert high.std() > 10  # not a flat image


def test_the_cascade_upsamples_its_own_low_res_samples(
        nets: dict[str, TrainedModel]) -> None:
    low, high, labels = cascade(nets, seed=2)
    stage = sampling.to_stage(nets["up"], "3")
    alone = cs.upsample(stage, low, torch.from_numpy(labels), seed=2)
    assert np.array_equal(alone, high)
    # The upsampler sees the labels: others give other images.
    relabelled = cs.upsample(stage, low, torch.tensor([0, 1, 2]), seed=2)
    assert not np.array_equal(relabelled, high)


def test_cascade_samples_do_not_depend_on_the_batch_size(
        nets: dict[str, TrainedModel]) -> None:
    whole = cascade(nets, num_samples=5, batch_size=5)
    for size in (1, 2):
        parts = cascade(nets, num_samples=5, batch_size=size)
        for a, b in zip(whole[:2], parts[:2], strict=True):
            assert np.abs(a.astype(int) - b.astype(int)).max() <= 1, size
        assert np.array_equal(whole[2], parts[2])


def test_the_base_model_is_guided_in_a_cascade(
        nets: dict[str, TrainedModel]) -> None:
    low, high, _ = cascade(nets)
    for guided in (cascade(nets, cfg_scale=2.0),
                   cascade(nets, classifier=nets["clf8"],
                           classifier_scale=10.0)):
        assert not np.array_equal(guided[0], low)
        assert guided[1].shape == high.shape


def test_an_augmented_upsampler_takes_a_level(
        nets: dict[str, TrainedModel]) -> None:
    highs = {t: cascade(nets, "aug", low_res_t=t)[1]
             for t in (None, 0, 5, 10)}
    assert np.array_equal(highs[None], highs[5])  # the default: half of 10
    assert not np.array_equal(highs[0], highs[10])
    assert not np.array_equal(highs[5], highs[10])
    for level in (11, -1):
        with pytest.raises(sampling.SampleError) as err:
            cascade(nets, "aug", low_res_t=level)
        assert f"--low-res-t {level}" in str(err.value)
        assert "levels 0 to 10" in str(err.value)
    with pytest.raises(sampling.SampleError) as err:
        cascade(nets, low_res_t=3)
    assert "--low-res-t 3" in str(err.value)
    assert "without conditioning augmentation" in str(err.value)
    assert str(nets["up"].source) in str(err.value)


def test_adm_sample_cascade_and_low_res(
        runs: dict[str, Path], nets: dict[str, TrainedModel],
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "c.npz"
    code, text, err = adm_sample([
        str(runs["base"]), "--upsampler", str(runs["up"]), "--respacing",
        "3", "--upsampler-respacing", "3", "--num-samples", "3",
        "--labels", "3,5,7", "--seed", "4", "--out", str(out)], capsys)
    assert code == 0, err
    low_out = tmp_path / "c_low_res.npz"
    for path in (out, low_out, out.with_suffix(".png"),
                 low_out.with_suffix(".png")):
        assert path.is_file() and str(path) in text, path
    low, high, labels = cascade(nets, seed=4)
    with np.load(out) as batch, np.load(low_out) as base:
        assert np.array_equal(batch["arr_0"], high)
        assert np.array_equal(base["arr_0"], low)
        assert batch["arr_1"].tolist() == base["arr_1"].tolist() == [3, 5, 7]
    # The base samples, upsampled alone: the cascade's (same seed).
    again = tmp_path / "again.npz"
    code, text, err = adm_sample([
        "--upsampler", str(runs["up"]), "--low-res", str(low_out),
        "--upsampler-respacing", "3", "--seed", "4", "--out", str(again)],
        capsys)
    assert code == 0, err
    assert str(again) in text and str(runs["base"]) not in text
    with np.load(again) as batch:
        assert np.array_equal(batch["arr_0"], high)
        assert batch["arr_1"].tolist() == [3, 5, 7]
    # A folder of PNGs in class folders named by the class numbers.
    folder = tmp_path / "pngs"
    for i, (image, y) in enumerate(zip(low, labels, strict=True)):
        (folder / str(y)).mkdir(parents=True)
        Image.fromarray(image[..., 0]).save(folder / str(y) / f"{i}.png")
    from_pngs = tmp_path / "pngs.npz"
    code, _, err = adm_sample([
        "--upsampler", str(runs["up"]), "--low-res", str(folder),
        "--upsampler-respacing", "3", "--seed", "4", "--out",
        str(from_pngs)], capsys)
    assert code == 0, err
    with np.load(from_pngs) as batch:
        assert np.array_equal(batch["arr_0"], high)
        assert batch["arr_1"].tolist() == [3, 5, 7]


def test_low_res_labels_from_the_command_line(
        runs: dict[str, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture) -> None:
    flat = tmp_path / "flat"
    flat.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (8, 8), np.uint8)).save(
            flat / f"{i}.png")
    out = str(tmp_path / "x.npz")
    args = ["--upsampler", str(runs["up"]), "--low-res", str(flat),
            "--upsampler-respacing", "3", "--out", out]
    code, _, err = adm_sample(args, capsys)
    assert code == 1 and "class-conditional" in err
    assert str(flat) in err and "pass --labels" in err
    code, _, err = adm_sample([*args, "--labels", "6"], capsys)
    assert code == 0, err
    with np.load(out) as batch:
        assert batch["arr_0"].shape == (2, 16, 16, 1)
        assert batch["arr_1"].tolist() == [6, 6]
    # --labels replaces the labels a batch has.
    batch_file = tmp_path / "low.npz"
    np.savez(batch_file, np.zeros((2, 8, 8, 1), np.uint8), np.array([1, 2]))
    code, _, err = adm_sample([*args[:2], "--low-res", str(batch_file),
                               *args[4:], "--labels", "9"], capsys)
    assert code == 0, err
    with np.load(out) as batch:
        assert batch["arr_1"].tolist() == [9, 9]
    # An unconditional upsampler needs none, and takes a level.
    code, _, err = adm_sample(["--upsampler", str(runs["aug"]),
                               *args[2:], "--low-res-t", "10"], capsys)
    assert code == 0, err
    with np.load(out) as batch:
        assert set(batch) == {"arr_0"}
    # A released upsampler, by its flags.
    code, text, err = adm_sample(["--upsampler", str(runs["ref"]),
                                  "--upsampler-flags", UP_FLAGS, *args[2:],
                                  "--labels", "1"], capsys)
    assert code == 0 and "reference flags" in text, err


def bad_batches(root: Path) -> dict[str, Path]:
    """Low-resolution inputs that do not fit the 8 to 16px upsampler."""
    files = {"big": np.zeros((2, 16, 16, 1), np.uint8),
             "rgb": np.zeros((2, 8, 8, 3), np.uint8),
             "labelled": np.zeros((2, 8, 8, 1), np.uint8),
             "unknown": np.zeros((2, 8, 8, 1), np.uint8)}
    paths = {}
    for name, images in files.items():
        paths[name] = root / f"{name}.npz"
        labels = [1, 12] if name == "unknown" else [1, 2]
        np.savez(paths[name], images, np.array(labels))
    paths["short"] = root / "short.npz"
    np.savez(paths["short"], files["big"][:, :8, :8], np.array([1]))
    paths["corrupt"] = root / "corrupt.npz"
    paths["corrupt"].write_bytes(b"PK\x03\x04 not a zip archive")
    paths["missing"] = root / "missing.npz"
    return paths


@pytest.mark.parametrize(("case", "messages"), [
    ("wrong size", ["big.npz", "are 16x16; the upsampler takes 8x8"]),
    ("wrong channels", ["rgb.npz", "have 3 channels; the upsampler takes 1"]),
    ("missing file", ["missing.npz: no such file"]),
    ("unknown labels", ["unknown.npz: labels [12] outside the upsampler's "
                        "10 classes"]),
    ("labels per image", ["short.npz: arr_1 must hold one integer label per "
                          "image (2)"]),
    ("corrupt file", ["corrupt.npz: not a readable .npz file"]),
    ("classifier with low res", ["--classifier: guidance runs in the base "
                                 "model only"]),
    ("unaugmented level", ["--low-res-t 3:", "without conditioning "
                           "augmentation", "{up}/checkpoints/"]),
    ("level out of range", ["--low-res-t 11:", "levels 0 to 10",
                            "{aug}/checkpoints/"]),
    ("small size", ["the base model makes 8x8 images; the upsampler takes "
                    "4x4", "--upsampler {up4}/checkpoints/"]),
    ("classifier of the output size", ["{clf16}/", "sees 16px images, the "
                                       "upsampler's output: guidance runs "
                                       "in the base model only",
                                       "the base model's size (8px)"]),
    ("not an upsampler", ["{base} is a diffusion run, not an upsampler"]),
    ("upsampler respacing", ["--upsampler-respacing 'ddim70'"]),
])
def test_adm_sample_names_what_does_not_fit(
        runs: dict[str, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture, case: str,
        messages: list[str]) -> None:
    files = bad_batches(tmp_path)
    up = ["--upsampler", str(runs["up"]), "--upsampler-respacing", "3"]
    cascade_args = [str(runs["base"]), "--respacing", "3",
                    "--num-samples", "2"]
    args = {
        "wrong size": [*up, "--low-res", str(files["big"])],
        "wrong channels": [*up, "--low-res", str(files["rgb"])],
        "missing file": [*up, "--low-res", str(files["missing"])],
        "unknown labels": [*up, "--low-res", str(files["unknown"])],
        "labels per image": [*up, "--low-res", str(files["short"])],
        "corrupt file": [*up, "--low-res", str(files["corrupt"])],
        "classifier with low res": [*up, "--low-res", str(files["labelled"]),
                                    "--classifier", str(runs["clf8"])],
        "unaugmented level": [*cascade_args, *up, "--low-res-t", "3"],
        "level out of range": [*cascade_args, "--upsampler",
                               str(runs["aug"]), "--low-res-t", "11"],
        "small size": [*cascade_args, "--upsampler", str(runs["up4"])],
        "classifier of the output size": [*cascade_args, *up,
                                          "--classifier", str(runs["clf16"])],
        "not an upsampler": [*cascade_args, "--upsampler",
                             str(runs["base"])],
        "upsampler respacing": [*cascade_args, "--upsampler",
                                str(runs["up"]), "--upsampler-respacing",
                                "ddim70"],
    }[case]
    out = tmp_path / "out.npz"
    code, _, err = adm_sample([*args, "--out", str(out)], capsys)
    assert code == 1, err
    assert err.startswith("adm sample: ") and err.count("\n") == 1, err
    paths = {name: str(path) for name, path in runs.items()}
    for message in messages:
        assert message.format(**paths) in err, (message, err)
    assert not out.exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--upsampler-respacing", "3"], "--upsampler-respacing needs "
     "--upsampler"),
    (["--upsampler-sampler", "ddim"], "--upsampler-sampler needs "
     "--upsampler"),
    (["--upsampler-flags", "--large_size 16"], "--upsampler-flags needs "
     "--upsampler"),
    (["--low-res-t", "2"], "--low-res-t needs --upsampler"),
    (["--low-res", "x.npz"], "--low-res needs --upsampler"),
    (["--upsampler", "u", "--low-res-t", "-1"], "--low-res-t -1: expected "
     "a step >= 0"),
    (["--upsampler", "u", "--low-res", "x.npz", "MODEL"], "give no MODEL"),
    (["--upsampler", "u", "--low-res", "x.npz", "--respacing", "3"],
     "--respacing is the base model's, and --low-res has none; the "
     "upsampler's is --upsampler-respacing"),
    (["--upsampler", "u", "--low-res", "x.npz", "--cfg-scale", "1"],
     "--cfg-scale: guidance runs in the base model only"),
    (["--upsampler", "u", "--low-res", "x.npz", "--num-samples", "4"],
     "--num-samples is the base model's"),
    (["--upsampler", "u"], "give a MODEL to sample"),
    ([], "give a MODEL to sample"),
])
def test_options_that_do_not_go_together_are_refused_before_loading(
        tmp_path: Path, capsys: pytest.CaptureFixture,
        monkeypatch: pytest.MonkeyPatch, args: list[str],
        message: str) -> None:
    def load_network(*args, **kwargs):
        raise AssertionError("a network was loaded before the options "
                             "were checked")

    monkeypatch.setattr(sampling, "load_network", load_network)
    monkeypatch.chdir(tmp_path)
    Path("x.npz").touch()
    code, _, err = adm_sample([*args, "--out", "out.npz"], capsys)
    assert code == 1 and message in err, err
    assert err.count("\n") == 1, err


def test_adm_sample_cascade_with_the_solvers(
        runs: dict[str, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "solved.npz"
    code, _, err = adm_sample([
        str(runs["base"]), "--upsampler", str(runs["up"]), "--sampler",
        "dpm++2m", "--upsampler-sampler", "heun", "--respacing", "3",
        "--upsampler-respacing", "2", "--num-samples", "2", "--labels",
        "3,5", "--out", str(out)], capsys)
    assert code == 0, err
    with np.load(out) as batch:
        assert batch["arr_0"].shape == (2, 16, 16, 1)
    stage = sampling.to_stage(sampling.load_network(runs["up"], "upsampler"),
                              "2", "heun")
    # The step bar counts Heun's calls: two a step and one at the last,
    # but the first step starts at the cosine schedule's clipped last
    # step and is Euler's (chapter 8.5): 2 calls, not 3.
    assert sampling._evaluations(stage, 2, 2) == 2
