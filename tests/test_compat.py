"""adm_lib.compat.guided_diffusion: the reference's flags and checkpoints."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torch import Tensor

from adm_lib.compat import guided_diffusion as gd
from adm_lib.diffusion import p_sample
from adm_lib.unet import EncoderUNetModel, SuperResModel, UNetModel
from tests.reference import (
    FIXTURES,
    ROOT,
    assert_parity,
    load,
    reference_files,
)

CHECKOUT = Path(os.environ.get("ADM_REFERENCE_CHECKOUT", ROOT / "reference"))

TINY = ("--image_size 32 --num_channels 32 --num_res_blocks 1 "
        "--channel_mult 1,2 --attention_resolutions 16 --num_heads 2")
TINY_CLASSIFIER = ("--image_size 64 --classifier_width 32 "
                   "--classifier_depth 1 --classifier_attention_resolutions 8")


def check_parity(model: torch.nn.Module, data: dict, *args) -> None:
    """Load the fixture's weights; the eval output, float32 and float64,
    against the fixture by the error model of tests/reference.py."""
    gd.load_reference_state_dict(model, data["state_dict"])
    model.eval()
    outs = []
    for dtype in (torch.float32, torch.float64):
        inputs = [a.to(dtype) if isinstance(a, torch.Tensor)
                  and a.is_floating_point() else a for a in args]
        with torch.no_grad():
            outs.append(model.to(dtype)(*inputs))
    assert_parity({"output": (*outs, data["output"])})


@pytest.mark.parity
@pytest.mark.parametrize("path", reference_files("unet_*.pt"))
def test_unet_parity(path: Path) -> None:
    data = load(path)
    model = gd.model_from_flags(data["flags"])
    check_parity(model, data, data["x"], data["t"], data.get("y"))


@pytest.mark.parity
@pytest.mark.parametrize("path", reference_files("classifier_*.pt"))
def test_classifier_parity(path: Path) -> None:
    data = load(path)
    model = gd.classifier_from_flags(data["flags"])
    check_parity(model, data, data["x"], data["t"])


@pytest.mark.parity
@pytest.mark.parametrize("path", reference_files("upsampler_*.pt"))
def test_upsampler_parity(path: Path) -> None:
    data = load(path)
    model = gd.upsampler_from_flags(data["flags"])
    check_parity(
        model, data, data["x"], data["t"], data["low_res"], data.get("y")
    )


def _upsampler_step(data: dict, network, dtype: torch.dtype,
                    noise: Tensor) -> dict[str, Tensor]:
    """One ancestral step of the fixture's upsampler from its x at its t."""
    diffusion = gd.diffusion_from_flags(data["flags"])
    diffusion.dtype = dtype
    kwargs = {"low_res": data["low_res"].to(dtype), "y": data["y"]}
    with torch.no_grad():
        step = p_sample(diffusion, network, data["x"].to(dtype), data["t"],
                        model_kwargs=kwargs, noise=noise.to(dtype))
    return {"sample": step["sample"], "pred_xstart": step["pred_xstart"]}


@pytest.mark.parity
@pytest.mark.parametrize("path", reference_files("upsampler_*.pt"))
def test_upsampler_reverse_step_parity(path: Path) -> None:
    """A reverse step with the low_res kwarg, against the reference's.

    The fixture holds the reference network's output, not its step: its
    step is that output through the diffusion maths in float64 (the maths
    equal the reference's by tests/test_diffusion.py), against ours in
    float32 and float64 by the error model of tests/reference.py.
    """
    data = load(path)
    model = gd.upsampler_from_flags(data["flags"])
    gd.load_reference_state_dict(model, data["state_dict"])
    model.eval()
    noise = torch.randn(data["x"].shape,
                        generator=torch.Generator().manual_seed(0))

    def recorded(x: Tensor, t: Tensor, low_res: Tensor,
                 y: Tensor | None = None) -> Tensor:
        # The kwarg passed on untouched: bit for bit.
        torch.testing.assert_close(low_res, data["low_res"].to(x.dtype),
                                   rtol=0, atol=0)
        return data["output"].to(x.dtype)

    ref = _upsampler_step(data, recorded, torch.float64, noise)
    ours32 = _upsampler_step(data, model.float(), torch.float32, noise)
    ours64 = _upsampler_step(data, model.double(), torch.float64, noise)
    assert_parity({k: (ours32[k], ours64[k], ref[k]) for k in ref})


@pytest.mark.parity
@pytest.mark.skipif(not (CHECKOUT / "guided_diffusion").is_dir(),
                    reason=f"no checkout of the reference at {CHECKOUT} "
                    "(set ADM_REFERENCE_CHECKOUT)")
