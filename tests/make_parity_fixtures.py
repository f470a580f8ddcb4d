"""More parity fixtures, made by a local checkout of the reference.

The fixtures in ../shared/reference/guided_diffusion have one schedule
(cosine, T = 1000) and friendly timesteps. This script makes others in the
same format with the reference's own code, so that the parity tests can be
run where float32 is hardest on them:

    b  linear, T = 1000, unconditional, t = 0, 998, 999 (T - 1), ddim7
    c  cosine, T = 4000, class-conditional, t up to 3999, 35 respaced steps
    d  linear, T = 100, fixed variance (no learned sigma), ddim25

plus respacing specs the shared fixtures lack (21, 35, 39, ddim7, ddim13,
1,3,999 at T = 4000, a section of 1). Usage, with the reference fetched into
the ignored folder reference/ (never committed):

    python -m tests.make_parity_fixtures reference build/fixtures
    ADM_REFERENCE_FIXTURES=$PWD/build/fixtures pytest -m parity
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from tests.reference import parse_flags

MODEL = ("--image_size 64 --num_channels 32 --num_res_blocks 1 --channel_mult "
         "1,2,2 --attention_resolutions 16,8 --num_head_channels 16 "
         "--resblock_updown True --use_scale_shift_norm True --dropout 0.0")
CLASSIFIER = ("--image_size 64 --classifier_width 64 --classifier_depth 1 "
              "--classifier_attention_resolutions 16,8 "
              "--classifier_use_scale_shift_norm True "
              "--classifier_resblock_updown True --classifier_pool attention")
# tag: extra model flags, training t, sampling respacing, spaced step t,
# respacing specs to record
FIXTURES = {
    "b": ("--learn_sigma True --class_cond False --diffusion_steps 1000 "
          "--noise_schedule linear", [0, 998, 999], "ddim7", [0, 6, 3],
          [("21", 1000), ("35", 1000), ("ddim7", 1000), ("1,3,999", 4000),
           ("7,1", 13)]),
    "c": ("--learn_sigma True --class_cond True --diffusion_steps 4000 "
          "--noise_schedule cosine", [1, 2500, 3999], "35", [34, 33, 0],
          [("39", 4000), ("ddim13", 4000), ("4000", 4000)]),
    "d": ("--learn_sigma False --class_cond True --diffusion_steps 100 "
          "--noise_schedule linear", [0, 50, 99], "ddim25", [24, 12, 0],
          [("23", 100), ("3,4", 100)]),
}


def _arguments(flags: str, defaults: dict[str, Any]) -> dict[str, Any]:
    """The reference's keyword arguments: its defaults, then the flags."""
    args = dict(defaults)
    for name, value in parse_flags(flags).items():
        kind = type(defaults[name])
        args[name] = value == "True" if kind is bool else kind(value)
    return args


def _perturbed(module: torch.nn.Module, g: torch.Generator) -> torch.nn.Module:
    """Random weights, zero-initialised layers included, in eval mode."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return module.eval()


@contextmanager
def _fixed_noise(noise: torch.Tensor) -> Iterator[None]:
    """The reference's p_sample draws randn_like: make it return `noise`."""
    original = torch.randn_like
    torch.randn_like = lambda x, **_: noise.clone()
    try:
        yield
    finally:
        torch.randn_like = original


