"""JupyterLab for the book: `adm book lab` and the contents manager it uses.

`adm book lab` starts JupyterLab on the chapters with the project's Jupyter
settings (the `.jupyter/` folder of the book's root) added to Jupyter's
configuration path, so that every reader gets them without a step of their
own: a chapter opens as a notebook on a double click (Jupytext's notebook
is the default viewer of `.py` files), and through `ChapterContentsManager`,
which gives a chapter the kernel's `language_info` as it is read. A text
notebook has none (the `.py` file does not store it), and JupyterLab marks a
notebook without one as changed the moment it opens. Hand-written tooling.
"""

from __future__ import annotations

import os
import sys
from functools import cache
from typing import Any

from jupyter_server.services.contents.largefilemanager import (
    AsyncLargeFileManager,
)
from jupytext.async_contentsmanager import (
    build_async_jupytext_contents_manager_class,
)

from adm_lib.book import Book

CONFIG_DIR = ".jupyter"  # the project's Jupyter settings, in the book's root


def lab_command(book: Book, extra: list[str]) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of JupyterLab on the book's chapters."""
    env = dict(os.environ)
    paths = [str(book.root / CONFIG_DIR), env.get("JUPYTER_CONFIG_PATH", "")]
    env["JUPYTER_CONFIG_PATH"] = os.pathsep.join(p for p in paths if p)
    command = [sys.executable, "-m", "jupyterlab",
               f"--ServerApp.root_dir={book.src}", *extra]
    return command, env


@cache
def _language_info() -> dict[str, Any]:
    """What the book's Python kernel (ipykernel) reports as its language."""
    from ipykernel.ipkernel import IPythonKernel

    return dict(IPythonKernel.language_info)


class ChapterContentsManager(
    build_async_jupytext_contents_manager_class(AsyncLargeFileManager)
):
    """Jupytext's contents manager; Python text notebooks get `language_info`."""

    async def get(self, path: str, content: bool = True, type: str | None = None,
                  format: str | None = None, **kwargs: Any) -> dict[str, Any]:
        """The model of `path`, as Jupytext reads it, with `language_info`."""
        model = await super().get(path, content=content, type=type,
                                  format=format, **kwargs)
        if model["type"] == "notebook" and model.get("content"):
            metadata = model["content"]["metadata"]
            if metadata.get("kernelspec", {}).get("language") == "python":
                metadata.setdefault("language_info", _language_info())
        return model
