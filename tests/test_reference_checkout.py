"""Random configurations against a local checkout of the reference itself.

The fixtures of tests/reference.py hold one configuration of each kind; these
tests draw many (schedules, step counts, respacings, objectives, the
reference's flags, architectures) and run the reference's own code beside
ours on the same inputs, under the same error model (`assert_parity`). They
need a checkout of openai/guided-diffusion (fetched, never committed) at
./reference or ADM_REFERENCE_CHECKOUT, and skip without one.
"""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from adm_lib import diffusion as D
from adm_lib.compat import guided_diffusion as gd
from tests.reference import ROOT, assert_parity

CHECKOUT = Path(os.environ.get("ADM_REFERENCE_CHECKOUT", ROOT / "reference"))
SOURCE = CHECKOUT / "guided_diffusion" / "gaussian_diffusion.py"

pytestmark = [
    pytest.mark.parity,
    pytest.mark.skipif(
        not SOURCE.is_file(),
        reason=f"no guided-diffusion checkout at {CHECKOUT} (set "
               "ADM_REFERENCE_CHECKOUT)"),
]


@pytest.fixture(scope="module")
def script_util() -> Any:
    """The reference's script_util module, imported from the checkout."""
    sys.path.insert(0, str(CHECKOUT))
    try:
        from guided_diffusion import script_util
    finally:
        sys.path.remove(str(CHECKOUT))
    return script_util


