"""The nightly deployment on a real Prefect server: its cron schedule makes flow runs, a process
worker runs one, and the batch it writes comes from the @champion model."""

from __future__ import annotations

import json
import time
import urllib.request

import pandas as pd
import pytest
import yaml

from conftest import copy_project, tracking_store
from e2e_helpers import BIN, init_repo, run, start_worker, stop_worker

pytestmark = pytest.mark.e2e

POOL = "schedule-test"  # its own pool, so no other test's worker picks up these runs


def _api(server, path: str, body: dict | None = None):
    req = urllib.request.Request(f"{server.url}{path}", data=json.dumps(body or {}).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def _register_champion(project, tiny_model, text_encoder, tiny_params) -> None:
    """What the pipeline leaves behind: t2i-shapes version 1 in the project's store, @champion."""
    import mlflow

    from diffusion.registry.pyfunc import log_and_register

    with tracking_store(f"sqlite:///{project / 'mlflow.db'}"):
        mlflow.set_experiment(experiment_id=mlflow.create_experiment(
            "t2i-shapes", artifact_location=(project / "mlartifacts").as_uri()))
        info = log_and_register(tiny_model, text_encoder, tiny_params.sample,
                                {"adherence.held_out.all": 0.7}, "t2i-shapes", evaluation={"id": "fp"})
        mlflow.MlflowClient().set_registered_model_alias("t2i-shapes", "champion", str(info["version"]))


def test_cron_schedule_creates_runs_and_a_scheduled_run_writes_its_batch(tmp_path, prefect_server, tiny_model,
                                                                         text_encoder, tiny_params):
    project = copy_project(tmp_path / "project")
    (project / "prompts/nightly.txt").write_text("a large red circle on the left\n\na small blue square in the center\n"
                                                 "a large green triangle on the right\n")
    spec = yaml.safe_load((project / "prefect.yaml").read_text())
    nightly = next(d for d in spec["deployments"] if d["name"] == "nightly")
    assert nightly["schedules"][0]["cron"] == "0 2 * * *" and nightly["schedules"][0]["timezone"] == "UTC"
    nightly["schedules"][0]["cron"] = "* * * * *"  # every minute, so one fires within the test
    assert {"task_runner", "workers"} <= set(nightly["parameters"])  # the deployment takes them as parameters
    nightly["parameters"].update(task_runner="dask", workers=2)  # the chunks go to a two-worker LocalCluster
    for d in spec["deployments"]:
        d["work_pool"]["name"] = POOL
    (project / "prefect.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    env = {**prefect_server.env, "PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_WORKER_PREFETCH_SECONDS": "5"}
    init_repo(project, env)
    _register_champion(project, tiny_model, text_encoder, tiny_params)

    prefect = str(BIN / "prefect")
    run([prefect, "work-pool", "create", POOL, "--type", "process", "--overwrite"], project, env)
    run([prefect, "--no-prompt", "deploy", "-n", "nightly"], project, env)
    dep = _api(prefect_server, "/deployments/filter", {"deployments": {"name": {"any_": ["nightly"]}}})[0]
    worker = start_worker(POOL, project, env, tmp_path / "worker.log")
    try:
        # the scheduler (not this test) creates the runs; one of them completes on the worker
        deadline, completed, scheduled = time.time() + 240, None, set()
        while time.time() < deadline and completed is None:
            def runs(*states):
                return _api(prefect_server, "/flow_runs/filter", {"flow_runs": {
                    "deployment_id": {"any_": [dep["id"]]}, "state": {"type": {"any_": list(states)}}}, "limit": 20})

            scheduled |= {r["id"] for r in runs("SCHEDULED", "PENDING", "RUNNING", "COMPLETED") if r["auto_scheduled"]}
            completed = next(iter(runs("COMPLETED")), None)
            failed = runs("FAILED", "CRASHED")
            assert not failed, (tmp_path / "worker.log").read_text()[-4000:]
            time.sleep(2)
        assert completed is not None, (tmp_path / "worker.log").read_text()[-4000:]
    finally:
        stop_worker(worker)
        run([prefect, "deployment", "delete", "batch-generation/nightly"], project, env)
    assert completed["auto_scheduled"] and len(scheduled) >= 2  # a schedule, not a single manual run

    date = completed["expected_start_time"][:10]
    out = project / "data/batches" / date / completed["name"]
    m = pd.read_parquet(out / "manifest.parquet")
    assert list(m["prompt"]) == ["a large red circle on the left", "a small blue square in the center",
                                 "a large green triangle on the right"]
    assert set(m["model_name"]) == {"t2i-shapes"} and set(m["model_version"]) == {"1"}
    assert (out / "contact_sheet.png").is_file() and all((out / f).is_file() for f in m["file"])
    # the chunks ran as task runs of the workers' subflow of this very flow run
    sub = _api(prefect_server, "/flow_runs/filter", {"flow_runs": {
        "parent_flow_run_id": {"any_": [completed["id"]]}}, "flows": {"name": {"any_": ["batch-generation-workers"]}}})
    assert len(sub) == 1 and sub[0]["state_type"] == "COMPLETED"
    chunks = _api(prefect_server, "/task_runs/filter", {"flow_runs": {"id": {"any_": [sub[0]["id"]]}}})
    assert sorted(t["name"] for t in chunks) == ["chunk 0"] and chunks[0]["state_type"] == "COMPLETED"
