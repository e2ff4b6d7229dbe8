"""Helpers for the end-to-end tests: a real Prefect server, a git+DVC project, subprocess runs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["DO_NOT_TRACK"] = "1"
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update(extra)
    return env


def run(cmd: list[str], cwd: Path, env: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    return r


def start_worker(pool: str, cwd: Path, env: dict, log_file: Path, *extra: str) -> subprocess.Popen:
    """`prefect worker start --pool POOL` in its own session (so stop_worker can end all of it)."""
    return subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", pool, *extra], cwd=cwd, env=env,
                            stdout=open(log_file, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def stop_worker(proc: subprocess.Popen, grace: float = 10) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds. A Prefect 3 process worker sometimes keeps
    its event loop running after SIGTERM (seen here after its runs had all finished); a test must
    not leave it polling the server for the rest of the session."""
    import signal

    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


class PrefectServer:
    """`prefect server start` on a free loopback port with its own PREFECT_HOME."""

    def __init__(self, home: Path):
        self.home = home
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.log = open(home / "server.log", "w")
        self.env = base_env(PREFECT_HOME=str(home), PREFECT_API_URL=self.url,
                            PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_UI_ENABLED="false")
        self.proc = subprocess.Popen(
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
            env={k: v for k, v in self.env.items() if k != "PREFECT_API_URL"}, stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prefect server exited: {(home / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("prefect server did not become healthy in 120 s")

    def _post(self, path: str, body: dict) -> list:
        req = urllib.request.Request(f"{self.url}{path}", data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def flow_names_with_runs(self) -> set[str]:
        """Names of the flows that have at least one completed run on this server."""
        runs = self._post("/flow_runs/filter",
                          {"flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}}, "limit": 200})
        flows = self._post("/flows/filter", {"limit": 200})
        by_id = {f["id"]: f["name"] for f in flows}
        return {by_id[r["flow_id"]] for r in runs}

    def completed_task_runs(self, name_prefix: str) -> int:
        """Completed task runs whose name starts with ``name_prefix``."""
        runs = self._post("/task_runs/filter", {"task_runs": {"state": {"type": {"any_": ["COMPLETED"]}},
                                                              "name": {"like_": name_prefix}}, "limit": 200})
        return sum(1 for r in runs if r["name"].startswith(name_prefix))

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def init_repo(project: Path, env: dict) -> None:
    run(["git", "init", "-q"], project, env)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "init"], project, env)
    run([str(BIN / "dvc"), "init", "-q"], project, env)
    run([str(BIN / "dvc"), "config", "core.analytics", "false"], project, env)
    run(["git", "add", "-A"], project, env)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "project"], project, env)


# --- DVC remote, git commits, experiments -----------------------------------------------------

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DVC_REMOTE = "local"  # the default remote the committed .dvc/config names


def git_commit(project: Path, env: dict, message: str, *paths: str) -> str:
    """``git add`` the paths (all tracked changes when none) and commit; returns the new HEAD."""
    run(["git", "add", *(paths or ("-u",))], project, env)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", message], project, env)
    return run(["git", "rev-parse", "HEAD"], project, env).stdout.strip()


def set_dvc_remote(project: Path, remote_dir: Path, env: dict) -> None:
    """Point the default remote at ``remote_dir`` in .dvc/config.local (per user, never committed),
    as the README tells users to."""
    run([str(BIN / "dvc"), "remote", "modify", "--local", DVC_REMOTE, "url", str(remote_dir)], project, env)


def use_project_dvc_config(project: Path, remote_dir: Path, env: dict) -> None:
    """The project's committed .dvc/config (its default remote) in a repo made by ``init_repo``,
    committed, with the remote pointed at ``remote_dir`` for this checkout only."""
    (project / ".dvc" / "config").write_text((PROJECT_ROOT / ".dvc" / "config").read_text())
    git_commit(project, env, "dvc config", ".dvc/config")
    set_dvc_remote(project, remote_dir, env)


def dvc_experiments(project: Path, env: dict) -> list[dict]:
    """``dvc exp show --json`` flattened: one {name, rev, params, metrics} per experiment (not baselines);
    params and metrics as in params.yaml / the metrics files, keyed by file."""
    rows = json.loads(run([str(BIN / "dvc"), "exp", "show", "--json"], project, env).stdout)
    out = []
    for baseline in rows:
        for exp in baseline.get("experiments") or []:
            for rev in exp.get("revs") or []:
                data = rev.get("data") or {}
                out.append({"name": rev.get("name"), "rev": rev.get("rev"),
                            "params": {f: v.get("data", {}) for f, v in (data.get("params") or {}).items()},
                            "metrics": {f: v.get("data", {}) for f, v in (data.get("metrics") or {}).items()}})
    return out
