"""adm_lib.metrics (chapter 5): the reference evaluator's numbers, and batches."""

from __future__ import annotations

import json
import pickle
import warnings

import numpy as np
import pytest
import torch
from scipy import linalg

from adm_lib import cli
from adm_lib import metrics as mt
from adm_lib.viz import to_uint8

from .reference import (
    EPS64,
    FLOOR_ULPS,
    K,
    assert_parity,
    reference_files,
)


@pytest.mark.parity
@pytest.mark.parametrize("path", reference_files("metrics_*.npz"))
def test_metrics_match_the_reference_evaluator(path):
    """Tolerances, against the error model of tests/reference.py: FID and
    IS are float64 numpy/scipy on the same float32 features, so they agree
    to float64 round-off and sqrtm's iteration (measured 6e-9 relative;
    rel 1e-6). The radii are float32 squared distances by |u|^2 - 2 u.v +
    |v|^2, which loses log2((|u|^2 + |v|^2) / d^2) bits, about 1 here:
    measured 3.6 eps32 (ours) and 3.0 eps32 (the fixture) from the float64
    distances; rtol 1e-5 (84 eps32) leaves the model's factor 8 and room for
    features with d^2 several times below |u|^2. Precision and recall count
    samples inside radii: exact, as the fixture used the same float32
    distances.
    """
    data = np.load(path)
    ref, samples = data["ref_features"], data["sample_features"]
    fid = mt.frechet_distance(mt.feature_statistics(samples),
                              mt.feature_statistics(ref))
    assert fid == pytest.approx(float(data["fid"]), rel=1e-6)
    score = mt.inception_score(data["sample_probs"], int(data["is_split_size"]))
    assert score == pytest.approx(float(data["inception_score"]), rel=1e-6)
    radii = mt.manifold_radii(ref).numpy()
    np.testing.assert_allclose(radii, data["ref_radii_k3"], rtol=1e-5)
    precision, recall = mt.precision_recall(ref, samples)
    assert precision == float(data["precision"])
    assert recall == float(data["recall"])


def fid_roundoff(sigma: np.ndarray) -> float:
    """Float64 round-off of the FID of two equal statistics (exactly 0).

    sqrtm(S S) finds the eigenvalues of S S to eps64 |S|^2 each; the
    smallest root, lambda_min, moves by that over 2 lambda_min, and FID
    counts -2 tr of the root.
    """
    eigenvalues = np.linalg.eigvalsh(sigma)
    return len(sigma) * EPS64 * eigenvalues.max() ** 2 / eigenvalues.min()


def test_blocks_do_not_change_the_result():
    rng = np.random.default_rng(0)
    ref, samples = rng.normal(size=(300, 5)), rng.normal(size=(250, 5)) + 0.3
    whole = mt.precision_recall(ref, samples)
    assert mt.precision_recall(ref, samples, block=37) == whole
    # Blocks change the products' shapes, hence float32's rounding: the
    # radii against float64 distances of the same float32 features, by the
    # error model of tests/reference.py (all radii one quantity: a radius's
    # error is that of |u|^2 + |v|^2, not of the radius).
    x = torch.as_tensor(ref, dtype=torch.float32).double()
    exact = ((x[:, None] - x[None]) ** 2).sum(-1).sort(dim=1).values[:, 3]
    assert_parity({"radii": (mt.manifold_radii(ref)[None], exact[None],
                             mt.manifold_radii(ref, block=11)[None])})


def test_radius_is_the_kth_neighbour_excluding_the_point_itself():
    points = np.array([[0.0], [1.0], [3.0], [6.0], [10.0]])
    # Squared distances from 0: 0, 1, 9, 36, 100; the 3rd neighbour is 36.
    assert mt.manifold_radii(points, k=3)[0].item() == 36.0
    # A sample exactly on a ball's surface is inside: -1 is on the surface
    # of 0's ball (radius 1, to its nearest neighbour 1); 50 is in none.
    precision, _ = mt.precision_recall(points, np.array([[-1.0], [50.0]]), k=1)
    assert precision == 0.5
    with pytest.raises(ValueError, match="needs at least 4"):
        mt.manifold_radii(points[:3])


