# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # The ADM architecture
#
# The diffusion model of chapter 2 is one network $\epsilon_\theta(x_t, t,
# y)$: given a noisy image, its timestep and (optionally) a class label, it
# predicts the noise and, with a learned variance, one more number per
# pixel. Input and output have the same shape, so since Ho et al. (2020) it
# is a **UNet**: a convolutional encoder that halves the resolution level by
# level, a decoder that doubles it back, and skip connections that hand
# every encoder feature map to the decoder at its resolution. Fine detail
# travels along the skips; global structure is worked out at the bottom,
# where self-attention lets every position see every other.
#
# Dhariwal & Nichol's first contribution is an ablation of that UNet
# (section 3 of the paper). Measured by FID on ImageNet $128 \times 128$, the
# changes that helped, and that their *ADM* model keeps, are:
#
# 1. **Depth versus width.** More residual blocks help but cost training
#    time, so the ablations keep 2 blocks per resolution and widen instead
#    (the released $64 \times 64$ model has 3).
# 2. **More attention.** Self-attention at $32 \times 32$, $16 \times 16$ and
#    $8 \times 8$ rather than at $16 \times 16$ only.
# 3. **More heads, fixed width per head**, so wider layers get more heads.
#    32 channels per head had the lowest FID (Table 2); they chose 64 for
#    wall-clock time (Figure 2), at a small cost in FID.
# 4. **BigGAN residual up/down-sampling.** Change resolution *inside* a
#    residual block rather than with a separate convolution.
# 5. **Adaptive group normalisation (AdaGN).** Inject the timestep and class
#    as a per-channel scale and shift of a normalised activation rather than
#    by adding a vector.
# 6. **Residual rescaling by $1/\sqrt{2}$**, from BigGAN and StyleGAN, was
#    tried too and did *not* help; the released models leave it off.
#
# This chapter builds each as a small module, checks what it does, assembles
# the UNet, the noisy-image classifier of chapter 6 and the super-resolution
# model of chapter 7, and exports them as `adm_lib.unet`. Names follow the
# reference implementation (`openai/guided-diffusion`), so its released
# checkpoints load unchanged, and `adm_lib.compat` builds from its flags.

# %% tags=["parameters"]
# Smoke configuration: tiny models, seconds on a CPU. The chapter trains
# nothing (chapter 5 trains the ablations); larger models are
#   adm book run 3 -p image_size 64 -p model_channels 64
image_size: int = 32  # side of the square images of the small models
model_channels: int = 32  # base width of the small models
batch_size: int = 2  # images per forward pass
threads: int = 1  # PyTorch CPU threads (0: its default): 1 is steadier
ablation_channels: int = 64  # base width of the ablation models of 3.11
seed: int = 0  # of the models' weights and inputs

# %%
#| default_exp unet

# %%
import os

import torch

from adm_lib.book import find_root

# Relative paths, the parameters' too, start at the book's root, as under
# `adm book run`, wherever the kernel starts (JupyterLab: in chapters/).
os.chdir(find_root())
torch.manual_seed(seed)
if threads:
    torch.set_num_threads(threads)

# %% [markdown]
# ## 3.1 Small parts
#
# The reference supports 1-, 2- and 3-D signals (`dims`), so convolutions and
# pooling are picked by dimension. Every normalisation is a `GroupNorm` with 32
# groups. Output layers of residual branches start at zero (`zero_module`): a
# new residual block is the identity and a new model predicts zero, so training
# starts from a network that does nothing rather than one that adds noise.
#
# The models compute in their parameters' and inputs' dtype (mixed precision
# is `torch.autocast`'s job), except, as in the reference, that a norm's
# output keeps its input's dtype and the timestep MLP runs in its weights'
# dtype (3.6).

# %%
#| export
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


def conv_nd(dims: int, *args, **kwargs) -> nn.Module:
    """A 1-, 2- or 3-D convolution."""
    return {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims](*args, **kwargs)


def avg_pool_nd(dims: int, *args, **kwargs) -> nn.Module:
    """A 1-, 2- or 3-D average pooling."""
    pools = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}
    return pools[dims](*args, **kwargs)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm whose output keeps its input's dtype."""

    def forward(self, x: Tensor) -> Tensor:
        # CUDA's autocast runs group_norm in float32 and returns float32:
        # without the cast back, every SiLU, AdaGN and dropout after a norm
        # would run and be saved for backward in float32, twice the bytes.
        return super().forward(x).to(x.dtype)


def normalization(channels: int) -> nn.GroupNorm:
    """The models' normalisation: GroupNorm with 32 groups."""
    return GroupNorm32(32, channels)


def zero_module(module: nn.Module) -> nn.Module:
    """Set every parameter of `module` to zero and return it."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


# %% [markdown]
# ### The timestep as a vector
#
# A network cannot do much with the integer $t$ itself. Like the Transformer's
# positions, it becomes cosines and sines of geometric frequencies: with $h$
# = `dim // 2`, frequency $k < h$ is $10000^{-k/h}$ radians per unit of $t$,
# from 1 down to nearly $1/10000$. Nearby timesteps get similar vectors,
# differing mostly in the fast frequencies, and every scale of $t$ is
# represented. The UNet passes this vector through an MLP (`time_embed`).

# %%
#| export
def timestep_embedding(
    timesteps: Tensor, dim: int, max_period: float = 10000.0
) -> Tensor:
    """Sinusoidal features [N, dim] of N (possibly fractional) timesteps."""
    half = dim // 2
    steps = torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(-math.log(max_period) * steps / half)
    angles = timesteps.float()[:, None] * freqs[None]
    embedding = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    if dim % 2:  # an odd width gets a zero column
        embedding = F.pad(embedding, (0, 1))
    return embedding


# %%
emb = timestep_embedding(torch.tensor([0, 1, 500, 999]), 8)
print(emb.round(decimals=3))
assert emb.shape == (4, 8)  # at t = 0, every cosine is one, every sine zero
assert torch.equal(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))
assert torch.allclose(emb[1, 0], torch.cos(torch.tensor(1.0)))
assert timestep_embedding(torch.tensor([3]), 7).shape == (1, 7)


# %% [markdown]
# ## 3.2 Blocks that see the timestep
#
# Residual blocks take the embedding as a second input, attention and
# resampling do not. A marker class and a `Sequential` that hands the
# embedding only to the blocks that want it (the reference's
# `TimestepEmbedSequential`) let one list of layers mix both; its numbered
# children shape the state-dict keys, `input_blocks.4.1.qkv...`.

# %%
#| export
class TimestepBlock(nn.Module):
    """A module whose forward takes (x, emb): features and embedding."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """Apply the block to x, conditioned on emb."""
        raise NotImplementedError


class TimestepEmbedSequential(nn.Sequential):
    """A Sequential that passes emb to the children that take it."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """Run the children in order, giving emb to TimestepBlocks."""
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


# %% [markdown]
# ## 3.3 Changing resolution
#
# The classic UNet resamples with separate layers: nearest-neighbour
# up-sampling followed by a $3 \times 3$ convolution, and, to go down, a $3
# \times 3$ convolution of stride 2, which may change the number of channels,
# or (`conv_resample=False`) a $2 \times 2$ average, which cannot. For 3-D
# signals only the inner two dimensions are resampled.

# %%
#| export
class Upsample(nn.Module):
    """Nearest-neighbour 2x up-sampling, optionally followed by a conv."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2,
                 out_channels: int | None = None) -> None:
        super().__init__()
        self.channels, self.out_channels = channels, out_channels or channels
        self.use_conv, self.dims = use_conv, dims
        if use_conv:
            self.conv = conv_nd(dims, channels, self.out_channels, 3,
                                padding=1)
        elif self.out_channels != channels:
            raise ValueError("changing channels needs use_conv=True")

    def forward(self, x: Tensor) -> Tensor:
        """Double the (inner two) spatial sizes of x."""
        if x.is_contiguous(memory_format=torch.channels_last):
            # interpolate keeps channels_last; repeat_interleave would not.
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        else:
            # Two repeats, each copying along a contiguous last dimension,
            # give the same values as interpolate's gather, three times
            # faster on a CPU at 16x16 (about even at 4x4).
            x = x.repeat_interleave(2, dim=-1)
            if self.dims > 1:
                x = x.repeat_interleave(2, dim=-2)
        return self.conv(x) if self.use_conv else x


