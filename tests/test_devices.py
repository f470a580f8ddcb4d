"""adm_lib.devices: the one rule that turns a device name into a device."""

from __future__ import annotations

import pytest
import torch

from adm_lib.devices import resolve_device


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
