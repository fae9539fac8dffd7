"""The layering as written: docs/development.md's module map is the import contracts of
pyproject.toml with each module's first docstring line, and every module sits in a layer.
(`lint-imports` checks the imports against the contracts; `.ci/run` runs it.) The names a recipe
may use have one list each, and each lower layer maps exactly those."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src" / "lenetlab"
MAP_START = "<!-- module map: tests/test_layers.py writes it from pyproject.toml; do not edit -->"
MAP_END = "<!-- /module map -->"


def layers() -> list[list[str]]:
    config = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    (contract,) = [c for c in config["tool"]["importlinter"]["contracts"] if c["id"] == "layers"]
    return [[name.strip() for name in layer.replace(":", "|").split("|")] for layer in contract["layers"]]


def concern(module: str) -> str:
    """A module's first docstring sentence, which may wrap (a package's __init__'s)."""
    path = SRC / f"{module}.py"
    if not path.exists():
        path = SRC / module / "__init__.py"
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    return " ".join(doc.split("\n\n")[0].split())


def module_map() -> str:
    rows = ["| layer | module | its one concern |", "| --- | --- | --- |"]
    for number, layer in enumerate(layers(), start=1):
        for module in layer:
            rows.append(f"| {number} | `{module}` | {concern(module).replace('|', '/')} |")
    return "\n".join([MAP_START, *rows, MAP_END])


def test_the_docs_module_map_is_the_contracts():
    page = (REPO / "docs" / "development.md").read_text(encoding="utf-8")
    start, end = page.index(MAP_START), page.index(MAP_END) + len(MAP_END)
    assert page[start:end] == module_map(), "run: python tests/test_layers.py, which rewrites it"


def test_every_module_is_in_a_layer():
    modules = {p.stem for p in SRC.glob("*.py") if p.stem != "__init__"}
    modules |= {p.name for p in SRC.iterdir() if (p / "__init__.py").is_file()}
    placed = [module for layer in layers() for module in layer]
    assert sorted(placed) == sorted(modules)


def test_every_module_says_its_concern():
    assert [m for layer in layers() for m in layer if not concern(m)] == []


def test_each_name_a_recipe_may_use_is_mapped_below_it():
    """recipes.py lists the names; the network's layers and the optimisers' constructors map them."""
    from lenetlab import model, optimizers, recipes

    assert list(model.ACTIVATION_LAYERS) == list(recipes.ACTIVATIONS)
    assert list(model.POOL_LAYERS) == list(recipes.POOLS)
    assert list(optimizers.OPTIMIZERS) == list(recipes.OPTIMIZERS)
    assert set(recipes.PUBLISHED_RECIPES) < set(recipes.RECIPES)
    assert set(recipes.ORIGINAL_FIELDS) < set(recipes.Recipe.__dataclass_fields__)


if __name__ == "__main__":  # rewrite the map in docs/development.md
    page_path = REPO / "docs" / "development.md"
    page = page_path.read_text(encoding="utf-8")
    start, end = page.index(MAP_START), page.index(MAP_END) + len(MAP_END)
    page_path.write_text(page[:start] + module_map() + page[end:], encoding="utf-8")
    print(f"wrote the module map into {page_path}")
