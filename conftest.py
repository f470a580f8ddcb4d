"""Run the book's chapters as tests through nbval.

nbval collects only `.ipynb` files, and the chapters are Jupytext `.py` files. So
each chapter listed in book.toml is converted to a notebook in the build folder
and handed to nbval's collector, in lax mode (there are no stored outputs to
compare; the cells assert what they show). If a requested chapter yields no
cells, collection fails rather than passing with nothing run.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from _pytest.compat import LEGACY_PATH, legacy_path
from nbval.plugin import IPyNbFile

from adm_lib.book import Book, to_notebook

BOOK = Book.load(Path(__file__).parent)
NOTEBOOKS = BOOK.build_dir / "nbval"


def pytest_configure(config: pytest.Config) -> None:
    """Turn nbval on, in the current environment, with the book's timeouts."""
    option = config.option
    if not (option.nbval or option.nbval_lax):
        option.nbval_lax = True
    if not option.nbval_kernel_name:
        option.nbval_current_env = True
    option.nbval_cell_timeout = BOOK.cell_timeout
    option.nbval_kernel_startup_timeout = BOOK.startup_timeout


class ChapterNotebook(IPyNbFile):
    """nbval's collector for a chapter: its node is the chapter's `.py` file
    (so `pytest chapters/01_forward.py` selects it), while nbval reads, and
    runs the kernel beside, the notebook converted into the build folder."""

    @property
    def fspath(self) -> LEGACY_PATH:
        return legacy_path(NOTEBOOKS / f"{self.path.stem}.ipynb")


def pytest_collect_file(
    file_path: Path, parent: pytest.Collector
) -> pytest.Collector | None:
    """Collect a book chapter as the notebook Jupytext makes of it."""
    if file_path not in BOOK.chapters:
        return None
    NOTEBOOKS.mkdir(parents=True, exist_ok=True)
    notebook = NOTEBOOKS / f"{file_path.stem}.ipynb"
    nbformat.write(to_notebook(file_path), notebook)
    return ChapterNotebook.from_parent(parent, path=file_path)


@pytest.hookimpl(tryfirst=True)  # before -k and -m deselect anything
def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    """Fail when a chapter that was asked for produced no cells to run."""
    here = config.invocation_params.dir
    requested = [(here / arg.split("::")[0]).resolve() for arg in config.args]
    wanted = [
        chapter
        for chapter in BOOK.chapters
        if any(chapter == p or p in chapter.parents for p in requested)
    ]
    collected = {
        item.parent.path.stem for item in items if isinstance(item.parent, IPyNbFile)
    }
    missing = [c.name for c in wanted if c.stem not in collected]
    if missing:
        raise pytest.UsageError(
            f"no notebook cells collected for chapter(s) {', '.join(missing)}; "
            "nbval must run every chapter listed in book.toml"
        )
