"""Where a model version came from: code, data, params and evaluation, as registry tags.

``collect(project_dir, params, evaluation)`` gathers, at registration time:

    lineage.git_commit       HEAD of the project's git repository ("unknown" outside one)
    lineage.git_dirty        "true" when tracked source or params differ from that commit (files
                             the pipeline itself writes, dvc.lock and the stages' outputs, do not count)
    lineage.data.<path>      the DVC hash (md5) of each data folder the train stage read, as it
                             recorded them from the data on disk (``trained_on.json`` in the model
                             folder); for a model without that record, dvc.lock's train deps, only
                             those whose hash matches the data on disk now
    lineage.data_from        where those came from: "train stage", "dvc.lock (matches the data on
                             disk)", or "unknown" (nothing could be vouched for)
    lineage.params_sha256    hash of the whole params (after overrides), canonical JSON
    lineage.parent.source    a warm-started model's train.init_from as written, ``.resolved`` what it
                             named then (models:/<name>/<version> or a folder), ``.sha256`` the
                             weights it started from (model.json's ``parent``); absent from scratch
    eval.fingerprint         what the metrics were measured on (prompt set, judge, sampler settings)

Every value is a short string, as MLflow tags must be.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import yaml

from diffusion.artifacts import dvc_md5

LINEAGE_PREFIX = "lineage."
EVAL_TAG = "eval.fingerprint"


def params_hash(params_dict: dict) -> str:
    return hashlib.sha256(json.dumps(params_dict, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _git(project: Path, *args: str) -> str | None:
    try:
        r = subprocess.run(["git", *args], cwd=project, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout if r.returncode == 0 else None


def _pipeline_outputs(project: Path) -> list[str]:
    """Paths that dvc.yaml declares as outputs (the pipeline writes them; they are not 'dirt')."""
    path = project / "dvc.yaml"
    if not path.is_file():
        return []
    stages = (yaml.safe_load(path.read_text()) or {}).get("stages", {})
    out = ["dvc.lock"]
    for s in stages.values():
        for kind in ("outs", "metrics", "plots"):
            for e in s.get(kind) or []:
                out.append(next(iter(e)) if isinstance(e, dict) else str(e))
    return out


def git_state(project_dir: str | Path) -> dict[str, str]:
    project = Path(project_dir).resolve()
    head = _git(project, "rev-parse", "HEAD")
    if head is None:
        return {"git_commit": "unknown", "git_dirty": "unknown"}
    excludes = [f":(exclude){p}" for p in _pipeline_outputs(project)]
    status = _git(project, "status", "--porcelain", "--untracked-files=no", "--", ".", *excludes)
    return {"git_commit": head.strip(), "git_dirty": "unknown" if status is None else str(bool(status.strip())).lower()}


def locked_data(project_dir: str | Path, stage: str = "train") -> dict[str, str]:
    """{dep path: md5} of the data folders dvc.lock says the stage read, kept only where the folder
    on disk has that hash now: dvc.lock describes the last ``dvc repro``, not necessarily the data
    a model was trained on (stages run by hand on other data leave it as it was)."""
    project = Path(project_dir)
    lock = project / "dvc.lock"
    if not lock.is_file():
        return {}
    deps = ((yaml.safe_load(lock.read_text()) or {}).get("stages", {}).get(stage) or {}).get("deps", [])
    return {d["path"]: d["md5"] for d in deps if str(d.get("path", "")).startswith("data/") and d.get("md5")
            and (project / d["path"]).exists() and dvc_md5(project / d["path"]) == d["md5"]}


def collect(project_dir: str | Path, params_dict: dict, evaluation_id: str,
            trained_on: dict[str, str] | None = None, parent: dict | None = None) -> dict[str, str]:
    """The lineage tags; ``trained_on``: the train stage's record of what it read (``trained_on.json``);
    ``parent``: model.json's record of the model it was warm-started from (train.init_from)."""
    tags = {f"{LINEAGE_PREFIX}{k}": v for k, v in git_state(project_dir).items()}
    data = trained_on if trained_on is not None else locked_data(project_dir)
    tags[f"{LINEAGE_PREFIX}data_from"] = ("train stage" if trained_on is not None else
                                          "dvc.lock (matches the data on disk)" if data else "unknown")
    for path, md5 in data.items():
        tags[f"{LINEAGE_PREFIX}data.{path}"] = md5
    tags[f"{LINEAGE_PREFIX}params_sha256"] = params_hash(params_dict)
    for k, v in (parent or {}).items():
        tags[f"{LINEAGE_PREFIX}parent.{k}"] = str(v)
    tags[EVAL_TAG] = evaluation_id
    return tags