# %%
#| export
class Downsample(nn.Module):
    """2x down-sampling by a strided conv, or by average pooling."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2,
                 out_channels: int | None = None) -> None:
        super().__init__()
        self.channels, self.out_channels = channels, out_channels or channels
        stride = (1, 2, 2) if dims == 3 else 2
        if use_conv:
            self.op = conv_nd(dims, channels, self.out_channels, 3,
                              stride=stride, padding=1)
        elif self.out_channels == channels:
            self.op = avg_pool_nd(dims, kernel_size=stride, stride=stride)
        else:
            raise ValueError("changing channels needs use_conv=True")

    def forward(self, x: Tensor) -> Tensor:
        """Halve the (inner two) spatial sizes of x."""
        return self.op(x)


# %%
x = torch.randn(batch_size, 8, image_size, image_size)
up, down, pool = Upsample(8, True), Downsample(8, True), Downsample(8, False)
print("up", tuple(up(x).shape), " down", tuple(down(x).shape))
assert up(x).shape[-1] == 2 * image_size
assert down(x).shape[-1] == image_size // 2
# Without a conv, pooling averages 2x2 squares.
assert torch.allclose(pool(x)[..., 0, 0], x[..., :2, :2].mean((-1, -2)))


# %% [markdown]
# ## 3.4 The residual block: AdaGN, BigGAN resampling, rescaling
#
# A residual block computes $x + F(x, e)$, where the branch $F$ is
# *normalise, SiLU, conv*, twice, and $e$ is the embedding of the timestep
# (plus the class). Three of the paper's changes live here.
#
# **How the embedding gets in.** Ho et al. project $e$ to one number per
# channel and *add* it to the activations between the two convolutions.
# ADM's **adaptive group normalisation** projects $e$ to two numbers per
# channel, a scale $y_s$ and a shift $y_b$, and applies them right after the
# second group norm:
#
# $$\mathrm{AdaGN}(h, e) = y_s \cdot \mathrm{GroupNorm}(h) + y_b,
# \qquad (y_s, y_b) = \mathrm{Linear}(\mathrm{SiLU}(e)).$$
#
# The code writes $y_s$ as $1 + y_s$, so a zero projection is no change. The
# paper (Table 3) finds AdaGN clearly better than addition: the condition can
# switch a channel off or amplify it, not just move it. The reference calls it
# `use_scale_shift_norm`.

# %%
#| exporti
def adagn(norm: nn.GroupNorm, h: Tensor, e: Tensor) -> Tensor:
    """AdaGN: norm(h) * (1 + y_s) + y_b, with (y_s, y_b) the halves of e."""
    scale, shift = e.chunk(2, dim=1)
    # One fused pass over h for the multiply and the add.
    return torch.addcmul(shift, norm(h), 1 + scale)


# %% [markdown]
# **BigGAN up/down-sampling.** With `up` or `down`, the block resamples both
# its skip path and its branch, right before the first convolution, so the
# resolution change is learned by a residual block.
#
# **Residual rescaling.** Multiplying $x + F(x)$ by $1/\sqrt{2}$ keeps the
# variance from growing with depth (for independent $x$ and $F(x)$ of equal
# variance). The paper found it no help, so `rescale_residual` is off by
# default.
#
# With `use_checkpoint`, `run_checkpointed` recomputes a block's activations
# in the backward pass instead of storing them: less memory, one more
# forward (attention blocks, 3.5, use it too).

# %%
#| exporti
def rescaled(h: Tensor, scale: float) -> Tensor:
    """h times the residual scale, without a pass when the scale is 1."""
    return h if scale == 1 else h * scale


def skip_projection(
    channels: int, out_channels: int, dims: int, use_conv: bool
) -> nn.Module:
    """The skip path: the identity, or a conv where the channels change."""
    if out_channels == channels:
        return nn.Identity()
    kernel = 3 if use_conv else 1
    return conv_nd(dims, channels, out_channels, kernel, padding=kernel // 2)


def run_checkpointed(block: nn.Module, *inputs: Tensor) -> Tensor:
    """block._forward(*inputs), recomputed in the backward pass if asked."""
    if block.use_checkpoint and torch.is_grad_enabled():
        return checkpoint(block._forward, *inputs, use_reentrant=False)
    return block._forward(*inputs)


# %% [markdown]
# The block: the branch's first half (`in_layers`), the embedding's
# projection (`emb_layers`), the second half (`out_layers`) and the skip
# path (`skip_projection`: a $1 \times 1$ conv where the width changes).

# %%
#| export
class ResBlock(TimestepBlock):
    """A residual block conditioned on an embedding, optionally resampling."""

    def __init__(
        self, channels: int, emb_channels: int, dropout: float,
        out_channels: int | None = None, use_conv: bool = False,
        use_scale_shift_norm: bool = False, dims: int = 2,
        use_checkpoint: bool = False, up: bool = False, down: bool = False,
        rescale_residual: bool = False,
    ) -> None:
        super().__init__()
        self.out_channels = out = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.use_checkpoint = use_checkpoint
        self.residual_scale = 2**-0.5 if rescale_residual else 1.0
        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(),
            conv_nd(dims, channels, out, 3, padding=1),
        )
        self.updown = up or down
        resample = Upsample if up else Downsample
        self.h_upd = resample(channels, False, dims) if up or down else None
        self.x_upd = resample(channels, False, dims) if up or down else None
        emb_out = 2 * out if use_scale_shift_norm else out
        self.emb_layers = nn.Sequential(nn.SiLU(),
                                        nn.Linear(emb_channels, emb_out))
        self.out_layers = nn.Sequential(
            normalization(out), nn.SiLU(), nn.Dropout(p=dropout),
            zero_module(conv_nd(dims, out, out, 3, padding=1)),
        )
        self.skip_connection = skip_projection(channels, out, dims, use_conv)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """skip(x) + branch(x, emb), times the residual scale."""
        return run_checkpointed(self, x, emb)

    def _forward(self, x: Tensor, emb: Tensor) -> Tensor:
        norm, act, conv = self.in_layers
        h = act(norm(x))
        if self.updown:  # BigGAN: resample branch and skip alike
            h, x = self.h_upd(h), self.x_upd(x)
        h = conv(h)
        e = self.emb_layers(emb)
        e = e.reshape(*e.shape, *(1,) * (h.ndim - 2))  # N C 1 1
        if self.use_scale_shift_norm:
            h = self.out_layers[1:](adagn(self.out_layers[0], h, e))
        else:  # additive: h + e, then the usual norm
            h = self.out_layers(h + e)
        return rescaled(self.skip_connection(x) + h, self.residual_scale)


# %% [markdown]
# A new block is the identity (its last conv is zero), times $1/\sqrt{2}$
# with rescaling; `down` halves the size and `up` doubles it; AdaGN has
# twice addition's projection weights, and computes its formula.

# %%
emb_dim = 4 * model_channels
x = torch.randn(batch_size, 32, image_size, image_size)
e = torch.randn(batch_size, emb_dim)
block = ResBlock(32, emb_dim, 0.0, use_scale_shift_norm=True)
assert torch.equal(block(x, e), x)
scaled = ResBlock(32, emb_dim, 0.0, rescale_residual=True)
assert torch.allclose(scaled(x, e), x / math.sqrt(2))
h_down = ResBlock(32, emb_dim, 0.0, down=True)(x, e)
h_up = ResBlock(32, emb_dim, 0.0, 64, up=True)(x, e)
print("down", tuple(h_down.shape), " up", tuple(h_up.shape))
assert h_down.shape[-1] == image_size // 2
assert h_up.shape == (batch_size, 64, 2 * image_size, 2 * image_size)
assert block.emb_layers[1].out_features == 2 * 32  # y_s and y_b
assert ResBlock(32, emb_dim, 0.0).emb_layers[1].out_features == 32

nn.init.normal_(block.emb_layers[1].weight)
scale, shift = block.emb_layers(e)[:, :, None, None].chunk(2, dim=1)
h = block.in_layers(x)
expected = block.out_layers[0](h) * (1 + scale) + shift
# Replace the rest of the branch by the identity to see AdaGN's output.
rest, block.out_layers = block.out_layers, block.out_layers[:1]
got = block(x, e) - x
block.out_layers = rest
assert torch.allclose(got, expected, atol=1e-5)
print("AdaGN output matches GroupNorm(h) * (1 + y_s) + y_b")


# %% [markdown]
# ## 3.5 Self-attention over positions
#
# An attention block lets every position of a feature map look at every
# other: a group norm, a $1 \times 1$ convolution to queries, keys and values
# (`qkv`), softmax attention per head, and a zero-initialised projection back
# (`proj_out`), added to the input. The number of heads is either given
# (`num_heads`: 4 in the released $128 \times 128$ model and $64 \to 256$
# upsampler) or follows from a fixed width per head (`num_head_channels`:
# 64 in ADM and the other released models).
#
# The `qkv` convolution outputs $3C$ channels, read as heads in one of two
# orders. The **legacy** order (the reference's `QKVAttentionLegacy`, in the
# 128, 256 and 512 models) splits into heads first, each holding its own
# $[q; k; v]$; the **new** order (`use_new_attention_order`, the 64 model)
# splits into $[q; k; v]$ first, each holding all heads. The weights have
# the same shape either way, so a checkpoint only works with the order it
# was trained with. Both are reshapes in front of PyTorch's fused
# `scaled_dot_product_attention`.
#
# The reference keeps features channels-first, `[N, C, T]` for $T$
# positions. We turn them positions-first, `[N, T, C]`, once before `qkv`:
# each head's $q$, $k$ and $v$ are then views with channels adjacent in
# memory, the layout the fused GPU kernels need, and nothing is copied.

# %%
#| export
class QKVAttention(nn.Module):
    """Multi-head attention over the positions of a [N, T, 3*C] qkv."""

    def __init__(self, num_heads: int, legacy_order: bool = False) -> None:
        super().__init__()
        self.num_heads, self.legacy_order = num_heads, legacy_order

    def forward(self, qkv: Tensor) -> Tensor:
        """softmax(q k^T / sqrt(c)) v per head, as [N, T, C]."""
        n, length, width = qkv.shape
        heads = self.num_heads
        if width % (3 * heads):
            raise ValueError(f"qkv width {width} is not 3 x {heads} heads")
        ch = width // (3 * heads)
        # Views as [q, k, v][N][head][T][ch], channels still adjacent.
        if self.legacy_order:  # [head][q, k, v][ch]
            qkv = qkv.reshape(n, length, heads, 3, ch).permute(3, 0, 2, 1, 4)
        else:  # [q, k, v][head][ch]
            qkv = qkv.reshape(n, length, 3, heads, ch).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)  # [N, heads, T, ch]
        return out.transpose(1, 2).reshape(n, length, heads * ch)


# %% [markdown]
# The block around it: `heads_for` turns the two ways of giving heads into a
# number. The two $1 \times 1$ convolutions stay `nn.Conv1d` modules, so the
# reference's checkpoints load; `positionwise` applies one to
# positions-first features as the linear map it is.

# %%
#| export
def positionwise(conv: nn.Conv1d, h: Tensor) -> Tensor:
    """A 1x1 conv applied to [..., C] features with channels last."""
    # Contiguous, F.linear is one matrix product; a transposed view would
    # go to a batched one, which in bf16 on an AVX2 CPU took 0.3 s a call.
    return F.linear(h.contiguous(), conv.weight[..., 0], conv.bias)


def heads_for(channels: int, num_heads: int, num_head_channels: int) -> int:
    """Heads of an attention layer: num_heads, or channels per head given."""
    if num_head_channels == -1:
        return num_heads
    if channels % num_head_channels:
        raise ValueError(
            f"{channels} channels are not divisible by "
            f"num_head_channels={num_head_channels}"
        )
    return channels // num_head_channels


class AttentionBlock(nn.Module):
    """Residual self-attention over the spatial positions of a feature map."""

    def __init__(
        self, channels: int, num_heads: int = 1, num_head_channels: int = -1,
        use_checkpoint: bool = False, use_new_attention_order: bool = False,
        rescale_residual: bool = False,
    ) -> None:
        super().__init__()
        self.num_heads = heads_for(channels, num_heads, num_head_channels)
        self.use_checkpoint = use_checkpoint
        self.residual_scale = 2**-0.5 if rescale_residual else 1.0
        self.norm = normalization(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        legacy = not use_new_attention_order
        self.attention = QKVAttention(self.num_heads, legacy_order=legacy)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        """x + attention(x), times the residual scale."""
        return run_checkpointed(self, x)

    def _forward(self, x: Tensor) -> Tensor:
        n, c, *spatial = x.shape
        x = x.reshape(n, c, -1)  # positions flattened: N C T
        h = self.norm(x).transpose(1, 2)  # N T C
        h = self.attention(positionwise(self.qkv, h))
        h = positionwise(self.proj_out, h).transpose(1, 2)
        return rescaled(x + h, self.residual_scale).reshape(n, c, *spatial)


# %% [markdown]
# Both orders against attention written out with `einsum`, and the sense in
# which they are the same layer: permuting the rows of `qkv`'s weights turns
# a legacy-order block into a new-order block with the same output.

# %%
def naive_attention(q, k, v):
    """softmax(q k^T / sqrt(c)) v for [B, T, heads, c] tensors."""
    weight = torch.einsum("bthc,bshc->bhts", q, k) / math.sqrt(q.shape[-1])
    out = torch.einsum("bhts,bshc->bthc", weight.softmax(dim=-1), v)
    return out.flatten(2)


heads, ch, length = 4, 16, 10
qkv = torch.randn(batch_size, length, 3 * heads * ch)
by_head = qkv.unflatten(-1, (heads, 3, ch)).unbind(-2)
legacy = QKVAttention(heads, legacy_order=True)(qkv)
assert torch.allclose(legacy, naive_attention(*by_head), atol=1e-5)
q, k, v = qkv.unflatten(-1, (3, heads, ch)).unbind(-3)
new = QKVAttention(heads)(qkv)
assert torch.allclose(new, naive_attention(q, k, v), atol=1e-5)

channels = heads * ch
old_block = AttentionBlock(channels, num_head_channels=ch)
new_block = AttentionBlock(channels, num_head_channels=ch,
                           use_new_attention_order=True)
nn.init.normal_(old_block.proj_out.weight)
state = old_block.state_dict()
# legacy row (head, j, c) -> new row (j, head, c), j in q, k, v
perm = torch.arange(3 * channels).reshape(heads, 3, ch).transpose(0, 1)
for name in ("qkv.weight", "qkv.bias"):
    state[name] = state[name][perm.flatten()]
new_block.load_state_dict(state)
x = torch.randn(batch_size, channels, 6, 6)
assert not torch.allclose(old_block(x), x)
assert torch.allclose(old_block(x), new_block(x), atol=1e-5)
print(f"{old_block.num_heads} heads of {ch} channels; orders agree "
      "after permuting qkv rows")


# %% [markdown]
# ## 3.6 The UNet
#
# The model has four parts, named as in the reference:
#
# * `time_embed`: the MLP on the sinusoidal timestep features, width $4C$ for
#   base width $C$; with classes, `label_emb` adds a learned vector per class.
# * `input_blocks`: a first convolution, then per resolution level
#   `num_res_blocks` residual blocks (with attention at the chosen
#   resolutions) and a down-sampling block, except at the last level. Level
#   $i$ has `channel_mult[i]` $\times\, C$ channels.
# * `middle_block`: residual block, attention, residual block, at the lowest
#   resolution.
# * `output_blocks`: per level, in reverse, `num_res_blocks + 1` residual
#   blocks, each taking the previous output concatenated with one saved
#   encoder output (the skip connections), and an up-sampling block; then
#   `out`, a norm, SiLU and a zero-initialised convolution.
#
# Attention resolutions are given, as in the reference, as *down-sampling
# factors*: `attention_resolutions=(2, 4, 8)` on a $64 \times 64$ model means
# attention at 32, 16 and 8. A small factory holds the options every block
# shares, so the construction code reads like this description.

# %%
#| export
@dataclass
class BlockFactory:
    """Builds residual and attention blocks with the options they share."""

    emb_channels: int
    dropout: float = 0.0
    dims: int = 2
    use_checkpoint: bool = False
    use_scale_shift_norm: bool = False
    num_heads: int = 1
    num_head_channels: int = -1
    use_new_attention_order: bool = False
    rescale_residual: bool = False

    def res(self, channels: int, out_channels: int | None = None,
            up: bool = False, down: bool = False) -> ResBlock:
        """A residual block from channels to out_channels."""
        return ResBlock(
            channels, self.emb_channels, self.dropout, out_channels,
            use_scale_shift_norm=self.use_scale_shift_norm, dims=self.dims,
            use_checkpoint=self.use_checkpoint, up=up, down=down,
            rescale_residual=self.rescale_residual,
        )

    def attn(self, channels: int, num_heads: int | None = None) -> nn.Module:
        """An attention block (num_heads overrides the default)."""
        return AttentionBlock(
            channels, num_heads or self.num_heads, self.num_head_channels,
            use_checkpoint=self.use_checkpoint,
            use_new_attention_order=self.use_new_attention_order,
            rescale_residual=self.rescale_residual,
        )

    def middle(self, channels: int) -> TimestepEmbedSequential:
        """The bottleneck: residual block, attention, residual block."""
        return TimestepEmbedSequential(self.res(channels),
                                       self.attn(channels), self.res(channels))


# %% [markdown]
# The encoder: `time_embed_mlp` builds `time_embed`, and `encoder_blocks`
# the `input_blocks`, returning also every block's output width, which sizes
# the decoder's skips, and the final down-sampling factor `ds`.

# %%
#| export
def time_embed_mlp(model_channels: int) -> nn.Sequential:
    """The MLP on the timestep features: C -> 4C -> 4C."""
    dim = 4 * model_channels
    return nn.Sequential(nn.Linear(model_channels, dim), nn.SiLU(),
                         nn.Linear(dim, dim))


def encoder_blocks(
    make: BlockFactory, in_channels: int, model_channels: int,
    channel_mult: Sequence[float], num_res_blocks: int,
    attention_resolutions: Sequence[int], conv_resample: bool,
    resblock_updown: bool,
) -> tuple[nn.ModuleList, list[int], int]:
    """The down path: blocks, their output channels, final downsampling."""
    ch = int(channel_mult[0] * model_channels)
    first = conv_nd(make.dims, in_channels, ch, 3, padding=1)
    blocks = nn.ModuleList([TimestepEmbedSequential(first)])
    chans, ds = [ch], 1
    for level, mult in enumerate(channel_mult):
        for _ in range(num_res_blocks):
            out = int(mult * model_channels)
            layers = [make.res(ch, out)]
            ch = out
            if ds in attention_resolutions:
                layers.append(make.attn(ch))
            blocks.append(TimestepEmbedSequential(*layers))
            chans.append(ch)
        if level < len(channel_mult) - 1:
            down = (make.res(ch, down=True) if resblock_updown
                    else Downsample(ch, conv_resample, make.dims))
            blocks.append(TimestepEmbedSequential(down))
            chans.append(ch)
            ds *= 2
    return blocks, chans, ds


# %% [markdown]
# The classifier of section 3.7 is this encoder with another head, so the
# shared part is one class, `UNetTrunk`: `embed` makes the embedding $e$ of
# the timesteps (and labels); `encode` runs the down path and the middle
# block, keeping every input block's output for the skips. It refuses two
# mistakes that would pass in silence: an attention factor no level reaches,
# such as `(8,)` with one halving, would build no attention at all; and
# images of another size than `image_size` would run, though the model was
# trained at one size (3.7's attention pooling fails on them obscurely).

# %%
#| export
class UNetTrunk(nn.Module):
    """The embedding, down path and middle block of UNet and classifier."""

    def __init__(
        self, make: BlockFactory, image_size: int, in_channels: int,
        model_channels: int, channel_mult: Sequence[float],
        num_res_blocks: int, attention_resolutions: Sequence[int],
        conv_resample: bool = True, resblock_updown: bool = False,
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        factors = [2**level for level in range(len(channel_mult))]
        if unreached := sorted(set(attention_resolutions) - set(factors)):
            raise ValueError(
                f"attention_resolutions={tuple(attention_resolutions)}: "
                "no level of this network has down-sampling factor "
                f"{', '.join(map(str, unreached))}; its factors are "
                f"{', '.join(map(str, factors))} (resolutions "
                f"{', '.join(str(image_size // f) for f in factors)} of "
                f"image_size={image_size}), each image_size // resolution")
        self.make = make
        self.image_size, self.in_channels = image_size, in_channels
        self.model_channels, self.num_classes = model_channels, num_classes
        self.attention_resolutions = tuple(attention_resolutions)
        self.channel_mult = tuple(channel_mult)
        self.time_embed = time_embed_mlp(model_channels)
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, make.emb_channels)
        self.input_blocks, self.skip_channels, self.ds = encoder_blocks(
            make, in_channels, model_channels, channel_mult, num_res_blocks,
            attention_resolutions, conv_resample, resblock_updown,
        )
        self.middle_block = make.middle(self.skip_channels[-1])

    def embed(self, x: Tensor, timesteps: Tensor, y: Tensor | None) -> Tensor:
        """The embedding of the timesteps (and labels), in the weights'."""
        if (y is None) != (self.num_classes is None):
            raise ValueError("pass y if and only if the model is class-"
                             f"conditional (num_classes={self.num_classes})")
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        features = timestep_embedding(timesteps, self.model_channels)
        # In the parameters' dtype even under autocast, as the reference
        # keeps this MLP in float32: a tiny cost, and t's features change
        # in digits that bfloat16 would round away.
        with torch.autocast(x.device.type, enabled=False):
            weight = self.time_embed[0].weight
            emb = self.time_embed(features.to(weight.dtype))
        if y is not None:
            if y.shape != (x.shape[0],):
                raise ValueError(f"y must have shape ({x.shape[0]},)")
            emb = emb + self.label_emb(y)
        return emb

    def encode(self, x: Tensor, emb: Tensor) -> tuple[list[Tensor], Tensor]:
        """Every input block's output, and the middle block's."""
        # The resampled axes: the last two (one in 1-D; 3-D keeps its first).
        size = tuple(x.shape[2:][-2:])
        if size != (self.image_size,) * len(size):
            built = " x ".join([str(self.image_size)] * len(size))
            raise ValueError(
                f"images of {' x '.join(map(str, size))} given to a network "
                f"built for {built} (image_size={self.image_size})")
        skips, h = [], x
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        return skips, self.middle_block(h, emb)


