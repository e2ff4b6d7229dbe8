"""`python -m flows.stack up|down` against the real thing: Prefect server, worker, deployments, MLflow UI."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import copy_project
from e2e_helpers import base_env, free_port, init_repo, run

pytestmark = pytest.mark.e2e

NAMES = {"prefect-server", "prefect-worker", "mlflow-ui"}


def get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.status, r.read()


def post(url: str, body: dict) -> list:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def pids(project: Path) -> dict[str, int]:
    return {p.stem: int(p.read_text()) for p in (project / ".stack").glob("*.pid")}


def gone(pid: int) -> bool:
    """No such process, or a zombie (dead, waiting for its parent or init to reap it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def stack(cmd: str, project: Path, env: dict) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "flows.stack", cmd], project, env, timeout=300)


@pytest.mark.timeout(300)
def test_stack_up_is_idempotent_and_down_stops_only_its_own(tmp_path):
    project = copy_project(tmp_path / "project")
    prefect_port, mlflow_port = free_port(), free_port()
    home = tmp_path / "prefect-home"
    home.mkdir()
    env = base_env(PREFECT_HOME=str(home), T2I_PREFECT_PORT=str(prefect_port), T2I_MLFLOW_PORT=str(mlflow_port))
    env.pop("PREFECT_API_URL", None)
    init_repo(project, env)
    api = f"http://127.0.0.1:{prefect_port}/api"
    # not ours: started in its own session like the stack's processes, and it must survive `down`
    bystander = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        # a stale pid file whose pid now belongs to someone else is replaced, not trusted
        (project / ".stack").mkdir()
        (project / ".stack" / "prefect-worker.pid").write_text(f"{bystander.pid}\n")
        first = stack("up", project, env)
        started = pids(project)
        assert set(started) == NAMES, first.stdout
        assert bystander.pid not in started.values()
        assert f"export PREFECT_API_URL={api}" in first.stdout
        assert f"http://127.0.0.1:{mlflow_port}" in first.stdout
        assert (project / ".stack" / "env").read_text().strip().endswith(f"export PREFECT_API_URL={api}")
        assert (project / ".stack" / "prefect.db").is_file()  # the server's database lives in the project

        assert get(f"{api}/health") == (200, b"true")
        assert get(f"http://127.0.0.1:{mlflow_port}/health")[0] == 200

        flows = {f["id"]: f["name"] for f in post(f"{api}/flows/filter", {})}
        deployments = {f"{flows[d['flow_id']]}/{d['name']}": d for d in post(f"{api}/deployments/filter", {})}
        assert "train-flow/default" in deployments
        assert deployments["train-flow/default"]["work_pool_name"] == "local"
        assert get(f"{api}/work_pools/local")[0] == 200
        # `up` waits for the worker's first heartbeat, so it is there already
        workers = post(f"{api}/work_pools/local/workers/filter", {})
        assert [w["name"] for w in workers] == ["t2i-stack"] and workers[0]["status"] == "ONLINE"

        second = stack("up", project, env)
        assert pids(project) == started, second.stdout
        assert second.stdout.count("already running") == 3
        assert "deployments: " in second.stdout and "train-flow/default" in second.stdout

        stack("down", project, env)
        assert pids(project) == {}
        deadline = time.time() + 10
        while time.time() < deadline and not all(gone(p) for p in started.values()):
            time.sleep(0.2)
        assert all(gone(p) for p in started.values())
        assert port_free(prefect_port) and port_free(mlflow_port)
        assert bystander.poll() is None
        # a pid file naming a process `up` did not start: removed, and the process left alone
        (project / ".stack" / "mlflow-ui.pid").write_text(f"{bystander.pid}\n")
        assert "nothing to stop" in stack("down", project, env).stdout
        assert pids(project) == {}
        time.sleep(0.5)
        assert bystander.poll() is None
    finally:
        bystander.send_signal(signal.SIGKILL)
        bystander.wait()
        # whatever failed above, leave no stack behind
        subprocess.run([sys.executable, "-m", "flows.stack", "down"], cwd=project, env=env, capture_output=True)