def test_singular_covariances_fall_back_with_a_warning(monkeypatch):
    stats = mt.FIDStatistics(np.zeros(3), np.eye(3))
    calls, real_sqrtm = [], linalg.sqrtm

    def sqrtm(matrix):
        calls.append(matrix)
        return np.full_like(matrix, np.inf) if len(calls) == 1 else real_sqrtm(
            matrix)

    monkeypatch.setattr(mt.linalg, "sqrtm", sqrtm)
    # The offset eps = 1e-6 on the diagonals moves the root by eps in each
    # of the 3 dimensions: FID -2 * 3 * eps, and float64 round-off of
    # traces of size 6.
    with pytest.warns(UserWarning, match="singular"):
        assert mt.frechet_distance(stats, stats) == pytest.approx(
            0, abs=2 * 3 * 1e-6 + FLOOR_ULPS * 6 * EPS64)
    # (1 + eps)^2 in float64, here and in the code: one sum, one product.
    np.testing.assert_allclose(calls[1], (1 + 1e-6) ** 2 * np.eye(3),
                               rtol=EPS64, atol=0)


def test_a_singular_product_with_a_finite_root_warns_nothing():
    # A feature that never varies (a dead unit) makes both covariances
    # singular; scipy warns, yet the root is finite and the distance exact.
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 20, 8))
    a[:, 0] = b[:, 0] = 0
    stats = [mt.feature_statistics(x) for x in (a, b)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        distance = mt.frechet_distance(*stats)
    # Without the dead unit the distance is the same: it adds nothing.
    live = [mt.feature_statistics(x[:, 1:]) for x in (a, b)]
    # float64 both ways (the dead unit's zero row and column pass through
    # sqrtm's Schur form untouched): a few eps64 of the traces' size per
    # dimension, and the traces cancel down to the distance.
    traces = sum(np.trace(s.sigma) for s in stats)
    rel = K * FLOOR_ULPS * a.shape[-1] * EPS64 * traces / distance
    assert distance == pytest.approx(mt.frechet_distance(*live), rel=rel)


def test_an_imaginary_root_is_an_error(monkeypatch):
    stats = mt.FIDStatistics(np.zeros(2), np.eye(2))
    monkeypatch.setattr(mt.linalg, "sqrtm",
                        lambda m: np.eye(2) * (1 + 0.1j))
    with pytest.raises(ValueError, match="imaginary"):
        mt.frechet_distance(stats, stats)


def test_mismatched_statistics_are_named():
    with pytest.raises(ValueError, match="same features"):
        mt.frechet_distance(mt.FIDStatistics(np.zeros(2), np.eye(2)),
                            mt.FIDStatistics(np.zeros(3), np.eye(3)))


def test_inception_score_splits_are_consecutive():
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(4) * 0.3, size=40)
    halves = [mt.inception_score(probs[:20]), mt.inception_score(probs[20:])]
    # The same float64 operations on the same splits: bit for bit.
    assert mt.inception_score(probs, split_size=20) == np.mean(halves)
    # One split of 40 is ~0.4% away here, far beyond approx's 1e-6.
    assert mt.inception_score(probs) != pytest.approx(np.mean(halves))


def test_batches_round_trip_and_convert_like_the_reference(tmp_path):
    images = torch.rand(3, 3, 8, 8) * 2 - 1
    path = mt.write_batch(tmp_path / "s.npz", images, torch.tensor([1, 2, 3]))
    batch = mt.read_batch(path)
    np.testing.assert_array_equal(batch.images, to_uint8(images))
    assert batch.labels.tolist() == [1, 2, 3] and batch.stats is None
    assert not list(tmp_path.glob(".*"))  # no temporary file left


def test_reference_statistics_are_read(tmp_path):
    path = tmp_path / "ref.npz"
    np.savez(path, arr_0=np.zeros((2, 4, 4, 3), np.uint8), mu=np.ones(5),
             sigma=np.eye(5), mu_s=np.zeros(7), sigma_s=np.eye(7))
    batch = mt.read_batch(path)
    assert batch.stats.mu.tolist() == [1.0] * 5
    assert batch.stats_spatial.sigma.shape == (7, 7)


@pytest.mark.parametrize("arrays, message", [
    ({"images": np.zeros((2, 4, 4, 3), np.uint8)}, "has no arr_0"),
    ({"arr_0": np.zeros((2, 4, 4, 3), np.float32)}, "must be uint8"),
    ({"arr_0": np.zeros((2, 4, 4), np.uint8)}, "must be uint8"),
    ({"arr_0": np.array([None, 1], dtype=object)}, "not a readable .npz"),
])
def test_bad_batches_are_named(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=f"{path}.*{message}|{message}.*{path}"):
        mt.read_batch(path)


