"""The layering the folders show: core imports no framework and no speech code; backends import no speech code,
no model family and no search; the search imports no speech code; the method registry and the recipe schema
import nothing heavy at import time (what keeps `stablequant validate` fast)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sq_plugin"
FRAMEWORKS = ("torchao", "neural_compressor", "optimum", "transformers")


def module_imports(path: Path, *, top_level_only: bool = False) -> set[str]:
    """Every module a file imports (in functions too, unless top_level_only)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def offending(folder: str, forbidden: tuple[str, ...], *, top_level_only: bool = False) -> dict[str, list[str]]:
    bad = {}
    for path in sorted((PACKAGE / folder).glob("*.py")):
        hits = sorted(m for m in module_imports(path, top_level_only=top_level_only)
                      if any(m == f or m.startswith(f + ".") for f in forbidden))
        if hits:
            bad[path.name] = hits
    return bad


def test_core_imports_no_framework_and_no_speech_code():
    assert offending("core", (*FRAMEWORKS, "sq_plugin.speech", "sq_plugin.families", "sq_plugin.backends",
                              "sq_plugin.search", "sq_plugin.runner", "sq_plugin.recipe")) == {}


def test_backends_import_no_speech_code_family_or_search():
    assert offending("backends", ("sq_plugin.speech", "sq_plugin.families", "sq_plugin.search", "sq_plugin.runner",
                                  "sq_plugin.recipe", "sq_plugin.methods")) == {}


def test_the_search_imports_no_speech_code_or_family():
    assert offending("search", ("sq_plugin.speech", "sq_plugin.families", "sq_plugin.runner")) == {}


@pytest.mark.parametrize("module", ["methods.py", "recipe.py", "core/plan.py", "core/grid.py", "core/defaults.py"])
def test_schema_modules_import_nothing_heavy_at_import_time(module):
    heavy = ("torch", "numpy", "scipy", *FRAMEWORKS, "sq_plugin.backends", "sq_plugin.families", "sq_plugin.search",
             "sq_plugin.speech")
    hits = sorted(m for m in module_imports(PACKAGE / module, top_level_only=True)
                  if any(m == h or m.startswith(h + ".") for h in heavy))
    assert hits == []
