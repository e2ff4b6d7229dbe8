"""One list per fact: each DVC stage's ``diffusion/`` deps are the import closure of its function
in ``diffusion.pipeline.stages`` (``diffusion.codegraph.stage_files``), and the train stage's list
is also what the resume fingerprint hashes. Editing any file a stage runs makes ``dvc repro``
rerun it; editing one the train stage runs also stops an old checkpoint from being resumed.
"""

from __future__ import annotations

import ast
import shutil
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from diffusion import codegraph

ROOT = Path(__file__).resolve().parents[1]
DVC_FILES = ("dvc.yaml", "analysis/dvc.yaml")


def dvc_stages() -> list[tuple[str, str, dict]]:
    """(file, stage name, stage) for every stage of both dvc.yaml files."""
    out = []
    for name in DVC_FILES:
        for stage, spec in yaml.safe_load((ROOT / name).read_text())["stages"].items():
            out.append((name, stage, spec))
    return out


def t2i_command(spec: dict) -> str | None:
    """``ingest`` for ``t2i ingest --out ...``; None for any other command."""
    words = spec["cmd"].split()
    return words[1] if words[:1] == ["t2i"] and len(words) > 1 else None


def code_deps_mismatch(file: str, stage: str, spec: dict) -> str | None:
    """None when the stage's ``diffusion/`` deps equal its import closure, else what differs."""
    listed = {d for d in spec.get("deps", []) if isinstance(d, str) and d.startswith("diffusion/")}
    closure = set(codegraph.stage_files(stage))
    if listed == closure:
        return None
    return (f"{file} stage {stage!r}: its diffusion/ deps are not its import closure\n"
            f"  missing (run by the stage, not in deps): {sorted(closure - listed)}\n"
            f"  extra (in deps, not run by the stage): {sorted(listed - closure)}\n"
            f"  the list to paste: python -m diffusion.codegraph {stage}")


def test_every_stage_runs_its_own_t2i_command():
    """The stage -> function mapping is by name; a stage running anything else would escape the check."""
    odd = [f"{file}:{stage}: {spec['cmd'].split()[:2]}" for file, stage, spec in dvc_stages()
           if t2i_command(spec) != stage]
    assert not odd, "stages whose command is not `t2i <stage>`:\n" + "\n".join(odd)


T2I_STAGES = [s for s in dvc_stages() if t2i_command(s[2]) == s[1]]


@pytest.mark.parametrize("file,stage,spec", T2I_STAGES, ids=[f"{file}:{stage}" for file, stage, _ in T2I_STAGES])
def test_stage_code_deps_are_its_import_closure(file, stage, spec):
    problem = code_deps_mismatch(file, stage, spec)
    if problem:
        pytest.fail(problem, pytrace=False)


def test_the_train_stage_runs_the_model_the_data_reader_and_the_conditioning():
    """The files the two hand-kept lists disagreed on (issue 32): all three are the train stage's."""
    files = codegraph.stage_files("train")
    for name in ("models/dit.py", "training/train_data.py", "data/text.py", "training/train.py"):
        assert f"diffusion/{name}" in files


# --------------------------------------------------------------------------------------------
# codegraph on a package written here, so every rule can fail for real


def write_package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root / "pkg"


PKG = {
    "pkg/__init__.py": "",
    "pkg/base.py": "",
    "pkg/util/__init__.py": "from . import helpers  # a package's own submodule\n",
    "pkg/util/helpers.py": "from ..base import thing  # two levels up: pkg.base\n",
    "pkg/util/lazy.py": "",
    "pkg/models/__init__.py": """\
        def __getattr__(name):  # lazy: runs only when the package's attribute is asked for
            from pkg.models import heavy
            return heavy
        """,
    "pkg/models/heavy.py": "",
    "pkg/models/net.py": "import pkg.util.helpers as h\n",
    "pkg/models/user.py": "from pkg import models\n",
    "pkg/models/rel.py": "from .net import Net\n",
    "pkg/pipeline/__init__.py": "",
    "pkg/pipeline/stages.py": """\
        from pkg import base


        def _helper():
            from pkg.models import net


        def _callback():
            from pkg.util import lazy


        def train():
            _helper()


        def sample(run):
            return run(submit=_callback)  # passed on, never called here


        def other():
            from pkg.models import user


        def relative():
            from ..models import rel
        """,
}


