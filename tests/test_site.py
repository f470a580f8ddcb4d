"""The book's web site, built for the smoke configuration and read in Chromium.

The site is built once for this module with `website.build_site`, as `adm book
build` builds it. Run with the chapters (`pytest`), these tests come after them
(conftest.py orders them last) and render the notebooks that nbval has just
executed, from build/site-cache; run alone, the build executes every chapter.

Each page is opened from its file in headless Chromium (Debian's `chromium` and
`chromium-driver`, which `.ci/run` installs when missing) through Selenium, and
must have its maths typeset by the local MathJax with no TeX left raw, every
image loaded, every internal link resolving, and nothing in the console. A
screenshot of a chapter is saved to build/site-test/chapter.png.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest

from adm_lib import book as bk
from adm_lib import website

pytestmark = pytest.mark.site

ROOT = Path(__file__).resolve().parents[1]
BOOK = bk.Book.load(ROOT)
OUT = BOOK.build_dir / "site-test"
PAGES = ["index", *(chapter.stem for chapter in BOOK.chapters)]
SCREENSHOT_OF = "01_forward"

# TeX that MathJax should have typeset: delimiters or a control sequence left in
# the text of a rendered markdown cell (code and the typeset maths removed).
RAW_TEX = re.compile(r"\$\$|\\\(|\\\)|\\\[|\\\]|\$[^$\s][^$]*\$|\\[A-Za-z]+")

# Waits until MathJax has typeset the page (its "End" startup hook) or says
# there is none; then reports what the checks need.
INSPECT = """
const done = arguments[arguments.length - 1];
function report(mathjax) {
  const prose = [];
  for (const cell of document.querySelectorAll(".jp-RenderedMarkdown")) {
    const copy = cell.cloneNode(true);
    copy.querySelectorAll("code, pre, script, .MathJax, .MathJax_Display, "
      + ".MathJax_Preview, .MathJax_CHTML, .MJX_Assistive_MathML")
      .forEach((node) => node.remove());
    prose.push(copy.textContent);
  }
  done({
    mathjax: mathjax,
    maths: document.querySelectorAll('script[type^="math/tex"]').length,
    // MathJax puts each typeset formula in a frame named after its script.
    untypeset: Array.from(document.querySelectorAll('script[type^="math/tex"]'))
      .filter((s) => !document.getElementById(s.id + "-Frame"))
      .map((s) => s.textContent.slice(0, 60)),
    prose: prose.join("\\n"),
    images: Array.from(document.images).map(
      (img) => [img.alt || img.src.slice(0, 60), img.complete, img.naturalWidth]),
    links: Array.from(document.querySelectorAll("a[href]")).map(
      (a) => a.getAttribute("href")),
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


@pytest.fixture(scope="module")
def site() -> Path:
    """The site for the smoke configuration, in build/site-test/site."""
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
    for chapter in BOOK.chapters:
        assert (site / "source" / chapter.name).read_bytes() == chapter.read_bytes()


def test_index_has_the_chapters_in_book_order(site: Path) -> None:
    text = (site / "index.html").read_text(encoding="utf-8")
    assert BOOK.title in text
    positions = [text.index(f'href="{chapter.stem}.html"') for chapter in BOOK.chapters]
    assert positions == sorted(positions)
    for chapter in BOOK.chapters:
        assert bk.chapter_title(chapter) in text.replace("&#x27;", "'")


@pytest.mark.parametrize("name", PAGES)
def test_page_in_chromium(site: Path, browser: Any, name: str) -> None:
    """Maths typeset, images loaded, links resolving, a quiet console."""
    page = site / f"{name}.html"
    browser.get(page.as_uri())
    seen = browser.execute_async_script(INSPECT)
    errors = [entry["message"] for entry in browser.get_log("browser")
              if entry["level"] == "SEVERE"]
    assert errors == [], f"{name}: console errors"
    unloaded = [image for image in seen["images"] if not image[1] or image[2] <= 0]
    assert unloaded == [], f"{name}: images that did not load"
    assert _broken_links(site, page, seen["links"]) == []
    raw = sorted({m.group() for m in RAW_TEX.finditer(seen["prose"])})
    assert raw == [], f"{name}: TeX left untypeset"
    if name != "index":
        chapter = BOOK.chapter(name)
        has_maths = any("$" in cell.source for cell in bk.read_cells(chapter)
                        if cell.kind == "markdown")
        assert seen["mathjax"], f"{name}: MathJax did not load"
        if has_maths:
            assert seen["maths"] > 0, f"{name}: no maths found"
        assert seen["untypeset"] == [], f"{name}: maths MathJax did not typeset"


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