def diffusion_flags(seed: int) -> dict[str, Any]:
    """A random valid configuration of the reference's diffusion flags."""
    rng = random.Random(seed)
    steps = rng.choice([2, 10, 50, 100, 333, 1000, 4000])
    # The linear schedule scales beta_T by 1000 / T: over 1 below T = 20.
    schedule = rng.choice(["linear", "cosine"] if steps >= 50 else ["cosine"])
    # The reference needs two steps or more (its posterior log-variance).
    specs = ["", str(rng.randint(2, steps)),
             f"ddim{len(range(0, steps, rng.randint(1, steps - 1)))}",
             ",".join(str(rng.randint(1, steps // 3)) for _ in range(3))
             if steps >= 3 else ""]
    return {"diffusion_steps": steps, "noise_schedule": schedule,
            "timestep_respacing": rng.choice(specs),
            "learn_sigma": rng.random() < 0.5,
            "predict_xstart": rng.random() < 0.4,
            "use_kl": rng.random() < 0.25,
            "rescale_learned_sigmas": rng.random() < 0.4,
            "rescale_timesteps": rng.random() < 0.4}


def toy_model(out_channels: int) -> Callable[..., Tensor]:
    """A network stand-in that depends on x and on the timesteps it sees."""
    def model(x: Tensor, t: Tensor, **kwargs: Any) -> Tensor:
        t = t.to(x.dtype).view(-1, 1, 1, 1)
        h = torch.tanh(1.3 * x.repeat(1, out_channels // x.shape[1], 1, 1))
        return 0.8 * h * torch.cos(t / 37) + 0.05 * torch.sin(t)
    return model


def cond_fn(x: Tensor, t: Tensor, **kwargs: Any) -> Tensor:
    """A classifier gradient stand-in, also depending on t."""
    return 0.3 * torch.sin(3 * x) * (1 + t.to(x.dtype).view(-1, 1, 1, 1) / 500)


def _ours(flags: dict[str, Any], dtype: torch.dtype) -> D.GaussianDiffusion:
    diffusion = gd.diffusion_from_flags(flags)
    diffusion.dtype = dtype
    return diffusion


@pytest.mark.parametrize("seed", range(60))
def test_diffusion_maths_equal_the_reference(script_util: Any,
                                             seed: int) -> None:
    flags = diffusion_flags(seed)
    ref = script_util.create_gaussian_diffusion(
        steps=flags["diffusion_steps"],
        **{k: v for k, v in flags.items() if k != "diffusion_steps"})
    ours32, ours64 = _ours(flags, torch.float32), _ours(flags, torch.float64)
    n, steps = ours32.num_timesteps, flags["diffusion_steps"]
    assert n == ref.num_timesteps
    shown = torch.tensor(ref.timestep_map)
    if flags["rescale_timesteps"]:
        shown = shown.float() * (1000.0 / steps)
    assert torch.equal(ours32.model_timesteps(torch.arange(n)), shown)

    model = toy_model(6 if flags["learn_sigma"] else 3)
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(6, 3, 4, 4, generator=g) * 2 - 1
    x = torch.randn(6, 3, 4, 4, generator=g)
    noise = torch.randn(6, 3, 4, 4, generator=g)
    t = torch.randint(0, n, (6,), generator=g)
    t[:2] = torch.tensor([0, n - 1])
    kw = {"model_kwargs": {}}

    def both(fn: Callable[[D.GaussianDiffusion, torch.dtype], Any]) -> Any:
        return fn(ours32, torch.float32), fn(ours64, torch.float64)

    q: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
    pmv = both(lambda d, f: d.p_mean_variance(model, x.to(f), t))
    pmv_ref = ref.p_mean_variance(model, x, t, **kw)
    for key in ("mean", "variance", "log_variance", "pred_xstart"):
        q[f"p_{key}"] = (pmv[0][key], pmv[1][key], pmv_ref[key])
    losses = both(lambda d, f: D.training_losses(
        d, model, x0.to(f), t, noise=noise.to(f)))
    losses_ref = ref.training_losses(model, x0, t, noise=noise, **kw)
    # The reference's vb is the term its loss adds: lambda T L_t.
    weight = (n / 1000 if flags["rescale_learned_sigmas"]
              and not flags["use_kl"] else 1)
    q["loss"] = (losses[0]["loss"], losses[1]["loss"], losses_ref["loss"])
    if "vb" in losses_ref:
        q["vb"] = (weight * losses[0]["vb"], weight * losses[1]["vb"],
                   losses_ref["vb"])
    for guide in (None, cond_fn):
        torch.manual_seed(0)  # the reference draws its noise inside
        step_ref = ref.p_sample(model, x, t, cond_fn=guide, **kw)
        torch.manual_seed(0)
        z = torch.randn_like(x)  # that draw
        step = both(lambda d, f, guide=guide, z=z: D.p_sample(
            d, model, x.to(f), t, cond_fn=guide, noise=z.to(f)))
        q[f"p_sample, guided {guide is not None}"] = (
            step[0]["sample"], step[1]["sample"], step_ref["sample"])
        torch.manual_seed(0)
        ddim_ref = ref.ddim_sample(model, x, t, cond_fn=guide, eta=0.5, **kw)
        ddim = both(lambda d, f, guide=guide, z=z: D.ddim_sample(
            d, model, x.to(f), t, cond_fn=guide, eta=0.5, noise=z.to(f)))
        q[f"ddim_sample, guided {guide is not None}"] = (
            ddim[0]["sample"], ddim[1]["sample"], ddim_ref["sample"])
    if n <= 100:  # the whole bound: n evaluations
        torch.manual_seed(1)
        bound_ref = ref.calc_bpd_loop(model, x0, **kw)
        torch.manual_seed(1)  # the same noise at every step
        bounds = [D.calc_bpd_loop(ours32, model, x0)]
        draw = torch.randn_like
        with pytest.MonkeyPatch.context() as patch:
            # float64 normals from a seed are other numbers: draw float32.
            patch.setattr(torch, "randn_like",
                          lambda y: draw(y, dtype=torch.float32).to(y.dtype))
            torch.manual_seed(1)
            bounds.append(D.calc_bpd_loop(ours64, model, x0.double()))
        for key in ("total_bpd", "vb", "mse"):
            q[f"bpd {key}"] = (bounds[0][key], bounds[1][key],
                               bound_ref[key])
    assert_parity(q)


def network_flags(seed: int) -> tuple[str, dict[str, Any]]:
    """A random network of the reference: its kind and its flags."""
    rng = random.Random(seed)
    kind = ["model", "classifier", "upsampler"][seed % 3]
    if kind == "classifier":  # 64 channels a head, fixed by the reference
        return kind, {
            "image_size": 64, "classifier_width": 64,
            "classifier_depth": rng.choice([1, 2]),
            "classifier_attention_resolutions": rng.choice(
                ["32,16,8", "16,8", "8"]),
            "classifier_use_scale_shift_norm": rng.random() < 0.5,
            "classifier_resblock_updown": rng.random() < 0.5,
            "classifier_pool": rng.choice(
                ["adaptive", "attention", "spatial", "spatial_v2"])}
    flags = {
        "num_channels": rng.choice([32, 64]),
        "num_res_blocks": rng.choice([1, 2]),
        "num_heads": rng.choice([1, 2, 4]),
        "num_head_channels": rng.choice([-1, 32]),
        "num_heads_upsample": rng.choice([-1, 1, 2]),
        "use_scale_shift_norm": rng.random() < 0.6,
        "resblock_updown": rng.random() < 0.5,
        "learn_sigma": rng.random() < 0.5,
        "class_cond": rng.random() < 0.5,
        "attention_resolutions": rng.choice(["16", "16,8", "32,16,8"])}
    if kind == "upsampler":  # the reference's 64x64 channel_mult
        return kind, {**flags, "large_size": 64,
                      "small_size": rng.choice([16, 32])}
    size = rng.choice([32, 64])
    mult = rng.choice(["1,2", "1,1,2", "1,2,2,2"] if size == 32
                      else ["", "1,2,2"])
    return kind, {**flags, "image_size": size, "channel_mult": mult,
                  "use_new_attention_order": rng.random() < 0.5}


def reference_network(script_util: Any, kind: str,
                      flags: dict[str, Any]) -> torch.nn.Module:
    """The reference's network of `kind`, from its builders' defaults."""
    if kind == "classifier":
        return script_util.create_classifier(
            **{**script_util.classifier_defaults(), **flags})
    if kind == "upsampler":
        options = script_util.sr_model_and_diffusion_defaults()
        builder = script_util.sr_create_model
    else:
        options = script_util.model_and_diffusion_defaults()
        builder = script_util.create_model
    names = builder.__code__.co_varnames[:builder.__code__.co_argcount]
    return builder(**{k: v for k, v in {**options, **flags}.items()
                      if k in names})


@pytest.mark.parametrize("seed", range(9))
def test_networks_equal_the_reference(script_util: Any, seed: int) -> None:
    kind, flags = network_flags(seed)
    ref = reference_network(script_util, kind, flags).eval()
    ours = gd.BUILDERS[kind](flags).eval()
    g = torch.Generator().manual_seed(seed)
    # Perturbed: the zero-initialised output layers would hide the rest.
    state = {k: v + 0.05 * torch.randn(v.shape, generator=g)
             if v.is_floating_point() else v
             for k, v in ref.state_dict().items()}
    ref.load_state_dict(state)
    ours.load_state_dict(state)
    size = flags.get("large_size") or flags["image_size"]
    x = torch.randn(2, 3, size, size, generator=g)
    t = torch.rand(2, generator=g) * 1000  # rescaled steps are floats
    kwargs: dict[str, Tensor] = {}
    if flags.get("class_cond"):
        kwargs["y"] = torch.randint(0, gd.NUM_CLASSES, (2,), generator=g)
    if kind == "upsampler":
        small = flags["small_size"]
        kwargs["low_res"] = torch.randn(2, 3, small, small, generator=g)
    with torch.no_grad():
        out_ref = ref(x, t, **kwargs)
        out32 = ours(x, t, **kwargs)
        out64 = ours.double()(x.double(), t.double(), **{
            k: v.double() if v.is_floating_point() else v
            for k, v in kwargs.items()})
    assert_parity({kind: (out32, out64, out_ref)})