def test_graph_reads_every_form_of_import(tmp_path):
    g = codegraph.graph(write_package(tmp_path, PKG))
    assert g["pkg.util"] == {"pkg.util.helpers"}  # `from . import x` in an __init__
    assert g["pkg.util.helpers"] == {"pkg.base"}  # `from ..base import thing`
    assert g["pkg.models.net"] == {"pkg.util.helpers"}  # `import a.b as c`
    assert g["pkg.models.user"] == {"pkg.models"}  # `from pkg import sub`: the subpackage
    assert g["pkg.models.rel"] == {"pkg.models.net"}  # `from .net import Net`: the module, not a name
    assert g["pkg.models"] == {"pkg.models.heavy"}  # inside a function: it counts
    assert g["pkg.pipeline.stages"] == {"pkg.base", "pkg.models.net", "pkg.util.lazy", "pkg.models.user",
                                        "pkg.models.rel"}


def test_stage_files_follow_functions_helpers_and_enclosing_packages(tmp_path):
    root = write_package(tmp_path, PKG)
    every = ["pkg/__init__.py", "pkg/base.py", "pkg/pipeline/__init__.py", "pkg/pipeline/stages.py"]
    # a helper it calls; net's `import pkg.util.helpers` runs pkg/util/__init__ first; the lazy
    # __getattr__ of pkg/models/__init__ does not run when only pkg.models.net is imported
    assert codegraph.stage_files("train", root) == sorted(every + [
        "pkg/models/__init__.py", "pkg/models/net.py", "pkg/util/__init__.py", "pkg/util/helpers.py"])
    # a helper passed on counts as one called; pkg.util's module-level import runs with it
    assert codegraph.stage_files("sample", root) == sorted(every + [
        "pkg/util/__init__.py", "pkg/util/helpers.py", "pkg/util/lazy.py"])
    # the package imported by name: its function's import counts
    assert "pkg/models/heavy.py" in codegraph.stage_files("other", root)
    assert "pkg/models/net.py" in codegraph.stage_files("relative", root)
    with pytest.raises(KeyError, match="no function 'nope'"):
        codegraph.stage_files("nope", root)


def test_an_edited_file_is_read_again(tmp_path):
    root = write_package(tmp_path, PKG)
    assert "pkg/models/heavy.py" not in codegraph.stage_files("train", root)
    (root / "models" / "net.py").write_text("import pkg.util.helpers as h\nimport pkg.models.heavy\n# longer\n")
    assert "pkg/models/heavy.py" in codegraph.stage_files("train", root)


def test_a_cycle_through_a_function_and_a_relative_import_is_found(tmp_path):
    root = write_package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "def f():\n    from pkg.sub import b\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/b.py": "from .. import a\n",
        "pkg/c.py": "from pkg import a\n",
    })
    assert codegraph.find_cycle(codegraph.graph(root)) == ["pkg.a", "pkg.sub.b", "pkg.a"]
    (root / "sub" / "b.py").write_text("")
    assert codegraph.find_cycle(codegraph.graph(root)) is None


def test_the_library_has_no_import_cycle():
    assert codegraph.find_cycle(codegraph.graph()) is None


def test_codegraph_imports_only_the_standard_library():
    tree = ast.parse(Path(codegraph.__file__).read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert {name.split(".")[0] for name in names} <= set(sys.stdlib_module_names), names


def test_main_prints_a_stage_as_dvc_yaml_lines(capsys):
    assert codegraph.main(["embed"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"      - {f}" for f in codegraph.stage_files("embed")]
    assert codegraph.main(["nope"]) == 2


# --------------------------------------------------------------------------------------------
# the resume fingerprint hashes the same files


def test_code_fingerprint_hashes_exactly_the_train_stage_files(tmp_path):
    from diffusion.training.train import code_fingerprint

    copy = tmp_path / "diffusion"
    shutil.copytree(ROOT / "diffusion", copy, ignore=shutil.ignore_patterns("__pycache__"))
    before = code_fingerprint(copy)
    assert before == code_fingerprint()
    with open(copy / "registry" / "promote.py", "a") as f:  # not run by the train stage
        f.write("\n# an edit\n")
    assert code_fingerprint(copy) == before
    for name in ("models/dit.py", "training/train_data.py", "data/text.py"):
        path = copy / name
        original = path.read_text()
        path.write_text(original + "\n# an edit\n")
        assert code_fingerprint(copy) != before, name
        path.write_text(original)
    assert code_fingerprint(copy) == before
