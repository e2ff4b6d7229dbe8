"""Batch generation on a real Dask cluster (``batch.task_runner: dask``, the ingest's DaskTaskRunner).

One two-worker ``distributed.LocalCluster`` on loopback serves the module. The e2e test runs the
``batch-generation`` flow on it through a real Prefect server, kills a worker while it draws a chunk,
and checks that the batch equals a one-process run byte for byte (images, and the manifest but its
``time``), that each chunk ran as a Dask task and a Prefect task run, and that each worker loaded the
model once. The bad-input tests use the same cluster.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import tiny_params_dict
from diffusion.errors import T2IError
from diffusion.pipeline.batch import PARTS, generate_batch, load_generator, plan_rows, read_prompts
from diffusion.pipeline.batch_workers import (ModelRef, check_scheduler, check_workers, render_on_worker,
                                              worker_device)

pytest.importorskip("prefect_dask", reason="prefect-dask is the `cluster` extra (and in `test`)")

PROMPTS = ["a large red circle on the left", "a small blue square in the center", "a large green triangle on the right",
           "a small yellow circle on the left", "a large purple square on the right"]
CHUNK = 2


@pytest.fixture(scope="module")
def cluster():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as c, Client(c) as client:
        yield c, client


@pytest.fixture
def api(prefect_server):
    """In-process flows report to the session's real Prefect server (and so do the workers)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: prefect_server.url}):
        yield prefect_server.url


def _project(tmp_path: Path, n: int) -> Path:
    params = tiny_params_dict()
    params["sample"]["steps"] = 6
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS[i % len(PROMPTS)] for i in range(n)) + "\n")
    return tmp_path


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted((root / "images").iterdir())}


