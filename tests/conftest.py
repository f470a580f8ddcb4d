"""Fixtures shared by the test modules."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    """Run the block with `n` intra-op threads, then put back the count."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread: two spinning threads on 2 busy cores crawl."""
    with threads(1):
        yield


@pytest.fixture(scope="session")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 grey 8x8 images in 4 classes, as an .npz (arr_0, arr_1)."""
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    rng = np.random.default_rng(0)
    labels = np.arange(24) % 4
    base = rng.integers(0, 256, (4, 8, 8))
    noise = rng.integers(-40, 41, (24, 8, 8))
    images = np.clip(base[labels] + noise, 0, 255).astype(np.uint8)
    np.savez(path, images, labels)
    return path


@pytest.fixture(scope="session")
def reference(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 6-step run of RESUMABLE, a checkpoint every step.

    One thread, as the runs compared with it: the tests that resume expect
    its bits exactly.
    """
    # Imported here: collecting the other test files needs no training loop.
    from adm_lib import train as tr
    from tests.helpers import RESUMABLE, config

    out = tmp_path_factory.mktemp("reference") / "run"
    with threads(1):
        tr.train(config(data, **RESUMABLE), out, progress=False)
    return out


@pytest.fixture
def backends(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Put back the global backend flags that fast_backends sets."""
    # monkeypatch cannot undo torch.backends' attributes: save them by hand.
    flags = [(torch.backends.cuda.matmul, "allow_tf32"),
             (torch.backends.cudnn, "allow_tf32"),
             (torch.backends.cudnn, "benchmark")]
    saved = [getattr(obj, name) for obj, name in flags]
    deterministic = torch.are_deterministic_algorithms_enabled()
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "")  # undone at the end
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    yield
    for (obj, name), value in zip(flags, saved, strict=True):
        setattr(obj, name, value)
    torch.use_deterministic_algorithms(deterministic)