# %% [markdown]
# The decoder mirrors the encoder, consuming its saved outputs in reverse,
# one per block. `num_heads_upsample` gives its attention another number of
# heads (the reference keeps it for old checkpoints; $-1$: `num_heads`).

# %%
#| exporti
def decoder_blocks(
    make: BlockFactory, skip_channels: Sequence[int], ds: int,
    model_channels: int, channel_mult: Sequence[float], num_res_blocks: int,
    attention_resolutions: Sequence[int], conv_resample: bool,
    resblock_updown: bool, num_heads_upsample: int,
) -> tuple[nn.ModuleList, int]:
    """The up path, taking the skips in reverse, and its output channels."""
    chans, ch = list(skip_channels), skip_channels[-1]
    blocks = nn.ModuleList()
    for level, mult in reversed(list(enumerate(channel_mult))):
        for i in range(num_res_blocks + 1):
            out = int(mult * model_channels)
            layers = [make.res(ch + chans.pop(), out)]
            ch = out
            if ds in attention_resolutions:
                layers.append(make.attn(ch, num_heads_upsample))
            if level and i == num_res_blocks:
                layers.append(make.res(ch, up=True) if resblock_updown
                              else Upsample(ch, conv_resample, make.dims))
                ds //= 2
            blocks.append(TimestepEmbedSequential(*layers))
    return blocks, ch