def damaged_batches(folder):
    """Files that are not batches, of every kind a disk or a user makes."""
    good = folder / "good.npz"
    mt.write_batch(good, np.zeros((6, 4, 4, 3), np.uint8))
    data = good.read_bytes()
    files = {"empty.npz": b"", "garbage.npz": bytes(range(256)) * 3,
             "text.npz": b"arr_0 = images\n",
             "pickled.npz": pickle.dumps({"arr_0": [1, 2]}),
             "flipped.npz": data[:60] + bytes(40) + data[100:]}
    for length in (1, 4, 30, 200, len(data) // 2, len(data) - 22,
                   len(data) - 1):
        files[f"cut_{length}.npz"] = data[:length]
    for name, content in files.items():
        (folder / name).write_bytes(content)
    np.save(folder / "one_array.npy", np.zeros((6, 4, 4, 3), np.uint8))
    (folder / "one_array.npy").rename(folder / "one_array.npz")
    return [folder / name for name in [*files, "one_array.npz",
                                       "absent.npz"]]


def test_damaged_batches_are_named(tmp_path):
    for path in damaged_batches(tmp_path):
        with pytest.raises(ValueError, match=str(path)) as caught:
            mt.read_batch(path)
        assert "allow_pickle" not in str(caught.value)  # no unsafe advice


def test_cli_evaluate_names_a_damaged_batch_in_one_line(tmp_path, monkeypatch,
                                                        capsys):
    monkeypatch.setattr(mt, "feature_extractor",
                        lambda name, weights, device: FakeFeatures())
    good = tmp_path / "good.npz"
    for path in damaged_batches(tmp_path):
        for pair in ((path, good), (good, path)):
            code = cli.main(["evaluate", *map(str, pair), "--quiet",
                             "--features", "mnist", "--device", "cpu"])
            err = capsys.readouterr().err
            assert code == 1 and err.startswith("adm evaluate: "), err
            assert str(path) in err and err.count("\n") == 1, err


class FakeFeatures:
    """A stand-in extractor: pixel means as features, fixed logits."""

    def __call__(self, images):
        x = images.float().flatten(2).mean(-1)
        flat = images.float().flatten(1)
        return {"pool": torch.cat([x, x ** 2 / 255], 1),
                "spatial": flat[:, :6], "logits": flat[:, :4] / 50}


class FakeGreyFeatures(FakeFeatures):
    """FakeFeatures of the images made grey, as the mnist net sees them."""

    def __call__(self, images):
        return super().__call__(images.float().mean(1, keepdim=True))


