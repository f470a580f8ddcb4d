"""The book as a web site: `adm book build`.

Each chapter of `book.toml` is executed by `book.run_chapter` (papermill), its
executed notebook is kept in a cache keyed on the chapter's text and parameters,
and nbconvert's lab template renders it to HTML. The site reads offline: MathJax
is copied from the `jupyter-server-mathjax` package, every image is embedded as
a data URI, and no page loads anything from the network. Hand-written tooling,
not exported from a chapter.
"""

from __future__ import annotations

import hashlib
import html
import json
import re
import shutil
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from adm_lib import book as bk

CACHE = "site-cache"
GENERATOR = "adm book build"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"

# MathJax 2.7 as jupyter-server-mathjax ships it. The site keeps the parts that
# TeX input with HTML-CSS output and the STIX-Web fonts load (about 2.5 MB of
# its 9.5): SVG output, the accessibility extensions and the translations stay out.
MATHJAX_CONFIG = "TeX-AMS-MML_HTMLorMML-full,Safe"
MATHJAX_PARTS = (
    "MathJax.js",
    "LICENSE",
    "config/TeX-AMS-MML_HTMLorMML-full.js",
    "config/Safe.js",
    "jax/input/TeX",
    "jax/element/mml",
    "jax/output/HTML-CSS",
    "extensions",
    "fonts/HTML-CSS/STIX-Web/woff",
)
MATHJAX_LEFT_OUT = ("extensions/a11y",)

# Given before MathJax.js loads. Only the STIX-Web web fonts are in the site, so
# MathJax is told to use them and no others: asking for its default TeX fonts
# would fail to load them and log errors. Its placeholder font (MathJax_Blank)
# comes from url('about:blank'), which a page opened from a file may not fetch
# (a console error): local() fails the same way, quietly. HTML output, not the
# browser's MathML, so that every browser shows the same thing.
MATHJAX_SETUP = r"""<script type="text/x-mathjax-config">
MathJax.Hub.Config({
  tex2jax: {
    inlineMath: [["$", "$"], ["\\(", "\\)"]],
    displayMath: [["$$", "$$"], ["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true
  },
  TeX: {equationNumbers: {autoNumber: "AMS", useLabelIds: true}},
  MMLorHTML: {prefer: "HTML"},
  "HTML-CSS": {
    availableFonts: [], preferredFont: null, webFont: "STIX-Web",
    imageFont: null, linebreaks: {automatic: true},
    styles: {"@font-face": {"font-family": "MathJax_Blank",
                            src: "local('MathJax_Blank')"}}
  },
  displayAlign: "center",
  messageStyle: "none"
});
// A TeX error still shows its source on the page; it is also said in the
// console, where a reader's tools and the site's browser test look.
MathJax.Hub.Register.MessageHook("TeX Jax - parse error", function (m) {
  console.error("TeX error: " + m[1] + " in: " + m[2]);
});
MathJax.Hub.Register.MessageHook("TeX Jax - undefined control sequence",
  function (m) { console.error("TeX: undefined control sequence " + m[1]); });
</script>
<script src="{{ resources.adm.mathjax_url }}"></script>"""

# nbconvert's lab template, less everything it would fetch from a CDN:
# require.js and the widget manager (the site has no live widgets) and mermaid
# (no chapter draws a diagram); plus the book's navigation.
TEMPLATE = (
    """{%- extends 'lab/index.html.j2' -%}
{%- block html_head_js_requirejs -%}{%- endblock html_head_js_requirejs -%}
{% block jupyter_widgets %}{% endblock jupyter_widgets %}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
{%- block html_head_js_mathjax -%}
"""
    + MATHJAX_SETUP
    + """
{%- endblock html_head_js_mathjax -%}
{% block extra_css %}
<meta name="generator" content="{{ resources.adm.generator }}">
<style type="text/css">{{ resources.adm.css }}</style>
{% endblock extra_css %}
{%- block body_header -%}
{{ super() }}
{{ resources.adm.top }}
{%- endblock body_header -%}
{% block body_footer %}
{{ resources.adm.bottom }}
{{ super() }}
{% endblock body_footer %}
"""
)

