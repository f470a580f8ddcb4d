"""Where the reference implementation's parity fixtures are, and how to read them.

Parity tests read the folder named by ADM_REFERENCE_FIXTURES (default
`../shared/reference/guided_diffusion`, relative to the project root), are
parametrized over every file matching their pattern (the test id names the file)
and skip with a reason where there is none.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / os.environ.get(
    "ADM_REFERENCE_FIXTURES", "../shared/reference/guided_diffusion"
)


def reference_files(pattern: str) -> list[Any]:
    """pytest params, one per fixture file matching `pattern`, or one skip."""
    files = sorted(FIXTURES.glob(pattern)) if FIXTURES.is_dir() else []
    if not files:
        reason = f"no {pattern} in {FIXTURES} (set ADM_REFERENCE_FIXTURES)"
        return [pytest.param(None, id=pattern, marks=pytest.mark.skip(reason))]
    return [pytest.param(path, id=path.name) for path in files]


def load(path: Path) -> dict[str, Any]:
    """A fixture file: a plain dict of tensors and strings."""
    return torch.load(path, map_location="cpu", weights_only=True)


def parse_flags(flags: str) -> dict[str, str]:
    """The reference's `--name value` command-line string as a dict."""
    words = shlex.split(flags)
    if len(words) % 2 or not all(w.startswith("--") for w in words[::2]):
        raise ValueError(f"not a --name value flags string: {flags!r}")
    pairs = zip(words[::2], words[1::2], strict=True)
    return {name[2:]: value for name, value in pairs}
