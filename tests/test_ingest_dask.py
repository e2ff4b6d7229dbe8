"""Ingest on a real Dask cluster (``ingest.task_runner: dask``, prefect-dask's DaskTaskRunner).

The e2e test starts a two-worker ``distributed.LocalCluster`` on loopback, runs the ``stage-ingest``
flow through params (``ingest.task_runner=dask``, ``ingest.dask_address`` = its scheduler) and checks
that the units ran as Dask tasks on the worker processes and that the output tree is byte for byte
what the thread runner writes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from corpus import write_folder_corpus
from diffusion.config import parse_params
from diffusion.errors import ConfigError

pytest.importorskip("prefect_dask", reason="prefect-dask is the `cluster` extra (and in `test`)")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def _stop_temporary_prefect_server():
    """The flows here run without PREFECT_API_URL, on Prefect's temporary local server: stop it with
    the module rather than at interpreter exit (after pytest has closed the streams it logs to)."""
    yield
    from prefect.server.api.server import SubprocessASGIServer

    SubprocessASGIServer().stop()  # a later flow starts a fresh one


def folder_params(photos: Path, **ingest):
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    data["ingest"].update({"source": "folder", "path": str(photos), "image_size": 64, "samples_per_shard": 4,
                           "dedupe": True, "workers": 2, **ingest})
    return parse_params(data, "test")


def unit_runs_of_the_last_ingest_flow_run() -> list:
    """The task runs of the newest stage-ingest flow run, as the flow's Prefect API recorded them."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        (run,) = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["stage-ingest"])),
                                       sort=FlowRunSort.START_TIME_DESC, limit=1)
        assert run.state.is_completed()
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))


def tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (shards, index parquet, stats, unit records) by relative path."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_params_pick_the_dask_task_runner(tmp_path):
    from prefect_dask import DaskTaskRunner

    from flows.stages import ingest_task_runner

    local = ingest_task_runner(folder_params(tmp_path, task_runner="dask", workers=3).ingest)
    assert isinstance(local, DaskTaskRunner) and local.address is None
    assert local.cluster_kwargs == {"n_workers": 3, "threads_per_worker": 1, "processes": True,
                                    "host": "127.0.0.1", "dashboard_address": None}
    remote = ingest_task_runner(folder_params(tmp_path, task_runner="dask", dask_address="tcp://sched:8786").ingest)
    assert remote.address == "tcp://sched:8786" and not remote.cluster_kwargs
    with pytest.raises(ConfigError, match="dask_address is set"):
        ingest_task_runner(folder_params(tmp_path, task_runner="threads", dask_address="tcp://sched:8786").ingest)
    with pytest.raises(ConfigError, match="must be one of threads, processes, dask"):
        folder_params(tmp_path, task_runner="ray")


def test_dask_address_does_not_change_what_a_unit_is(tmp_path):
    """Like workers and task_runner, the address is how units are made, not what they are: a rerun
    on another runner keeps the committed units (incremental), and old outputs stay valid."""
    from diffusion.data.ingest import make_spec, settings_fingerprint

    a = folder_params(tmp_path).ingest
    b = folder_params(tmp_path, task_runner="dask", dask_address="tcp://sched:8786", workers=7).ingest
    assert settings_fingerprint(make_spec(a, None, tmp_path)) == settings_fingerprint(make_spec(b, None, tmp_path))


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_ingest_flow_runs_units_on_a_dask_cluster_and_writes_the_same_shards(tmp_path):
    from distributed import Client, LocalCluster, get_task_stream

    from flows.stages import run_ingest_flow

    accepted, expected = write_folder_corpus(tmp_path / "photos")

    threads = run_ingest_flow(folder_params(tmp_path / "photos", task_runner="threads"), str(tmp_path / "threads"))

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster, Client(cluster) as client:
        worker_pids = set(client.run(os.getpid).values())
        assert len(worker_pids) == 2 and os.getpid() not in worker_pids  # separate worker processes
        p = folder_params(tmp_path / "photos", task_runner="dask", dask_address=cluster.scheduler_address)
        with get_task_stream(client) as ts:  # the scheduler records every task it ran, and where
            dask = run_ingest_flow(p, str(tmp_path / "dask"))
        workers = set(client.scheduler_info()["workers"])

    assert dask == threads
    assert dask["accepted"] == accepted and dask["rejected"] == dict(expected)

    a, b = tree(tmp_path / "threads"), tree(tmp_path / "dask")
    assert sorted(a) == sorted(b)
    assert [k for k in a if a[k] != b[k]] == []  # byte for byte
    shards = [k for k in a if k.endswith(".tar")]
    assert {"index-train.parquet", "index-val.parquet", "stats.json"} <= set(a) and len(shards) >= 4

    units = len(json.loads(b["stats.json"])["units"])
    assert units >= 4  # several work units, so several tasks in flight on the cluster
    # the Dask scheduler ran one ingest-unit task per unit, on the cluster's worker processes ...
    ran = [t for t in ts.data if t["key"].startswith("ingest_unit_task-")]
    assert len(ran) == units, sorted({t["key"] for t in ts.data})
    assert {t["worker"] for t in ran} <= workers
    # ... and those workers reported each task run to the flow's Prefect API (not a server of their own)
    runs = unit_runs_of_the_last_ingest_flow_run()
    assert sorted(r.name for r in runs) == sorted(f"unit {i}" for i in range(units))
    assert all(r.state.is_completed() for r in runs)
