"""`prefect deployment run 'train-flow/default' --watch` against a real local server and worker."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import copy_project
from e2e_helpers import BIN, init_repo, run, start_worker, stop_worker

pytestmark = pytest.mark.e2e


def test_deployment_runs_the_pipeline_and_registers(tmp_path, prefect_server):
    project = copy_project(tmp_path / "project")
    env = {**prefect_server.env}
    init_repo(project, env)
    prefect = str(BIN / "prefect")
    run([prefect, "work-pool", "create", "local", "--type", "process", "--overwrite"], project, env)
    run([prefect, "--no-prompt", "deploy", "--all"], project, env)
    worker = start_worker("local", project, env, tmp_path / "worker.log", "--limit", "1")
    try:
        r = run([prefect, "deployment", "run", "train-flow/default", "--watch"], project, env, timeout=900)
        assert "Completed" in r.stdout, r.stdout
    finally:
        stop_worker(worker)
    reg = json.loads((project / "reports/registered_model.json").read_text())
    assert reg["uri"] == "models:/t2i-shapes/1"
    assert (project / "data/samples/grid.png").is_file()
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"ingest", "latents", "embed", "judge", "train", "sample", "evaluate", "register", "promote"}
    # one deployment run leaves a champion chosen by the policy
    decision = json.loads((project / "reports/promotion.json").read_text())
    assert decision["outcome"] == "promoted" and decision["champion_after"] == 1, decision
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    assert {k: int(v) for k, v in client.get_registered_model("t2i-shapes").aliases.items()} == {"champion": 1}
