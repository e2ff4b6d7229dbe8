"""The library's shape, read from its source: no import cycle, each layer imports only the ones
below it, the file-name module imports nothing of the project, and no function runs past 60 lines.

The graph counts every import, function-local ones too (``diffusion.codegraph``), so a cycle
cannot hide inside a function body.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from diffusion import codegraph

ROOT = Path(__file__).resolve().parents[1]

# rank of each layer: a module may import its own subpackage and layers of a lower rank only
LAYERS = {"errors": 0, "codegraph": 0, "threads": 0, "config": 1, "artifacts": 1, "data": 2, "models": 3,
          "training": 4, "sampling": 4, "evaluation": 5, "registry": 6, "pipeline": 7}
MAX_FUNCTION_LINES = 60


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "diffusion"


def test_the_import_graph_has_no_cycle():
    assert codegraph.find_cycle(codegraph.graph()) is None, " -> ".join(codegraph.find_cycle(codegraph.graph()))


def test_cycle_finder_finds_a_function_local_cycle(tmp_path):
    pkg = tmp_path / "diffusion"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from diffusion.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from diffusion import a\n")
    assert codegraph.find_cycle(codegraph.graph(pkg)) == ["diffusion.a", "diffusion.sub.b", "diffusion.a"]


def test_every_module_imports_only_lower_layers():
    wrong = []
    for module, imported in codegraph.graph().items():
        here = layer(module)
        if here == "diffusion":  # the package's own __init__
            assert not imported
            continue
        for other in imported:
            there = layer(other)
            if there != here and LAYERS[there] >= LAYERS[here]:
                wrong.append(f"{module} -> {other}")
    assert not wrong, "imports against the layering (see diffusion/__init__.py):\n" + "\n".join(sorted(wrong))


def test_every_module_has_a_layer():
    assert {layer(m) for m in codegraph.modules()} - {"diffusion"} == set(LAYERS)


def test_artifacts_imports_nothing_of_the_project_but_errors():
    assert codegraph.graph()["diffusion.artifacts"] == {"diffusion.errors"}


@pytest.mark.parametrize("package", sorted(k for k in LAYERS if (ROOT / "diffusion" / k).is_dir()))
def test_each_subpackage_says_what_it_owns_and_may_import(package):
    doc = ast.get_docstring(ast.parse((ROOT / "diffusion" / package / "__init__.py").read_text())) or ""
    assert "Owns:" in doc and "May import" in doc, package


def long_functions(roots=("diffusion", "flows")) -> list[str]:
    found = []
    for root in roots:
        for path in sorted((ROOT / root).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    n = node.end_lineno - node.lineno + 1
                    if n > MAX_FUNCTION_LINES:
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    return found


def test_no_function_runs_past_60_lines():
    assert not long_functions(), "split by what each piece does:\n" + "\n".join(long_functions())
