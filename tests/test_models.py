"""adm_lib.models (chapter 4): a trained model loaded from a run folder or
a checkpoint file, today's runs and those of older formats."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch

from adm_lib import checkpoints as ck
from adm_lib import config as cf
from adm_lib import train as tr
from adm_lib.models import TrainedModel, load_run
from adm_lib.unet import EncoderUNetModel, UNetModel
from tests.helpers import RESUMABLE, ROOT, assert_same, config, steps_of, weights

pytestmark = pytest.mark.usefixtures("one_thread")


def test_classifier_run(data, tmp_path):
    out = tmp_path / "run"
    tr.train(config(data, "classifier", steps=2, ema_rate="0.9999,0.99"), out,
             progress=False)
    records = ck.read_metrics(out)
    train_records = [r for r in records if "acc@1" in r]
    evals = [r for r in records if "val_acc@1" in r]
    assert [r["step"] for r in train_records] == [1, 2]
    assert [r["step"] for r in evals] == [2]
    for key in ("val_loss", "val_acc@1", "val_acc@5", "ema_val_acc@1",
                "ema_val_acc@5"):
        assert 0 <= evals[0][key] and np.isfinite(evals[0][key])
    assert 0 <= evals[0]["val_acc@1"] <= evals[0]["val_acc@5"] == 1.0  # 4 classes
    assert not (out / "samples" / "step_00000002.png").exists()

    saved = ck.read_checkpoint(ck.checkpoint_path(out, 2))
    run = load_run(out)
    assert isinstance(run.model, EncoderUNetModel)
    assert run.config == cf.TrainConfig(**saved["config"])
    assert run.step == 2 and run.path == ck.checkpoint_path(out, 2)
    assert not run.model.training
    assert_same(run.model.state_dict(), saved["ema"]["0.9999"])
    assert_same(weights(out, "model"), saved["model"])
    assert_same(weights(out, "0.99"), saved["ema"]["0.99"])
    assert_same(load_run(run.path, "0.9999").model.state_dict(),
                saved["ema"]["0.9999"])
    with pytest.raises(cf.TrainError, match="weights='0.5': .* has ema, model, "
                       "0.9999, 0.99"):
        load_run(out, "0.5")
    logits = run.model(torch.zeros(2, 1, 8, 8), torch.zeros(2))
    assert logits.shape == (2, 4)


def test_diffusion_run_loads_as_a_unet(reference):
    run = load_run(reference, "model")
    assert isinstance(run.model, UNetModel)
    assert run.diffusion.num_timesteps == RESUMABLE["diffusion_steps"]
    assert run.config.dropout == 0.1 and run.step == 6
    samples = reference / "samples"
    assert sorted(p.name for p in samples.iterdir()) == ["step_00000006.png"]


# --- a run folder of 2026-12-07 (tests/data/README.md) -------------------------
# Its config.json and its checkpoint's config hold the lists as strings
# ("1", "", "0.9999,0.99"), as adm train wrote them before TrainConfig's
# lists were typed. Its EMA network's output on fixed inputs was saved by
# the code that trained it.

OLD_RUN = ROOT / "tests" / "data" / "run_2026_12_07"
OLD_OUTPUT = ROOT / "tests" / "data" / "run_2026_12_07_output.pt"


def test_a_run_folder_with_string_lists_loads():
    stored = json.loads((OLD_RUN / "config.json").read_text())
    assert stored["channel_mult"] == "1"  # the old format, as committed
    run = load_run(OLD_RUN)
    assert isinstance(run, TrainedModel) and isinstance(run.model, UNetModel)
    assert (run.step, run.weights) == (1, "ema")
    c = run.config
    assert (c.channel_mult, c.attention_resolutions, c.ema_rate) == (
        (1,), (), (0.9999, 0.99))
    assert all(type(v) is tuple for v in (
        c.channel_mult, c.attention_resolutions, c.ema_rate,
        c.classifier_attention_resolutions))
    cf.validate(c)


def test_an_old_run_computes_what_it_computed_when_saved():
    saved = torch.load(OLD_OUTPUT, weights_only=True)
    run = load_run(OLD_RUN)
    with torch.no_grad():
        out = run.model(saved["x"], saved["t"], y=saved["y"])
    # The same float32 code on the CPU; another CPU or thread count sums in
    # another order, which moves an output by a few ulps (measured: 1.5 ulp,
    # 2.8e-9 at the outputs' scale 0.02, between 1 and 2 threads). 1e-5 of
    # the scale is about 80 ulps. Wrong weights move it by far more: the raw
    # weights, one Adam step from the EMA's, by 2e-3.
    scale = saved["out"].abs().max().item()
    torch.testing.assert_close(out, saved["out"], rtol=1e-5,
                               atol=1e-5 * scale)
    raw = load_run(OLD_RUN, "model").model(saved["x"], saved["t"],
                                           y=saved["y"])
    assert (raw - saved["out"]).abs().max() > 100 * 1e-5 * scale


def test_an_old_runs_other_ema_rate_loads():
    state = ck.read_checkpoint(ck.checkpoint_path(OLD_RUN, 1))
    assert list(state["ema"]) == ["0.9999", "0.99"]
    run = load_run(OLD_RUN, "0.99")
    assert run.weights == "0.99"
    assert_same(run.model.state_dict(), state["ema"]["0.99"])


def test_an_old_run_matches_its_own_config_on_resume():
    stored = json.loads((OLD_RUN / "config.json").read_text())
    typed = cf.config_from_dict(stored)
    assert tr.config_mismatch(stored, typed) == []
    # And a real change is still found, alone.
    assert tr.config_mismatch(stored, replace(typed, lr=1e-3)) == [
        "lr: checkpoint 0.0002, now 0.001"]


def test_an_old_run_resumes(data, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(OLD_RUN, out)
    stored = json.loads((out / "config.json").read_text())
    # Its data (mnist5k) swapped for the fixture's: data is a run field.
    c = replace(cf.config_from_dict(stored), data=str(data), steps=2,
                device="cpu")
    tr.train(c, out, resume=True, progress=False)
    assert steps_of(out) == [1, 2]
    assert [r["step"] for r in ck.read_metrics(out)] == [1, 2]
    assert load_run(out).config == c
    assert json.loads((out / "config.json").read_text())["channel_mult"] == [1]