# %% [markdown]
# The UNet is the trunk, the decoder and `out`. Class conditioning adds
# `label_emb(y)` to the timestep embedding, which every residual block sees.
# `rescale_residual`, our addition for the paper's ablation, changes no
# parameter.

# %%
#| export
class UNetModel(UNetTrunk):
    """The ADM UNet: model(x, timesteps, y=None) -> [N, out_channels, ...].

    Arguments as the reference's. attention_resolutions are down-sampling
    FACTORS (image_size // resolution, each 2**i, i < len(channel_mult));
    widths channel_mult[i] * model_channels are multiples of 32;
    out_channels is 2 * in_channels for a learned variance; labels y of a
    class-conditional model are in [0, num_classes).
    """

    def __init__(
        self, image_size: int, in_channels: int, model_channels: int,
        out_channels: int, num_res_blocks: int,
        attention_resolutions: Sequence[int], dropout: float = 0.0,
        channel_mult: Sequence[float] = (1, 2, 4, 8),
        conv_resample: bool = True, dims: int = 2,
        num_classes: int | None = None, use_checkpoint: bool = False,
        num_heads: int = 1, num_head_channels: int = -1,
        num_heads_upsample: int = -1, use_scale_shift_norm: bool = False,
        resblock_updown: bool = False, use_new_attention_order: bool = False,
        rescale_residual: bool = False,
    ) -> None:
        super().__init__(
            BlockFactory(4 * model_channels, dropout, dims, use_checkpoint,
                         use_scale_shift_norm, num_heads, num_head_channels,
                         use_new_attention_order, rescale_residual),
            image_size, in_channels, model_channels, channel_mult,
            num_res_blocks, attention_resolutions, conv_resample,
            resblock_updown, num_classes)
        self.out_channels = out_channels
        self.output_blocks, ch = decoder_blocks(
            self.make, self.skip_channels, self.ds, model_channels,
            channel_mult, num_res_blocks, attention_resolutions,
            conv_resample, resblock_updown,
            num_heads if num_heads_upsample == -1 else num_heads_upsample,
        )
        self.out = nn.Sequential(
            normalization(ch), nn.SiLU(),
            zero_module(conv_nd(dims, ch, out_channels, 3, padding=1)),
        )

    def forward(
        self, x: Tensor, timesteps: Tensor, y: Tensor | None = None
    ) -> Tensor:
        """The prediction for noisy images x at timesteps (labels y)."""
        return self.denoise(x, self.embed(x, timesteps, y))

    def denoise(self, x: Tensor, emb: Tensor) -> Tensor:
        """The prediction for x given its embedding (down, middle, up)."""
        skips, h = self.encode(x, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)


# %% [markdown]
# A small class-conditional ADM-style model: AdaGN, BigGAN resampling,
# attention at the two lowest resolutions with 16 channels per head, learned
# variance (6 output channels). Fresh, it predicts exactly zero, and the
# embedding only enters through zero residual branches, so to see the
# timestep and label matter we perturb all weights, as training would. Last,
# side by side, separate resampling layers against BigGAN residual blocks.

# %%
SMALL = dict(  # a smoke-sized ADM-style UNet for this chapter's checks
    image_size=image_size, in_channels=3, model_channels=model_channels,
    out_channels=6, num_res_blocks=1, attention_resolutions=(2, 4),
    channel_mult=(1, 2, 2), num_head_channels=16, num_classes=10,
    use_scale_shift_norm=True, resblock_updown=True,
)


def small_unet(**overrides) -> UNetModel:
    """The UNet of SMALL, with overrides."""
    return UNetModel(**{**SMALL, **overrides})


@torch.no_grad()
def perturb(model: nn.Module, std: float = 0.02) -> nn.Module:
    """Add Gaussian noise to every parameter (zero layers included)."""
    for p in model.parameters():
        p.add_(std * torch.randn_like(p))
    return model


model = small_unet().eval()
x = torch.randn(batch_size, 3, image_size, image_size)
t = torch.randint(0, 1000, (batch_size,))
y = torch.randint(0, 10, (batch_size,))
with torch.no_grad():
    out = model(x, t, y)
    assert out.shape == (batch_size, 6, image_size, image_size)
    assert torch.all(out == 0)
    out = perturb(model)(x, t, y)
    assert not torch.allclose(out, model(x, t, (y + 1) % 10))
    assert not torch.allclose(out, model(x, t + 1, y))
print(f"{sum(p.numel() for p in model.parameters()):,} parameters; output "
      f"{tuple(out.shape)}; {len(model.input_blocks)} input blocks, "
      f"{len(model.output_blocks)} output blocks")
for updown in (False, True):
    m = small_unet(resblock_updown=updown)
    names = [type(block[-1]).__name__ for block in m.input_blocks[1:]]
    count = sum(p.numel() for p in m.parameters())
    print(f"resblock_updown={updown!s:5}: {count:>9,} parameters, "
          f"input blocks end in {names}")
    assert ("Downsample" in names) != updown

# %% [markdown]
# ### One level of the released $64 \times 64$ model, drawn
#
# The released $64 \times 64$ ImageNet model (`64x64_diffusion.pt`) is this
# class built from the reference's flags (section 3.9): 192, 384, 576 and
# 768 channels at 64, 32, 16 and 8 pixels. The figure draws its level at $32
# \times 32$, with sizes read from the model built on the `meta` device, and
# AdaGN inside its residual blocks. Down, the level has 3 residual blocks,
# each followed by attention with $384 / 64 = 6$ heads, between two BigGAN
# resampling blocks; up, it has 4, because the down-sampling block that
# *entered* the level left a skip too. Each skip is concatenated onto one
# decoder block's input, so the decoder's residual blocks read 960, 768, 768
# and 576 channels and write 384.

# %% jupyter={"source_hidden": true}
from itertools import pairwise

import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

from adm_lib.compat import guided_diffusion as gd_compat

with torch.device("meta"):  # shapes only: no memory, milliseconds
    adm64 = gd_compat.model_from_flags(
        gd_compat.RELEASED["64x64_diffusion"][1])
# Its sizes, read from the model: the level at 32 x 32 (level 1).
widths = [int(m * adm64.model_channels) for m in adm64.channel_mult]
levels = len(widths)
R = (len(adm64.input_blocks) - levels) // levels  # res blocks per level
level, size = 1, adm64.image_size // 2
enc = list(adm64.input_blocks[(R + 1) * level:][:R + 2])  # down ... down
dec = list(adm64.output_blocks[(R + 1) * (levels - 1 - level):][:R + 1])
heads = enc[1][1].num_heads
emb_dim = adm64.time_embed[-1].out_features
dec_in = [b[0].in_layers[0].num_channels for b in dec]
dropout = dec[0][0].out_layers[2].p
w, lo, hi = widths[level], widths[level - 1], widths[level + 1]
assert R == 3 and widths == [192, 384, 576, 768] and emb_dim == 4 * 192
assert enc[0][0].updown and enc[-1][0].updown and dec[-1][-1].updown
# (Library classes: gd_compat builds adm_lib.unet's, not this chapter's.)
assert all(type(b[1]).__name__ == "AttentionBlock"
           for b in enc[1:-1] + dec)
assert heads == w // 64 and adm64.make.use_scale_shift_norm
assert dec_in == [hi + w] + [2 * w] * (R - 1) + [w + lo]
assert dec[0][0].emb_layers[1].out_features == 2 * w  # y_s and y_b

fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 6.6),
                             gridspec_kw={"width_ratios": [2.2, 1]})
colours = {"res": "#cfe2f3", "down": "#d9ead3", "emb": "#ead1dc",
           "other": "#eeeeee", "adagn": "#fde9c9"}


def box(ax, x, y, text, kind, width=3.0, height=0.7):
    """A labelled rounded box centred at (x, y)."""
    ax.add_patch(FancyBboxPatch(
        (x - width / 2, y - height / 2), width, height,
        boxstyle="round,pad=0.04", fc=colours[kind], ec="black", lw=0.8))
    ax.text(x, y, text, ha="center", va="center", fontsize=7.5)


def arrow(ax, start, end, text="", colour="black"):
    """An arrow from start to end, optionally labelled at its middle."""
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>",
                                 mutation_scale=9, lw=0.9, color=colour))
    if text:
        ax.text((start[0] + end[0]) / 2, (start[1] + end[1]) / 2 + 0.12,
                text, ha="center", va="bottom", fontsize=7, color=colour)