@pytest.mark.parametrize("path", reference_files("upsampler_*.pt"))
def test_upsampler_step_equals_the_reference_code(path: Path) -> None:
    """The same step run by the reference's own SuperResModel and p_sample,
    in one process (a local checkout, never committed)."""
    from adm_lib.bench import _import_reference

    data = load(path)
    script_util = _import_reference(CHECKOUT)["script_util"]
    f = gd.parse_flags(data["flags"])
    names = script_util.sr_model_and_diffusion_defaults()
    theirs, diffusion = script_util.sr_create_model_and_diffusion(
        **{k: f[k] for k in names})
    theirs.load_state_dict(data["state_dict"])
    theirs.eval()
    kwargs = {"low_res": data["low_res"], "y": data["y"]}
    torch.manual_seed(0)  # its p_sample draws its noise as randn_like(x)
    with torch.no_grad():
        step = diffusion.p_sample(theirs, data["x"], data["t"],
                                  model_kwargs=kwargs)
    torch.manual_seed(0)
    noise = torch.randn_like(data["x"])
    model = gd.upsampler_from_flags(data["flags"])
    gd.load_reference_state_dict(model, data["state_dict"])
    model.eval()
    ours32 = _upsampler_step(data, model.float(), torch.float32, noise)
    ours64 = _upsampler_step(data, model.double(), torch.float64, noise)
    assert_parity({k: (ours32[k], ours64[k], step[k]) for k in ours32})


def official_models() -> list:
    """pytest params, one per entry of official_models.json, or one skip."""
    path = FIXTURES / "official_models.json"
    if not path.is_file():
        reason = f"no {path} (set ADM_REFERENCE_FIXTURES)"
        return [pytest.param(None, None, id="official_models.json",
                             marks=pytest.mark.skip(reason))]
    entries = json.loads(path.read_text())
    return [pytest.param(name, entry, id=name)
            for name, entry in entries.items()]


@pytest.mark.parity
@pytest.mark.parametrize("name,entry", official_models())
def test_official_model_sizes(name: str, entry: dict) -> None:
    with torch.device("meta"):
        model = gd.BUILDERS[entry["kind"]](entry["flags"])
    assert sum(p.numel() for p in model.parameters()) == entry["params"]
    assert len(model.state_dict()) == entry["state_dict_entries"]
    kind, flags = gd.RELEASED[name]  # the table the chapters show
    assert gd.parse_flags(flags) == gd.parse_flags(entry["flags"])
    assert gd.BUILDERS[kind] is gd.BUILDERS[entry["kind"]]


def test_parse_flags_types_and_defaults() -> None:
    flags = gd.parse_flags(
        "--image_size 128 --class_cond True --learn_sigma false "
        "--dropout 0.1 --attention_resolutions 32,16,8 --use_fp16=True"
    )
    assert flags["image_size"] == 128 and flags["class_cond"] is True
    assert flags["learn_sigma"] is False and flags["dropout"] == 0.1
    assert flags["attention_resolutions"] == "32,16,8"
    assert flags["use_fp16"] is True
    assert flags["num_heads"] == 4 and flags["classifier_pool"] == "attention"
    assert gd.parse_flags({"num_channels": "64", "class_cond": "1",
                           "attention_resolutions": (16, 8)}) == (
        gd.parse_flags("--num_channels 64 --class_cond True "
                       "--attention_resolutions 16,8"))


