"""The library's own import graph, read from the source: which code a stage runs.

Every ``import`` counts, the ones inside functions too (they run when the function does). From
it come the files a DVC stage depends on (``stage_files``: the import closure of that stage's
function in ``diffusion.pipeline.stages``, listed in dvc.yaml and compared there by
tests/test_stage_deps.py), the code a training checkpoint was written by
(``diffusion.training.train.code_fingerprint``, the train stage's files), and the check that the
graph has no cycle.

Imports nothing of the project and nothing outside the standard library, so it runs anywhere.
``python -m diffusion.codegraph train`` prints the train stage's files as dvc.yaml deps lines.
"""

from __future__ import annotations

import ast
import sys
from functools import lru_cache
from pathlib import Path
from typing import Iterator

PACKAGE_DIR = Path(__file__).resolve().parent
STAGES = "pipeline.stages"  # in the package: one function per pipeline stage

_DEFS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


@lru_cache(maxsize=None)
def modules(root: Path = PACKAGE_DIR) -> dict[str, Path]:
    """Every module of the package in ``root`` (named after the folder): dotted name -> file (a
    package is its ``__init__.py``)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = (root.name, *path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imported(node: ast.AST, module: str, known: dict[str, Path]) -> set[str]:
    """The project modules one import statement names (``from pkg import sub`` is the submodule)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]  # `import a.b as c` is a.b
    elif isinstance(node, ast.ImportFrom):
        if node.level:  # relative: `.` is the package this module sits in (a package's own, for __init__)
            package = module.split(".") if known[module].name == "__init__.py" else module.split(".")[:-1]
            if node.level - 1 >= len(package):
                return set()  # above the top package: not ours
            base = package[: len(package) - (node.level - 1)]
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
        if name:
            found.add(name)
    return found


def _tree(path: Path) -> ast.Module:
    stat = path.stat()
    return _parse(path, stat.st_mtime_ns, stat.st_size)  # a file edited since is parsed again


@lru_cache(maxsize=None)
def _parse(path: Path, mtime_ns: int, size: int) -> ast.Module:
    return ast.parse(path.read_text(), str(path))


def imports_in(node: ast.AST, module: str, root: Path = PACKAGE_DIR) -> set[str]:
    """Project modules imported anywhere inside ``node`` (a module, a function) of ``module``."""
    known = modules(root)
    return {m for sub in ast.walk(node) for m in _imported(sub, module, known)} - {module}


def _on_import(node: ast.AST) -> Iterator[ast.AST]:
    """The nodes under ``node`` that run when it runs: all but the bodies of the functions it
    defines (a class body runs, its methods do not)."""
    for child in ast.iter_child_nodes(node):
        if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield child
            yield from _on_import(child)


def _imports_on_import(module: str, root: Path) -> set[str]:
    """Project modules that importing ``module`` imports at once (outside its functions)."""
    known = modules(root)
    return {m for sub in _on_import(_tree(known[module])) for m in _imported(sub, module, known)} - {module}


def graph(root: Path = PACKAGE_DIR) -> dict[str, set[str]]:
    """module -> the project modules it imports, at any depth of its code."""
    return {m: imports_in(_tree(path), m, root) for m, path in modules(root).items()}


def _packages_of(module: str) -> list[str]:
    """The packages ``module`` sits in, outermost first: ``a.b.c`` -> ``[a, a.b]``."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _reach(start: set[str], enclosing: set[str], root: Path) -> set[str]:
    """Modules imported by name (``start``) run all their code; the packages a module sits in run
    their ``__init__`` first, but only its module-level code (``enclosing``): a function there,
    such as a lazy ``__getattr__``, counts where a module imports that package by name."""
    g, known = graph(root), modules(root)
    whole: set[str] = set()
    body: set[str] = set()
    todo = [(m, True) for m in start] + [(m, False) for m in enclosing]
    while todo:
        m, named = todo.pop()
        if m in whole or (not named and m in body):
            continue
        (whole if named else body).add(m)
        todo += [(n, True) for n in (g[m] if named else _imports_on_import(m, root))]
        todo += [(p, False) for p in _packages_of(m) if p in known]
    return whole | body


def closure(start: set[str], root: Path = PACKAGE_DIR) -> set[str]:
    """``start``, every project module reachable from it, and the packages they sit in."""
    return _reach(set(start), set(), root)


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


def _names_used(node: ast.AST) -> set[str]:
    """Every name ``node`` reads. A local that shares a module-level function's name counts as
    that function: the closure may hold a module too many, never one too few."""
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}


def stage_modules(stage: str, root: Path = PACKAGE_DIR) -> set[str]:
    """The modules the pipeline stage ``stage`` runs: its function in ``<package>.pipeline.stages``
    and the module's own functions and classes it uses (called or passed on), that module's
    module-level code, and everything they import in turn."""
    stages = f"{root.name}.{STAGES}"
    tree = _tree(modules(root)[stages])
    defs = {n.name: n for n in tree.body if isinstance(n, _DEFS)}
    if not isinstance(defs.get(stage), (ast.FunctionDef, ast.AsyncFunctionDef)):
        raise KeyError(f"{stages} has no function {stage!r}")
    start = _imports_on_import(stages, root)
    todo = [stage] + sorted({n for sub in _on_import(tree) for n in _names_used(sub)} & set(defs))
    done: set[str] = set()
    while todo:
        name = todo.pop()
        if name in done:
            continue
        done.add(name)
        start |= imports_in(defs[name], stages, root)
        todo += sorted(_names_used(defs[name]) & set(defs))
    # the stages module itself is a file of the stage, but not every other stage's imports in it
    return _reach(start - {stages}, set(_packages_of(stages)), root) | {stages}


def files_of(mods: set[str], root: Path = PACKAGE_DIR) -> list[str]:
    """The source files of ``mods`` and of the packages they sit in, relative to the folder that
    holds the package (``diffusion/models/unet.py``), sorted."""
    known = modules(root)
    names = set(mods).union(*(_packages_of(m) for m in mods))
    return sorted(known[n].relative_to(root.parent).as_posix() for n in names if n in known)


def stage_files(stage: str, root: Path = PACKAGE_DIR) -> list[str]:
    """The files of the package that DVC's stage ``stage`` depends on (see ``stage_modules``)."""
    return files_of(stage_modules(stage, root), root)


def main(argv: list[str] | None = None) -> int:
    """``python -m diffusion.codegraph STAGE...``: each stage's files as dvc.yaml deps lines."""
    stages = sys.argv[1:] if argv is None else argv
    if not stages:
        print("usage: python -m diffusion.codegraph STAGE [STAGE...]", file=sys.stderr)
        return 2
    for stage in stages:
        try:
            files = stage_files(stage)
        except KeyError as e:
            print(e.args[0], file=sys.stderr)
            return 2
        if len(stages) > 1:
            print(f"# {stage}")
        print("\n".join(f"      - {f}" for f in files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