# Left: the level. Encoder down the left, decoder up the right; each
# encoder block's output is a skip into the decoder block at its height.
L, Rx = 0.0, 6.2
ys = [9.0, 7.8, 6.6, 5.4, 4.2]  # encoder rows; the decoder's are one up
attn = f"+ attention, {heads} heads × 64"
left = [(f"BigGAN down ResBlock\n{2 * size}→{size} px, {lo} ch", "down"),
        *[(f"ResBlock {c}→{w} ch\n{attn}", "res") for c in (lo, w, w)],
        (f"BigGAN down ResBlock\n{size}→{size // 2} px, {w} ch", "down")]
right = [(f"BigGAN up ResBlock\n{size}→{2 * size} px, {w} ch", "down"),
         *[(f"concat → ResBlock {c}→{w} ch\n{attn}", "res")
           for c in reversed(dec_in)]]
for x, rows, texts in ((L, ys, left), (Rx, [10.2, *ys[:-1]], right)):
    for y, (text, kind) in zip(rows, texts, strict=True):
        box(ax, x, y, text, kind)
ax.text(L, 10.5, f"from the {2 * size} px level", ha="center", fontsize=8)
ax.text(Rx, 11.1, f"to the {2 * size} px level", ha="center", fontsize=8)
box(ax, (L + Rx) / 2, 2.8, f"the {size // 2} px and {size // 4} px "
    f"levels ({hi} and {widths[-1]} ch)\nand the middle block", "other",
    width=7.6)
for a, b in pairwise([10.8, *ys, 2.8]):  # down the encoder
    arrow(ax, (L, a - 0.35), (L, b + 0.35))
for a, b in pairwise([11.4, 10.2, *ys[:-1], 2.8]):  # up the decoder
    arrow(ax, (Rx, b + 0.35), (Rx, a - 0.35))
for y, c in zip(ys[:-1], [lo, w, w, w], strict=True):
    arrow(ax, (L + 1.55, y), (Rx - 1.55, y), text=f"skip, {c} ch",
          colour="tab:blue")
# The embedding e reaches every ResBlock (dashed), through AdaGN.
box(ax, (L + Rx) / 2, 12.0, f"e = MLP(sinusoid(t)) + label_emb(y): "
    f"{emb_dim} numbers", "emb", width=5.4, height=0.5)
for x, side, rows in ((L - 1.8, -1, ys), (Rx + 1.8, 1, [10.2] + ys[:-1])):
    ax.plot([(L + Rx) / 2 + side * 2.7, x, x], [12.0, 12.0, rows[-1]],
            color="tab:purple", ls="--", lw=0.9)
    for y in rows:
        arrow(ax, (x, y), (x - side * 0.3, y), colour="tab:purple")
ax.text(L - 1.9, 3.8, "AdaGN\nin every\nResBlock", fontsize=7,
        color="tab:purple", ha="center", va="top")
ax.set(xlim=(L - 2.4, Rx + 2.3), ylim=(2.2, 12.4))
ax.set_title(f"One level of the released 64x64 model: {size}x{size} px, "
             f"{w} channels, {R} ResBlocks down, {R + 1} up", fontsize=9)

# Right: inside a ResBlock with AdaGN, at this level's width.
steps = [("h (skip concatenated)", "other"),
         ("GroupNorm, SiLU, conv 3x3", "res"), ("GroupNorm", "res"),
         ("× (1 + y_s) + y_b", "adagn"),
         (f"SiLU, dropout {dropout:g},\nconv 3x3 (zero init)", "res"),
         ("+ h (1x1 conv if\nthe width changes)", "other")]
rows = [10.4 - 1.6 * i for i in range(len(steps))]
for y, (text, kind) in zip(rows, steps, strict=True):
    box(bx, 0, y, text, kind, width=2.9, height=0.8)
for a, b in pairwise(rows):
    arrow(bx, (0, a - 0.4), (0, b + 0.4))
box(bx, 3.0, 10.4, f"e ({emb_dim})", "emb", width=1.6, height=0.6)
box(bx, 3.0, rows[3] + 1.6, f"Linear(SiLU(e))\n{emb_dim} → 2 × {w}:\n"
    "(y_s, y_b)", "emb", width=2.0, height=1.0)
arrow(bx, (3.0, 10.1), (3.0, rows[3] + 2.1), colour="tab:purple")
arrow(bx, (3.0, rows[3] + 1.1), (1.45, rows[3]), colour="tab:purple")
bx.plot([-1.45, -1.8, -1.8], [rows[0], rows[0], rows[-1]], color="gray",
        lw=0.9)
arrow(bx, (-1.8, rows[-1]), (-1.45, rows[-1]), colour="gray")
bx.text(-1.9, (rows[0] + rows[-1]) / 2, "skip path", rotation=90,
        fontsize=7, color="gray", ha="right", va="center")
bx.set(xlim=(-2.3, 4.1), ylim=(1.6, 11.0))
bx.set_title("Inside a ResBlock: AdaGN", fontsize=9)
for panel in (ax, bx):
    panel.set_axis_off()
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 3.7 The noisy-image classifier
#
# Classifier guidance (chapter 6) needs $\nabla_{x_t} \log p(y \mid x_t)$: a
# classifier of *noisy* images at any timestep. The paper uses the UNet's
# encoder half (input blocks and middle block, with the same timestep
# embedding) and a pooling head to 1000 logits. The reference calls it
# `EncoderUNetModel` and offers four heads:
#
# * `adaptive`: norm, SiLU, global average pooling, a zero-initialised $1
#   \times 1$ conv;
# * `attention` (the released classifiers): norm, SiLU and CLIP's attention
#   pooling: the mean feature, prepended as an extra token to the
#   positionally embedded map, attends to it, and its output through
#   `c_proj` is the logits;
# * `spatial` and `spatial_v2`: the spatial mean of *every* input block's
#   output and of the middle block, concatenated, through a two-layer MLP.

# %%
#| export
class AttentionPool2d(nn.Module):
    """CLIP-style attention pooling: the mean token attends to the map."""

    def __init__(self, spacial_dim: int, embed_dim: int,
                 num_heads_channels: int,
                 output_dim: int | None = None) -> None:
        super().__init__()
        self.positional_embedding = nn.Parameter(
            torch.randn(embed_dim, spacial_dim**2 + 1) / embed_dim**0.5
        )
        self.qkv_proj = nn.Conv1d(embed_dim, 3 * embed_dim, 1)
        self.c_proj = nn.Conv1d(embed_dim, output_dim or embed_dim, 1)
        self.attention = QKVAttention(embed_dim // num_heads_channels)

    def forward(self, x: Tensor) -> Tensor:
        """Pool [N, C, H, W] features to [N, output_dim]."""
        x = x.flatten(2)  # N C T
        x = torch.cat([x.mean(dim=-1, keepdim=True), x], dim=-1)
        x = (x + self.positional_embedding.to(x.dtype)).transpose(1, 2)
        h = self.attention(positionwise(self.qkv_proj, x))  # N T C
        return positionwise(self.c_proj, h[:, 0])  # the mean token's row


POOLS = ("adaptive", "attention", "spatial", "spatial_v2")


def pool_head(
    pool: str, channels: int, out_channels: int, dims: int,
    spatial_size: int, num_head_channels: int, feature_size: int,
) -> nn.Sequential:
    """The classifier's output head for a pooling kind."""
    if pool == "adaptive":
        adaptive = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d,
                    3: nn.AdaptiveAvgPool3d}[dims]
        return nn.Sequential(
            normalization(channels), nn.SiLU(), adaptive(1),
            zero_module(conv_nd(dims, channels, out_channels, 1)),
            nn.Flatten(),
        )
    if pool == "attention":
        if num_head_channels == -1:
            raise ValueError("attention pooling needs num_head_channels")
        attend = AttentionPool2d(spatial_size, channels, num_head_channels,
                                 out_channels)
        return nn.Sequential(normalization(channels), nn.SiLU(), attend)
    if pool in ("spatial", "spatial_v2"):  # an MLP, v2 with a norm
        act = ([nn.ReLU()] if pool == "spatial"
               else [normalization(2048), nn.SiLU()])
        return nn.Sequential(nn.Linear(feature_size, 2048), *act,
                             nn.Linear(2048, out_channels))
    raise ValueError(f"unknown pool {pool!r}; known: {', '.join(POOLS)}")


# %%
#| export
class EncoderUNetModel(UNetTrunk):
    """The UNet's encoder and middle block with a pooling head: logits.

    out_channels is the number of classes; pool is one of POOLS
    ("attention" needs num_head_channels); the rest are UNetModel's.
    """

    def __init__(
        self, image_size: int, in_channels: int, model_channels: int,
        out_channels: int, num_res_blocks: int,
        attention_resolutions: Sequence[int], dropout: float = 0.0,
        channel_mult: Sequence[float] = (1, 2, 4, 8),
        conv_resample: bool = True, dims: int = 2,
        use_checkpoint: bool = False, num_heads: int = 1,
        num_head_channels: int = -1, use_scale_shift_norm: bool = False,
        resblock_updown: bool = False, use_new_attention_order: bool = False,
        pool: str = "adaptive", rescale_residual: bool = False,
    ) -> None:
        super().__init__(
            BlockFactory(4 * model_channels, dropout, dims, use_checkpoint,
                         use_scale_shift_norm, num_heads, num_head_channels,
                         use_new_attention_order, rescale_residual),
            image_size, in_channels, model_channels, channel_mult,
            num_res_blocks, attention_resolutions, conv_resample,
            resblock_updown)
        self.out_channels, self.pool = out_channels, pool
        chans = self.skip_channels
        self.out = pool_head(pool, chans[-1], out_channels, dims,
                             image_size // self.ds, num_head_channels,
                             feature_size=sum(chans) + chans[-1])

    def forward(self, x: Tensor, timesteps: Tensor) -> Tensor:
        """Logits [N, out_channels] for noisy images x at timesteps."""
        skips, h = self.encode(x, self.embed(x, timesteps, None))
        if self.pool.startswith("spatial"):
            # The spatial heads read the mean of every block's output.
            means = [f.mean(dim=tuple(range(2, f.ndim))) for f in (*skips, h)]
            return self.out(torch.cat(means, dim=-1))
        return self.out(h)


