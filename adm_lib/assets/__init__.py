"""Files that ship inside the package: the embedded MNIST-5k, the feature nets
and the training presets.

``data/README.md`` describes the first two and the scripts in ``data/`` that make
them; ``presets.toml`` is read by ``adm_lib.config`` (chapter 4.2).
They are read through :mod:`importlib.resources`, so an installed wheel finds them
as an editable checkout does.
"""

from __future__ import annotations

from importlib.resources import files
from importlib.resources.abc import Traversable


def asset(name: str) -> Traversable:
    """The packaged file ``adm_lib/assets/<name>``; open it with ``.open("rb")``."""
    # A Traversable, not a Path: the package may be imported from a zip archive.
    return files(__name__) / name
