"""Where a model version came from: code, data, params and evaluation, as registry tags.

``collect(project_dir, params, evaluation)`` gathers, at registration time:

    lineage.git_commit       HEAD of the project's git repository ("unknown" outside one)
    lineage.git_dirty        "true" when tracked source or params differ from that commit (files
                             the pipeline itself writes, dvc.lock and the stages' outputs, do not count)
    lineage.data.<path>      the DVC hash (md5) of each data folder the train stage read, from dvc.lock
    lineage.params_sha256    hash of the whole params (after overrides), canonical JSON
    eval.fingerprint         what the metrics were measured on (prompt set, judge, sampler settings)

Every value is a short string, as MLflow tags must be.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import yaml

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


def trained_on(project_dir: str | Path, stage: str = "train") -> dict[str, str]:
    """{dep path: md5} of the data folders the stage read, as dvc.lock recorded them."""
    lock = Path(project_dir) / "dvc.lock"
    if not lock.is_file():
        return {}
    deps = ((yaml.safe_load(lock.read_text()) or {}).get("stages", {}).get(stage) or {}).get("deps", [])
    return {d["path"]: d.get("md5", "") for d in deps if str(d.get("path", "")).startswith("data/")}


def collect(project_dir: str | Path, params_dict: dict, evaluation_id: str) -> dict[str, str]:
    tags = {f"{LINEAGE_PREFIX}{k}": v for k, v in git_state(project_dir).items()}
    for path, md5 in trained_on(project_dir).items():
        tags[f"{LINEAGE_PREFIX}data.{path}"] = md5
    tags[f"{LINEAGE_PREFIX}params_sha256"] = params_hash(params_dict)
    tags[EVAL_TAG] = evaluation_id
    return tags
