"""adm_lib.devices (foundation): the one rule that turns a device name into
a device, and a run's precision, memory layout and kernels."""

from __future__ import annotations

import os

import pytest
import torch

from adm_lib import config as cf
from adm_lib import devices as dv
from adm_lib.devices import resolve_device

CPU = torch.device("cpu")


@pytest.mark.parametrize("gpu", [False, True])
def test_auto_is_cuda_exactly_when_torch_sees_a_gpu(
    monkeypatch: pytest.MonkeyPatch, gpu: bool
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    assert resolve_device() == torch.device("cuda" if gpu else "cpu")
    assert resolve_device("auto") == resolve_device()


def test_explicit_names_are_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "", "CPU"])
def test_a_name_torch_does_not_parse_is_refused_by_name(name: str) -> None:
    expected = (f"device={name!r} is not a device; expected auto, cpu, cuda "
                "or cuda:N")
    with pytest.raises(ValueError) as raised:
        resolve_device(name)
    assert str(raised.value) == expected


@pytest.mark.parametrize("name", ["cuda", "cuda:0"])
def test_cuda_without_a_gpu_is_refused(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError) as raised:
        resolve_device(name)
    assert str(raised.value) == (f"device={name!r} but PyTorch sees no GPU; "
                                 "use cpu or auto")


# --- precision ------------------------------------------------------------------


@pytest.mark.parametrize("native", [True, False])
def test_resolve_precision(monkeypatch, capsys, native):
    # "auto" is bf16 only where it is native: emulated bf16 is slower.
    monkeypatch.setattr(dv, "native_bf16", lambda device: native)
    dv._say_fp32.cache_clear()
    want = "bf16" if native else "fp32"
    for device in (CPU, torch.device("cuda", 0)):
        assert dv.resolve_precision("auto", device) == want
    for precision in ("fp32", "bf16", "fp16"):
        assert dv.resolve_precision(precision, CPU) == precision
    said = capsys.readouterr().err
    # Said once per device type, and only when it falls back.
    assert said.count("no native bfloat16") == (0 if native else 2)
    dv.resolve_precision("auto", CPU)
    assert "bfloat16" not in capsys.readouterr().err


def test_native_bf16_matches_the_cpu_flags():
    flags = open("/proc/cpuinfo").read() if os.path.exists(
        "/proc/cpuinfo") else ""
    if not flags:
        pytest.skip("no /proc/cpuinfo to read the CPU's flags from")
    has = any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))
    assert dv.native_bf16(CPU) == has


# --- memory format, backends -----------------------------------------------------


def test_memory_format_auto_follows_the_device_and_choices_override():
    cuda = torch.device("cuda", 0)
    assert dv.memory_format("auto", CPU) == torch.contiguous_format
    assert dv.memory_format("auto", cuda) == torch.channels_last
    for device in (CPU, cuda):
        assert dv.memory_format("contiguous", device) == torch.contiguous_format
        assert dv.memory_format("channels_last", device) == torch.channels_last
    assert {"memory_format", "deterministic"} <= cf.RUN_FIELDS


def tf32() -> tuple[bool, bool]:
    return (torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cudnn.allow_tf32)


@pytest.mark.parametrize("first", ["fp32", "bf16"])
def test_tf32_only_for_16_bit_runs(backends, first):
    # fast_backends reads only the device's type, so a CUDA device object
    # works without a GPU. Each precision after the other: a previous
    # run's setting must not leak into the next.
    cuda = torch.device("cuda", 0)
    order = ["fp32", "bf16", "fp16", "fp32"]
    if first == "bf16":
        order = order[1:] + ["bf16"]
    for precision in order:
        dv.fast_backends(cuda, precision)
        assert tf32() == ((precision != "fp32"),) * 2, precision
        assert torch.backends.cudnn.benchmark


def test_fast_backends_change_nothing_on_a_cpu(backends):
    before = tf32(), torch.backends.cudnn.benchmark
    dv.fast_backends(CPU, "bf16")
    assert (tf32(), torch.backends.cudnn.benchmark) == before
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ


def test_deterministic_sets_what_bit_exact_gpu_runs_need(backends):
    cuda = torch.device("cuda", 0)
    dv.fast_backends(cuda, "auto", deterministic=True)
    assert torch.are_deterministic_algorithms_enabled()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert not torch.backends.cudnn.benchmark
    with dv.attention_kernels(deterministic=True):
        assert torch.backends.cuda.math_sdp_enabled()
        assert not (torch.backends.cuda.flash_sdp_enabled()
                    or torch.backends.cuda.mem_efficient_sdp_enabled()
                    or torch.backends.cuda.cudnn_sdp_enabled())
    assert torch.backends.cuda.flash_sdp_enabled()  # only inside
    # A non-deterministic run in the same process undoes it, but leaves a
    # workspace setting alone (cuBLAS read it once, at its first call).
    dv.fast_backends(cuda, "auto")
    assert not torch.are_deterministic_algorithms_enabled()
    assert torch.backends.cudnn.benchmark
    # A workspace size the user chose is kept.
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":16:8"
    dv.fast_backends(cuda, "auto", deterministic=True)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
