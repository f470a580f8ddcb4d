"""Devices and precision: which device, which dtype, which kernels.

Foundation (hand-written; the runs appendix explains it). Chapter 2 picks
its device with `resolve_device`; chapter 4 teaches mixed precision with
`resolve_precision` and `autocast_model`; chapter 6 samples with them.
"""

import contextlib
import functools
import os
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = [
    "PRECISIONS",
    "MEMORY_FORMATS",
    "resolve_device",
    "native_bf16",
    "resolve_precision",
    "fast_backends",
    "memory_format",
    "attention_kernels",
    "autocast_model",
    "follow_layouts",
]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
MEMORY_FORMATS = ("auto", "channels_last", "contiguous")


def resolve_device(name: str = "auto") -> torch.device:
    """The device a name selects: "auto" is CUDA when there is a GPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"device={name!r} is not a device; expected auto, "
                         "cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but PyTorch sees no GPU; use cpu "
                         "or auto")
    return device


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes in bfloat16 natively (not emulated)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    # AVX-512-BF16 or AMX: without them oneDNN emulates bf16, several
    # times slower than float32.
    mkldnn = torch.ops.mkldnn
    return device.type == "cpu" and mkldnn._is_mkldnn_bf16_supported()


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto" as bf16 where the device has it natively, else fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: expected one of "
                         f"{', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    if native_bf16(device):
        return "bf16"
    _say_fp32(device.type)
    return "fp32"


@functools.cache
def _say_fp32(device_type: str) -> None:
    """Say once per process why "auto" precision is float32 here."""
    print(f"adm_lib: this {device_type} has no native bfloat16 (a CPU needs "
          "AVX-512-BF16 or AMX), so precision 'auto' runs in float32",
          file=sys.stderr)


def fast_backends(device: torch.device, precision: str,
                  deterministic: bool = False) -> None:
    """Set TF32, cuDNN's autotuner and determinism for a run's settings."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # This also stops Inductor (compile=true) from autotuning its kernels.
    torch.use_deterministic_algorithms(deterministic)
    if device.type == "cuda":
        tf32 = resolve_precision(precision, device) != "fp32"
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        torch.backends.cudnn.benchmark = not deterministic


def memory_format(choice: str, device: torch.device) -> torch.memory_format:
    """The layout a `memory_format` setting names on `device`."""
    if choice not in MEMORY_FORMATS:
        raise ValueError(f"memory_format={choice!r}: expected one of "
                         f"{', '.join(MEMORY_FORMATS)}")
    if choice == "auto":
        # cuDNN's fastest convolutions want channels_last.
        choice = "channels_last" if device.type == "cuda" else "contiguous"
    return (torch.channels_last if choice == "channels_last"
            else torch.contiguous_format)


def attention_kernels(
        deterministic: bool) -> contextlib.AbstractContextManager[None]:
    """Attention in the math kernels if `deterministic` (bit-exact runs)."""
    return (sdpa_kernel(SDPBackend.MATH) if deterministic
            else contextlib.nullcontext())


def autocast_model(model: nn.Module | Callable[..., Tensor], precision: str,
                   device: torch.device) -> Callable[..., Tensor]:
    """`model` run under autocast at `precision`, returning float32."""
    if precision == "fp32":
        return model
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16

    def run(x: Tensor, t: Tensor, **kwargs: Any) -> Tensor:
        with torch.autocast(device.type, dtype=dtype):
            out = model(x, t, **kwargs)
        return out.float()

    return run


def follow_layouts(optimizer: torch.optim.Optimizer) -> None:
    """Give each parameter's moments the parameter's strides.

    Loading moves them to the parameter's device and dtype but keeps the
    strides they were saved with, and the fused AdamW pairs elements by
    position in memory: moments saved channels_last (a GPU's layout) and
    loaded for a contiguous parameter (a CPU's) would update the wrong
    elements.
    """
    for param, slots in optimizer.state.items():
        for name, value in slots.items():
            if (isinstance(value, Tensor) and value.shape == param.shape
                    and value.stride() != param.stride()):
                slots[name] = torch.empty_like(
                    param, dtype=value.dtype).copy_(value)
