"""adm_lib.evaluation and `adm evaluate`'s other work: images from a folder,
a zip or an .npz as training reads them; the reference batch written from
them; the bound in bits/dim with its standard error; and FID while a run
trains, with the FID of real images at the same n beside it.
"""

from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from adm_lib import cli
from adm_lib import evaluation as ev
from adm_lib.checkpoints import read_metrics
from adm_lib.data import load_dataset
from adm_lib.errors import TrainError
from adm_lib.metrics import read_batch
from adm_lib.models import load_run
from adm_lib.train import train
from tests.helpers import config


@pytest.fixture(scope="module")
def run(data: Path, tmp_path_factory: pytest.TempPathFactory,
        one_thread: None) -> Path:
    """A tiny 2-step class-conditional run on the fixture's data."""
    out = tmp_path_factory.mktemp("run") / "run"
    train(config(data), out, progress=False)
    return out


def _folder(root: Path, sizes: list[tuple[int, int]]) -> Path:
    """Grey images of these sizes in class folders a/ and b/."""
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(sizes):
        path = root / "ab"[i % 2] / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)).save(
            path)
    return root


def test_images_are_read_as_training_reads_them(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "imgs", [(12, 10), (9, 9), (10, 14),
                                         (8, 8)] * 2)
    batch = ev.read_images(folder, 8)
    data = load_dataset(folder, resolution=8)  # what adm train sees
    expected = torch.stack([data.pixels(i)[0] for i in range(len(data))])
    assert np.array_equal(batch.images, expected.permute(0, 2, 3, 1).numpy())
    assert batch.labels.tolist() == data.labels.tolist()
    with zipfile.ZipFile(tmp_path / "imgs.zip", "w") as z:
        for path in sorted(folder.rglob("*.png")):
            z.write(path, path.relative_to(folder).as_posix())
    assert np.array_equal(ev.read_images(tmp_path / "imgs.zip", 8).images,
                          batch.images)
    with pytest.raises(ValueError, match="not square|pass a resolution"):
        ev.read_images(folder)  # sizes differ: resizing is asked for


def test_a_subset_is_seeded_and_without_repeats(data: Path) -> None:
    whole = ev.read_images(data).images.reshape(24, -1)
    some = ev.read_images(data, count=10, seed=3).images.reshape(10, -1)
    again = ev.read_images(data, count=10, seed=3).images.reshape(10, -1)
    other = ev.read_images(data, count=10, seed=4).images.reshape(10, -1)
    assert np.array_equal(some, again) and not np.array_equal(some, other)
    rows = {row.tobytes() for row in some}
    assert len(rows) == 10 and rows <= {row.tobytes() for row in whole}


