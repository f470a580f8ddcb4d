"""JupyterLab on the book (`adm book lab`, adm_lib/book/lab.py).

The browser test starts `adm book lab` on localhost, with a random free port,
a token and settings folders of its own, opens it in headless Chromium (the
site test's browser: Debian's `chromium` and `chromium-driver` through
Selenium; it skips with the reason where they are absent), double-clicks a
chapter in the file browser and checks that a notebook opened, with every
cell of the chapter and no unsaved change.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbformat
import pytest

from adm_lib import book as bk
from adm_lib.cli import main
from tests.test_site import browser  # noqa: F401  (a fixture)

lab = pytest.importorskip("adm_lib.book.lab", reason="needs the book extras: "
                          "pip install -e '.[book]'")

ROOT = Path(__file__).resolve().parents[1]
BOOK = bk.Book.load(ROOT)
OPENED = BOOK.chapter("0")  # the quickest kernel-side: nothing runs on open


def test_lab_command_adds_the_projects_settings(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`adm book lab` is JupyterLab on the chapters, with .jupyter/ first."""
    monkeypatch.setenv("JUPYTER_CONFIG_PATH", "/elsewhere")
    monkeypatch.chdir(OPENED.parent)  # the book is found from inside it
    started = []

    def execve(path: str, argv: list[str], env: dict[str, str]) -> None:
        started.append((path, argv, env))
        raise SystemExit(0)

    monkeypatch.setattr(os, "execve", execve)
    with pytest.raises(SystemExit):
        main(["book", "lab", "--", "--port", "8890", "--no-browser"])
    (path, argv, env), = started
    assert path == argv[0] == sys.executable
    assert argv[1:] == ["-m", "jupyterlab", f"--ServerApp.root_dir={BOOK.src}",
                        "--port", "8890", "--no-browser"]
    assert env["JUPYTER_CONFIG_PATH"].split(os.pathsep) == [
        str(ROOT / lab.CONFIG_DIR), "/elsewhere"]


def test_the_settings_name_the_viewer_and_the_contents_manager() -> None:
    config = ROOT / lab.CONFIG_DIR
    server = json.loads((config / "jupyter_server_config.json").read_text())
    manager = server["ServerApp"]["contents_manager_class"]
    assert manager == "adm_lib.book.lab.ChapterContentsManager"
    overrides = json.loads(
        (config / "labconfig" / "default_setting_overrides.json").read_text())
    viewers = overrides["@jupyterlab/docmanager-extension:plugin"]
    assert viewers["defaultViewers"]["python"] == "Jupytext Notebook"


def _get(root: Path, path: str, **kwargs: Any) -> dict[str, Any]:
    manager = lab.ChapterContentsManager(root_dir=str(root))
    return asyncio.run(manager.get(path, **kwargs))


def test_a_chapter_is_read_with_the_kernels_language_info(tmp_path: Path) -> None:
    """Without it, JupyterLab marks a chapter changed as it opens."""
    from ipykernel.ipkernel import IPythonKernel

    model = _get(BOOK.src, OPENED.name)
    assert model["type"] == "notebook"
    metadata = model["content"]["metadata"]
    assert metadata["language_info"] == IPythonKernel.language_info
    assert metadata["kernelspec"]["name"] == BOOK.kernel
    assert len(model["content"]["cells"]) == len(bk.to_notebook(OPENED).cells)
    # A notebook's own language_info is kept; other files are left alone.
    stored = nbformat.v4.new_notebook(metadata={
        "kernelspec": {"name": "python3", "language": "python",
                       "display_name": "Python 3"},
        "language_info": {"name": "python", "version": "3.0"}})
    nbformat.write(stored, tmp_path / "old.ipynb")
    (tmp_path / "notes.txt").write_text("text\n")
    assert _get(tmp_path, "old.ipynb")["content"]["metadata"][
        "language_info"] == {"name": "python", "version": "3.0"}
    assert _get(tmp_path, "notes.txt")["content"] == "text\n"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def jupyterlab(tmp_path: Path) -> Iterator[str]:
    """`adm book lab` on localhost; yields its URL, token included."""
    port, token = _free_port(), secrets.token_hex(16)
    command = [
        sys.executable, "-m", "adm_lib.cli", "book", "lab", "--",
        "--no-browser", "--ip=127.0.0.1", f"--port={port}",
        "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
        # The reader's own JupyterLab settings and workspaces stay out.
        f"--LabApp.user_settings_dir={tmp_path / 'settings'}",
        f"--LabApp.workspaces_dir={tmp_path / 'workspaces'}",
        "--LabApp.expose_app_in_browser=True",  # for the checks below
        *(["--allow-root"] if os.geteuid() == 0 else [])]
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(tmp_path / "config"),
           "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime")}
    log = (tmp_path / "lab.log").open("w")
    server = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log,
                              stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, (tmp_path / "lab.log").read_text()
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}",
                                       timeout=5)
                break
            except OSError:
                assert time.monotonic() < deadline, "JupyterLab did not start"
                time.sleep(0.5)
        yield f"{url}/lab?token={token}"
    finally:
        server.terminate()
        server.wait(60)
        log.close()


# The open notebook's state, through the app that expose_app_in_browser shows.
STATE = """
const panel = window.jupyterapp.shell.currentWidget;
if (!panel || !panel.context) return null;  // the launcher, or nothing yet
const cells = panel.context.model.cells;  // a notebook's, not a text file's
return {path: panel.context.path, notebook: cells !== undefined,
        cells: cells ? cells.length : 0, dirty: panel.context.model.dirty,
        kernel: cells && panel.sessionContext.kernelDisplayStatus,
        tab: panel.title.className};
"""


@pytest.mark.slow
def test_double_click_opens_a_chapter_as_a_clean_notebook(
        browser: Any, jupyterlab: str) -> None:  # noqa: F811
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(jupyterlab)
    wait = WebDriverWait(browser, 120, poll_frequency=0.5)

    def listed(driver: Any) -> Any:
        for item in driver.find_elements(By.CSS_SELECTOR, ".jp-DirListing-item"):
            text = item.find_elements(By.CSS_SELECTOR, ".jp-DirListing-itemText")
            if text and text[0].text == OPENED.name and item.is_displayed():
                return item
        return None

    ActionChains(browser).double_click(wait.until(listed)).perform()
    # Opened, and its kernel started: by then JupyterLab has set the kernel's
    # language_info and kernelspec, which would mark a chapter changed.
    state = wait.until(lambda d: (s := d.execute_script(STATE))
                       and (not s["notebook"] or s["kernel"] == "idle") and s)
    assert state["notebook"], f"{OPENED.name} opened as text"
    time.sleep(2)  # for any late change to the model
    state = browser.execute_script(STATE)
    assert state["path"] == OPENED.name
    assert state["cells"] == len(bk.to_notebook(OPENED).cells)
    cells = browser.find_elements(By.CSS_SELECTOR, ".jp-NotebookPanel .jp-Cell")
    assert cells and not browser.find_elements(By.CSS_SELECTOR, ".jp-FileEditor")
    assert state["dirty"] is False
    assert "jp-mod-dirty" not in state["tab"]