# %% [markdown]
# Every head gives one logit vector per image, and the classifier's gradient
# with respect to its input, which guidance uses, is there (the weights are
# perturbed, as in 3.6, so that the zero-initialised layers pass it on).

# %%
for pool_kind in POOLS:
    clf = perturb(EncoderUNetModel(
        image_size, 3, model_channels, 10, 1, (2, 4),
        channel_mult=(1, 2, 2), num_head_channels=16,
        use_scale_shift_norm=True, resblock_updown=True, pool=pool_kind,
    ))
    x = torch.randn(batch_size, 3, image_size, image_size, requires_grad=True)
    logits = clf(x, torch.randint(0, 1000, (batch_size,)))
    (grad,) = torch.autograd.grad(logits.log_softmax(-1)[:, 0].sum(), x)
    count = sum(p.numel() for p in clf.parameters())
    print(f"{pool_kind:>10}: logits {tuple(logits.shape)}, "
          f"{count:,} parameters, |grad| {grad.norm():.2e}")
    assert logits.shape == (batch_size, 10) and grad.shape == x.shape


# %% [markdown]
# ## 3.8 The super-resolution model
#
# The paper's upsampling stack (after Nichol & Dhariwal and Saharia et al.)
# generates at low resolution, then runs a second diffusion model at high
# resolution *conditioned on the low-resolution image*, in the simplest way:
# the low-resolution image is bilinearly up-sampled to the model's size and
# concatenated to $x_t$ on channels. So the model is a UNet with twice the
# input channels.
#
# Chapter 7 adds one option, for *conditioning augmentation*: trained on
# low-resolution inputs noised to a random step $s$ of its own diffusion, the
# upsampler must be told $s$. With `low_res_level=True` it embeds $s$ as it
# embeds $t$ (its own MLP, `low_res_embed`) and adds it to the timestep
# embedding; the model then takes `low_res_t`. The released upsamplers have
# no such layer, and load unchanged.

# %%
#| export
class SuperResModel(UNetModel):
    """A UNet that also sees a low-res image, up-sampled, as extra input.

    x and low_res (any size) have in_channels each; out_channels count x's.
    low_res_level: forward takes low_res_t, the step low_res was noised to.
    """

    def __init__(self, image_size: int, in_channels: int, *args: Any,
                 low_res_level: bool = False, **kwargs: Any) -> None:
        super().__init__(image_size, 2 * in_channels, *args, **kwargs)
        if low_res_level:
            self.low_res_embed = time_embed_mlp(self.model_channels)

    def forward(
        self, x: Tensor, timesteps: Tensor, low_res: Tensor,
        y: Tensor | None = None, low_res_t: Tensor | None = None,
    ) -> Tensor:
        """The prediction for x at timesteps given low_res (and labels)."""
        if (low_res_t is None) != (not hasattr(self, "low_res_embed")):
            raise ValueError("pass low_res_t if and only if the model was "
                             "built with low_res_level=True")
        upsampled = F.interpolate(low_res, x.shape[2:], mode="bilinear")
        h = torch.cat([x, upsampled], dim=1)
        emb = self.embed(h, timesteps, y)
        if low_res_t is not None:
            if low_res_t.ndim == 0:
                low_res_t = low_res_t.expand(x.shape[0])
            level = timestep_embedding(low_res_t, self.model_channels)
            emb = emb + self.low_res_embed(level.to(h.dtype))
        return self.denoise(h, emb)


