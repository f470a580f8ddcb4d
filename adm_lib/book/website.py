"""The book as a web site: `adm book build`.

Each chapter of `book.toml` is executed by `book.run_chapter` (papermill), its
executed notebook is kept in a cache keyed on the chapter's text and parameters,
and nbconvert's lab template renders it to HTML. The Markdown pages in `docs/`
(the guide, the measurements) are rendered beside them by markdown-it-py, their
links to chapters and to each other made links of the site. Every page has a
sidebar with the chapters, the current page's sections and a search box over a prebuilt
index (`search-index.js`); export cells fold, cells tagged `solution` are
collapsed, images have alt text, and a page built from the smoke configuration
says so in a banner. The site reads offline, from `file://` too: MathJax is
copied from the `jupyter-server-mathjax` package, every image is embedded as a
data URI, the index is a script rather than fetched JSON, and no page loads
anything from the network. Hand-written tooling, not exported from a chapter.
"""

from __future__ import annotations

import base64
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
// In text mode (\text{...}, \texttt{...}, \mbox{...}) MathJax 2 shows
// \_ with its backslash, where JupyterLab's MathJax 3 (its textmacros) and
// LaTeX show _: the chapters are written for those, so the escapes of _ % & #
// are taken out of text-mode arguments before MathJax reads them.
MathJax.Hub.Register.StartupHook("TeX Jax Ready", function () {
  MathJax.InputJax.TeX.prefilterHooks.Add(function (data) {
    data.math = data.math.replace(
      /(\\(?:text[a-z]*|mbox)\s*\{)([^{}]*)\}/g,
      function (all, macro, body) {
        return macro + body.replace(/\\([_%&#])/g, "$1") + "}";
      });
  });
});
// A collapsed <details> (a solution, folded code) has no size when MathJax
// typesets it: its maths is laid out again when it opens.
document.addEventListener("toggle", function (event) {
  var details = event.target;
  if (details.open && details.querySelector('script[type^="math/tex"]')) {
    MathJax.Hub.Queue(["Rerender", MathJax.Hub, details]);
  }
}, true);
</script>
<script src="{{ resources.adm.mathjax_url }}"></script>"""

# nbconvert's lab template, less everything it would fetch from a CDN:
# require.js and the widget manager (the site has no live widgets) and mermaid
# (no chapter draws a diagram); plus the book's navigation, a solution's cells
# collapsed, export cells foldable and images with alt text.
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
{% block any_cell scoped %}
{%- if 'solution' in cell.metadata.get('tags', []) -%}
<details class="adm-solution"><summary>Solution</summary>
{{ super() }}
</details>
{%- else -%}
{{ super() }}
{%- endif -%}
{% endblock any_cell %}
{% block input_group -%}
{%- if cell.metadata.adm_fold -%}
<details class="adm-fold"{{ ' open' if cell.metadata.adm_fold.open }}>
<summary>{{ cell.metadata.adm_fold.summary | escape_html }}</summary>
{{ super() }}
</details>
{%- else -%}
{{ super() }}
{%- endif -%}
{% endblock input_group %}
{% block data_png scoped %}
<div class="jp-RenderedImage jp-OutputArea-output {{ extra_class }}">
<img src="data:image/png;base64,{{ output.data['image/png'] | escape_html }}"
 alt="{{ output | get_metadata('adm_alt', 'image/png') | escape_html }}">
</div>
{%- endblock data_png %}
{% block data_jpg scoped %}
<div class="jp-RenderedImage jp-OutputArea-output {{ extra_class }}">
<img src="data:image/jpeg;base64,{{ output.data['image/jpeg'] | escape_html }}"
 alt="{{ output | get_metadata('adm_alt', 'image/jpeg') | escape_html }}">
</div>
{%- endblock data_jpg %}
"""
)

# The site's own scripts: search over search-index.js (a script, not JSON
# fetched, so that it works from file://) and the fold-all switch.
SITE_JS = """(function () {
  "use strict";
  var input = document.getElementById("adm-search");
  var list = document.getElementById("adm-results");
  var index = window.ADM_SEARCH || [];
  function snippet(text, word) {
    var at = Math.max(0, text.toLowerCase().indexOf(word) - 60);
    return (at ? "\\u2026" : "") + text.slice(at, at + 160) + "\\u2026";
  }
  function search() {
    var words = input.value.toLowerCase().split(/\\s+/).filter(Boolean);
    var hits = [];
    list.replaceChildren();
    list.hidden = words.length === 0;
    if (list.hidden) {
      return;
    }
    index.forEach(function (s) {
      var title = s.title.toLowerCase(), text = s.text.toLowerCase();
      if (!words.every(function (w) { return (title + " " + text).includes(w); })) {
        return;
      }
      var score = words.filter(function (w) { return title.includes(w); }).length;
      hits.push([score, s]);
    });
    hits.sort(function (a, b) { return b[0] - a[0]; });
    hits.slice(0, 20).forEach(function (hit) {
      var s = hit[1], item = document.createElement("li");
      var link = document.createElement("a"), where = document.createElement("span");
      link.href = s.url;
      link.textContent = s.title;
      where.className = "adm-where";
      where.textContent = s.page + ": " + snippet(s.text, words[0]);
      item.append(link, where);
      list.append(item);
    });
    if (!hits.length) {
      var none = document.createElement("li");
      none.textContent = "Nothing found.";
      list.append(none);
    }
  }
  if (input) {
    input.addEventListener("input", search);
    search();
  }
  var fold = document.getElementById("adm-fold-all");
  if (fold) {
    fold.addEventListener("click", function () {
      var folds = document.querySelectorAll("details.adm-fold");
      var open = Array.prototype.some.call(folds, function (d) { return !d.open; });
      folds.forEach(function (d) { d.open = open; });
    });
  }
})();
"""

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
.adm-smoke { margin: 0 0 1rem; padding: 0.7rem 0.9rem; border-radius: 6px;
  border: 1px solid #d4a72c; border-left-width: 5px; background: #fff8c5;
  color: #3b2e00; font: 15px/1.5 system-ui, sans-serif; }
.adm-smoke a { color: #0b5cad; }
.adm-recorded { display: block; width: fit-content; margin: 0.3rem 0;
  padding: 0 0.4rem; border-radius: 4px; background: #dafbe1; color: #116329;
  font: 600 12px/1.6 system-ui, sans-serif; letter-spacing: 0.03em; }
.adm-sidebar { box-sizing: border-box; padding: 1rem 0.9rem; background: #f6f8fa;
  font: 14px/1.45 system-ui, sans-serif; color: #1f2328;
  border-bottom: 1px solid #d0d7de; }
.adm-sidebar a { color: #0b5cad; text-decoration: none; }
.adm-sidebar a:hover { text-decoration: underline; }
.adm-sidebar .adm-book { display: block; font-weight: 600; font-size: 15px;
  color: #1f2328; margin-bottom: 0.7rem; }
.adm-sidebar ol { list-style: none; margin: 0; padding: 0; }
.adm-chapters > li { margin: 0.35rem 0; }
.adm-chapters a[aria-current] { font-weight: 600; color: #1f2328; }
.adm-contents { margin: 0.3rem 0 0.5rem 0.7rem !important;
  padding-left: 0.6rem !important; border-left: 2px solid #d0d7de; }
.adm-contents li { margin: 0.2rem 0; font-size: 13px; }
.adm-smoke-tag { display: block; margin: 0.2rem 0 0 0.7rem; font-size: 12px;
  color: #7d4e00; }
.adm-sidebar input[type=search] { box-sizing: border-box; width: 100%;
  padding: 0.35rem 0.5rem; border: 1px solid #d0d7de; border-radius: 6px;
  font: inherit; }
.adm-results { margin: 0.4rem 0 0.8rem !important; max-height: 50vh;
  overflow-y: auto; background: #fff; border: 1px solid #d0d7de;
  border-radius: 6px; }
.adm-results li { padding: 0.35rem 0.5rem; border-bottom: 1px solid #eaeef2; }
.adm-results .adm-where { display: block; color: #57606a; font-size: 12px; }
.adm-sidebar button { margin: 0.8rem 0 0; font: 13px system-ui, sans-serif;
  padding: 0.2rem 0.5rem; border: 1px solid #d0d7de; border-radius: 6px;
  background: #fff; cursor: pointer; }
@media (min-width: 72rem) {
  body.jp-Notebook, body.adm-index { padding-left: 18rem; }
  .adm-sidebar { position: fixed; top: 0; bottom: 0; left: 0; width: 17rem;
    overflow-y: auto; border-bottom: none; border-right: 1px solid #d0d7de; }
}
details.adm-fold > summary, details.adm-solution > summary { cursor: pointer;
  padding: 0.3rem 0.6rem; font: 13px/1.5 system-ui, sans-serif;
  color: #57606a; }
details.adm-fold { border-left: 3px solid #d0d7de; margin: 0.2rem 0; }
details.adm-solution { margin: 0.6rem 0; padding: 0 0.4rem;
  border: 1px solid #d0d7de; border-radius: 6px; }
details.adm-solution > summary { font-weight: 600; color: #1f2328; }
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
.adm-docs-title { margin: 1rem 0 0.3rem; color: #57606a; font-size: 12px;
  text-transform: uppercase; letter-spacing: 0.05em; }
.adm-docs > li { margin: 0.35rem 0; }
.adm-docs a[aria-current] { font-weight: 600; color: #1f2328; }
.adm-page pre { overflow-x: auto; padding: 0.6rem 0.8rem; background: #f6f8fa;
  border: 1px solid #d0d7de; border-radius: 6px; font-size: 14px; }
.adm-page code { font-size: 0.9em; }
.adm-page table { border-collapse: collapse; margin: 1rem 0; font-size: 15px;
  display: block; overflow-x: auto; }
.adm-page th, .adm-page td { border: 1px solid #d0d7de; padding: 0.3rem 0.6rem;
  text-align: left; vertical-align: top; }
.adm-page img { max-width: 100%; }
"""

# Export cells longer than this start folded (the reader can open each, or all).
FOLD_LINES = 40
SEARCH_INDEX = "search-index.js"
SITE_SCRIPT = "site.js"
SCRIPTS = (f'<script src="{SEARCH_INDEX}"></script>\n'
           f'<script src="{SITE_SCRIPT}"></script>')
SIDEBAR_MARK = "<!-- adm-sidebar -->"
# The folder of Markdown pages shown beside the chapters, in file-name order.
DOCS = "docs"
_IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg",
                ".jpeg": "image/jpeg", ".svg": "image/svg+xml"}

_MD_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$", re.MULTILINE)
_MD_IMAGE = re.compile(r"!\[([^\]]*)\]\((figures/[^)\s]+)[^)]*\)")
_FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
_DEFINED = re.compile(r"^(?:async\s+)?(def|class)\s+(\w+)", re.MULTILINE)
_MATH = re.compile(r"\$\$(.+?)\$\$|\$([^$]+)\$", re.DOTALL)
_GREEK = ("alpha beta gamma delta epsilon varepsilon zeta eta theta iota kappa "
          "lambda mu nu xi pi rho sigma tau upsilon phi varphi chi psi omega "
          "Gamma Delta Theta Lambda Xi Pi Sigma Phi Psi Omega").split()
_LETTERS = dict(zip(_GREEK, "αβγδεεζηθικλμνξπρστυφφχψωΓΔΘΛΞΠΣΦΨΩ", strict=True))


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
    """One chapter's place in the site, or one page of docs/."""

    chapter: Path  # the source: a chapter, or a docs/*.md file
    title: str
    number: str  # "1" for 01_forward.py; "" for an unnumbered chapter
    html: str

    @property
    def label(self) -> str:
        """The title with its number, as the navigation shows it."""
        return f"{self.number}. {self.title}" if self.number else self.title


@dataclass
class Section:
    """A heading of a rendered chapter and the prose under it."""

    anchor: str
    level: int
    title: str
    text: list[str] = field(default_factory=list)


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


def _doc_pages(book: bk.Book, pages: list[Page]) -> list[Page]:
    """The Markdown pages of docs/, titled by their first heading."""
    folder = book.root / DOCS
    taken = {"index.html", *(page.html for page in pages)}
    docs = []
    for path in sorted(folder.glob("*.md")) if folder.is_dir() else []:
        heading = re.search(r"^# (.+)$", path.read_text(encoding="utf-8"),
                            re.MULTILINE)
        page = Page(path, heading[1].strip() if heading else path.stem, "",
                    f"{path.stem}.html")
        if page.html in taken:
            raise bk.BookError(f"{book.rel(path)} would be {page.html}, a page the "
                               "site already has: rename it")
        docs.append(page)
    return docs


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


def _note(info: dict[str, Any], recorded: list[str]) -> str:
    """Says which parameters made the outputs on the page: a banner for a smoke run."""
    parameters = info.get("parameters") or {}
    when = (f"in {info.get('seconds', 0):.0f} s "
            f"({html.escape(str(info.get('executed', '')))})")
    if parameters:
        given = ", ".join(f"<code>{html.escape(f'{k} = {v!r}')}</code>"
                          for k, v in parameters.items())
        return (
            f'<p class="adm-note">The outputs on this page came from running the '
            f"chapter with {given} (the other parameters at their defaults), "
            f"{when}. Figures that the text cites from recorded runs are those "
            "runs' own.</p>"
        )
    links = ", ".join(f'<a href="#adm-recorded-{n}">{html.escape(caption)}</a>'
                      for n, caption in enumerate(recorded, 1))
    where = (f" The recorded runs' figures, which are results, are marked "
             f"<em>recorded run</em> where the text shows them: {links}."
             if recorded else "")
    return (
        '<aside class="adm-smoke" id="adm-smoke" role="note"><strong>Smoke run.'
        "</strong> The outputs on this page came from running the chapter with "
        "its parameters cell as written, the smoke configuration sized for a "
        f"CPU, {when}. Where they train or sample, they do it with "
        "tiny models and few steps: those numbers and images (noisy samples, "
        "scores near zero) show that the code runs, not what it achieves."
        f"{where}</aside>"
    )


def _plain(text: str) -> str:
    """Text with its TeX made readable: Greek letters kept, markup dropped."""

    def escaped(match: re.Match[str]) -> str:
        char = match.group(1)  # None for markup: {}, _ and ^
        if char in ("_", "%", "&", "#"):
            return char  # posterior\_mean
        return " " if char and (char.isspace() or char in ",;:!") else ""

    def math(match: re.Match[str]) -> str:
        tex = match.group(1) or match.group(2)
        tex = re.sub(r"\\([A-Za-z]+)",
                     lambda m: _LETTERS.get(m.group(1), " "), tex)
        return re.sub(r"\\([\s\S])|[{}_^]", escaped, tex)

    return " ".join(_MATH.sub(math, text).split())


def _fold_summary(source: str, module: str | None) -> str:
    """What a folded export cell defines, for its summary line."""
    names = [f"{kind} {name}" for kind, name in _DEFINED.findall(source)]
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more"
                                    if len(names) > 4 else "")
    lines = len(source.splitlines())
    into = f"adm_lib.{module}" if module else "adm_lib"
    return (f"Library code, exported to {into}: {shown or 'statements'} "
            f"({lines} lines)")


def _for_the_page(notebook: Any) -> tuple[Any, list[str]]:
    """The notebook as the page shows it, and the captions of its recorded figures.

    Live progress-bar widgets are dropped; export cells and code hidden
    in JupyterLab are marked to fold;
    images drawn by a cell get alt text that says where they are (the text's
    own images have their captions); the recorded runs' figures are labelled.
    """
    notebook.metadata.pop("widgets", None)
    module, section, recorded = None, "", []

    def label(match: re.Match[str]) -> str:
        recorded.append(" ".join(match.group(1).split()) or match.group(2))
        # A block of its own: an inline tag would be split from its text.
        return (f'<div class="adm-recorded" id="adm-recorded-{len(recorded)}">'
                f"recorded run</div>\n\n{match.group()}")

    for cell in notebook.cells:
        if cell.cell_type == "markdown":
            prose = _FENCE.sub("", cell.source)
            headings = [h for _, h in _MD_HEADING.findall(prose)]
            section = _plain(headings[-1]) if headings else section
            cell.source = _MD_IMAGE.sub(label, cell.source)
            continue
        if cell.cell_type != "code":
            continue
        cell.outputs = [o for o in cell.outputs
                        if WIDGET_VIEW not in o.get("data", {})]
        first = (cell.source.splitlines() or [""])[0].split()
        if first[:2] == ["#|", "default_exp"] and len(first) > 2:
            module = first[2]
        elif first[:2] in (["#|", "export"], ["#|", "exporti"]):
            lines = len(cell.source.splitlines())
            cell.metadata["adm_fold"] = {
                "summary": _fold_summary(cell.source,
                                         first[2] if len(first) > 2 else module),
                "open": lines <= FOLD_LINES,
            }
        elif (cell.metadata.get("jupyter", {}).get("source_hidden")
              and "solution" not in cell.metadata.get("tags", [])):
            # Hidden in JupyterLab (a diagram's drawing code): folded here.
            lines = len(cell.source.splitlines())
            cell.metadata["adm_fold"] = {
                "summary": f"The code that draws it ({lines} lines)",
                "open": False,
            }
        for output in cell.outputs:
            data = output.get("data", {})
            if "image/png" not in data and "image/jpeg" not in data:
                continue
            # Matplotlib's text for a figure: "<Figure size 900x320 with 2 Axes>".
            panels = re.search(r"with (\d+) Axes", str(data.get("text/plain", "")))
            what = (f"A figure of {panels[1]} panels" if panels and panels[1] != "1"
                    else "A figure")
            output.metadata["adm_alt"] = (
                f"{what} drawn by the code of the section \u201c{section}\u201d")
    return notebook, recorded


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


class _Prose(HTMLParser):
    """The headings of a rendered chapter's markdown and the text under each."""

    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link",
            "meta", "source", "track", "wbr"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.sections = [Section("", 1, "")]
        self._depth = 0
        self._markdown: int | None = None  # depth of the markdown cell we are in
        self._heading: int | None = None
        self._skip: int | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self.VOID:
            return
        self._depth += 1
        named = dict(attrs)
        classes = (named.get("class") or "").split()
        if self._markdown is None:
            if "jp-RenderedMarkdown" in classes:
                self._markdown = self._depth
        elif self._skip is None and ("anchor-link" in classes
                                     or tag in ("script", "style")):
            self._skip = self._depth
        elif re.fullmatch(r"h[1-3]", tag) and named.get("id"):
            self.sections.append(Section(named["id"] or "", int(tag[1]), ""))
            self._heading = self._depth

    def handle_endtag(self, tag: str) -> None:
        if tag in self.VOID:
            return
        for name in ("_skip", "_heading", "_markdown"):
            if getattr(self, name) == self._depth:
                setattr(self, name, None)
        self._depth -= 1

    def handle_data(self, data: str) -> None:
        if self._markdown is None or self._skip is not None:
            return
        section = self.sections[-1]
        if self._heading is not None:
            section.title += data
        else:
            section.text.append(data)


def _sections(body: str) -> list[Section]:
    """The sections of a rendered chapter, in order."""
    parser = _Prose()
    parser.feed(body)
    return [s for s in parser.sections if s.anchor or "".join(s.text).strip()]


def _items(pages: list[Page], current: Page | None, sections: list[Section],
           tag: str = "") -> str:
    """A list of pages, the current one with its sections as contents."""
    items = []
    for page in pages:
        if page != current:
            items.append(f'<li><a href="{page.html}">{html.escape(page.label)}</a>'
                         "</li>")
            continue
        contents = "\n".join(
            f'<li><a href="#{html.escape(s.anchor)}">{html.escape(s.title.strip())}'
            "</a></li>" for s in sections if s.level == 2)
        items.append(
            f'<li><a href="{page.html}" aria-current="page">'
            f"{html.escape(page.label)}</a>{tag}"
            f'<ol class="adm-contents" aria-label="Contents of this page">'
            f"{contents}</ol></li>")
    return "".join(items)


def _sidebar(book: bk.Book, pages: list[Page], current: int | None,
             sections: list[Section], smoke: bool,
             docs: list[Page] | None = None, doc: Page | None = None) -> str:
    """The chapter list and the pages of docs/, the current one with its
    contents, and the search box."""
    tag = ('<a class="adm-smoke-tag" href="#adm-smoke">Outputs from a smoke '
           "run</a>" if smoke else "")
    chapter = pages[current] if current is not None else None
    items = _items(pages, chapter, sections, tag)
    others = (f'<p class="adm-docs-title">Beside the chapters</p>'
              f'<ol class="adm-docs">{_items(docs, doc, sections)}</ol>'
              if docs else "")
    fold = ('<button type="button" id="adm-fold-all">Fold or unfold all library '
            "code</button>" if current is not None else "")
    return (
        '<nav class="adm-sidebar" aria-label="Chapters">'
        f'<a class="adm-book" href="index.html">{html.escape(book.title)}</a>'
        '<div role="search"><input type="search" id="adm-search" '
        'placeholder="Search the book" aria-label="Search the book" '
        'autocomplete="off">'
        '<ol class="adm-results" id="adm-results" hidden></ol></div>'
        f'<ol class="adm-chapters">{items}</ol>{others}{fold}</nav>'
    )


def render_chapter(
    book: bk.Book, pages: list[Page], index: int, notebook_path: Path,
    exporter: Any = None, docs: list[Page] | None = None,
) -> tuple[str, list[Section]]:
    """A chapter's HTML page from its executed notebook, and its sections."""
    import nbformat

    page = pages[index]
    notebook, recorded = _for_the_page(nbformat.read(notebook_path, as_version=4))
    notebook.metadata["title"] = f"{page.label} | {book.title}"
    nav = _nav(pages, index)
    info = notebook.metadata.get("adm_book", {})
    resources = {
        # Markdown images (the recorded runs' figures) resolve from here.
        "metadata": {"path": str(page.chapter.parent), "name": page.title},
        "adm": {
            "mathjax_url": f"mathjax/MathJax.js?config={MATHJAX_CONFIG}",
            "generator": GENERATOR,
            "css": CSS,
            "top": SIDEBAR_MARK + nav + _note(info, recorded),
            "bottom": nav + SCRIPTS,
        },
    }
    try:
        body, _ = (exporter or _exporter()).from_notebook_node(notebook, resources)
    except FileNotFoundError as err:
        raise bk.BookError(f"{book.rel(page.chapter)}: an image it shows is "
                           f"missing: {err}") from err
    sections = _sections(body)
    smoke = not info.get("parameters")
    body = body.replace(
        SIDEBAR_MARK, _sidebar(book, pages, index, sections, smoke, docs), 1)
    return body, sections


def search_index(pages: list[Page], sections: dict[str, list[Section]]) -> str:
    """The site's search index, as a script that sets `window.ADM_SEARCH`."""
    entries = []
    for page in pages:
        for section in sections.get(page.html, []):
            url = page.html + (f"#{section.anchor}" if section.anchor else "")
            entries.append({
                "page": page.label, "url": url,
                "title": _plain(section.title) or page.label,
                "text": _plain(" ".join(section.text)),
            })
    # "</" cannot end the script early: JSON allows "\/" for "/".
    text = json.dumps(entries, ensure_ascii=False).replace("</", "<\\/")
    return f"window.ADM_SEARCH = {text};\n"


def render_index(book: bk.Book, pages: list[Page],
                 docs: list[Page] | None = None) -> str:
    """The site's front page: the book's title and its table of contents."""
    items = "\n".join(
        f'<li><a href="{p.html}"><span class="adm-num">'
        f"{p.number + '.' if p.number else ''}</span>{html.escape(p.title)}</a>"
        f'<a class="adm-source" href="source/{p.chapter.name}">source</a></li>'
        for p in pages
    )
    beside = "\n".join(f'<li><a href="{p.html}">{html.escape(p.title)}</a></li>'
                       for p in docs or [])
    beside = (f'<h2>Beside the chapters</h2>\n<ul class="adm-toc">\n{beside}\n'
              "</ul>" if beside else "")
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
{_sidebar(book, pages, None, [], False, docs)}
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
{beside}
<p class="adm-note">Every chapter is a Jupytext <code>.py</code> file (its
<em>source</em> link) that runs as a notebook. The outputs on these pages came from
running each chapter with its smoke configuration, unless a page says otherwise;
figures from the recorded CPU runs are shown where the text cites them. Made by
<code>adm book build</code>.</p>
</main>
{SCRIPTS}
</body>
</html>
"""


def _slug(text: str) -> str:
    """A heading's anchor, as GitHub makes it, so that links work in both."""
    kept = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return kept.replace(" ", "-")


def _site_link(book: bk.Book, pages: list[Page], docs: list[Page], doc: Page,
               href: str) -> str:
    """A link of a docs/ page as the site has it: a chapter's file becomes the
    chapter's page, another Markdown page its page; anything else is refused."""
    from urllib.parse import urlsplit

    parts = urlsplit(href)
    if parts.scheme or parts.netloc or not parts.path:
        return href
    target = (doc.chapter.parent / parts.path).resolve()
    for page in pages + docs:
        if page.chapter.resolve() == target:
            return page.html + (f"#{parts.fragment}" if parts.fragment else "")
    raise bk.BookError(f"{book.rel(doc.chapter)}: the link {href!r} is to neither "
                       f"a chapter nor a page of {DOCS}/, so the site cannot show "
                       "it: link a chapter or a page, or write the path as code")


def _data_uri(book: bk.Book, doc: Page, src: str) -> str:
    """An image of a docs/ page, embedded, so that the page reads offline."""
    if re.match(r"[a-z]+:|//", src):
        raise bk.BookError(f"{book.rel(doc.chapter)}: the image {src!r} is not a "
                           "local file; the site loads nothing from the network")
    path = (doc.chapter.parent / src).resolve()
    kind = _IMAGE_TYPES.get(path.suffix.lower())
    if kind is None or not path.is_file():
        raise bk.BookError(f"{book.rel(doc.chapter)}: the image {src!r} is "
                           "missing or not a PNG, JPEG or SVG file")
    return f"data:{kind};base64," + base64.b64encode(path.read_bytes()).decode()


def render_doc(book: bk.Book, pages: list[Page], docs: list[Page],
               doc: Page) -> tuple[str, list[Section]]:
    """A page of docs/ from its Markdown, with the site's sidebar and search."""
    from markdown_it import MarkdownIt

    markdown = MarkdownIt("commonmark", {"html": False}).enable("table")
    tokens = markdown.parse(doc.chapter.read_text(encoding="utf-8"))
    seen: set[str] = set()
    for at, token in enumerate(tokens):
        if token.type == "heading_open" and token.tag in ("h1", "h2", "h3"):
            inline = tokens[at + 1].children or []
            anchor = base = _slug("".join(c.content for c in inline))
            number = 0
            while anchor in seen:  # GitHub numbers a repeated heading's anchor
                number += 1
                anchor = f"{base}-{number}"
            seen.add(anchor)
            token.attrSet("id", anchor)
        for child in token.children or []:
            if child.type == "link_open":
                child.attrSet("href", _site_link(book, pages, docs, doc,
                                                 str(child.attrGet("href"))))
            elif child.type == "image":
                child.attrSet("src", _data_uri(book, doc, str(child.attrGet("src"))))
    body = markdown.renderer.render(tokens, markdown.options, {})
    sections = _sections(f'<div class="jp-RenderedMarkdown">{body}</div>')
    where = docs.index(doc)
    links = ['<a href="index.html">Contents</a>',
             f'<a class="adm-src" href="source/{doc.chapter.name}">source: '
             f"{DOCS}/{doc.chapter.name}</a>"]
    if where + 1 < len(docs):
        links.append(f'<a rel="next" class="adm-next" href="{docs[where + 1].html}">'
                     f"{html.escape(docs[where + 1].label)} &rarr;</a>")
    nav = '<nav class="adm-nav">' + "\n".join(links) + "</nav>"
    page = f"""<!DOCTYPE html>
<html lang="{html.escape(book.language)}">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1.0">
<meta name="generator" content="{GENERATOR}">
<title>{html.escape(doc.title)} | {html.escape(book.title)}</title>
<style type="text/css">{CSS}</style>
</head>
<body class="adm-index adm-page">
{_sidebar(book, pages, None, sections, False, docs, doc)}
<main>
{nav}
<article class="jp-RenderedMarkdown">
{body}</article>
{nav}
</main>
{SCRIPTS}
</body>
</html>
"""
    return page, sections


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
    docs = _doc_pages(book, pages)
    exporter = _exporter()
    # Built beside the output and swapped in at the end, so that a failed build
    # leaves the last good site in place.
    partial = output.with_name(output.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    (partial / "source").mkdir(parents=True)
    copy_mathjax(partial / "mathjax")
    report = SiteReport(output, output / "index.html")
    bar = tqdm(pages, desc="adm book build", unit="chapter", disable=not progress)
    sections = {}
    for index, page in enumerate(bar):
        bar.set_postfix_str(page.chapter.name)
        done = execute(book, page.chapter, parameters.get(page.chapter, {}),
                       force, progress)
        (report.reused if done.reused else report.executed).append(page.chapter.stem)
        text, sections[page.html] = render_chapter(book, pages, index, done.notebook,
                                                   exporter, docs)
        (partial / page.html).write_text(text, encoding="utf-8")
        shutil.copy2(page.chapter, partial / "source" / page.chapter.name)
    for doc in docs:
        text, sections[doc.html] = render_doc(book, pages, docs, doc)
        (partial / doc.html).write_text(text, encoding="utf-8")
        shutil.copy2(doc.chapter, partial / "source" / doc.chapter.name)
    (partial / "index.html").write_text(render_index(book, pages, docs),
                                        encoding="utf-8")
    (partial / SEARCH_INDEX).write_text(search_index(pages + docs, sections),
                                        encoding="utf-8")
    (partial / SITE_SCRIPT).write_text(SITE_JS, encoding="utf-8")
    shutil.rmtree(output, ignore_errors=True)
    partial.rename(output)
    report.seconds = time.perf_counter() - start
    return report