CSS = """
main { max-width: 62rem; margin: 0 auto; padding: 0 1rem 2rem; }
.adm-nav { display: flex; flex-wrap: wrap; gap: 0.4rem 1.2rem;
  align-items: baseline; margin: 1rem 0; padding: 0.6rem 0.8rem;
  border: 1px solid #d0d7de; border-radius: 6px; background: #f6f8fa;
  font: 15px/1.4 system-ui, sans-serif; }
.adm-nav a { color: #0b5cad; text-decoration: none; }
.adm-nav a:hover { text-decoration: underline; }
.adm-nav .adm-next { margin-left: auto; }
.adm-note { color: #57606a; font: 14px/1.45 system-ui, sans-serif;
  margin: 0 0 1rem; }
.adm-index { font: 17px/1.55 system-ui, sans-serif; color: #1f2328; }
.adm-index h1 { font-size: 2rem; margin: 2rem 0 0.3rem; }
.adm-index .adm-authors { color: #57606a; margin-top: 0; }
.adm-toc { list-style: none; padding: 0; }
.adm-toc li { margin: 0.45rem 0; }
.adm-toc .adm-num { display: inline-block; min-width: 2rem; color: #57606a; }
.adm-toc a { color: #0b5cad; text-decoration: none; }
.adm-toc .adm-source { font-size: 0.85em; margin-left: 0.5rem; }
/* MathJax adds hidden MathML for screen readers; its styles would have the
   browser fetch MathJax's TeX fonts (not in the site) for script letters. */
.MJX_Assistive_MathML, .MJX_Assistive_MathML * { font-family: serif !important; }
"""


@dataclass(frozen=True)
class Executed:
    """A chapter's executed notebook, and whether the cache already had it."""

    chapter: Path
    notebook: Path
    reused: bool
    seconds: float
    executor: str


@dataclass
class SiteReport:
    """What `build_site` wrote and did."""

    output: Path
    index: Path
    executed: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass(frozen=True)
class Page:
    """One chapter's place in the site."""

    chapter: Path
    title: str
    number: str  # "1" for 01_forward.py; "" for an unnumbered chapter
    html: str

    @property
    def label(self) -> str:
        """The title with its number, as the navigation shows it."""
        return f"{self.number}. {self.title}" if self.number else self.title


def _changed_parameters(chapter: Path, overrides: dict[str, str]) -> dict[str, Any]:
    """The overrides whose values differ from the chapter's defaults."""
    values = bk.resolve_parameters(chapter, overrides)
    defaults = bk.chapter_parameters(chapter)
    # Passing a default explicitly runs the same chapter, so it keys the same.
    return {k: v for k, v in sorted(values.items()) if v != defaults[k]}