def test_evaluate_computes_each_score(tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    ref = rng.integers(0, 256, (40, 4, 4, 3), dtype=np.uint8)
    samples = rng.integers(0, 200, (30, 4, 4, 3), dtype=np.uint8)
    mt.write_batch(tmp_path / "ref.npz", ref)
    mt.write_batch(tmp_path / "samples.npz", samples)
    monkeypatch.setattr(mt, "feature_extractor",
                        lambda name, weights, device: FakeFeatures())
    scores = mt.evaluate(tmp_path / "ref.npz", tmp_path / "samples.npz",
                         features="mnist", batch_size=7)
    acts = [mt.compute_activations(x, FakeFeatures()) for x in (ref, samples)]
    # FakeFeatures works row by row, so batches of 7 give the same features,
    # and the scores are the same float64 functions of them: bit for bit.
    assert scores["fid"] == mt.frechet_distance(
        mt.feature_statistics(acts[1]["pool"]),
        mt.feature_statistics(acts[0]["pool"]))
    assert scores["sfid"] == mt.frechet_distance(
        mt.feature_statistics(acts[1]["spatial"]),
        mt.feature_statistics(acts[0]["spatial"]))
    assert scores["inception_score"] == mt.inception_score(
        mt.softmax(acts[1]["logits"]))
    assert (scores["precision"], scores["recall"]) == mt.precision_recall(
        acts[0]["pool"], acts[1]["pool"])
    text = mt.format_scores(scores)
    assert "FID(mnist-net): " in text and "Inception Score(mnist-net)" in text


def test_inception_uses_a_reference_batch_statistics(tmp_path, monkeypatch):
    ref = np.random.default_rng(3).integers(0, 256, (20, 4, 4, 3), np.uint8)
    given = mt.FIDStatistics(np.full(6, 7.0), np.eye(6))
    np.savez(tmp_path / "ref.npz", arr_0=ref, mu=given.mu, sigma=given.sigma,
             mu_s=np.zeros(6), sigma_s=np.eye(6))
    mt.write_batch(tmp_path / "samples.npz", ref)
    monkeypatch.setattr(mt, "feature_extractor",
                        lambda name, weights, device: FakeFeatures())
    acts = mt.compute_activations(ref, FakeFeatures())
    for features, expected in (("mnist", 0.0), ("inception", None)):
        scores = mt.evaluate(tmp_path / "ref.npz", tmp_path / "samples.npz",
                             features=features)
        if expected is not None:  # its own statistics: 0 but for round-off
            sigma = mt.feature_statistics(acts["pool"]).sigma
            assert scores["fid"] == pytest.approx(
                expected, abs=K * fid_roundoff(sigma))
        else:  # the same float64 operations: bit for bit
            assert scores["fid"] == mt.frechet_distance(
                mt.feature_statistics(acts["pool"]), given)


def test_cli_evaluate_writes_json_and_names_bad_files(tmp_path, monkeypatch,
                                                      capsys):
    images = np.random.default_rng(4).integers(0, 256, (12, 4, 4, 3),
                                               dtype=np.uint8)
    mt.write_batch(tmp_path / "a.npz", images)
    monkeypatch.setattr(mt, "feature_extractor",
                        lambda name, weights, device: FakeFeatures())
    out = tmp_path / "scores.json"
    assert cli.main(["evaluate", str(tmp_path / "a.npz"), str(tmp_path / "a.npz"),
                     "--features", "mnist", "--quiet", "--device", "cpu",
                     "--json", str(out)]) == 0
    assert json.loads(out.read_text())["features"] == "mnist"
    assert "Precision(mnist-net): 1.0" in capsys.readouterr().out
    assert cli.main(["evaluate", str(tmp_path / "absent.npz"),
                     str(tmp_path / "a.npz"), "--features", "mnist"]) == 1
    assert "no such file" in capsys.readouterr().err


@pytest.mark.parametrize("json_path", ["absent/scores.json", "folder"])
def test_cli_evaluate_checks_json_before_the_work(tmp_path, monkeypatch,
                                                  capsys, json_path):
    mt.write_batch(tmp_path / "a.npz", np.zeros((6, 4, 4, 3), np.uint8))
    (tmp_path / "folder").mkdir()

    def no_features(name, weights, device):
        raise AssertionError("no work before --json is checked")

    monkeypatch.setattr(mt, "feature_extractor", no_features)
    code = cli.main(["evaluate", str(tmp_path / "a.npz"),
                     str(tmp_path / "a.npz"), "--device", "cpu",
                     "--json", str(tmp_path / json_path)])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith(
        f"adm evaluate: --json {tmp_path / json_path}"), err
    assert err.count("\n") == 1


def test_grey_against_colour_is_said(tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(6)
    mt.write_batch(tmp_path / "grey.npz",
                   rng.integers(0, 256, (8, 4, 4, 1), dtype=np.uint8))
    mt.write_batch(tmp_path / "colour.npz",
                   rng.integers(0, 256, (8, 4, 4, 3), dtype=np.uint8))
    monkeypatch.setattr(mt, "feature_extractor",
                        lambda name, weights, device: FakeGreyFeatures())
    for ref, samples in (("grey", "colour"), ("colour", "grey")):
        with pytest.warns(UserWarning, match=(
                f"the reference batch .*{ref}.npz is 8 x 4 x 4 x "
                f"{1 if ref == 'grey' else 3}, the sample batch "
                f".*{samples}.npz .*compare grey images with colour")):
            mt.evaluate(tmp_path / f"{ref}.npz", tmp_path / f"{samples}.npz",
                        features="mnist")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same channels: not a word
        mt.evaluate(tmp_path / "grey.npz", tmp_path / "grey.npz",
                    features="mnist")
    # The command says it too (in one line: tests/test_cli.py), and scores.
    with pytest.warns(UserWarning, match="compare grey images with colour"):
        assert cli.main(["evaluate", str(tmp_path / "grey.npz"),
                         str(tmp_path / "colour.npz"), "--features", "mnist",
                         "--quiet", "--device", "cpu"]) == 0
    assert "FID" in capsys.readouterr().out


def test_unknown_features_are_named():
    with pytest.raises(ValueError, match="inception, mnist, cifar10"):
        mt.feature_extractor("vgg")


@pytest.mark.parametrize("count", [0, 3])
def test_cli_evaluate_names_a_batch_too_small_to_score(tmp_path, monkeypatch,
                                                       capsys, count):
    rng = np.random.default_rng(5)
    mt.write_batch(tmp_path / "ref.npz",
                   rng.integers(0, 256, (12, 4, 4, 3), dtype=np.uint8))
    mt.write_batch(tmp_path / "few.npz",
                   rng.integers(0, 256, (count, 4, 4, 3), dtype=np.uint8))
    monkeypatch.setattr(mt, "feature_extractor",
                        lambda name, weights, device: FakeFeatures())
    assert cli.main(["evaluate", str(tmp_path / "ref.npz"),
                     str(tmp_path / "few.npz"), "--features", "mnist",
                     "--quiet", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err == (f"adm evaluate: the sample batch {tmp_path / 'few.npz'} has "
                   f"{count} images; the scores need at least 4 (precision "
                   "and recall use each image's 3rd nearest neighbour)\n")


def test_cli_evaluate_names_a_bad_batch_size(tmp_path, monkeypatch, capsys):
    mt.write_batch(tmp_path / "a.npz", np.zeros((6, 4, 4, 3), np.uint8))

    def no_features(name, weights, device):
        raise AssertionError("no work before the options are checked")

    monkeypatch.setattr(mt, "feature_extractor", no_features)
    with pytest.raises(SystemExit) as exit_:  # argparse refuses it
        cli.main(["evaluate", str(tmp_path / "a.npz"), str(tmp_path / "a.npz"),
                  "--batch-size", "0", "--device", "cpu"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.endswith(
        "adm evaluate: error: argument --batch-size: expected a whole number "
        ">= 1, got '0'\n")
    with pytest.raises(ValueError, match="batch_size=0: expected >= 1"):
        mt.evaluate(tmp_path / "a.npz", tmp_path / "a.npz", batch_size=0)


def test_score_activations_count_hits_of_the_labels() -> None:
    rng = np.random.default_rng(0)
    ref = {"pool": rng.normal(size=(40, 3)),
           "spatial": rng.normal(size=(40, 5)),
           "logits": rng.normal(size=(40, 4))}
    logits = np.eye(4)[[0, 1, 2, 3, 0, 1]] * 5
    samples = {"pool": rng.normal(size=(6, 3)),
               "spatial": rng.normal(size=(6, 5)), "logits": logits}
    scores = mt.score_activations(ref, samples, np.array([0, 1, 2, 0, 0, 0]))
    assert scores["accuracy"] == 4 / 6  # a count over 6: the same division
    assert set(scores) == {"inception_score", "fid", "sfid", "precision",
                           "recall", "accuracy"}
    assert "accuracy" not in mt.score_activations(ref, samples)


def test_score_activations_use_given_reference_statistics() -> None:
    rng = np.random.default_rng(1)
    acts = {"pool": rng.normal(size=(20, 3)),
            "spatial": rng.normal(size=(20, 3)),
            "logits": rng.normal(size=(20, 4))}
    own = mt.score_activations(acts, acts)
    sigma = mt.feature_statistics(acts["pool"]).sigma
    assert own["fid"] == pytest.approx(0, abs=K * fid_roundoff(sigma))
    far = mt.FIDStatistics(np.full(3, 10.0), np.eye(3))
    given = mt.score_activations(acts, acts, ref_stats=(far, far))
    # |mu - 10|^2 alone is ~3 * 100 for features of mean ~0 and sd 1.
    assert given["fid"] > 100 and given["sfid"] > 100


@pytest.mark.parametrize("allowed", [True, False])
def test_metrics_compute_without_tf32_and_restore_the_setting(
        monkeypatch: pytest.MonkeyPatch, allowed: bool) -> None:
    # A training run may have turned TF32 on; the products of distances and
    # features must still be IEEE float32, and the run's setting come back.
    backends = (torch.backends.cuda.matmul, torch.backends.cudnn)
    # Set by hand: monkeypatch cannot undo these modules' attributes.
    saved = [backend.allow_tf32 for backend in backends]
    for backend in backends:
        backend.allow_tf32 = allowed
    try:
        check_tf32_off(monkeypatch, backends, allowed)
    finally:
        for backend, value in zip(backends, saved, strict=True):
            backend.allow_tf32 = value


def check_tf32_off(monkeypatch: pytest.MonkeyPatch, backends: tuple,
                   allowed: bool) -> None:
    seen = []
    matmul = torch.Tensor.__matmul__

    def spy(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        seen.append([backend.allow_tf32 for backend in backends])
        return matmul(a, b)

    monkeypatch.setattr(torch.Tensor, "__matmul__", spy)
    mt.pairwise_distances(torch.randn(5, 3), torch.randn(4, 3))

    def extractor(x: torch.Tensor) -> dict[str, torch.Tensor]:
        seen.append([backend.allow_tf32 for backend in backends])
        return {"pool": x.flatten(1)}

    images = np.zeros((3, 2, 2, 1), np.uint8)
    mt.compute_activations(images, extractor, batch_size=2)
    assert seen == [[False, False]] * 3
    assert [backend.allow_tf32 for backend in backends] == [allowed] * 2