def test_the_reference_batch_holds_the_images_and_their_statistics(
        data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A stand-in for Inception (its weights are not offline): the features
    # are the pixels, so the statistics can be checked by hand.
    def pixels_net(name: str, weights=None, device="cpu"):
        assert name == "inception"
        return lambda x: {"pool": x.flatten(1), "spatial": x[:, :, :2, :2]
                          .flatten(1), "logits": x.flatten(1)[:, :3]}

    monkeypatch.setattr(ev, "feature_extractor", pixels_net)
    out = tmp_path / "ref.npz"
    ev.write_reference(data, out, image_size=8)
    ref = read_batch(out)
    assert np.array_equal(ref.images, ev.read_images(data).images)
    assert ref.labels.tolist() == (np.arange(24) % 4).tolist()
    flat = ref.images.reshape(24, -1).astype(np.float64)
    np.testing.assert_allclose(ref.stats.mu, flat.mean(0), rtol=1e-6)
    np.testing.assert_allclose(ref.stats.sigma, np.cov(flat, rowvar=False),
                               rtol=1e-5, atol=1e-3)
    assert ref.stats_spatial.mu.shape == (4,)
    # Read whole, a reference batch keeps its given statistics.
    assert ev.read_images(out).stats is not None
    # A data-set net's statistics are not written: the evaluator would
    # not read them (it computes its own from arr_0).
    ev.write_reference(data, out, features="mnist")
    assert read_batch(out).stats is None


def test_the_bound_is_paired_and_its_error_is_the_spread(
        data: Path, run: Path) -> None:
    trained = load_run(run)
    one = ev.bound_terms(trained, data, seed=1, batch_size=5)
    again = ev.bound_terms(trained, data, seed=1, batch_size=24)
    # Same draws whatever the batch: another model's terms pair with these.
    torch.testing.assert_close(one["vlb"], again["vlb"], rtol=1e-5, atol=0)
    other = ev.bound_terms(trained, data, seed=2)
    assert not torch.equal(one["vlb"], other["vlb"])
    scores = ev.bound_bpd(trained, data, seed=1, batch_size=5)
    vlb = one["vlb"]
    assert scores["n"] == 24
    assert scores["bpd"] == pytest.approx(vlb.mean().item())
    assert scores["bpd_se"] == pytest.approx(vlb.std().item() / math.sqrt(24))
    # The estimate's expectation over t is the whole bound (chapter 2):
    # with T = 50, a model of noise sits near the prior's bits/dim.
    assert 1 < scores["bpd"] < 40


def test_the_bound_refuses_what_it_cannot_score(
        data: Path, run: Path, tmp_path: Path) -> None:
    trained = load_run(run)
    unlabelled = tmp_path / "unlabelled.npz"
    np.savez(unlabelled, np.load(data)["arr_0"])
    with pytest.raises(ValueError, match="no labels.*class-conditional"):
        ev.bound_bpd(trained, unlabelled)
    trained.config = config(data, kind="classifier")
    with pytest.raises(ValueError, match="is a classifier"):
        ev.bound_bpd(trained, data)


def test_fid_while_training_is_logged_with_its_n_and_floor(
        data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    fid = ev.TrainingFID(2, samples=4, ref_images=12)
    train(config(data, steps=3), out, progress=False, watch=fid)
    records = [r for r in read_metrics(out) if "fid" in r]
    assert [r["step"] for r in records] == [2, 3]  # the interval, the end
    for record in records:
        assert record["fid_n"] == 4 and record["fid_ref_n"] == 12
        assert math.isfinite(record["fid"]) and record["fid"] >= -1e-6
    assert records[0]["fid_floor"] == records[1]["fid_floor"] > 0
    assert (out / "fid.png").stat().st_size > 0
    assert "compare only FIDs of one n" in fid.note()

    with pytest.raises(TrainError, match="24 images: too few for fid "
                       "samples=30"):
        train(config(data, steps=1), tmp_path / "few", progress=False,
              watch=ev.TrainingFID(1, samples=30))
    with pytest.raises(ValueError, match="samples=1: expected >= 2"):
        ev.TrainingFID(1, samples=1)


# `adm evaluate`: each mode's options refused, one line naming the flag,
# before anything loads.
@pytest.mark.parametrize(("argv", "message"), [
    ([], "give the images"),
    (["{data}"], "give SAMPLES to score against REF"),
    (["{data}", "--count", "3"], "--count needs --write-ref or --nll"),
    (["{data}", "{data}", "--nll-weights", "model"],
     "--nll-weights needs --nll"),
    (["{data}", "{data}", "--nll", "{run}"], "--nll reads one set of "
     "images"),
    (["{data}", "--nll", "{run}", "--write-ref", "x.npz"],
     "--write-ref and --nll are two commands"),
    (["nowhere.npz", "{data}"], "nowhere.npz: no such file or folder"),
    (["{data}", "--write-ref", "{tmp}/no/dir/ref.npz"],
     "--write-ref {tmp}/no/dir/ref.npz: no folder"),
    (["{data}", "--nll", "{run}", "--nll-weights", "0.5"],
     "--nll {run}: --nll-weights '0.5'"),
])
def test_adm_evaluate_names_its_flags(
        data: Path, run: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
        argv: list[str], message: str) -> None:
    names = {"data": data, "run": run, "tmp": tmp_path}
    assert cli.main(["evaluate", "--quiet", "--device", "cpu",
                     *(a.format(**names) for a in argv)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"adm evaluate: {message.format(**names)}"), err
    assert err.count("\n") == 1


def test_adm_evaluate_writes_a_reference_and_scores_a_folder(
        data: Path, run: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture) -> None:
    ref = tmp_path / "ref.npz"
    base = ["evaluate", "--quiet", "--device", "cpu"]
    assert cli.main([*base, str(data), "--write-ref", str(ref),
                     "--features", "mnist", "--count", "12"]) == 0
    assert f"wrote {ref}: 12 x 8 x 8 x 1 images, labels" in (
        capsys.readouterr().out)
    folder = _folder(tmp_path / "samples", [(8, 8)] * 6)
    scores = tmp_path / "scores.json"
    assert cli.main([*base, str(ref), str(folder), "--features", "mnist",
                     "--json", str(scores)]) == 0
    assert "FID(mnist-net)" in capsys.readouterr().out
    assert json.loads(scores.read_text())["features"] == "mnist"
    assert cli.main([*base, str(data), "--nll", str(run), "--count",
                     "8"]) == 0
    assert "bits/dim (standard error) on 8 images" in (
        capsys.readouterr().out)
