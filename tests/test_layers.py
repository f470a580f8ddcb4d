"""The package's layers: which module may import which (docs/guide.md, Layout).

Every module of adm_lib belongs to one layer; a module imports only its own
layer and the layers it builds on, so that the foundation works without the
book, the book's library without the apps, and the book tooling stands
apart. Imports inside functions count: they are imports all the same.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "adm_lib"

# The layers, bottom up, and the modules in each (a name covers its
# submodules). Within the book's library, chapter order is `adm book
# check`'s rule.
LAYERS: dict[str, tuple[str, ...]] = {
    # hand-written; the appendix on the engineering of runs explains it
    "foundation": ("errors", "values", "devices", "seeds", "viz", "files",
                   "checkpoints", "ranks", "runs", "assets", "data",
                   "datanets", "inception"),
    # generated from chapters 1 to 8
    "library": ("forward", "diffusion", "toy", "unet", "config", "batches",
                "objectives", "runlog", "models", "train", "metrics",
                "guidance", "cascade", "solvers"),
    # the reference's flags and files, read into the library's types
    "compat": ("compat",),
    # the `adm` command and what only it needs
    "apps": ("sampling", "finetune", "evaluation", "demo", "bench", "cli"),
    # the book's own tooling: export, check, run, site, JupyterLab
    "tools": ("book",),
}
# What each layer may import, besides itself.
MAY_IMPORT: dict[str, set[str]] = {
    "foundation": set(),
    "library": {"foundation"},
    "compat": {"foundation", "library"},
    "tools": {"foundation"},
    "apps": {"foundation", "library", "compat", "tools"},
}


def layer_of(module: str) -> str:
    """The layer of `adm_lib.<module>`; KeyError for an unplaced module."""
    top = module.split(".")[0]
    for layer, names in LAYERS.items():
        if top in names:
            return layer
    raise KeyError(module)


def modules() -> dict[str, Path]:
    """Every module of the package, by dotted name below adm_lib."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts == ("__init__",):
            continue
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imports(path: Path) -> set[str]:
    """The adm_lib modules `path` imports, at any depth of its code."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "adm_lib":  # from adm_lib import x
                names |= {f"adm_lib.{a.name}" for a in node.names}
            else:
                names.add(node.module)
    return {n.removeprefix("adm_lib.") for n in names
            if n.startswith("adm_lib.")}


def crossings(found: dict[str, Path]) -> list[str]:
    """Every import that reaches a layer its module may not import."""
    problems = []
    for name, path in found.items():
        layer = layer_of(name)
        for target in sorted(imports(path)):
            other = layer_of(target)
            if other != layer and other not in MAY_IMPORT[layer]:
                problems.append(f"{name} ({layer}) imports {target} "
                                f"({other})")
    return problems


def test_every_module_has_a_layer() -> None:
    unplaced = []
    for name in modules():
        try:
            layer_of(name)
        except KeyError:
            unplaced.append(name)
    assert unplaced == [], "place these in LAYERS (and the Layout of docs/guide.md)"


def test_no_import_crosses_a_layer_upwards() -> None:
    assert crossings(modules()) == []


def test_the_check_finds_an_upward_import(tmp_path: Path) -> None:
    # The check itself: a foundation module importing the library, at
    # module level or inside a function, is caught.
    for code in ("from adm_lib.config import TrainConfig\n",
                 "def f():\n    from adm_lib import train\n",
                 "import adm_lib.cli\n"):
        (tmp_path / "files.py").write_text(code)
        assert crossings({"files": tmp_path / "files.py"}), code
    (tmp_path / "files.py").write_text("from adm_lib.errors import x\n")
    assert crossings({"files": tmp_path / "files.py"}) == []


@pytest.mark.parametrize("module,absent", [
    ("adm_lib.guidance", ("train", "runlog", "ranks", "batches", "sampling",
                          "cli", "demo", "bench", "compat", "book")),
    ("adm_lib.cascade", ("train", "runlog", "ranks", "sampling", "cli")),
    ("adm_lib.checkpoints", ("config", "train", "diffusion", "compat")),
])
def test_a_module_loads_only_what_it_builds_on(
        module: str, absent: tuple[str, ...]) -> None:
    # In a fresh interpreter: what importing `module` loads, at any depth.
    loaded = subprocess.run(
        [sys.executable, "-c", f"import {module}, sys; print(' '.join("
         "m for m in sys.modules if m.startswith('adm_lib')))"],
        capture_output=True, text=True, check=True,
        cwd=PACKAGE.parent).stdout.split()
    tops = {m.removeprefix("adm_lib.").split(".")[0] for m in loaded}
    assert tops.isdisjoint(absent), sorted(tops & set(absent))
