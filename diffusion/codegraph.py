"""The library's own import graph, read from the source: which code a stage runs.

Every ``import`` counts, the ones inside functions too (they run when the function does). From
it come the files a DVC stage depends on (``stage_files``: the import closure of that stage's
function in ``diffusion.pipeline.stages``), the code a training checkpoint was written by
(``diffusion.training.train.code_fingerprint``), and the check that the graph has no cycle.

Imports nothing of the project and nothing outside the standard library, so it runs anywhere.
"""

from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

PACKAGE = "diffusion"
PACKAGE_DIR = Path(__file__).resolve().parent
STAGES_MODULE = "diffusion.pipeline.stages"


@lru_cache(maxsize=None)
def modules(root: Path = PACKAGE_DIR) -> dict[str, Path]:
    """Every module of the package: dotted name -> file (a package is its ``__init__.py``)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = (PACKAGE, *path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imported(node: ast.AST, module: str, known: dict[str, Path]) -> set[str]:
    """The project modules one import statement names (``from pkg import sub`` is the submodule)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
        if node.level:  # relative: resolve against this module's package
            is_pkg = known[module].name == "__init__.py"
            base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_pkg else 0)]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        names = [f"{target}.{a.name}" if f"{target}.{a.name}" in known else target for a in node.names]
    else:
        return set()
    found = set()
    for name in names:
        while name and name not in known:  # `import diffusion.data.text.x` -> the deepest module that exists
            name = name.rpartition(".")[0]
        if name.startswith(PACKAGE) and name != PACKAGE:
            found.add(name)
    return found


@lru_cache(maxsize=None)
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), str(path))


def imports_in(node: ast.AST, module: str, root: Path = PACKAGE_DIR) -> set[str]:
    """Project modules imported anywhere inside ``node`` (a module, a function) of ``module``."""
    known = modules(root)
    return {m for sub in ast.walk(node) for m in _imported(sub, module, known)} - {module}


def graph(root: Path = PACKAGE_DIR) -> dict[str, set[str]]:
    """module -> the project modules it imports, at any depth of its code."""
    return {m: imports_in(_tree(path), m, root) for m, path in modules(root).items()}


def closure(start: set[str], root: Path = PACKAGE_DIR) -> set[str]:
    """``start`` and every project module reachable from it."""
    g, seen, todo = graph(root), set(), list(start)
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(g[m])
    return seen


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (``[a, b, ..., a]``), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(g.get(m, ())):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(g):
        if m not in state and (found := visit(m)):
            return found
    return None


def _function(tree: ast.Module, name: str) -> ast.FunctionDef:
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return node
    raise KeyError(f"{STAGES_MODULE} has no function {name!r}")


def stage_modules(stage: str, root: Path = PACKAGE_DIR) -> set[str]:
    """The modules the pipeline stage ``stage`` runs: its function in ``diffusion.pipeline.stages``
    (and the module's own functions it calls), that module's top-level imports, and everything
    they import in turn."""
    path = modules(root)[STAGES_MODULE]
    tree = _tree(path)
    top_level = {n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))}
    local_functions = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    start = set().union(*(imports_in(n, STAGES_MODULE, root) for n in top_level))
    todo, done = [stage], set()
    while todo:
        name = todo.pop()
        if name in done:
            continue
        done.add(name)
        fn = _function(tree, name)
        start |= imports_in(fn, STAGES_MODULE, root)
        todo += [c.func.id for c in ast.walk(fn) if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)
                 and c.func.id in local_functions]
    return closure(start, root) | {STAGES_MODULE}  # its file, not every other stage's imports


def files_of(mods: set[str], root: Path = PACKAGE_DIR) -> list[str]:
    """The source files of ``mods`` and of the packages they sit in, relative to the repository
    (``diffusion/models/unet.py``), sorted."""
    known = modules(root)
    names = set(mods)
    for m in mods:
        parts = m.split(".")
        names |= {".".join(parts[:i]) for i in range(1, len(parts))}
    base = root.parent
    return sorted(known[n].relative_to(base).as_posix() for n in names if n in known)


def stage_files(stage: str, root: Path = PACKAGE_DIR) -> list[str]:
    """The files of ``diffusion/`` that DVC's stage ``stage`` depends on (see ``stage_modules``)."""
    return files_of(stage_modules(stage, root), root)
