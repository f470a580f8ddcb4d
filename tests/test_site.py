"""The book's web site, built for the smoke configuration and read in Chromium.

The site is built once for this module with `website.build_site`, as `adm book
build` builds it. Run with the chapters (`pytest`), these tests come right after
them (conftest.py's order) and render the notebooks that nbval has just
executed, from build/site-cache; run alone, the build executes every chapter.

Each page is opened from its file in headless Chromium (Debian's `chromium` and
`chromium-driver`, which `.ci/run` installs when missing) through Selenium, and
must have its maths typeset by the local MathJax with no TeX source left in its
text (typeset formulas included), every image loaded and described, every
internal link resolving, the chapter list with the chapter's contents, and
nothing in the console; the pages of docs/ (the guide, the measurements) the
same, less the chapters' own parts. Search, folding, a solution opened and the
smoke-run banner are tried as a reader would. A screenshot of a chapter is saved to
build/site-test/chapter.png.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest

from adm_lib import book as bk
from adm_lib.book import website

pytestmark = [pytest.mark.site, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
BOOK = bk.Book.load(ROOT)
OUT = BOOK.build_dir / "site-test"
DOCS = sorted(path.stem for path in (ROOT / website.DOCS).glob("*.md"))
PAGES = ["index", *(chapter.stem for chapter in BOOK.chapters), *DOCS]
SCREENSHOT_OF = "01_forward"

# TeX that MathJax should have typeset: delimiters, a control sequence or an
# escaped character left in the text of a page (code and typeset maths removed).
RAW_TEX = re.compile(
    r"\$\$|\\\(|\\\)|\\\[|\\\]|\$[^$\s][^$]*\$|\\[A-Za-z]+|\\[_%&#]")
# What the typeset maths shows must not be TeX either: `\_` inside \texttt{...}
# is typeset as a backslash and an underscore by MathJax 2 unless the site
# takes the escape out.
TEX_IN_MATHS = re.compile(r"\\|\$")

# Waits until MathJax has typeset the page (its "End" startup hook) or says
# there is none; then reports what the checks need.
INSPECT = """
const done = arguments[arguments.length - 1];
function report(mathjax) {
  const text = document.body.cloneNode(true);
  text.querySelectorAll("code, pre, script, style, .MathJax, .MathJax_Display, "
    + ".MathJax_Preview, .MathJax_CHTML, .MJX_Assistive_MathML")
    .forEach((node) => node.remove());
  const hrefs = (selector) => Array.from(document.querySelectorAll(selector))
    .map((a) => a.getAttribute("href"));
  done({
    mathjax: mathjax,
    maths: document.querySelectorAll('script[type^="math/tex"]').length,
    // MathJax puts each typeset formula in a frame named after its script.
    untypeset: Array.from(document.querySelectorAll('script[type^="math/tex"]'))
      .filter((s) => !document.getElementById(s.id + "-Frame"))
      .map((s) => s.textContent.slice(0, 60)),
    prose: text.textContent,
    typeset: Array.from(document.querySelectorAll(".MathJax, .MathJax_Display"))
      .map((node) => node.textContent).join("\\n"),
    images: Array.from(document.images).map(
      (img) => [img.src.slice(0, 60), img.complete, img.naturalWidth, img.alt]),
    links: hrefs("a[href]"),
    chapters: hrefs(".adm-chapters > li > a:first-child"),
    current: hrefs(".adm-chapters a[aria-current=page]"),
    docs: hrefs(".adm-docs > li > a:first-child"),
    docCurrent: hrefs(".adm-docs a[aria-current=page]"),
    contents: hrefs(".adm-contents a"),
    headings: Array.from(document.querySelectorAll(".jp-RenderedMarkdown h2[id]"))
      .map((h) => "#" + h.id),
    smoke: document.getElementById("adm-smoke")?.textContent || "",
  });
}
if (window.MathJax && window.MathJax.Hub) {
  MathJax.Hub.Register.StartupHook("End", () => report(true));
} else {
  report(false);
}
"""


def _browser_reason() -> str | None:
    """Why the browser tests cannot run here, or None when they can."""
    try:
        import selenium  # noqa: F401
    except ModuleNotFoundError:
        return "selenium is not installed: pip install -e '.[dev]'"
    if not _chromium() or not shutil.which("chromedriver"):
        return ("no chromium and chromedriver on PATH: .ci/run installs them "
                "with `apt-get install chromium chromium-driver`")
    return None


def _chromium() -> str | None:
    names = ("chromium", "chromium-browser", "google-chrome")
    return next((path for name in names if (path := shutil.which(name))), None)


def _wait_for_chapters(limit: float = 3600) -> None:
    """Wait until the chapters this session runs have run: under
    pytest-xdist another worker may still be running them, and their
    outputs in the cache are what the site renders."""
    stems = [s for s in os.environ.get("ADM_SESSION_CHAPTERS", "").split(",")
             if s]
    marks = [BOOK.build_dir / "nbval" / f"{stem}.done" for stem in stems]
    deadline = time.monotonic() + limit
    while not all(mark.exists() for mark in marks):
        if time.monotonic() > deadline:
            return  # build_site executes what is missing
        time.sleep(2)


@pytest.fixture(scope="module")
def site() -> Path:
    """The site for the smoke configuration, in build/site-test/site."""
    _wait_for_chapters()
    report = website.build_site(BOOK, OUT / "site", progress=False)
    # Kept for the record: what was executed and what came from the cache.
    (OUT / "build.json").write_text(json.dumps({
        "executed": report.executed, "reused": report.reused,
        "seconds": round(report.seconds, 1)}, indent=1) + "\n")
    return report.output


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium through chromedriver, keeping the console's messages."""
    reason = _browser_reason()
    if reason:
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = _chromium()
    # --no-sandbox: CI runs as root, where Chromium's sandbox cannot start.
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", "--window-size=1280,1700",
                     "--hide-scrollbars"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")),
                              options=options)
    driver.set_script_timeout(120)
    driver.set_page_load_timeout(120)
    yield driver
    driver.quit()