# %%
sr = SuperResModel(
    image_size, 3, model_channels, 6, 1, (4,), channel_mult=(1, 2, 2),
    num_heads=2, use_scale_shift_norm=True, resblock_updown=True,
).eval()
aug = perturb(SuperResModel(  # told the noise level of low_res
    image_size, 3, model_channels, 6, 1, (4,), channel_mult=(1, 2, 2),
    num_heads=2, low_res_level=True,
)).eval()
x = torch.randn(batch_size, 3, image_size, image_size)
t = torch.randint(0, 1000, (batch_size,))
low_res = torch.randn(batch_size, 3, image_size // 2, image_size // 2)
with torch.no_grad():
    out = perturb(sr)(x, t, low_res)
    other = sr(x, t, low_res.flip(-1))
    levels = [aug(x, t, low_res, low_res_t=torch.full_like(t, s))
              for s in (0, 100)]
extra = sum(p.numel() for p in aug.low_res_embed.parameters())
print(f"x {tuple(x.shape)} + low_res {tuple(low_res.shape)} "
      f"-> {tuple(out.shape)}; first conv sees "
      f"{sr.input_blocks[0][0].in_channels} channels")
print(f"low_res_level: {extra:,} more parameters; output change from s=0 "
      f"to s=100: {(levels[1] - levels[0]).abs().max():.2e}")
assert out.shape == (batch_size, 6, image_size, image_size)
assert sr.input_blocks[0][0].in_channels == 6
assert not torch.allclose(out, other)
assert not torch.allclose(*levels)

# %% [markdown]
# ## 3.9 The released models, counted
#
# The reference describes every model by command-line flags;
# `adm_lib.compat.guided_diffusion` (hand-written) reads them with the
# reference's defaults and builds our models as its `create_model`,
# `create_classifier` and `sr_create_model` build theirs. A resolution that
# no level has is dropped there, not refused: the reference ignores it, and
# checkpoints trained with such flags (the parity fixtures') must load. On
# PyTorch's `meta` device a model has shapes but no storage, so even the
# 500-million-parameter models are counted in milliseconds. The flags, from
# the reference's README, are in `gd_compat.RELEASED` (the appendix runs
# them).

# %%
import json
from pathlib import Path

RELEASED, BUILDERS = gd_compat.RELEASED, gd_compat.BUILDERS
counts, models = {}, {}
print(f"{'model':<26}{'parameters':>14}{'entries':>9}")
for name, (kind, flags) in RELEASED.items():
    with torch.device("meta"):
        models[name] = built = BUILDERS[kind](flags)
    params = sum(p.numel() for p in built.parameters())
    counts[name] = (params, len(built.state_dict()))
    print(f"{name:<26}{params:>14,}{counts[name][1]:>9}")

# %% [markdown]
# The heads, read from the built models: 4 per layer at $128 \times 128$
# (128 to 256 channels each), 64 channels per head in the others.

# %%
for name in ("64x64_diffusion", "128x128_diffusion", "256x256_diffusion"):
    layers = [m for m in models[name].modules()
              if type(m).__name__ == "AttentionBlock"]
    shapes = sorted({(m.num_heads, m.qkv.in_channels // m.num_heads)
                     for m in layers})
    print(f"{name:<20} heads x channels per head: {shapes}")
    if name.startswith("128"):
        assert {h for h, _ in shapes} == {4}
    else:
        assert {c for _, c in shapes} == {64}

# %% [markdown]
# Where the reference's own counts are at hand (the parity fixtures), ours
# must match exactly: the same parameters and state-dict entries are what
# let a released checkpoint load.

# %%
# Beside the project, as the tests look for it (the kernel is at its root).
official = Path("../shared/reference/guided_diffusion/official_models.json")
if official.is_file():
    reference = json.loads(official.read_text())
    for name, entry in reference.items():
        kind, flags = RELEASED[name]
        assert gd_compat.parse_flags(entry["flags"]) == (
            gd_compat.parse_flags(flags)), name
        assert counts[name] == (entry["params"], entry["state_dict_entries"])
    print(f"{len(reference)} counts agree with the reference's "
          f"({', '.join(reference)})")
else:
    print(f"no {official}: reference counts not checked")

# %% [markdown]
# Width, not depth, is where the parameters go: the 128 and 256 models are 256
# channels wide with 2 blocks per resolution, the 64 model 192 wide with 3.
# The classifiers are a fraction of the diffusion models' size, which keeps
# guidance's extra gradient cheap.
#
# ## 3.10 Loading the reference's checkpoints
#
# Because the module tree mirrors the reference's, a reference state dict
# loads with `strict=True` and no renaming. `load_checkpoint(path, flags,
# kind)` builds from flags and loads a file; `load_reference_state_dict`
# loads a state dict and, when it does not fit, says which flag is likely
# wrong instead of printing a thousand key names. (Not every wrong flag: the
# heads and the attention order change no shape, so a model built with the
# wrong ones loads and computes something else.) Say, a class-conditional
# state dict offered to an unconditional model:

# %%
flags = ("--image_size 32 --num_channels 32 --num_res_blocks 1 "
         "--channel_mult 1,2 --attention_resolutions 16 --num_heads 2")
conditional = gd_compat.model_from_flags(flags + " --class_cond True")
unconditional = gd_compat.model_from_flags(flags)
state = conditional.state_dict()
try:
    gd_compat.load_reference_state_dict(unconditional, state)
except ValueError as err:
    message = str(err)
print(message)
assert "--class_cond" in message
del state["label_emb.weight"]  # without the label embedding, the rest fits
gd_compat.load_reference_state_dict(unconditional, state)

# %% [markdown]
# The fixtures also hold a small random-weight model run by the reference:
# ours gives the same output to float32 round-off. The tests check every
# fixture; here is the first.

# %%
fixture = official.parent / "unet_a.pt"
if fixture.is_file():
    run = torch.load(fixture, map_location="cpu", weights_only=True)
    ref_model = gd_compat.model_from_flags(run["flags"]).eval()
    gd_compat.load_reference_state_dict(ref_model, run["state_dict"])
    with torch.no_grad():
        ours = ref_model(run["x"], run["t"], run["y"])
    diff = (ours - run["output"]).abs().max().item()
    print(f"{fixture.name}: max |ours - reference| = {diff:.1e}")
    torch.testing.assert_close(ours, run["output"], rtol=1e-5, atol=1e-5)
else:
    print(f"no {fixture}: parity not shown")

# %% [markdown]
# ## 3.11 The paper's ablations, as switches
#
# Section 3 of the paper starts from the UNet of Ho et al. (with Nichol &
# Dhariwal's changes) and changes one thing at a time (Table 1), then
# compares fixed head counts with a fixed width per head (Table 2) and AdaGN
# with addition (Table 3). Each row is a few keyword arguments of
# `UNetModel` on top of a **baseline**: two residual blocks per resolution,
# the additive embedding, separate resampling layers, attention at $16
# \times 16$ only with one head, no rescaling, and levels from the image
# size down to $8 \times 8$ (`channel_mult=(1, 2, 2)` for $32 \times 32$).
# Each entry of `ABLATIONS` below is one change from it, and **ADM** the
# paper's combination. Four need a word:
#
# * **depth** trades width for blocks, as the paper did: 4 blocks at 0.8
#   times the width. Widths are multiples of 32 (GroupNorm's groups), so at
#   base width 128 the narrower width is 96, about the baseline's size, but
#   at 64 it cannot shrink and the deeper model is simply bigger.
# * **64 channels per head** (Table 2's choice) needs attention layers a
#   multiple of 64 wide; with attention at $32 \times 32$ (ADM), the base
#   width must be one too.
# * **attention at 32, 16 and 8**: on $32 \times 32$ images, the absolute
#   resolutions of the paper's $128 \times 128$ experiments, so
#   `attention_at` is in pixels (those above the image's are dropped).
# * **AdaGN** was ablated in the paper on top of its improved model; here it
#   is one more change from the same baseline, so every row answers the
#   same question.
#
# Every model predicts $\epsilon$ and the variance interpolation $v$
# (chapter 2): twice the image's channels.

# %%
#| export
ABLATION_BASELINE = dict(
    num_res_blocks=2, width=1.0, attention_at=(16,), num_heads=1,
    num_head_channels=-1, resblock_updown=False,
    use_scale_shift_norm=False, rescale_residual=False,
)
ABLATIONS: dict[str, dict] = {
    "baseline": {},
    "depth (4 blocks, 0.8x width)": dict(num_res_blocks=4, width=0.8),
    "4 heads": dict(num_heads=4),
    "64 channels per head": dict(num_head_channels=64),
    "attention at 32, 16, 8": dict(attention_at=(32, 16, 8)),
    "BigGAN up/down": dict(resblock_updown=True),
    "residual rescaling": dict(rescale_residual=True),
    "AdaGN": dict(use_scale_shift_norm=True),
    "ADM": dict(attention_at=(32, 16, 8), num_head_channels=64,
                resblock_updown=True, use_scale_shift_norm=True),
}


def ablation_unet(
    variant: str, image_size: int, model_channels: int,
    num_classes: int | None = None, in_channels: int = 3,
) -> UNetModel:
    """The UNet of an ABLATIONS entry, predicting eps and the variance."""
    if variant not in ABLATIONS:
        raise ValueError(f"unknown variant {variant!r}; known: "
                         f"{', '.join(ABLATIONS)}")
    config = {**ABLATION_BASELINE, **ABLATIONS[variant]}
    # Widths are multiples of 32, the GroupNorm's number of groups.
    width = 32 * max(1, round(config.pop("width") * model_channels / 32))
    levels = int(math.log2(image_size // 8)) + 1  # down to 8 x 8
    # Resolutions in pixels; those above image_size are not in the model.
    factors = tuple(image_size // r for r in config.pop("attention_at")
                    if r <= image_size)
    return UNetModel(image_size, in_channels, width, 2 * in_channels,
                     attention_resolutions=factors,
                     channel_mult=(1,) + (2,) * (levels - 1),
                     num_classes=num_classes, **config)


# %% [markdown]
# Each variant, built at the size chapter 4 trains it, with what the ablations
# change; each row must differ from the baseline in what it claims.

# %%
def describe(model: UNetModel) -> dict:
    """The features of a UNet that the ablations change."""
    res = [m for m in model.modules() if isinstance(m, ResBlock)]
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "res blocks": len(res),
        "attention at": sorted({model.image_size // f
                                for f in model.attention_resolutions}),
        "heads x width": sorted({
            (m.num_heads, m.qkv.in_channels // m.num_heads)
            for m in model.modules() if isinstance(m, AttentionBlock)}),
        "BigGAN": any(m.updown for m in res),
        "AdaGN": res[0].use_scale_shift_norm,
        "scale": round(res[0].residual_scale, 3),
    }


features = {name: describe(ablation_unet(name, 32, ablation_channels, 10))
            for name in ABLATIONS}
print(f"base width {ablation_channels}, 32x32 RGB, 10 classes")
print(f"{'variant':<29}{'parameters':>11}{'blocks':>7}  attention at, "
      "heads x width, BigGAN, AdaGN, scale")
for name, f in features.items():
    params, blocks, *rest = f.values()
    print(f"{name:<29}{params:>11,}{blocks:>7}  {', '.join(map(str, rest))}")
base = features["baseline"]
assert features["depth (4 blocks, 0.8x width)"]["res blocks"] > (
    base["res blocks"])
assert features["attention at 32, 16, 8"]["attention at"] == [8, 16, 32]
assert {h for h, _ in features["4 heads"]["heads x width"]} == {4}
assert {c for _, c in features["ADM"]["heads x width"]} == {64}
assert features["BigGAN up/down"]["BigGAN"] and not base["BigGAN"]
assert features["AdaGN"]["AdaGN"] and not base["AdaGN"]
assert features["residual rescaling"]["parameters"] == base["parameters"]

# %% [markdown]
# Gradient checkpointing (section 3.4) is not an ablation: it trades one
# more forward pass for memory, and the gradients are the plain model's.

# %%
torch.manual_seed(seed)
plain = perturb(small_unet())
ckpt = small_unet(use_checkpoint=True)
ckpt.load_state_dict(plain.state_dict())
x = torch.randn(batch_size, 3, image_size, image_size)
t = torch.randint(0, 1000, (batch_size,))
y = torch.randint(0, 10, (batch_size,))
for m in (plain, ckpt):
    m(x, t, y).square().mean().backward()
for p, q in zip(plain.parameters(), ckpt.parameters(), strict=True):
    torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)
print("checkpointed gradients match")

# %% [markdown]
# ## 3.12 Training the ablations
#
# Which switches help is a question for training. Chapter 5 (section 5.10)
# trains every entry of `ABLATIONS` with chapter 4's loop, compares them at
# equal steps and at equal time by chapter 2's estimate of the variational
# bound on held-out images, and records a CPU run.
#
# Mind what that judges. The paper ranks its variants by FID on ImageNet
# $128 \times 128$ after 700K and 1200K iterations (chapter 0.2); the book by
# the held-out bound in bits per dimension, since FID needs thousands of
# samples per variant before its noise falls below Table 1's gaps. The
# bound measures likelihood, FID sample quality, and the two need not agree
# (Nichol & Dhariwal 2021 trade one for the other): a lower bound does not
# show a lower FID. Chapter 5 adds each variant's FID from a few samples as
# a glance, not as evidence.

# %% [markdown]
# ## 3.13 The library
#
# The `#| export` cells are `adm_lib.unet`. Library and chapter give the same
# outputs for the same weights, so edits here show when the library is stale:

# %%
from adm_lib import unet

lib_model = unet.UNetModel(**SMALL)
chapter_model = perturb(small_unet())
lib_model.load_state_dict(chapter_model.state_dict())
assert unet.ABLATIONS == ABLATIONS
with torch.no_grad():  # x, t and y of 3.11's last cell
    lib_out = lib_model.eval()(x, t, y)
    assert torch.equal(lib_out, chapter_model.eval()(x, t, y))
print("adm_lib.unet exports:", ", ".join(unet.__all__))

# %% [markdown]
# ## Summary
#
# * The ADM UNet is a convolutional encoder-decoder with skip connections,
#   conditioned on the timestep (and class) through an embedding that every
#   residual block reads.
# * The paper's changes: attention at 32, 16 and 8 with 64 channels per head,
#   BigGAN residual up/down-sampling, and AdaGN, which scales and shifts
#   normalised activations by the embedding; residual rescaling by
#   $1/\sqrt{2}$ was tried and left out.
# * Each ablation is an entry of `ABLATIONS`, built by `ablation_unet`;
#   chapter 5 (section 5.10) compares them by a held-out VLB estimate, a
#   likelihood, not the paper's FID.
# * The noisy-image classifier is the UNet's encoder with an
#   attention-pooling head; the super-resolution model is a UNet that also
#   sees the up-sampled low-resolution image.
# * Our models load the reference's state dicts unchanged, reproduce its
#   outputs to float32 round-off, and have the released models' parameter
#   counts exactly.
#
# Chapter 6 uses the classifier's gradient to guide sampling.

# %% [markdown]
# ## Exercises
#
# 1. Show that for an even `dim` the dot product of the embeddings that
#    `timestep_embedding` gives two timesteps $s$ and $t$ depends only on
#    $s - t$. Predict from the frequencies how it changes as $|s - t|$
#    grows, then plot it for `dim` 128.
# 2. Write the parameter count of `ResBlock(C, E, 0.0)`, a block that keeps
#    its $C$ channels, as a function of $C$ and $E$, with and without
#    `use_scale_shift_norm`, and check it by summing `p.numel()` over
#    `block.parameters()`. What share does AdaGN add at $C = 256$, $E = 4C$?
# 3. Count the multiply-adds of an `AttentionBlock` of $C$ channels on an
#    $r \times r$ map, in `qkv`, `proj_out` and the attention itself. Predict
#    the ratio of its times at $r = 32$ and $r = 16$ for $C = 64$, then time
#    it, and compare with the ms/step of the recorded run of appendix M.4.
# 4. Rerun with `-p ablation_channels 96`. Predict which entries of
#    `ABLATIONS` `ablation_unet` can build, minding the GroupNorm's 32 groups
#    and `heads_for`, then check.
# 5. Add to `ABLATIONS` an entry "ADM, additive": ADM without
#    `use_scale_shift_norm` (then `adm book export`). Predict whether its VLB
#    in 5.10 lands nearer ADM's or the baseline's, given the paired standard
#    errors, then check.
# 6. Add a pool `"max"` to `pool_head` and `POOLS`: norm, SiLU, global max
#    pooling and a zero-initialised $1 \times 1$ conv. Predict how its input
#    gradient, which guidance uses, differs from the `adaptive` head's, then
#    compare the two with the cell of 3.7.

# %% [markdown] jupyter={"source_hidden": true} tags=["solution"]
# **Solution 1.** With $h$ = `dim // 2` frequencies $\omega_k$, the dot
# product is $\sum_k (\cos \omega_k s \cos \omega_k t + \sin \omega_k s \sin
# \omega_k t) = \sum_k \cos \omega_k (s - t)$: a function of $s - t$ only,
# $h$ at $s = t$. As $|s - t|$ grows, terms with $\omega_k |s - t| \gtrsim 1$
# average out, fast frequencies first. The frequencies are geometric, so
# about $h (1 - \log|s - t| / \log 10^4)$ still agree, and the dot product
# falls roughly linearly in $\log |s - t|$, from 64 to about 30 at $|s - t|
# = 100$ for `dim` 128, with ripples from the fast terms.

# %% jupyter={"source_hidden": true} tags=["solution"]
h = 64  # dim 128: h frequencies
emb = timestep_embedding(torch.arange(1001), 2 * h)
freqs = torch.exp(-math.log(10000.0) * torch.arange(h) / h)
gaps = torch.arange(-500, 501)
dots = emb @ emb[500]  # s = 0..1000 against t = 500
by_formula = torch.cos(gaps[:, None] * freqs).sum(dim=1)
torch.testing.assert_close(dots, by_formula, rtol=0, atol=2e-3)
for gap in (1, 7, 100):  # every pair (s, s + gap) gives one number
    pairs = (emb[:-gap] * emb[gap:]).sum(dim=1)
    torch.testing.assert_close(pairs, pairs[:1].expand_as(pairs),
                               rtol=0, atol=2e-3)
# The slow frequencies that still agree, omega_k |s - t| < 1.
slow = [(freqs * g < 1).sum().item() for g in (1, 10, 100)]
print("dot product at |s - t| = 0, 1, 10, 100:",
      [round(dots[500 + g].item(), 1) for g in (0, 1, 10, 100)],
      "; frequencies with omega |s - t| < 1:", slow)
assert dots[500] == h and dots[500 + 1] > dots[500 + 10] > dots[500 + 100]
fig, ax = plt.subplots(figsize=(6, 2.8))
ax.plot(gaps[501:], dots[501:])
ax.set(xscale="log", xlabel="|s - t| (timesteps)",
       ylabel="embedding dot product", title="timestep_embedding, dim 128")
plt.show()

# %% [markdown] jupyter={"source_hidden": true} tags=["solution"]
# **Solution 2.** Two group norms ($2C$ each: scale and shift), two $3 \times
# 3$ convolutions ($9C^2 + C$ each) and the embedding's `Linear` ($EC + C$
# with addition, twice that with AdaGN): $18C^2 + EC + 7C$ parameters
# additive, $18C^2 + 2EC + 8C$ with AdaGN. At $C = 256$, $E = 4C$: 1,443,584
# against 1,705,984; AdaGN adds $4C^2 + C$ = 262,400, 18.2% of the block.

# %% jupyter={"source_hidden": true} tags=["solution"]
def resblock_count(c: int, e: int, adagn: bool) -> int:
    """Parameters of ResBlock(c, e, 0.0): two norms, two convs, a Linear."""
    return 2 * 2 * c + 2 * (9 * c * c + c) + (2 if adagn else 1) * (e * c + c)


for c, e, adagn in [(32, 128, False), (32, 128, True), (64, 96, True)]:
    block = ResBlock(c, e, 0.0, use_scale_shift_norm=adagn)
    assert sum(p.numel() for p in block.parameters()) == (
        resblock_count(c, e, adagn))
c = 256
extra = resblock_count(c, 4 * c, True) - resblock_count(c, 4 * c, False)
share = extra / resblock_count(c, 4 * c, False)
print(f"C = {c}, E = {4 * c}: additive {resblock_count(c, 4 * c, False):,}"
      f", AdaGN adds {extra:,} ({share:.1%})")
assert extra == 4 * c * c + c and 0.18 < share < 0.19

# %% [markdown] jupyter={"source_hidden": true} tags=["solution"]
# **Solution 3.** With $T = r^2$ positions: `qkv` is $3TC^2$ multiply-adds,
# `proj_out` $TC^2$, and the attention $2T^2C$ ($q k^\top$, then the weighted
# sum of $v$, whatever the heads). At $C = 64$: 151.0M at $r = 32$ against
# 12.6M at $r = 16$, a ratio of 12, almost all of it the $T^2$ term (134M),
# which grows 16-fold when $r$ doubles. The timed ratio on a CPU is smaller
# (about 5 on the book's 2-core machine): the norm and reshapes do not grow
# with $T^2$, and the fused attention kernel outpaces the projections.
# Appendix M.4's recorded run shows the cost in a whole model: attention at
# 32, 16 and 8 took 1,417 ms a step against the baseline's 562, 2.5 times.

# %% jupyter={"source_hidden": true} tags=["solution"]
import time

from torch.utils.flop_counter import FlopCounterMode


def attention_macs(c: int, r: int) -> tuple[int, int]:
    """Multiply-adds of qkv and proj_out, and of the attention itself."""
    t = r * r
    return 4 * t * c * c, 2 * t * t * c


c, times = 64, {}
block = AttentionBlock(c, num_head_channels=64)
for r in (32, 16):
    x = torch.randn(1, c, r, r)
    with torch.no_grad(), FlopCounterMode(display=False) as linear:
        block(x)  # counts the two projections (CPU attention is not)
    q = torch.randn(1, r * r, 1, c)
    with FlopCounterMode(display=False) as core:
        naive_attention(q, q, q)  # q k^T and the weighted sum of v
    proj, attn = attention_macs(c, r)
    assert linear.get_total_flops() == 2 * proj
    assert core.get_total_flops() == 2 * attn
    with torch.no_grad():  # timed after the counted (warm-up) call
        start = time.perf_counter()
        for _ in range(5):
            block(x)
    times[r] = (time.perf_counter() - start) / 5
    print(f"r = {r}: projections {proj / 1e6:.1f}M, attention "
          f"{attn / 1e6:.1f}M multiply-adds, {times[r] * 1e3:.2f} ms")
ratio = sum(attention_macs(c, 32)) / sum(attention_macs(c, 16))
print(f"predicted ratio {ratio:.1f}, timed {times[32] / times[16]:.1f}")
assert 11 < ratio < 13

# %% [markdown] jupyter={"source_hidden": true} tags=["solution"]
# **Solution 4.** At base width 96 the levels are 96, 192 and 192 wide, all
# multiples of 32, and "depth" rounds $0.8 \times 96$ to 64. Only attention at
# $32 \times 32$ with 64 channels per head can fail: 96 is not a multiple of
# 64. "64 channels per head" alone keeps attention at 16 (192 channels, 3
# heads) and builds; ADM, which has both, is refused by `heads_for`.

# %% jupyter={"source_hidden": true} tags=["solution"]
built, refused = {}, {}
for name in ABLATIONS:
    try:
        with torch.device("meta"):
            built[name] = ablation_unet(name, 32, 96, 10)
    except ValueError as err:
        refused[name] = str(err)
print("built:", ", ".join(built))
print("refused:", refused)
assert set(refused) == {"ADM"}
assert built["depth (4 blocks, 0.8x width)"].model_channels == 64

# %% [markdown] jupyter={"source_hidden": true} tags=["solution"]
# **Solution 5.** The entry differs from ADM only in each residual block's
# embedding `Linear`, half as wide (the cell counts the parameters). Its VLB
# needs chapter 5's run (appendix M.4's command), not made with this entry. The
# prediction from appendix M.4's recorded table: at 100 steps AdaGN alone was
# *worse* than the baseline (+0.065 ± 0.028 bits/dim, paired) and ADM tied it
# (+0.000 ± 0.011), so the additive ADM should land within two paired standard
# errors of both: the comparison cannot tell them apart. The paper's Table 3
# (FID 13.06 with AdaGN against 15.08 with addition, after 700K iterations at
# $128 \times 128$) is about trained models, which 100 CPU steps are not.

# %% jupyter={"source_hidden": true} tags=["solution"]
ABLATIONS["ADM, additive"] = {**ABLATIONS["ADM"],
                              "use_scale_shift_norm": False}
try:
    with torch.device("meta"):
        adm, additive = (ablation_unet(name, 32, 64, 10)
                         for name in ("ADM", "ADM, additive"))
finally:
    del ABLATIONS["ADM, additive"]  # the chapter's table stays the paper's
blocks = [m for m in adm.modules() if isinstance(m, ResBlock)]
# AdaGN's second half of each block's Linear: E x C weights and C biases.
expected = sum(m.emb_layers[1].out_features // 2
               * (m.emb_layers[1].in_features + 1) for m in blocks)
difference = (sum(p.numel() for p in adm.parameters())
              - sum(p.numel() for p in additive.parameters()))
print(f"ADM has {difference:,} more parameters than ADM, additive "
      f"({len(blocks)} residual blocks)")
assert difference == expected > 0

# %% [markdown] jupyter={"source_hidden": true} tags=["solution"]
# **Solution 6.** Average pooling spreads a logit's gradient evenly over all
# positions of the last feature map ($w_c / HW$ each); max pooling passes it
# only to each channel's maximum, and a position's gradient jumps when the
# maximum moves: guidance pushes $x_t$ only where the strongest features are,
# in a direction that can change abruptly between steps. The cell checks the
# sparsity before the zero-initialised projection (fresh, it passes none).

# %% jupyter={"source_hidden": true} tags=["solution"]
channels, size = 64, 8
feats = torch.rand(batch_size, channels, size, size, requires_grad=True)
project = nn.init.normal_(torch.empty(10, channels))
grads = {}
for name, pool in (("adaptive", lambda f: f.mean(dim=(2, 3))),
                   ("max", lambda f: f.amax(dim=(2, 3)))):
    logits = pool(feats) @ project.T
    (grads[name],) = torch.autograd.grad(logits[:, 0].sum(), feats)
    nonzero = (grads[name] != 0).sum(dim=(2, 3)).float().mean()
    print(f"{name:>8}: {nonzero:.0f} of {size * size} positions of each "
          "channel get a gradient")
assert (grads["adaptive"] != 0).all()
assert ((grads["max"] != 0).sum(dim=(2, 3)) == 1).all()
