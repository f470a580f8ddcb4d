"""Tests of adm_lib.solvers (chapter 8): parity with DPM-Solver++'s and
EDM's own code, the one signature, and what the solvers refuse.

Parity: tests/data/solvers/ holds the outputs of the references run in
float64 (tests/make_solver_fixtures.py). Each case is replayed here in
float32 and float64 and held to tests/reference.py's error model
(`assert_parity`): the fixture stands in the reference's slot, and as it
is float64 its distance from our float64 run is far inside the budget,
which is K times our float32 error. The mutation tests check that the
comparison catches a solver fault (an update of the wrong order, one
coefficient off by 1e-4).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from adm_lib import solvers
from adm_lib.diffusion import GaussianDiffusion, SpacedDiffusion, respace
from adm_lib.forward import get_named_beta_schedule
from adm_lib.guidance import (
    classifier_cond_fn,
    classifier_free_model,
    sample_batches,
)
from tests.make_solver_fixtures import CLASSES, TinyClassifier, TinyEps
from tests.reference import ParityError, assert_parity, load

FIXTURES = Path(__file__).parent / "data" / "solvers"


def _cases() -> list[Any]:
    params = []
    for path in sorted(FIXTURES.glob("*.pt")):
        for i, case in enumerate(load(path)["cases"]):
            params.append(pytest.param(
                path, i, id=f"{path.stem}-{case['solver']}-{len(case['steps'])}"
                f"-o{case['order']}-{case['guidance']}-{case['mean_type']}"))
    return params


def replay(path: Path, index: int, dtype: torch.dtype,
           order: int | None = None, loop: Any = None) -> torch.Tensor:
    """Case `index` of fixture `path` run by our solver in `dtype`."""
    fixture = load(path)
    case = fixture["cases"][index]
    nets = {}
    for name, state in fixture["nets"].items():
        net = TinyClassifier() if name == "classifier" else TinyEps()
        net.load_state_dict(state)
        nets[name] = net.to(dtype)
    base = GaussianDiffusion(
        get_named_beta_schedule(fixture["schedule"], 1000),
        mean_type=case["mean_type"], var_type="fixed_small", dtype=dtype)
    spaced = SpacedDiffusion(base, case["steps"])
    model = nets["eps" if case["mean_type"] == "eps" else "x0"]
    cond_fn = None
    if case["guidance"] == "cfg":
        model = classifier_free_model(model, fixture["cfg_scale"], CLASSES)
    elif case["guidance"] == "classifier":
        cond_fn = classifier_cond_fn(nets["classifier"],
                                     fixture["classifier_scale"])
    kwargs = {"clip_denoised": False, "cond_fn": cond_fn,
              "model_kwargs": {"y": fixture["y"]}}
    if case["solver"] == "dpm++":
        kwargs["order"] = case["order"] if order is None else order
    loop = loop or (solvers.dpm_solver_sample_loop
                    if case["solver"] == "dpm++"
                    else solvers.heun_sample_loop)
    return loop(spaced, model, fixture["noise"].to(dtype), **kwargs)


@pytest.mark.parametrize(("path", "index"), _cases())
def test_equals_the_reference(path: Path, index: int) -> None:
    expected = load(path)["cases"][index]["output"]
    assert_parity({"x_0": (replay(path, index, torch.float32),
                           replay(path, index, torch.float64), expected)})


def test_edm_steps_are_the_steps_edms_sampler_rounds_to() -> None:
    for path in sorted(FIXTURES.glob("*.pt")):
        fixture = load(path)
        base = GaussianDiffusion(
            get_named_beta_schedule(fixture["schedule"], 1000),
            var_type="fixed_small")
        heun = [c for c in fixture["cases"] if c["solver"] == "heun"]
        for count in (3, 6, 10):
            expected = next(c["steps"] for c in heun
                            if len(c["steps"]) == count)
            assert solvers.edm_steps(base, count) == sorted(expected)


def test_fixtures_cover_what_the_chapter_claims() -> None:
    seen = {(load(p)["schedule"], c["solver"], c["order"], c["guidance"])
            for p in FIXTURES.glob("*.pt") for c in load(p)["cases"]}
    for schedule in ("linear", "cosine"):
        for guidance in ("none", "classifier", "cfg"):
            for solver, order in (("dpm++", 1), ("dpm++", 2), ("heun", 2)):
                assert (schedule, solver, order, guidance) in seen
    size = sum(p.stat().st_size for p in FIXTURES.glob("*"))
    assert size < 1_000_000


def _first(solver: str, guidance: str, steps: int) -> tuple[Path, int]:
    path = FIXTURES / "linear.pt"
    cases = load(path)["cases"]
    index, = (i for i, c in enumerate(cases)
              if (c["solver"], c["guidance"], len(c["steps"]), c["order"],
                  c["mean_type"]) == (solver, guidance, steps, 2, "eps"))
    return path, index


def test_parity_catches_an_update_of_the_wrong_order() -> None:
    path, index = _first("dpm++", "classifier", 12)
    expected = load(path)["cases"][index]["output"]
    with pytest.raises(ParityError):
        assert_parity({"x_0": (replay(path, index, torch.float32, order=1),
                               replay(path, index, torch.float64, order=1),
                               expected)})


def test_parity_catches_a_coefficient_off_by_1e4(
        monkeypatch: pytest.MonkeyPatch) -> None:
    path, index = _first("heun", "none", 6)
    expected = load(path)["cases"][index]["output"]
    real = solvers._tables

    def off(diffusion: GaussianDiffusion) -> dict[str, np.ndarray]:
        tables = real(diffusion)
        tables["alpha"] = tables["alpha"] * (1 + 1e-4)
        return tables

    monkeypatch.setattr(solvers, "_tables", off)
    with pytest.raises(ParityError):
        assert_parity({"x_0": (replay(path, index, torch.float32),
                               replay(path, index, torch.float64),
                               expected)})


# --- the one signature ----------------------------------------------------

def _toy() -> tuple[GaussianDiffusion, TinyEps, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    diffusion = GaussianDiffusion(get_named_beta_schedule("cosine", 100),
                                  var_type="fixed_small")
    return (respace(diffusion, "6"), TinyEps(), torch.randn(2, 1, 6, 6),
            torch.tensor([0, 1]))


@pytest.mark.parametrize("sampler", solvers.SOLVERS)
def test_callback_sees_every_step_and_the_calls_are_counted(
        sampler: str) -> None:
    spaced, net, noise, y = _toy()
    calls, seen = [], []

    def counted(x: torch.Tensor, t: torch.Tensor, **kw: Any) -> torch.Tensor:
        calls.append(t.clone())
        return net(x, t, **kw)

    out = solvers.solver_sample(spaced, counted, noise, sampler=sampler,
                                callback=seen.append,
                                model_kwargs={"y": y})
    assert [s["step"] for s in seen] == list(range(5, -1, -1))
    assert torch.equal(seen[-1]["sample"], out)
    assert torch.equal(out, seen[-1]["pred_xstart"])  # ends at x_0
    assert len(calls) == solvers.network_calls(sampler, spaced)
    # The network sees the base diffusion's timesteps, as chapter 2's.
    assert {int(t[0]) for t in calls} <= set(spaced.timestep_map.tolist())
    assert out.abs().max() <= 1  # clipped


def test_heun_takes_an_euler_step_below_the_log_snr_clip() -> None:
    base = GaussianDiffusion(get_named_beta_schedule("cosine", 1000),
                             var_type="fixed_small")
    # Step 999 (lambda -9.9) starts the grid: one call fewer.
    assert solvers.network_calls("heun", respace(base, "10")) == 18
    assert solvers.network_calls(
        "heun", SpacedDiffusion(base, [0, 500, 990])) == 5


def test_order_one_is_ddim() -> None:
    from adm_lib.diffusion import ddim_sample_loop

    spaced, net, noise, y = _toy()
    kwargs = {"model_kwargs": {"y": y}}
    torch.testing.assert_close(
        solvers.dpm_solver_sample_loop(spaced, net, noise, order=1,
                                       **kwargs),
        ddim_sample_loop(spaced, net, noise, **kwargs), rtol=0, atol=1e-6)


@pytest.mark.parametrize("sampler", solvers.SOLVERS)
def test_sample_batches_runs_the_solvers_batch_size_free(
        sampler: str) -> None:
    spaced, net, _, _ = _toy()
    labels = torch.tensor([0, 1, 2])
    runs = [sample_batches(spaced, net, 3, (1, 6, 6), labels, size,
                           seed=4, sample_fn=solvers.solver_sample,
                           sampler=sampler)[0] for size in (1, 3)]
    np.testing.assert_array_equal(*runs)


@pytest.mark.parametrize(("options", "message"), [
    ({"sampler": "dpm++3m"}, "sampler must be one of"),
    ({"sampler": "heun", "eta": 0.5}, "deterministic"),
    ({"sampler": "dpm++2m", "guide_at_mean": True}, "deterministic"),
])
def test_solver_sample_refuses(options: dict, message: str) -> None:
    spaced, net, noise, y = _toy()
    with pytest.raises(ValueError, match=message):
        solvers.solver_sample(spaced, net, noise, model_kwargs={"y": y},
                              **options)


def test_guidance_needs_labels() -> None:
    spaced, net, noise, _ = _toy()
    with pytest.raises(ValueError, match="labels"):
        solvers.solver_sample(spaced, net, noise, sampler="heun",
                              cond_fn=lambda x, t, **_: x)


def test_dynamic_threshold_keeps_images_in_range() -> None:
    x0 = torch.stack([torch.linspace(-3, 3, 64).view(1, 8, 8),
                      torch.linspace(-0.5, 0.5, 64).view(1, 8, 8)])
    out = solvers.dynamic_threshold(x0, ratio=0.9)
    assert out.abs().max() <= 1
    # An image inside [-1, 1] is left alone; one beyond is rescaled whole,
    # its order kept, not flattened at +-1 as clipping would.
    torch.testing.assert_close(out[1], x0[1])
    assert (out[0].flatten().diff() >= 0).all()
    assert (out[0].abs() == 1).sum() < (x0[0].clamp(-1, 1).abs() == 1).sum()
