"""adm_lib.objectives (chapter 4): the terms a training step minimises,
from the step's draws."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from adm_lib import batches as bt
from adm_lib import config as cf
from adm_lib import objectives as ob
from adm_lib import train as tr
from adm_lib.diffusion import UniformSampler
from adm_lib.models import load_run
from tests.helpers import assert_same, config

pytestmark = pytest.mark.usefixtures("one_thread")


def test_augmented_upsampler_trains_on_noised_inputs(data, tmp_path):
    """low_res_noise: each image's low-res input noised to its own drawn
    step s <= S (seeded), the network told s; it learns the level's MLP."""
    c = config(data, "upsampler", steps=1, low_res_noise=30)
    shape = (1, c.image_size, c.image_size)
    sampler = UniformSampler(c.diffusion_steps)
    draws = bt.draw_step(c, sampler, 7, shape, torch.device("cpu"))
    again = bt.draw_step(c, sampler, 7, shape, torch.device("cpu"))
    assert_same(vars(draws), vars(again))
    assert draws.low_res_noise.shape == (c.batch_size, 1, c.small_size,
                                         c.small_size)
    assert 0 <= draws.low_res_t.min() and draws.low_res_t.max() <= 30
    assert len(set(draws.low_res_t.tolist())) > 1  # one draw per image
    # Without augmentation the other draws are the same numbers.
    plain = bt.draw_step(config(data, "upsampler", steps=1), sampler, 7,
                         shape, torch.device("cpu"))
    torch.testing.assert_close(draws.noise, plain.noise, rtol=0, atol=0)
    assert plain.low_res_noise.numel() == 0
    out = tmp_path / "run"
    tr.train(c, out, progress=False)
    run = load_run(out)
    assert run.config.low_res_noise == 30
    assert hasattr(run.model, "low_res_embed")
    seen = {}

    def spy(model, x, t, low_res, y=None, low_res_t=None):
        seen.update(low_res=low_res, low_res_t=low_res_t)
        return model(x, t, low_res, y, low_res_t)

    x = torch.rand(c.batch_size, *shape) * 2 - 1
    y = torch.zeros(c.batch_size, dtype=torch.long)
    model = run.model
    ob.diffusion_terms(c, run.diffusion,
                    lambda *a, **k: spy(model, *a, **k), x, y, draws)
    clean = F.interpolate(x, c.small_size, mode="area")
    torch.testing.assert_close(seen["low_res_t"], draws.low_res_t)
    torch.testing.assert_close(seen["low_res"], run.diffusion.q_sample(
        clean, draws.low_res_t, draws.low_res_noise))
    with pytest.raises(ValueError, match="low_res_t"):
        model(x, torch.zeros(c.batch_size), clean, y)  # level not given
    for kind, level, message in [("diffusion", 5, "upsampler's setting"),
                                 ("upsampler", -1, "low_res_noise=-1"),
                                 ("upsampler", 50, "diffusion_steps - 1")]:
        with pytest.raises(cf.TrainError, match=message):
            config(data, kind, low_res_noise=level)