def _chunk_runs(flow_name: str) -> list:
    """The task runs of the newest flow run named ``flow_name``, as the Prefect API recorded them."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        (run,) = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
                                       sort=FlowRunSort.START_TIME_DESC, limit=1)
        assert run.state.is_completed()
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))


def _kill_a_worker_mid_chunk(client, out: Path, killed: list) -> None:
    """Once the first chunk is committed, SIGKILL a worker while it is drawing a chunk."""
    deadline = time.time() + 120
    while time.time() < deadline and not list((out / PARTS).glob("part-*.parquet")):
        time.sleep(0.02)
    while time.time() < deadline:
        busy = [w for w, tasks in client.processing().items() if any(k.startswith("chunk_task-") for k in tasks)]
        if busy:
            pid = client.run(os.getpid, workers=[busy[0]])[busy[0]]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            return
        time.sleep(0.01)


@pytest.mark.e2e
@pytest.mark.timeout(600)  # the session fixtures (a trained tiny model) count too
def test_batch_on_two_workers_equals_one_process_even_when_a_worker_is_killed(tmp_path, cluster, api, tiny_model,
                                                                             tiny_params):
    from distributed import get_task_stream

    from flows.batch import batch_generation_flow

    local_cluster, client = cluster
    n = 12
    project = _project(tmp_path, n)
    # the one-process run: the library, in this process, as the local runner draws it
    gen = load_generator(str(tiny_model), device="cpu", params=tiny_params)
    rows = plan_rows(gen, read_prompts(project / "prompts.txt"))
    rows = [{**r, "steps": 6} for r in rows]
    one = generate_batch(gen, rows, tmp_path / "one", batch_size=CHUNK, progress=False, log=lambda *_: None)

    out = project / "out/2026-12-07/dask"
    killed: list[int] = []
    killer = threading.Thread(target=_kill_a_worker_mid_chunk, args=(client, out, killed), daemon=True)
    killer.start()
    with get_task_stream(client) as ts:
        summary = batch_generation_flow(str(project / "prompts.txt"), str(tiny_model), str(project / "out"), "dask",
                                        "2026-12-07", str(project / "params.yaml"), steps=6, task_runner="dask",
                                        params_overrides=[f"batch.batch_size={CHUNK}", "batch.device=cpu",
                                                          f"batch.dask_address={local_cluster.scheduler_address}"])
    killer.join()
    assert killed, "no worker was caught drawing a chunk"
    assert summary["images"] == summary["drawn"] == n

    # byte for byte: every image, and the manifest but its time column
    a, b = _tree(tmp_path / "one"), _tree(out)
    assert sorted(a) == sorted(b) and [k for k in a if a[k] != b[k]] == []
    pd.testing.assert_frame_equal(pd.read_parquet(out / "manifest.parquet").drop(columns="time"),
                                  pd.read_parquet(Path(one["manifest"])).drop(columns="time"))
    # the chunks ran as Dask tasks on the workers; the killed worker's chunk was drawn again elsewhere
    ran = [t for t in ts.data if t["key"].startswith("chunk_task-")]
    assert len({t["key"] for t in ran}) == n // CHUNK
    # ... and each is one completed Prefect task run of the workers' subflow
    runs = _chunk_runs("batch-generation-workers")
    assert sorted(r.name for r in runs) == sorted(f"chunk {i}" for i in range(0, n, CHUNK))
    assert all(r.state.is_completed() for r in runs)
    # a worker loads the model once and keeps it: one load for its chunks (the restarted one too)
    loads = client.run(lambda: len(__import__("diffusion.pipeline.batch_workers", fromlist=["_LOADED"])._LOADED))
    assert sorted(loads.values()) in ([0, 1], [1, 1])


def test_unreachable_scheduler_is_one_line_and_quick(tmp_path, tiny_model):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.time()
    with pytest.raises(T2IError, match=f"batch.dask_address tcp://127.0.0.1:{port}: no Dask scheduler answers"):
        check_scheduler(f"tcp://127.0.0.1:{port}")
    with pytest.raises(T2IError, match="must be tcp://host:port"):
        check_scheduler("tcp://:8786")
    assert time.time() - t0 < 5


def test_a_worker_that_cannot_read_the_model_says_so_in_one_line(tmp_path, cluster, tiny_model, tiny_params):
    _, client = cluster
    gen = load_generator(str(tiny_model), device="cpu", params=tiny_params)
    row = plan_rows(gen, read_prompts(_project(tmp_path, 1) / "prompts.txt"))
    gone = ModelRef(str(tmp_path / "no-such-model"), "cpu", gen.weights_sha256, None, tiny_params)
    with pytest.raises(T2IError, match=r"worker \d+ on .* cannot read the model: model folder not found") as e:
        client.submit(render_on_worker, gone, row, 16, pure=False).result()
    assert "\n" not in str(e.value)
    other = ModelRef(str(tiny_model), "cpu", "0" * 64, None, tiny_params)
    with pytest.raises(T2IError, match="loaded other weights"):
        client.submit(render_on_worker, other, row, 16, pure=False).result()


def test_workers_take_one_gpu_each():
    assert [worker_device("auto", w, 4) for w in (0, 1, 2, 3, 4)] == ["cuda:0", "cuda:1", "cuda:2", "cuda:3", "cuda:0"]
    assert worker_device("cuda", "tcp://10.0.0.5:4012", 1) == "cuda:0"  # a worker pinned by CUDA_VISIBLE_DEVICES
    assert worker_device("auto", 1, 0) == "cpu" and worker_device("cpu", 1, 8) == "cpu"
    with pytest.raises(T2IError, match="sees no CUDA GPU"):
        worker_device("cuda", 0, 0)


@pytest.mark.timeout(120)
def test_a_worker_that_cannot_import_the_project_is_named_in_one_line(cluster):
    """A real worker process whose Python lacks the project (site-packages without its editable
    install) joins the cluster: the check before any chunk is sent names it."""
    import subprocess
    import sys
    import sysconfig

    local_cluster, client = cluster
    assert check_workers(client) == 2
    env = {**os.environ, "PYTHONPATH": sysconfig.get_paths()["purelib"]}  # -S: no .pth, so no editable install
    worker = subprocess.Popen([sys.executable, "-S", "-m", "distributed.cli.dask_worker",
                               local_cluster.scheduler_address, "--nthreads", "1", "--no-nanny", "--name", "bare"],
                              cwd="/", env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client.wait_for_workers(3, timeout=60)
        with pytest.raises(T2IError, match=r"^1 of 3 Dask workers cannot import the project \(tcp://") as e:
            check_workers(client)
        assert "\n" not in str(e.value)
    finally:
        worker.kill()
        worker.wait()