class _Anchors(HTMLParser):
    """The ids and names a page defines, which links may point at."""

    def __init__(self) -> None:
        super().__init__()
        self.anchors: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.anchors |= {v for k, v in attrs if k in ("id", "name") and v}


def _anchors(page: Path) -> set[str]:
    parser = _Anchors()
    parser.feed(page.read_text(encoding="utf-8"))
    return parser.anchors


def _broken_links(site: Path, page: Path, links: list[str]) -> list[str]:
    """Internal links of a page whose file or anchor does not exist."""
    broken = []
    for href in links:
        parts = urlsplit(href)
        if parts.scheme or parts.netloc:
            continue  # a link out of the site (a paper, say) is prose
        target = (page.parent / unquote(parts.path)).resolve() if parts.path else page
        if not target.is_file() or site.resolve() not in target.parents:
            broken.append(href)
        elif parts.fragment and target.suffix == ".html":
            # A browser matches the fragment as written, then percent-decoded.
            anchors = _anchors(target)
            if parts.fragment not in anchors and unquote(parts.fragment) not in anchors:
                broken.append(href)
    return broken


def test_every_page_is_written_with_nothing_from_the_network(site: Path) -> None:
    """No script, stylesheet, image or font of any page is fetched from a URL."""
    assert sorted(p.stem for p in site.glob("*.html")) == sorted(PAGES)
    for page in site.glob("*.html"):
        assert website.external_loads(page.read_text(encoding="utf-8")) == [], page
    assert (site / "mathjax" / "MathJax.js").is_file()
    assert (site / website.SEARCH_INDEX).read_text(encoding="utf-8").startswith(
        "window.ADM_SEARCH = [")
    assert (site / website.SITE_SCRIPT).is_file()
    for chapter in BOOK.chapters:
        assert (site / "source" / chapter.name).read_bytes() == chapter.read_bytes()
    for name in DOCS:
        source = ROOT / website.DOCS / f"{name}.md"
        assert (site / "source" / source.name).read_bytes() == source.read_bytes()


