"""``train-flow``: the whole pipeline, stage by stage, through ``dvc repro``.

DVC decides what is stale; this flow only orders the stages, makes each one a visible, retriable
Prefect task, and hands its Prefect API to the stage processes so that their own flow runs
(stage-ingest, stage-train, ...) report to the same server. Deployed as ``train-flow/default``
(see prefect.yaml); ``t2i pipeline`` runs it in-process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from prefect import flow, get_run_logger, task

from diffusion.errors import T2IError
from flows.project import DVC_TARGETS, OPTIONAL_STAGES, STAGES



def stage_env(api_url: str | None) -> dict[str, str]:
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)  # the t2i and dvc of this environment
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def current_api_url() -> str | None:
    """The API this process reports to (a server, or the temporary one Prefect started)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return str(client.api_url).rstrip("/") or None


@task(name="dvc-repro", task_run_name="dvc repro {stage}")
def repro_stage(stage: str, project_dir: str, force: bool, api_url: str | None) -> None:
    cmd = [sys.executable, "-m", "dvc", "repro", DVC_TARGETS.get(stage, stage)]
    cmd += ["--force", "--single-item"] if force else []
    get_run_logger().info("running %s", " ".join(cmd[2:]))
    proc = subprocess.run(cmd, cwd=project_dir, env=stage_env(api_url))
    if proc.returncode != 0:
        raise RuntimeError(f"dvc repro {stage} failed with exit code {proc.returncode}")


@flow(name="train-flow", log_prints=True)
def train_flow(project_dir: str = ".", stages: list[str] | None = None, force: bool = False) -> dict:
    """Reproduce the pipeline (ingest -> latents -> embed -> judge -> train -> sample -> evaluate -> register
    -> promote): it ends with the promotion policy applied to the version it registered.

    ``stages`` limits the run to some stages (and whatever DVC finds stale upstream of them), or
    names an optional one (``sweep``: the quality-vs-cost map); ``force`` reruns them even if
    nothing changed.
    """
    project = Path(project_dir).resolve()
    if not (project / "dvc.yaml").is_file():
        raise T2IError(f"no dvc.yaml in {project}: run train-flow from the project folder")
    chosen = list(stages or STAGES)
    unknown = [s for s in chosen if s not in STAGES + OPTIONAL_STAGES]
    if unknown:
        raise T2IError(f"unknown stage(s) {', '.join(unknown)}; stages are {', '.join(STAGES + OPTIONAL_STAGES)}")
    from diffusion.config import load_params
    from diffusion.evaluation.evaluate import check_promotion_metric

    check_promotion_metric(load_params(project / "params.yaml"))  # before any stage: not after training
    api_url = current_api_url()
    for stage in chosen:
        repro_stage(stage, str(project), force, api_url)
    from diffusion.registry import tracking
    from flows.project import summary

    text = summary(project, tracking.tracking_uri(load_params(project / "params.yaml").mlflow))
    print(text)
    return {"project": str(project), "stages": chosen, "summary": text}