def cache_key(
    book: bk.Book, chapter: Path, overrides: dict[str, str], text: str | None = None
) -> str:
    """The cache key of an execution: the chapter's text and its parameters."""
    blob = json.dumps(
        {
            "chapter": chapter.read_text(encoding="utf-8") if text is None else text,
            "parameters": _changed_parameters(chapter, overrides),
            "kernel": book.kernel,
        },
        sort_keys=True,
        default=repr,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cache_path(
    book: bk.Book, chapter: Path, overrides: dict[str, str], text: str | None = None
) -> Path:
    """Where the cache keeps a chapter executed with these overrides."""
    key = cache_key(book, chapter, overrides, text)
    return book.build_dir / CACHE / f"{chapter.stem}-{key}.ipynb"


def store_executed(
    book: bk.Book,
    chapter: Path,
    notebook: Any,
    overrides: dict[str, str],
    seconds: float,
    executor: str,
    text: str | None = None,
) -> Path:
    """Put an executed notebook in the cache, replacing the chapter's older ones."""
    import nbformat

    # `text` is the chapter as it was executed, for when the file has changed
    # since (nbval reads it at collection, minutes before the last cell runs).
    path = cache_path(book, chapter, overrides, text)
    notebook.metadata["adm_book"] = {
        "chapter": book.rel(chapter),
        "parameters": _changed_parameters(chapter, overrides),
        "seconds": round(seconds, 1),
        "executor": executor,
        "executed": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    # Written aside, then renamed: an interrupted write leaves no entry to reuse.
    nbformat.write(notebook, partial)
    partial.replace(path)
    mine = re.compile(rf"{re.escape(chapter.stem)}-[0-9a-f]{{16}}\.ipynb")
    for old in path.parent.iterdir():
        if old != path and mine.fullmatch(old.name):
            old.unlink()
    return path


def execute(
    book: bk.Book,
    chapter: Path,
    overrides: dict[str, str],
    force: bool = False,
    progress: bool = True,
) -> Executed:
    """A chapter's executed notebook: from the cache, or run with papermill."""
    import nbformat

    text = chapter.read_text(encoding="utf-8")
    path = cache_path(book, chapter, overrides, text)
    if path.is_file() and not force:
        info = nbformat.read(path, as_version=4).metadata.get("adm_book", {})
        return Executed(chapter, path, True, info.get("seconds", 0.0),
                        info.get("executor", "?"))
    # A failed run leaves its notebook, traceback included, under this name.
    running = book.build_dir / CACHE / f"{chapter.stem}.failed.ipynb"
    start = time.perf_counter()
    bk.run_chapter(book, chapter, overrides, running, progress,
                   book.cell_timeout)
    seconds = time.perf_counter() - start
    notebook = nbformat.read(running, as_version=4)
    stored = store_executed(book, chapter, notebook, overrides, seconds,
                            "papermill", text)
    running.unlink()
    return Executed(chapter, stored, False, seconds, "papermill")


def read_parameters_file(book: bk.Book, path: Path) -> dict[Path, dict[str, str]]:
    """Per-chapter overrides from a TOML file: a table per chapter, `[06_guidance]`."""
    import tomllib

    try:
        tables = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise bk.BookError(f"cannot read parameters file {path}: {err}") from err
    except tomllib.TOMLDecodeError as err:
        raise bk.BookError(f"{path}: not valid TOML: {err}") from err
    overrides: dict[Path, dict[str, str]] = {}
    for name, table in tables.items():
        if not isinstance(table, dict):
            raise bk.BookError(
                f"{path}: {name!r} is not a table; write [chapter] then "
                "name = value lines"
            )
        chapter = book.chapter(name)
        # The same text `adm book run -p NAME VALUE` would take.
        values = {k: v if isinstance(v, str) else repr(v) for k, v in table.items()}
        bk.resolve_parameters(chapter, values)
        overrides[chapter] = values
    return overrides


def _pages(book: bk.Book) -> list[Page]:
    pages = []
    for chapter in book.chapters:
        if not chapter.is_file():
            raise bk.BookError(
                f"{book.rel(chapter)} is listed in book.toml but missing")
        title = bk.chapter_title(chapter) or chapter.stem
        prefix = chapter.stem.split("_", 1)[0]
        number = str(int(prefix)) if prefix.isdigit() else ""
        pages.append(Page(chapter, title, number, f"{chapter.stem}.html"))
    return pages


def _nav(pages: list[Page], index: int) -> str:
    """The navigation bar of a chapter: contents, previous, next, source."""
    page = pages[index]
    links = ['<a href="index.html">Contents</a>']
    if index > 0:
        prev = pages[index - 1]
        links.append(f'<a rel="prev" class="adm-prev" href="{prev.html}">'
                     f"&larr; {html.escape(prev.label)}</a>")
    links.append(f'<a class="adm-src" href="source/{page.chapter.name}">'
                 f"source: {page.chapter.name}</a>")
    if index + 1 < len(pages):
        nxt = pages[index + 1]
        links.append(f'<a rel="next" class="adm-next" href="{nxt.html}">'
                     f"{html.escape(nxt.label)} &rarr;</a>")
    return '<nav class="adm-nav">' + "\n".join(links) + "</nav>"


def _note(info: dict[str, Any]) -> str:
    """Says which parameters made the outputs on the page."""
    parameters = info.get("parameters") or {}
    if parameters:
        given = ", ".join(f"<code>{html.escape(f'{k} = {v!r}')}</code>"
                          for k, v in parameters.items())
        made = f"with {given} (the other parameters at their defaults)"
    else:
        made = "with its parameters cell as written (the smoke configuration)"
    return (
        f'<p class="adm-note">The outputs on this page came from running the '
        f"chapter {made}, in {info.get('seconds', 0):.0f} s "
        f"({html.escape(str(info.get('executed', '')))}). Figures that the text "
        "cites from recorded runs are those runs' own.</p>"
    )


def _for_the_page(notebook: Any) -> Any:
    """Drop what a static page cannot show: live progress-bar widgets."""
    notebook.metadata.pop("widgets", None)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.outputs
                            if WIDGET_VIEW not in o.get("data", {})]
    return notebook


def _exporter() -> Any:
    """nbconvert's HTML exporter with the site's template and local MathJax."""
    from jinja2 import DictLoader
    from nbconvert import HTMLExporter

    return HTMLExporter(
        template_name="lab",
        extra_loaders=[DictLoader({"adm_site.html.j2": TEMPLATE})],
        template_file="adm_site.html.j2",
        embed_images=True,
    )


def render_chapter(
    book: bk.Book, pages: list[Page], index: int, notebook_path: Path,
    exporter: Any = None,
) -> str:
    """A chapter's HTML page from its executed notebook."""
    import nbformat

    page = pages[index]
    notebook = _for_the_page(nbformat.read(notebook_path, as_version=4))
    notebook.metadata["title"] = f"{page.label} | {book.title}"
    nav = _nav(pages, index)
    resources = {
        # Markdown images (the recorded runs' figures) resolve from here.
        "metadata": {"path": str(page.chapter.parent), "name": page.title},
        "adm": {
            "mathjax_url": f"mathjax/MathJax.js?config={MATHJAX_CONFIG}",
            "generator": GENERATOR,
            "css": CSS,
            "top": nav + _note(notebook.metadata.get("adm_book", {})),
            "bottom": nav,
        },
    }
    try:
        body, _ = (exporter or _exporter()).from_notebook_node(notebook, resources)
    except FileNotFoundError as err:
        raise bk.BookError(f"{book.rel(page.chapter)}: an image it shows is "
                           f"missing: {err}") from err
    return body


def render_index(book: bk.Book, pages: list[Page]) -> str:
    """The site's front page: the book's title and its table of contents."""
    items = "\n".join(
        f'<li><a href="{p.html}"><span class="adm-num">'
        f"{p.number + '.' if p.number else ''}</span>{html.escape(p.title)}</a>"
        f'<a class="adm-source" href="source/{p.chapter.name}">source</a></li>'
        for p in pages
    )
    authors = html.escape(", ".join(book.authors))
    return f"""<!DOCTYPE html>
<html lang="{html.escape(book.language)}">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1.0">
<meta name="generator" content="{GENERATOR}">
<title>{html.escape(book.title)}</title>
<style type="text/css">{CSS}</style>
</head>
<body class="adm-index">
<main>
<h1>{html.escape(book.title)}</h1>
<p class="adm-authors">{authors}</p>
<p>{html.escape(book.description)}</p>
<nav class="adm-nav"><a rel="next" href="{pages[0].html}">Start reading:
{html.escape(pages[0].label)} &rarr;</a></nav>
<h2>Contents</h2>
<ul class="adm-toc">
{items}
</ul>
<p class="adm-note">Every chapter is a Jupytext <code>.py</code> file (its
<em>source</em> link) that runs as a notebook. The outputs on these pages came from
running each chapter with its smoke configuration, unless a page says otherwise;
figures from the recorded CPU runs are shown where the text cites them. Made by
<code>adm book build</code>.</p>
</main>
</body>
</html>
"""


class _Loads(HTMLParser):
    """Collects what a page would load: src and href of the elements that fetch."""

    FETCHING = {"script": "src", "img": "src", "link": "href", "iframe": "src",
                "source": "src", "video": "src", "audio": "src", "embed": "src",
                "object": "data", "track": "src"}

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self._in_style = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        wanted = self.FETCHING.get(tag)
        self.urls += [v for k, v in attrs if k in (wanted, "srcset") and v]
        self._in_style = tag == "style"

    def handle_endtag(self, tag: str) -> None:
        self._in_style = False

    def handle_data(self, data: str) -> None:
        if self._in_style:
            self.urls += re.findall(r"url\(\s*['\"]?([^'\")]+)", data)
            self.urls += re.findall(r"@import\s+['\"]([^'\"]+)", data)


def external_loads(page: str) -> list[str]:
    """The network URLs an HTML page would load (scripts, styles, images, fonts)."""
    parser = _Loads()
    parser.feed(page)
    return [url for url in parser.urls if re.match(r"(https?:)?//", url.strip())]


def mathjax_source() -> Path:
    """The MathJax 2.7 folder that the `jupyter-server-mathjax` package ships."""
    try:
        import jupyter_server_mathjax
    except ModuleNotFoundError as err:
        raise bk.BookError(
            "the site needs MathJax from the jupyter-server-mathjax package: "
            "pip install -e '.[book]'"
        ) from err
    static = Path(jupyter_server_mathjax.__file__).parent / "static"
    if not (static / "MathJax.js").is_file():
        raise bk.BookError(f"no MathJax.js in {static}; reinstall "
                           "jupyter-server-mathjax")
    return static


def copy_mathjax(destination: Path) -> None:
    """Copy the parts of MathJax that the site uses into `destination`."""
    source = mathjax_source()
    skip = {source / part for part in MATHJAX_LEFT_OUT}
    for part in MATHJAX_PARTS:
        origin, target = source / part, destination / part
        if origin.is_dir():
            shutil.copytree(origin, target,
                            ignore=lambda d, names: [n for n in names
                                                     if Path(d) / n in skip])
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(origin, target)


def _is_site(folder: Path) -> bool:
    index = folder / "index.html"
    return index.is_file() and f'content="{GENERATOR}"' in index.read_text(
        encoding="utf-8", errors="replace")


def build_site(
    book: bk.Book,
    output: Path | None = None,
    parameters: dict[Path, dict[str, str]] | None = None,
    force: bool = False,
    progress: bool = True,
) -> SiteReport:
    """Execute (or reuse) every chapter and write the site to `output`."""
    from tqdm.auto import tqdm

    start = time.perf_counter()
    output = (output or book.build_dir / "site").resolve()
    if output.exists() and any(output.iterdir()) and not _is_site(output):
        raise bk.BookError(f"{output} exists and is not a site made by adm book "
                           "build; give an empty or new --output folder")
    parameters = parameters or {}
    pages = _pages(book)
    exporter = _exporter()
    # Built beside the output and swapped in at the end, so that a failed build
    # leaves the last good site in place.
    partial = output.with_name(output.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    (partial / "source").mkdir(parents=True)
    copy_mathjax(partial / "mathjax")
    report = SiteReport(output, output / "index.html")
    bar = tqdm(pages, desc="adm book build", unit="chapter", disable=not progress)
    for index, page in enumerate(bar):
        bar.set_postfix_str(page.chapter.name)
        done = execute(book, page.chapter, parameters.get(page.chapter, {}),
                       force, progress)
        (report.reused if done.reused else report.executed).append(page.chapter.stem)
        text = render_chapter(book, pages, index, done.notebook, exporter)
        (partial / page.html).write_text(text, encoding="utf-8")
        shutil.copy2(page.chapter, partial / "source" / page.chapter.name)
    (partial / "index.html").write_text(render_index(book, pages), encoding="utf-8")
    shutil.rmtree(output, ignore_errors=True)
    partial.rename(output)
    report.seconds = time.perf_counter() - start
    return report