def test_index_has_the_chapters_in_book_order(site: Path) -> None:
    text = (site / "index.html").read_text(encoding="utf-8")
    assert BOOK.title in text
    positions = [text.index(f'href="{chapter.stem}.html"') for chapter in BOOK.chapters]
    assert positions == sorted(positions)
    for chapter in BOOK.chapters:
        assert bk.chapter_title(chapter) in text.replace("&#x27;", "'")
    for name in DOCS:
        assert f'href="{name}.html"' in text


@pytest.mark.parametrize("name", PAGES)
def test_page_in_chromium(site: Path, browser: Any, name: str) -> None:
    """Maths typeset, images loaded and described, links resolving, a quiet console."""
    page = site / f"{name}.html"
    browser.get(page.as_uri())
    seen = browser.execute_async_script(INSPECT)
    errors = [entry["message"] for entry in browser.get_log("browser")
              if entry["level"] == "SEVERE"]
    assert errors == [], f"{name}: console errors"
    unloaded = [image for image in seen["images"] if not image[1] or image[2] <= 0]
    assert unloaded == [], f"{name}: images that did not load"
    assert [image for image in seen["images"] if not image[3].strip()] == [], (
        f"{name}: images without alt text")
    assert _broken_links(site, page, seen["links"]) == []
    raw = sorted({m.group() for m in RAW_TEX.finditer(seen["prose"])})
    assert raw == [], f"{name}: TeX left untypeset"
    shown = sorted({m.group() for m in TEX_IN_MATHS.finditer(seen["typeset"])})
    assert shown == [], f"{name}: TeX source shown by the typeset maths"
    # Every page lists the chapters in book order, and the pages of docs/.
    assert seen["chapters"] == [f"{c.stem}.html" for c in BOOK.chapters]
    assert seen["docs"] == [f"{doc}.html" for doc in DOCS]
    if name == "index":
        assert seen["current"] == [] and seen["docCurrent"] == []
        return
    if name in DOCS:
        assert seen["current"] == [] and seen["docCurrent"] == [f"{name}.html"]
        assert seen["headings"] and seen["contents"] == seen["headings"]
        return
    chapter = BOOK.chapter(name)
    assert seen["current"] == [f"{name}.html"]
    # The chapter's contents: a link to each of its sections, in order.
    assert seen["headings"] and seen["contents"] == seen["headings"]
    # Built with its parameters cell as written: the page says so.
    assert "Smoke run." in seen["smoke"], f"{name}: no smoke-run banner"
    has_maths = any("$" in cell.source for cell in bk.read_cells(chapter)
                    if cell.kind == "markdown")
    assert seen["mathjax"], f"{name}: MathJax did not load"
    if has_maths:
        assert seen["maths"] > 0, f"{name}: no maths found"
    assert seen["untypeset"] == [], f"{name}: maths MathJax did not typeset"


