"""What the pipeline produced, read from dvc.yaml (the one place that names the paths)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from diffusion.artifacts import GRID

# dvc.yaml's stages, in pipeline order (train-flow runs them one by one; `t2i pipeline --stage` checks names)
STAGES = ("ingest", "latents", "embed", "judge", "train", "sample", "evaluate", "register", "promote")
# stages that `t2i pipeline --stage NAME` (or `dvc repro NAME`) runs on request, not by default
OPTIONAL_STAGES = ("sweep",)
# the dvc repro target of each stage (optional ones live in analysis/dvc.yaml)
DVC_TARGETS = {"sweep": "analysis/dvc.yaml:sweep"}


def _first(entries: list) -> str | None:
    for e in entries or []:
        return next(iter(e)) if isinstance(e, dict) else str(e)
    return None


def stage_outputs(project_dir: str | Path) -> dict[str, dict[str, str | None]]:
    """{stage: {"out": first out, "metrics": first metrics file}} from dvc.yaml."""
    stages = yaml.safe_load((Path(project_dir) / "dvc.yaml").read_text())["stages"]
    return {name: {"out": _first(s.get("outs")), "metrics": _first(s.get("metrics"))} for name, s in stages.items()}


def summary(project_dir: str | Path, tracking_uri: str) -> str:
    """Where the sample grid, the metrics and the registered model are, and how to look at them."""
    project = Path(project_dir).resolve()
    outs = stage_outputs(project)
    lines = ["", "Pipeline outputs"]
    grid = project / outs["sample"]["out"] / GRID
    lines.append(f"  sample grid:      {grid}" + ("" if grid.is_file() else "  (not produced yet)"))
    metrics_file = project / outs["evaluate"]["metrics"]
    if metrics_file.is_file() and json.loads(metrics_file.read_text()).get("adherence") is None:
        lines.append(f"  metrics:          {metrics_file} (no adherence: {json.loads(metrics_file.read_text())['note']})")
    elif metrics_file.is_file():
        m = json.loads(metrics_file.read_text())
        a, j = m["adherence"], m["judge"]
        lines.append(f"  metrics:          {metrics_file}")
        for split in ("seen", "held_out"):
            attrs = ", ".join(f"{k} {a[split][k]:.1%}" for k in ("shape", "color", "size", "position"))
            lines.append(f"    adherence {split:<9} all-correct {a[split]['all']:.1%} ({attrs}; n={a[split]['n']})")
        lines.append(f"    judge on real val images: all-correct {j['overall']['all']:.1%} "
                     f"(seen {j['seen']['all']:.1%}, held-out {j['held_out']['all']:.1%})")
    else:
        lines.append(f"  metrics:          {metrics_file}  (not produced yet)")
    reg_file = project / outs["register"]["out"]
    if reg_file.is_file():
        reg = json.loads(reg_file.read_text())
        lines.append(f"  registered model: {reg['uri']} (run {reg['run_id']})")
    else:
        lines.append(f"  registered model: {reg_file}  (not produced yet)")
    promo_file = project / outs["promote"]["out"] if "promote" in outs else None
    if promo_file is not None and promo_file.is_file():
        d = json.loads(promo_file.read_text())
        lines.append(f"  promotion:        {d['outcome']}: {d['reason']}")
    lines += [
        "",
        "Look at them",
        f"  MLflow UI:  mlflow ui --backend-store-uri {tracking_uri} --port 5000   -> http://127.0.0.1:5000",
        "  Prefect UI: prefect server start   -> http://127.0.0.1:4200  (flow runs: train-flow, stage-*)",
        "  (from the project directory, with .venv/bin on PATH: source .venv/bin/activate)",
    ]
    return "\n".join(lines)
