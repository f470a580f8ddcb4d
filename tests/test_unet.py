"""adm_lib.unet (chapter 3): the UNet, the classifier and the upsampler."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adm_lib.unet import (
    ABLATIONS,
    AttentionBlock,
    Downsample,
    EncoderUNetModel,
    QKVAttention,
    ResBlock,
    SuperResModel,
    UNetModel,
    Upsample,
    ablation_unet,
    normalization,
    timestep_embedding,
)

from .reference import EPS32, K_BF16, assert_parity, bf16_error

N, SIZE, WIDTH = 2, 16, 32


def unet(**overrides) -> UNetModel:
    """A tiny UNet; overrides change any option."""
    config = dict(
        image_size=SIZE, in_channels=3, model_channels=WIDTH, out_channels=6,
        num_res_blocks=1, attention_resolutions=(2,), channel_mult=(1, 2),
        num_head_channels=16, use_scale_shift_norm=True, resblock_updown=True,
    )
    return UNetModel(**{**config, **overrides})


@torch.no_grad()
def perturb(model: nn.Module, std: float = 0.05) -> nn.Module:
    """Noise on every parameter, so zero-initialised layers do something."""
    for p in model.parameters():
        p.add_(std * torch.randn_like(p))
    return model


def inputs(channels: int = 3, size: int = SIZE):
    x = torch.randn(N, channels, size, size)
    return x, torch.tensor([0, 999])


def test_timestep_embedding_values() -> None:
    emb = timestep_embedding(torch.tensor([0.0, 2.5]), 6)
    assert emb.shape == (2, 6) and emb.dtype == torch.float32
    assert torch.equal(emb[0], torch.tensor([1.0, 1, 1, 0, 0, 0]))

    def cosines(dtype: torch.dtype) -> torch.Tensor:
        freqs = torch.exp(-math.log(10000) * torch.arange(3, dtype=dtype) / 3)
        return torch.cos(2.5 * freqs)[None]

    # The formula in float32 and float64: the error model of tests/reference.py.
    assert_parity({"cos": (cosines(torch.float32), cosines(torch.float64),
                           emb[1:, :3])})
    assert timestep_embedding(torch.tensor([1]), 5)[0, -1] == 0


@pytest.mark.parametrize(
    "options",
    [
        dict(num_heads=2, num_head_channels=-1),
        dict(num_heads=4, num_head_channels=-1, num_heads_upsample=1),
        dict(attention_resolutions=()),
        dict(resblock_updown=False, conv_resample=False),
        dict(resblock_updown=False, conv_resample=True),
        dict(use_scale_shift_norm=False),
        dict(rescale_residual=True),
        dict(use_new_attention_order=True),
        dict(channel_mult=(1, 1, 2), attention_resolutions=(1, 2, 4)),
        dict(num_res_blocks=2, dropout=0.1),
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()),
)
def test_unet_shapes_for_odd_configs(options: dict) -> None:
    model = perturb(unet(**options))
    x, t = inputs()
    out = model(x, t)
    assert out.shape == (N, 6, SIZE, SIZE) and torch.isfinite(out).all()


def test_fresh_unet_predicts_zero_and_heads_follow_channels() -> None:
    model = unet()
    x, t = inputs()
    assert torch.all(model(x, t) == 0)
    attn = [m for m in model.modules() if isinstance(m, AttentionBlock)]
    assert attn and all(
        m.num_heads == m.qkv.in_channels // 16 for m in attn
    )
    with pytest.raises(ValueError, match="num_head_channels"):
        unet(num_head_channels=24)


def test_class_conditional_unet() -> None:
    model = perturb(unet(num_classes=5)).eval()
    x, t = inputs()
    y = torch.tensor([0, 4])
    assert model.label_emb.weight.shape == (5, 4 * WIDTH)
    # Other labels move the output by O(1), far beyond allclose's 1e-5.
    assert not torch.allclose(model(x, t, y), model(x, t, y.flip(0)))
    with pytest.raises(ValueError, match="class-conditional"):
        model(x, t)
    with pytest.raises(ValueError, match="class-conditional"):
        unet()(x, t, y)


def test_residual_rescaling_changes_no_parameter() -> None:
    plain, scaled = unet(), unet(rescale_residual=True)
    assert {k: v.shape for k, v in plain.state_dict().items()} == {
        k: v.shape for k, v in scaled.state_dict().items()
    }
    block = ResBlock(32, 8, 0.0, rescale_residual=True)
    x = torch.randn(1, 32, 4, 4)
    # The zero output layer adds 0. x * 2^-0.5 rounds the constant and the
    # product, x / sqrt(2) the quotient: 1.5 eps32 apart at most.
    assert torch.allclose(block(x, torch.randn(1, 8)), x / math.sqrt(2),
                          rtol=2 * EPS32, atol=0)


def test_additive_and_adagn_embedding_widths() -> None:
    add = ResBlock(32, 8, 0.0, out_channels=64)
    ada = ResBlock(32, 8, 0.0, out_channels=64, use_scale_shift_norm=True)
    assert add.emb_layers[1].out_features == 64
    assert ada.emb_layers[1].out_features == 128
    assert isinstance(add.skip_connection, nn.Conv2d)
    assert ResBlock(32, 8, 0.0, 64, use_conv=True).skip_connection \
        .kernel_size == (3, 3)


def test_attention_orders_match_explicit_attention() -> None:
    heads, ch, length = 2, 8, 5
    qkv = torch.randn(N, length, 3 * heads * ch)

    def explicit(q, k, v):  # [N, T, heads, ch] each
        w = torch.einsum("bthc,bshc->bhts", q, k) / math.sqrt(ch)
        return torch.einsum("bhts,bshc->bthc", w.softmax(-1), v).flatten(2)

    def legacy(qkv):
        return explicit(*qkv.unflatten(-1, (heads, 3, ch)).unbind(-2))

    def new(qkv):
        return explicit(*qkv.unflatten(-1, (3, heads, ch)).unbind(-3))

    for order, formula in ((True, legacy), (False, new)):
        got = QKVAttention(heads, legacy_order=order)(qkv)
        # The explicit formula in float32 and float64: the error model of
        # tests/reference.py.
        assert_parity({"attention": (formula(qkv), formula(qkv.double()),
                                     got)})
    with pytest.raises(ValueError, match="qkv width"):
        QKVAttention(4)(torch.randn(1, 3, 30))


@pytest.mark.parametrize("legacy_order", [True, False])
def test_attention_block_matches_channels_first_reference(
        legacy_order: bool) -> None:
    # The reference's block: channels-first, the Conv1d modules called as
    # convolutions, heads split from the [N, 3C, T] qkv, same weights.
    heads, ch = 4, 8
    block = AttentionBlock(heads * ch, num_head_channels=ch,
                           use_new_attention_order=not legacy_order)
    nn.init.normal_(block.proj_out.weight)
    x = torch.randn(N, heads * ch, 3, 5)

    def reference(block: AttentionBlock, x: torch.Tensor) -> torch.Tensor:
        qkv = block.qkv(block.norm(x.flatten(2)))
        if legacy_order:
            q, k, v = qkv.reshape(N * heads, 3 * ch, -1).split(ch, dim=1)
        else:
            q, k, v = (t.reshape(N * heads, ch, -1) for t in qkv.chunk(3, 1))
        w = torch.einsum("bct,bcs->bts", q, k) / math.sqrt(ch)
        a = torch.einsum("bts,bcs->bct", w.softmax(-1), v)
        return x + block.proj_out(a.reshape(N, heads * ch, -1)).reshape(
            x.shape)

    # The reference's block in float32 and float64: the error model of
    # tests/reference.py.
    exact = reference(copy.deepcopy(block).double(), x.double())
    assert_parity({"block": (reference(block, x), exact, block(x))})


@pytest.mark.parametrize(("dims", "channels_last"),
                         [(1, False), (2, False), (3, False), (2, True)])
def test_upsample_is_nearest_interpolation(dims: int,
                                           channels_last: bool) -> None:
    x = torch.randn(N, 3, *(4, 5, 6)[:dims])
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    size = [2 * s for s in x.shape[2:]]
    if dims == 3:  # only the inner two are doubled
        size[0] = x.shape[2]
    got = Upsample(3, use_conv=False, dims=dims)(x)
    assert torch.equal(got, F.interpolate(x, size, mode="nearest"))
    assert got.is_contiguous(
        memory_format=torch.channels_last if channels_last
        else torch.contiguous_format)


@pytest.mark.parametrize("legacy_order", [True, False])
def test_attention_gives_sdpa_channels_adjacent_in_memory(
        monkeypatch: pytest.MonkeyPatch, legacy_order: bool) -> None:
    # The fused (flash, memory-efficient) kernels need last stride 1; with
    # another, SDPA falls back to the math kernel and its T x T matrix.
    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        seen.append([(t.shape, t.stride(-1)) for t in (q, k, v)])
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    heads, ch, side = 2, 16, 3
    block = AttentionBlock(heads * ch, num_head_channels=ch,
                           use_new_attention_order=not legacy_order)
    block(torch.randn(N, heads * ch, side, side))
    assert seen == [[((N, heads, side * side, ch), 1)] * 3]


@pytest.mark.parametrize("pool", ["adaptive", "attention", "spatial",
                                  "spatial_v2"])
def test_classifier_pools(pool: str) -> None:
    clf = perturb(EncoderUNetModel(
        SIZE, 3, WIDTH, 7, 1, (2,), channel_mult=(1, 2),
        num_head_channels=16, use_scale_shift_norm=True,
        resblock_updown=True, pool=pool,
    ))
    x, t = inputs()
    x.requires_grad_(True)
    logits = clf(x, t)
    assert logits.shape == (N, 7)
    (grad,) = torch.autograd.grad(logits[:, 0].sum(), x)
    assert grad.abs().sum() > 0


def test_classifier_rejects_unknown_pool_and_headless_attention() -> None:
    with pytest.raises(ValueError, match="unknown pool"):
        EncoderUNetModel(SIZE, 3, WIDTH, 7, 1, (), channel_mult=(1,),
                         pool="max")
    with pytest.raises(ValueError, match="num_head_channels"):
        EncoderUNetModel(SIZE, 3, WIDTH, 7, 1, (), channel_mult=(1,),
                         pool="attention")


def test_super_res_model_concatenates_upsampled_low_res() -> None:
    model = perturb(SuperResModel(
        SIZE, 3, WIDTH, 3, 1, (2,), channel_mult=(1, 2), num_heads=2,
        num_classes=3,
    )).eval()
    x, t = inputs()
    low = torch.randn(N, 3, SIZE // 2, SIZE // 2)
    y = torch.tensor([0, 2])
    out = model(x, t, low, y=y)
    assert out.shape == (N, 3, SIZE, SIZE)
    assert model.input_blocks[0][0].in_channels == 6
    # Another low_res moves the output by O(1), far beyond allclose's 1e-5.
    assert not torch.allclose(out, model(x, t, low.flip(-1), y=y))


def test_bfloat16_forward_matches_float32() -> None:
    torch.manual_seed(0)
    model = perturb(unet(num_classes=4)).eval()
    x, t = inputs()
    y = torch.tensor([1, 3])
    with torch.no_grad():
        ref = model(x, t, y)
        out = model.to(torch.bfloat16)(x.bfloat16(), t, y)
    assert out.dtype == torch.bfloat16
    # bf16 keeps 8 significant bits: the error model of tests/reference.py.
    bound = K_BF16 * bf16_error(model) * ref.abs().max()
    assert (out.float() - ref).abs().max() < bound


def test_float16_forward_where_supported() -> None:
    model = perturb(unet()).eval().half()
    x, t = inputs()
    try:
        with torch.no_grad():
            out = model(x.half(), t)
    except (RuntimeError, NotImplementedError) as err:  # pragma: no cover
        pytest.skip(f"float16 forward unsupported on this CPU build: {err}")
    assert out.dtype == torch.float16 and torch.isfinite(out).all()


def test_autocast_bfloat16() -> None:
    model = perturb(unet()).eval()
    x, t = inputs()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t)
    assert out.shape == (N, 6, SIZE, SIZE) and torch.isfinite(out).all()


@pytest.mark.parametrize("cast", [False, True])
def test_time_embedding_runs_in_the_weights_dtype_under_autocast(
        cast: bool) -> None:
    # The reference keeps the timestep MLP in float32 under mixed precision.
    model = unet().to(torch.bfloat16) if cast else unet()
    seen = []
    model.time_embed.register_forward_hook(
        lambda m, i, out: seen.append((i[0].dtype, out.dtype)))
    x, t = inputs()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(x.to(model.time_embed[0].weight.dtype), t)
    weights = torch.bfloat16 if cast else torch.float32
    assert seen == [(weights, weights)]


def test_norms_return_their_inputs_dtype_when_computed_in_float32(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # CUDA's autocast runs group_norm in float32; the same is forced here,
    # and every activation a norm hands on must stay in the input's dtype.
    group_norm = F.group_norm
    monkeypatch.setattr(F, "group_norm", lambda x, groups, w, b, eps:
                        group_norm(x.float(), groups, w.float(), b.float(),
                                   eps))
    seen = []
    model = unet(dropout=0.1).to(torch.bfloat16)
    for module in model.modules():
        if isinstance(module, nn.GroupNorm):
            module.register_forward_hook(
                lambda m, i, out: seen.append((i[0].dtype, out.dtype)))
    x = torch.randn(N, 3, SIZE, SIZE, dtype=torch.bfloat16)
    out = model(x, torch.tensor([3, 700]))
    assert out.dtype == torch.bfloat16 and len(seen) > 10
    assert all(out == into for into, out in seen)
    # The reference's checkpoints load: a norm's keys are GroupNorm's.
    norm = normalization(64)
    assert norm.state_dict().keys() == nn.GroupNorm(32, 64).state_dict().keys()


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    torch.manual_seed(0)
    plain = perturb(unet(num_classes=3, dropout=0.0))
    ckpt = unet(num_classes=3, use_checkpoint=True)
    ckpt.load_state_dict(plain.state_dict())
    x, t = inputs()
    y = torch.tensor([0, 1])
    for model in (plain, ckpt):
        model(x, t, y).square().mean().backward()
    # The backward recomputes the same forward with the same kernels, and
    # sums the gradients in the same order: bit for bit.
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters(),
                            strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0, msg=name)


def test_scalar_timestep_is_broadcast() -> None:
    model = perturb(unet()).eval()
    x, _ = inputs()
    with torch.no_grad():  # the same timesteps: bit for bit
        torch.testing.assert_close(
            model(x, torch.tensor(7)), model(x, torch.tensor([7, 7])),
            rtol=0, atol=0)


@pytest.mark.parametrize("levels", [1, 2, 3, 4])
def test_attention_factors_no_level_reaches_are_refused(levels: int) -> None:
    """Every factor a level has builds; any other is refused, by name,
    with the factors the network does have, for each model class."""
    mult, size = (1,) * levels, 2 ** (levels + 2)
    factors = [2**i for i in range(levels)]
    builders = {
        "unet": lambda a: UNetModel(size, 3, WIDTH, 6, 1, a,
                                    channel_mult=mult),
        "classifier": lambda a: EncoderUNetModel(size, 3, WIDTH, 4, 1, a,
                                                 channel_mult=mult),
        "upsampler": lambda a: SuperResModel(size, 3, WIDTH, 6, 1, a,
                                             channel_mult=mult),
    }
    with torch.device("meta"):  # shapes only: fast
        for name, build in builders.items():
            model = build(tuple(factors))
            attn = _modules(model, AttentionBlock)
            # A layer per block at each level (one block down, two up), and
            # the middle block's.
            per_level = 1 if name == "classifier" else 3
            assert len(attn) == per_level * levels + 1, name
            shown = ", ".join(map(str, factors))
            for bad in (0, 3, 2**levels, 2 ** (levels + 1)):
                with pytest.raises(ValueError) as err:
                    build((*factors[:1], bad))
                assert str(err.value).startswith(
                    f"attention_resolutions=(1, {bad}): no level"), name
                assert f"factor {bad}; its factors are {shown} (" in str(
                    err.value), name


@pytest.mark.parametrize(("built", "given"), [
    (16, (8, 8)), (16, (32, 32)), (16, (16, 8)), (16, (8, 16)),
    (8, (16, 16)), (32, (16, 16)),
])
def test_images_of_another_size_are_refused(built: int,
                                            given: tuple[int, int]) -> None:
    """UNet, classifier and upsampler name the size they were built for;
    at that size they run (the attention-pooled classifier would fail on
    any other with an obscure shape error)."""
    models = {
        "unet": UNetModel(built, 3, WIDTH, 6, 1, (2,), channel_mult=(1, 2)),
        "classifier": EncoderUNetModel(built, 3, WIDTH, 4, 1, (2,),
                                       channel_mult=(1, 2), pool="attention",
                                       num_head_channels=32),
        "upsampler": SuperResModel(built, 3, WIDTH, 6, 1, (2,),
                                   channel_mult=(1, 2)),
    }
    t = torch.tensor([3])
    low = torch.randn(1, 3, 4, 4)  # an upsampler's low_res: any size
    shown = " x ".join(map(str, given))
    message = (f"images of {shown} given to a network built for {built} x "
               f"{built} (image_size={built})")
    with torch.no_grad():
        for name, model in models.items():
            extra = (low,) if name == "upsampler" else ()
            with pytest.raises(ValueError) as err:
                model(torch.randn(1, 3, *given), t, *extra)
            assert str(err.value) == message, name
            out = model(torch.randn(1, 3, built, built), t, *extra)
            assert out.shape[0] == 1, name


def test_the_size_check_reads_the_resampled_axes() -> None:
    """1-D: the one axis; 3-D: the last two (the first is not resampled)."""
    line = UNetModel(8, 1, WIDTH, 1, 1, (), channel_mult=(1, 2), dims=1)
    volume = UNetModel(8, 1, WIDTH, 1, 1, (), channel_mult=(1, 2), dims=3)
    t = torch.tensor([3])
    with torch.no_grad():
        assert line(torch.randn(1, 1, 8), t).shape == (1, 1, 8)
        assert volume(torch.randn(1, 1, 5, 8, 8), t).shape == (1, 1, 5, 8, 8)
        for model, x in ((line, torch.randn(1, 1, 16)),
                         (volume, torch.randn(1, 1, 8, 8, 16))):
            with pytest.raises(ValueError, match="built for 8"):
                model(x, t)


def test_three_dimensional_unet() -> None:
    model = perturb(UNetModel(
        8, 1, WIDTH, 1, 1, (2,), channel_mult=(1, 2), dims=3, num_heads=2,
    ))
    x = torch.randn(1, 1, 2, 8, 8)
    assert model(x, torch.tensor([3])).shape == (1, 1, 2, 8, 8)


@pytest.mark.parametrize("variant", list(ABLATIONS))
def test_every_ablation_builds_and_runs(variant: str) -> None:
    model = perturb(ablation_unet(variant, 16, 64, num_classes=10,
                                  in_channels=1))
    out = model(torch.randn(1, 1, 16, 16), torch.tensor([5]),
                torch.tensor([3]))
    assert out.shape == (1, 2, 16, 16) and torch.isfinite(out).all()


def _modules(model: nn.Module, kind: type) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, kind)]


def test_ablation_switches_change_what_they_claim() -> None:
    with torch.device("meta"):  # shapes only: fast at any size
        models = {v: ablation_unet(v, 32, 128, 10) for v in ABLATIONS}
    base = models["baseline"]
    assert base.attention_resolutions == (2,)  # 16 x 16 of 32 x 32
    assert base.channel_mult == (1, 2, 2)
    assert {m.num_heads for m in _modules(base, AttentionBlock)} == {1}
    assert any(isinstance(b[-1], Downsample) for b in base.input_blocks)
    assert not any(r.use_scale_shift_norm for r in _modules(base, ResBlock))

    deep = models["depth (4 blocks, 0.8x width)"]
    assert deep.model_channels == 96  # 0.8 x 128, rounded to 32s
    assert len(_modules(deep, ResBlock)) > len(_modules(base, ResBlock))
    heads = models["4 heads"]
    assert {m.num_heads for m in _modules(heads, AttentionBlock)} == {4}
    per_head = models["64 channels per head"]
    assert {m.qkv.in_channels // m.num_heads
            for m in _modules(per_head, AttentionBlock)} == {64}
    assert models["attention at 32, 16, 8"].attention_resolutions == (1, 2, 4)
    biggan = models["BigGAN up/down"]
    assert len([r for r in _modules(biggan, ResBlock) if r.updown]) == 4
    blocks = (*biggan.input_blocks, *biggan.output_blocks)
    assert not any(isinstance(b[-1], (Downsample, Upsample)) for b in blocks)
    rescaled = models["residual rescaling"]
    assert {r.residual_scale for r in _modules(rescaled, ResBlock)} == {
        2**-0.5}
    shapes = {k: v.shape for k, v in base.state_dict().items()}
    assert {k: v.shape for k, v in rescaled.state_dict().items()} == shapes
    adagn = models["AdaGN"]
    assert all(r.emb_layers[1].out_features == 2 * r.out_channels
               for r in _modules(adagn, ResBlock))
    adm = models["ADM"]
    assert adm.attention_resolutions == (1, 2, 4)
    assert {m.qkv.in_channels // m.num_heads
            for m in _modules(adm, AttentionBlock)} == {64}
    assert all(r.use_scale_shift_norm for r in _modules(adm, ResBlock))
    assert any(r.updown for r in _modules(adm, ResBlock))
    # Every row but depth keeps the baseline's width and block count.
    for variant, model in models.items():
        if variant != "depth (4 blocks, 0.8x width)":
            assert model.model_channels == 128, variant


@pytest.mark.parametrize("size", [8, 16, 32, 64])
def test_ablations_attend_at_their_resolutions_at_any_size(size: int) -> None:
    """attention_at is in pixels: those the image has, as factors."""
    for variant, options in ABLATIONS.items():
        pixels = options.get("attention_at", (16,))
        with torch.device("meta"):
            model = ablation_unet(variant, size, 64)
        assert model.attention_resolutions == tuple(
            size // r for r in pixels if r <= size), variant


def test_unknown_ablation_is_an_error() -> None:
    with pytest.raises(ValueError, match="known: baseline"):
        ablation_unet("wider", 32, 64)