def test_search_finds_sections_from_a_file(site: Path, browser: Any) -> None:
    """Typing in the search box lists sections whose links resolve."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    page = site / f"{SCREENSHOT_OF}.html"
    browser.get(page.as_uri())
    browser.execute_async_script(INSPECT)
    box = browser.find_element(By.ID, "adm-search")

    def results(query: str) -> list[tuple[str, str]]:
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(Keys.BACKSPACE)
        box.send_keys(query)
        return [(item.get_attribute("textContent"),
                 item.find_element(By.TAG_NAME, "a").get_attribute("href")
                 if item.find_elements(By.TAG_NAME, "a") else "")
                for item in browser.find_elements(By.CSS_SELECTOR, "#adm-results li")]

    found = results("posterior variance")
    assert found and all(href for _, href in found)
    links = [href.removeprefix(site.as_uri() + "/") for _, href in found]
    assert _broken_links(site, page, links) == []
    assert any(link.startswith("01_forward.html#1.4") for link in links)
    assert not [text for text, _ in found if RAW_TEX.search(text)]
    # Every chapter's prose is in the index, not only this page's.
    assert {link.split("#")[0] for link in links} - {page.name}
    assert results("zzzqqq no such words") == [("Nothing found.", "")]
    assert results("") == []
    assert [entry for entry in browser.get_log("browser")
            if entry["level"] == "SEVERE"] == []


def test_a_solution_opens(site: Path, browser: Any) -> None:
    """Every solution cell is on its page behind a closed <details>; one
    starts hidden and shows its content when its summary is clicked."""
    from selenium.webdriver.common.by import By

    counts = {c.stem: sum("solution" in cell.tags for cell in bk.read_cells(c))
              for c in BOOK.chapters}
    assert any(counts.values()), "no chapter has a solution"
    for name, count in counts.items():
        page = (site / f"{name}.html").read_text(encoding="utf-8")
        assert page.count('<details class="adm-solution">') == count, name
    name = next(name for name, count in counts.items() if count)
    browser.get((site / f"{name}.html").as_uri())
    browser.execute_async_script(INSPECT)
    first = browser.find_element(By.CSS_SELECTOR, "details.adm-solution")
    content = first.find_elements(By.CSS_SELECTOR, ":scope > :not(summary)")
    assert content and not any(c.is_displayed() for c in content), (
        f"{name}: a solution shows before it is asked for")
    summary = first.find_element(By.TAG_NAME, "summary")
    browser.execute_script("arguments[0].scrollIntoView();", summary)
    summary.click()
    assert first.get_attribute("open") is not None
    assert any(c.is_displayed() and c.text.strip() for c in content), (
        f"{name}: the opened solution shows nothing")
    assert [entry for entry in browser.get_log("browser")
            if entry["level"] == "SEVERE"] == []


def test_export_cells_fold(site: Path, browser: Any) -> None:
    """Export cells and code hidden in JupyterLab fold; one switch for all."""
    import jupytext
    from selenium.webdriver.common.by import By

    def starts_open(cell: Any) -> bool | None:
        """An export cell is open if short; hidden drawing code is folded."""
        if cell.cell_type != "code":
            return None
        if cell.source.startswith("#| export"):
            return len(cell.source.splitlines()) <= website.FOLD_LINES
        hidden = cell.metadata.get("jupyter", {}).get("source_hidden")
        solution = "solution" in cell.metadata.get("tags", [])
        return False if hidden and not solution else None

    chapter = BOOK.chapter(SCREENSHOT_OF)
    expected = [starts_open(cell) for cell in jupytext.read(chapter).cells]
    expected = [state for state in expected if state is not None]
    browser.get((site / f"{SCREENSHOT_OF}.html").as_uri())
    browser.execute_async_script(INSPECT)

    def opened() -> list[bool]:
        return browser.execute_script(
            "return Array.from(document.querySelectorAll('details.adm-fold'))"
            ".map((d) => d.open)")

    assert opened() == expected
    assert not all(opened()), "no export cell of the chapter starts folded"
    browser.find_element(By.ID, "adm-fold-all").click()
    assert all(opened())
    browser.find_element(By.ID, "adm-fold-all").click()
    assert not any(opened())


def test_screenshot_of_a_chapter(site: Path, browser: Any) -> None:
    """A picture of a chapter page as a reader sees it (README shows one)."""
    browser.get((site / f"{SCREENSHOT_OF}.html").as_uri())
    browser.execute_async_script(INSPECT)
    path = OUT / "chapter.png"
    assert browser.save_screenshot(str(path))
    png = path.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert width >= 1000 and height >= 1000