@pytest.mark.parametrize(
    "flags,message",
    [
        ("--num_chanels 64", "did you mean --num_channels"),
        ({"clas_cond": True}, "did you mean --class_cond"),
        ("--num_channels", "has no value"),
        ("image_size 64", "expected a --flag"),
        ("--class_cond maybe", "expects True or False"),
        ("--num_channels 1.5", "expects int"),
    ],
)
def test_parse_flags_errors(flags, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        gd.parse_flags(flags)


def test_builders_follow_the_reference() -> None:
    with torch.device("meta"):
        model = gd.model_from_flags("--image_size 64 --learn_sigma True "
                                    "--class_cond True")
        clf = gd.classifier_from_flags("--image_size 128")
        sr = gd.upsampler_from_flags("--large_size 64 --small_size 32")
    assert isinstance(model, UNetModel) and model.out_channels == 6
    assert model.channel_mult == (1, 2, 3, 4)
    assert model.attention_resolutions == (4, 8)  # 16,8 at 64
    assert model.label_emb.num_embeddings == gd.NUM_CLASSES
    assert isinstance(clf, EncoderUNetModel) and clf.out_channels == 1000
    assert isinstance(sr, SuperResModel) and sr.in_channels == 6
    with pytest.raises(ValueError, match="--channel_mult"):
        gd.model_from_flags("--image_size 48")


@pytest.mark.parametrize(
    "ckpt_flags,model_flags,flag",
    [
        (" --class_cond True", "", "--class_cond True"),
        ("", " --class_cond True", "--class_cond False"),
        (" --learn_sigma True", "", "--learn_sigma True"),
        ("", " --use_scale_shift_norm False", "--use_scale_shift_norm True"),
        (" --resblock_updown True", "", "--resblock_updown True"),
        ("", " --resblock_updown True", "--resblock_updown False"),
        (" --num_res_blocks 2", "", "--num_res_blocks"),
        (" --attention_resolutions 32,16", "", "--attention_resolutions"),
    ],
)
def test_mismatch_names_the_flag(ckpt_flags, model_flags, flag) -> None:
    state = gd.model_from_flags(TINY + ckpt_flags).state_dict()
    model = gd.model_from_flags(TINY + model_flags)
    with pytest.raises(ValueError, match="likely wrong") as err:
        gd.load_reference_state_dict(model, state)
    assert flag in str(err.value), str(err.value)


def test_width_mismatch_names_the_checkpoint_width() -> None:
    state = gd.model_from_flags(TINY.replace("32 --num_res", "64 --num_res"))
    model = gd.model_from_flags(TINY)
    with pytest.raises(ValueError, match="--num_channels 64") as err:
        gd.load_reference_state_dict(model, state.state_dict())
    assert "mis-shaped" in str(err.value)


def test_classifier_mismatch_uses_classifier_flags() -> None:
    state = gd.classifier_from_flags(
        TINY_CLASSIFIER + " --classifier_pool adaptive").state_dict()
    model = gd.classifier_from_flags(TINY_CLASSIFIER)
    with pytest.raises(ValueError, match="--classifier_pool adaptive"):
        gd.load_reference_state_dict(model, state)
    state = gd.classifier_from_flags(
        TINY_CLASSIFIER + " --classifier_use_scale_shift_norm False"
    ).state_dict()
    with pytest.raises(ValueError,
                       match="--classifier_use_scale_shift_norm False"):
        gd.load_reference_state_dict(model, state)


def test_load_checkpoint(tmp_path: Path) -> None:
    source = gd.model_from_flags(TINY)
    for p in source.parameters():
        torch.nn.init.normal_(p)
    plain, wrapped = tmp_path / "plain.pt", tmp_path / "wrapped.pt"
    torch.save(source.state_dict(), plain)
    torch.save({"flags": TINY, "state_dict": source.state_dict()}, wrapped)
    for path in (plain, wrapped):
        model = gd.load_checkpoint(path, TINY)
        assert not model.training
        for key, value in source.state_dict().items():
            assert torch.equal(model.state_dict()[key], value)
    with pytest.raises(ValueError, match=r"(?s)plain.pt.*--class_cond"):
        gd.load_checkpoint(plain, TINY + " --class_cond True")
    with pytest.raises(ValueError, match="unknown kind"):
        gd.load_checkpoint(plain, TINY, kind="vae")


def test_load_checkpoint_missing_and_corrupt_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"(?s)nothere.pt.*put it there"):
        gd.load_checkpoint(tmp_path / "nothere.pt", TINY)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"(?s)cannot read checkpoint.*corrupt"):
        gd.load_checkpoint(corrupt, TINY)
    odd = tmp_path / "odd.pt"
    torch.save({"step": 3}, odd)
    with pytest.raises(ValueError, match="odd.pt does not hold"):
        gd.load_checkpoint(odd, TINY)


@pytest.mark.parametrize(("size", "mult", "given", "kept"), [
    (64, "1,2,2", "16,8", "16"), (32, "1,2", "32,16,8,4", "32,16"),
    (32, "1", "64,16", ""), (64, "1,2,3,4", "64,32,16,8", "64,32,16,8"),
])
def test_resolutions_no_level_has_add_nothing_as_in_the_reference(
        size: int, mult: str, given: str, kept: str) -> None:
    """The reference skips them, and its checkpoints built so load; the
    classifier's flag alike. (UNetModel itself refuses such factors.)"""
    base = {"image_size": size, "channel_mult": mult, "num_channels": 32,
            "classifier_width": 64, "classifier_depth": 1}
    builds = {"attention_resolutions": gd.model_from_flags,
              "classifier_attention_resolutions": gd.classifier_from_flags}
    with torch.device("meta"):
        for flag, build in builds.items():
            got = build({**base, flag: given})
            want = build({**base, flag: kept})
            assert ({k: v.shape for k, v in got.state_dict().items()}
                    == {k: v.shape for k, v in want.state_dict().items()})
            assert got.attention_resolutions == want.attention_resolutions


def test_no_attention_resolutions_leaves_only_the_middle_blocks():
    # "" passes validation (no attention at any resolution): the builder
    # must agree.
    model = gd.model_from_flags({"image_size": 32, "channel_mult": "1,2",
                                 "attention_resolutions": "",
                                 "num_channels": 32})
    names = [type(m).__name__ for m in model.modules()]
    assert names.count("AttentionBlock") == 1  # the middle block's, always