def make(su: Any, gd: Any, space_timesteps: Any, tag: str, out: Path,
         seed: int) -> None:
    """Write unet_, classifier_ and diffusion_<tag>.pt into `out`."""
    extra, ts, spacing, step_t, respacings = FIXTURES[tag]
    flags = f"{MODEL} {extra}"
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    defaults = su.model_and_diffusion_defaults()
    margs = _arguments(flags, defaults)
    model, _ = su.create_model_and_diffusion(**margs)
    model = _perturbed(model, g)
    cargs = _arguments(CLASSIFIER, su.classifier_defaults())
    classifier = _perturbed(su.create_classifier(**cargs), g)

    def diffusion(respacing: str) -> Any:
        return su.create_gaussian_diffusion(
            steps=margs["diffusion_steps"], learn_sigma=margs["learn_sigma"],
            noise_schedule=margs["noise_schedule"],
            timestep_respacing=respacing)

    shape = (3, 3, margs["image_size"], margs["image_size"])
    x_start = torch.rand(shape, generator=g) * 2 - 1
    noise = torch.randn(shape, generator=g)
    t = torch.tensor(ts)
    y = (torch.randint(0, 1000, (3,), generator=g) if margs["class_cond"]
         else None)
    kwargs = {} if y is None else {"y": y}
    x = torch.randn(shape, generator=g)
    with torch.no_grad():
        output = model(x, t, **kwargs)
    torch.save({"flags": flags, "state_dict": model.state_dict(), "x": x,
                "t": t, "y": y, "output": output}, out / f"unet_{tag}.pt")
    with torch.no_grad():
        logits = classifier(x, t)
    torch.save({"flags": CLASSIFIER, "state_dict": classifier.state_dict(),
                "x": x, "t": t, "output": logits},
               out / f"classifier_{tag}.pt")

    fixture: dict[str, Any] = {"schedule": margs["noise_schedule"]}
    for name, steps in [("linear", 1000), ("cosine", 1000), ("linear", 4000),
                        ("cosine", 50), ("cosine", 37)]:
        fixture[f"betas_{name}_{steps}"] = torch.tensor(
            gd.get_named_beta_schedule(name, steps))
    for spec, steps in respacings:
        fixture[f"respace_{spec}_{steps}"] = torch.tensor(
            sorted(space_timesteps(steps, spec)))
    base = diffusion("")
    with torch.no_grad():
        x_t = base.q_sample(x_start, t, noise)
        terms = base.training_losses(model, x_start, t, kwargs, noise)
        p = base.p_mean_variance(model, x_t, t, clip_denoised=True,
                                 model_kwargs=kwargs)
        mean, variance, log_variance = base.q_posterior_mean_variance(
            x_start, x_t, t)
    fixture.update(
        x_start=x_start, noise=noise, t=t, y=y, x_t=x_t, **terms,
        p_mean=p["mean"], p_variance=p["variance"],
        p_log_variance=p["log_variance"], pred_xstart=p["pred_xstart"],
        q_posterior_mean=mean, q_posterior_variance=variance,
        q_posterior_log_variance_clipped=log_variance)

    scale, guide_y = 3.0, torch.randint(0, 1000, (3,), generator=g)

    def cond_fn(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor
                ) -> torch.Tensor:
        # As the reference's scripts/classifier_sample.py.
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            log_probs = F.log_softmax(classifier(x_in, t), dim=-1)
            chosen = log_probs[range(len(log_probs)), y.view(-1)]
            return torch.autograd.grad(chosen.sum(), x_in)[0] * scale

    def model_fn(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor
                 ) -> torch.Tensor:
        return model(x, t, y if margs["class_cond"] else None)

    spaced = diffusion(spacing)
    x_T = torch.randn(shape, generator=g)
    guide = {"y": guide_y}
    plain = spaced.ddim_sample_loop(model_fn, shape, noise=x_T,
                                    model_kwargs=guide, device="cpu")
    guided = spaced.ddim_sample_loop(model_fn, shape, noise=x_T,
                                     model_kwargs=guide, cond_fn=cond_fn,
                                     device="cpu")
    step_x = torch.randn(shape, generator=g)
    step_noise = torch.randn(shape, generator=g)
    with _fixed_noise(step_noise):
        step = spaced.p_sample(model_fn, step_x, torch.tensor(step_t),
                               clip_denoised=True, cond_fn=cond_fn,
                               model_kwargs=guide)
    fixture.update(
        guidance_scale=scale, guide_y=guide_y, ddim_respacing=spacing,
        x_T=x_T, ddim_eta0=plain, ddim_eta0_guided=guided,
        ddpm_step_t=torch.tensor(step_t), ddpm_step_x=step_x,
        ddpm_step_noise=step_noise, ddpm_step_guided_sample=step["sample"],
        ddpm_step_guided_pred_xstart=step["pred_xstart"])
    torch.save(fixture, out / f"diffusion_{tag}.pt")
    print(f"wrote {out}/{{unet,classifier,diffusion}}_{tag}.pt")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("reference", type=Path,
                        help="a checkout of openai/guided-diffusion")
    parser.add_argument("out", type=Path, help="the fixtures' folder")
    args = parser.parse_args()
    sys.path.insert(0, str(args.reference.resolve()))
    from guided_diffusion import gaussian_diffusion as gd
    from guided_diffusion import script_util as su
    from guided_diffusion.respace import space_timesteps

    args.out.mkdir(parents=True, exist_ok=True)
    for seed, tag in enumerate(FIXTURES, 1):
        make(su, gd, space_timesteps, tag, args.out, seed)


if __name__ == "__main__":
    main()
