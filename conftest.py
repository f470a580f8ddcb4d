"""Run the book's chapters as tests through nbval.

nbval collects only `.ipynb` files, and the chapters are Jupytext `.py` files. So
each chapter listed in book.toml is converted to a notebook in the build folder
and handed to nbval's collector, in lax mode (there are no stored outputs to
compare; the cells assert what they show). If a requested chapter yields no
cells, collection fails rather than passing with nothing run.

A chapter whose every cell ran and passed has been executed exactly as
`adm book build` would execute it (its parameters cell's defaults), so its
outputs go into the site's cache (build/site-cache): the site test, ordered
after the chapters, and a later `adm book build` render them without running
the chapter a second time.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Generator, Iterable
from pathlib import Path
from typing import Any

import jupytext
import nbformat
import pytest
from _pytest.compat import LEGACY_PATH, legacy_path
from nbval.plugin import IPyNbFile

from adm_lib.book import Book, BookError, to_notebook
from adm_lib.book.website import store_executed

BOOK = Book.load(Path(__file__).parent)
NOTEBOOKS = BOOK.build_dir / "nbval"
# Rough seconds of the longest files in one of CI's two workers (2-core CPU,
# `pytest --durations=0`, 2026-12-07), which order them: only the order
# matters. A file not named here takes a few seconds.
SECONDS = {
    "chapters/05_metrics.py": 115, "chapters/02_diffusion.py": 85,
    "chapters/07_cascades.py": 75, "chapters/06_guidance.py": 70,
    "chapters/appendix_runs.py": 57, "chapters/04_training.py": 55,
    "chapters/08_solvers.py": 32, "chapters/appendix_checkpoints.py": 20,
    "chapters/03_architecture.py": 11, "chapters/01_forward.py": 9,
    "tests/test_book.py": 91, "tests/test_train.py": 69,
    "tests/test_scripts.py": 61, "tests/test_install.py": 31,
    "tests/test_demo.py": 23, "tests/test_lab.py": 19,
    "tests/test_cascade.py": 12, "tests/test_sampling.py": 11,
}


def pytest_configure(config: pytest.Config) -> None:
    """Turn nbval on, in the current environment, with the book's timeouts."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # One thread per worker process, its chapters' kernels included:
        # two workers of two threads each on two cores run slower than two
        # of one (torch reads the variable when it starts).
        os.environ["OMP_NUM_THREADS"] = "1"
        import torch

        torch.set_num_threads(1)
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

    failed = False
    cells: list[Any] = []

    @property
    def fspath(self) -> LEGACY_PATH:
        return legacy_path(NOTEBOOKS / f"{self.path.stem}.ipynb")

    def collect(self) -> Iterable[Any]:
        # The chapter's text as nbval runs it: the cache is keyed on this text.
        self.text = self.path.read_text(encoding="utf-8")
        self.cells = list(super().collect())
        for cell in self.cells:
            # nbval waits 5 s for a finished cell's outputs to arrive; a
            # loaded 2-core machine can take longer to send a figure.
            cell.output_timeout = 60
        return self.cells

    def setup(self) -> None:
        self.started = time.perf_counter()
        super().setup()

    def teardown(self) -> None:
        super().teardown()
        done(self.path).touch()  # for the site's tests in another worker
        ran = [cell.test_outputs for cell in self.cells]
        if self.failed or not ran or any(outputs is None for outputs in ran):
            return  # a failed, skipped or deselected cell: not the whole chapter
        notebook = jupytext.reads(self.text, fmt="py:percent")
        code = [cell for cell in notebook.cells if cell.cell_type == "code"]
        for count, (cell, outputs) in enumerate(zip(code, ran, strict=True), 1):
            cell.execution_count, cell.outputs = count, outputs
        try:
            store_executed(BOOK, self.path, notebook, {},
                           time.perf_counter() - self.started, "nbval",
                           text=self.text)
        except (BookError, OSError) as err:
            warnings.warn(f"{self.path.name}: not shared with the site cache: "
                          f"{err}", stacklevel=1)


def done(chapter: Path) -> Path:
    """The mark a chapter leaves when its cells have run, passed or not."""
    return NOTEBOOKS / f"{chapter.stem}.done"


@pytest.hookimpl(wrapper=True)
def pytest_collect_file(
    file_path: Path, parent: pytest.Collector
) -> Generator[None, list[pytest.Collector], list[pytest.Collector]]:
    """Collect a book chapter as the notebook Jupytext makes of it, only."""
    collectors = yield
    if file_path not in BOOK.chapters:
        return collectors
    NOTEBOOKS.mkdir(parents=True, exist_ok=True)
    notebook = NOTEBOOKS / f"{file_path.stem}.ipynb"
    nbformat.write(to_notebook(file_path), notebook)
    done(file_path).unlink(missing_ok=True)
    # Named on the command line (`pytest chapters/05_metrics.py`), a chapter
    # is also a Python module to pytest, which would import it, running the
    # whole chapter once more during collection: that collector is dropped.
    return [ChapterNotebook.from_parent(parent, path=file_path)]


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
    # End-to-end runs are slow: `pytest -m "not slow"` leaves them out.
    for item in items:
        if isinstance(item.parent, IPyNbFile):
            item.add_marker(pytest.mark.slow)
    # pytest-xdist's two workers take whole files, in the order the items
    # come in; a worker ends with the file it took last. So the files go
    # longest first, and the workers end together: the chapters, then the
    # site's tests, which render what the chapters' cells have just
    # executed (build/site-cache) and so wait for the last of them, then
    # the other tests. The sort is stable: a file's tests keep their order.
    def rank(item: pytest.Item) -> tuple[int, float]:
        if isinstance(item.parent, IPyNbFile):
            group = 0
        else:
            group = 1 if item.get_closest_marker("site") is not None else 2
        return group, -SECONDS.get(item.nodeid.split("::")[0], 0)

    items.sort(key=rank)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Say which chapters this session runs (after -k and -m), which the
    site's tests wait for when another worker runs them (test_site.py)."""
    chapters = {item.parent.path.stem for item in session.items
                if isinstance(item.parent, IPyNbFile)}
    os.environ["ADM_SESSION_CHAPTERS"] = ",".join(sorted(chapters))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Note a chapter with a failing cell: its outputs must not reach the site."""
    report = yield
    if report.failed and isinstance(item.parent, ChapterNotebook):
        item.parent.failed = True
    return report
