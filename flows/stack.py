"""The local operations stack behind ``make stack`` / ``make stack-down`` / ``make stack-status``.

``up`` starts, on 127.0.0.1: a Prefect server (its SQLite database in ``.stack/prefect.db``), the
process work pool ``local``, every deployment in prefect.yaml (``prefect deploy --all``), a process
worker polling ``local`` from the project directory, and the MLflow UI on the project's tracking
store (``params.yaml`` ``mlflow.tracking_uri``, or ``MLFLOW_TRACKING_URI``). ``down`` stops exactly
what ``up`` started; ``status`` says what runs.

Bookkeeping lives in ``.stack/``: ``<name>.pid`` and ``<name>.log`` per long-running process and
``env`` (the ``export PREFECT_API_URL=...`` line for other shells). Every process is started in its
own session, so its pid is also its process group and session id: ``down`` signals that whole
group (the MLflow UI's uvicorn worker, for one) and nothing else, and a pid
file only counts as ours while that pid still leads its own session running the command we started
(a reused pid, or a server started by hand, never does).

``up`` is idempotent: a healthy process from its pid file is kept, a stale pid file is replaced,
and the deployments are re-applied every time so that edits to prefect.yaml land.

Ports: ``T2I_PREFECT_PORT`` (default 4200) and ``T2I_MLFLOW_PORT`` (default 5000); health waits
give up after ``T2I_STACK_TIMEOUT`` seconds (default 120).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

HOST = "127.0.0.1"
STATE_DIR = ".stack"
WORK_POOL = "local"
WORKER_NAME = "t2i-stack"
DEFAULT_PREFECT_PORT = 4200
DEFAULT_MLFLOW_PORT = 5000
DEFAULT_TIMEOUT = 120.0
STOP_GRACE = 10.0  # seconds between SIGTERM and SIGKILL
# stop order: the worker before the server it polls
SERVICE_ORDER = ("prefect-worker", "prefect-server", "mlflow-ui")
# what a process we started runs: the program's name followed by these words (see _runs)
SIGNATURES = {
    "prefect-server": ("prefect", "server", "start"),
    "prefect-worker": ("prefect", "worker", "start"),
    "mlflow-ui": ("mlflow", "ui"),
}


class StackError(RuntimeError):
    """Something in the stack failed; the message is one line that names the log to read."""


@dataclass
class Service:
    name: str
    argv: list[str]
    cwd: Path
    env: dict[str, str]
    health_url: str | None = None  # GET it until 200; None: liveness only (the worker)
    port: int | None = None  # must be free before the first start
    port_var: str | None = None  # the variable that moves it, for the error message
    proc: subprocess.Popen | None = field(default=None, repr=False)  # set when started by this call

    @property
    def signature(self) -> tuple[str, ...]:
        return SIGNATURES[self.name]


# ----------------------------------------------------------------------------------------------
# processes


def _bin_dir() -> Path:
    """The environment this module runs in: its prefect, mlflow, dvc and t2i."""
    return Path(sys.executable).parent


def stack_env(api_url: str | None) -> dict[str, str]:
    """The environment of the stack's processes (as ``flows.pipeline.stage_env``, without Prefect)."""
    env = dict(os.environ)
    env["PATH"] = str(_bin_dir()) + os.pathsep + env.get("PATH", "")
    env["DO_NOT_TRACK"] = "1"
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    if api_url:
        env["PREFECT_API_URL"] = api_url
    else:
        env.pop("PREFECT_API_URL", None)
    return env


def _cmdline(pid: int) -> list[str] | None:
    """The argv of ``pid`` (/proc on Linux, ``ps`` elsewhere), or None if it cannot be read."""
    if Path("/proc/self/cmdline").exists():
        try:
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return None
        return [a.decode(errors="replace") for a in raw.split(b"\0") if a] or None
    r = subprocess.run(["ps", "-o", "args=", "-p", str(pid)], capture_output=True, text=True)
    return (r.stdout.split() or None) if r.returncode == 0 else None


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, process group) of ``pid`` from /proc, or None (gone, or not Linux)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # the command name may hold spaces and parens
    return fields[0], int(fields[2])


def _alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (a dead child nobody reaped yet)."""
    if pid <= 0:  # os.kill would address a whole group (0) or every process (-1)
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, but another user's: _owned rejects it
    stat = _proc_stat(pid)
    return stat is None or stat[0] != "Z"


def _group_alive(pgid: int) -> bool:
    """True while any live (non-zombie) process is left in process group ``pgid``."""
    if Path("/proc/self/stat").exists():
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                stat = _proc_stat(int(entry.name))
                if stat is not None and stat[1] == pgid and stat[0] != "Z":
                    return True
        return False
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _runs(cmdline: list[str], signature: tuple[str, ...]) -> bool:
    """Whether ``cmdline`` runs ``signature``: e.g. ``.../bin/python .../bin/prefect server start ...``."""
    program, *words = signature
    n = len(words)
    return any(Path(arg).name == program and cmdline[i + 1:i + 1 + n] == words for i, arg in enumerate(cmdline))


def _leads_session(pid: int) -> bool:
    """Alive and the leader of its own session, as every process ``up`` starts is."""
    try:
        return _alive(pid) and os.getsid(pid) == pid
    except OSError:
        return False


def _owned(pid: int, signature: tuple[str, ...]) -> bool:
    """Whether ``pid`` is a process ``up`` started: alive, leading its own session, running ``signature``.

    A Prefect server or worker started by hand in a shell shares the shell's session, so it never
    passes, and neither does an unrelated process that got a recycled pid.
    """
    if not _leads_session(pid):
        return False
    cmd = _cmdline(pid)
    return cmd is not None and _runs(cmd, signature)


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind: TIME_WAIT is fine
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def _stop_groups(pgids: list[int], grace: float = STOP_GRACE) -> None:
    """SIGTERM each process group, then SIGKILL whatever is left after ``grace`` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        left = [g for g in pgids if _group_alive(g)]
        for g in left:
            try:
                os.killpg(g, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while left and time.monotonic() < deadline:
            time.sleep(0.2)
            left = [g for g in left if _group_alive(g)]
        if not left:
            return
    raise StackError(f"process group(s) {left} survived SIGKILL")


# ----------------------------------------------------------------------------------------------
# HTTP


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except (OSError, ValueError):
        return False


def _api(api_url: str, path: str, body: dict | None = None, method: str | None = None):
    """A Prefect REST call; returns the decoded JSON, or None for a 404."""
    data = None if body is None else json.dumps(body).encode()
    method = method or ("GET" if data is None else "POST")
    req = urllib.request.Request(f"{api_url}{path}", data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return None
        raise StackError(f"Prefect API {method} {path} answered {e.code}: {e.read()[:200]!r}") from None
    except OSError as e:
        raise StackError(f"Prefect API at {api_url} unreachable ({e})") from None


def deployment_names(api_url: str) -> list[str]:
    """``flow/deployment`` for every deployment on the server."""
    flows = {f["id"]: f["name"] for f in _api(api_url, "/flows/filter", {"limit": 200})}
    deployments = _api(api_url, "/deployments/filter", {"limit": 200})
    return sorted(f"{flows.get(d['flow_id'], '?')}/{d['name']}" for d in deployments)


def pool_workers(api_url: str, pool: str = WORK_POOL) -> list[dict]:
    return _api(api_url, f"/work_pools/{pool}/workers/filter", {"limit": 200}) or []


def _heartbeat(worker: dict) -> datetime | None:
    stamp = worker.get("last_heartbeat_time")
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")) if stamp else None


# ----------------------------------------------------------------------------------------------
# the stack


def _state_dir(project: Path) -> Path:
    return project / STATE_DIR


def _rel(path: Path) -> str:
    """``path`` relative to the working directory when it lies below it (short error messages)."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _port(value: int | None, var: str, default: int) -> int:
    if value is not None:
        return int(value)
    raw = os.environ.get(var)
    try:
        return int(raw) if raw else default
    except ValueError:
        raise StackError(f"{var}={raw!r} is not a port number") from None


def _tracking_uri(project: Path) -> str:
    from diffusion.registry import tracking
    from diffusion.config import load_params

    return tracking.tracking_uri(load_params(project / "params.yaml").mlflow)


def _services(project: Path, prefect_port: int, mlflow_port: int) -> dict[str, Service]:
    state = _state_dir(project)
    bin_dir = _bin_dir()
    api_url = f"http://{HOST}:{prefect_port}/api"
    server_env = stack_env(None)  # the server serves the API; a PREFECT_API_URL from a profile is no concern of it
    server_env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = f"sqlite+aiosqlite:///{state / 'prefect.db'}"
    services = {
        "prefect-server": Service(
            "prefect-server",
            [str(bin_dir / "prefect"), "server", "start", "--host", HOST, "--port", str(prefect_port)],
            project, server_env, health_url=f"{api_url}/health", port=prefect_port, port_var="T2I_PREFECT_PORT"),
        # cwd = the project: deployments without a pull step run where `prefect deploy` ran
        "prefect-worker": Service(
            "prefect-worker",
            [str(bin_dir / "prefect"), "worker", "start", "--pool", WORK_POOL, "--type", "process",
             "--name", WORKER_NAME],
            project, stack_env(api_url)),
    }
    uri = _tracking_uri(project)
    if not uri.startswith(("http://", "https://", "databricks")):
        # a store (sqlite:///mlflow.db, relative to the project) rather than a tracking server that
        # already has its own UI. One uvicorn worker: it is one user's UI, and each worker is a full
        # MLflow import (uvicorn's default is 4). Its job runner (eight huey processes, ~2 GB, for
        # GenAI scorer jobs this project does not use) stays off unless the environment turns it on.
        ui_env = stack_env(None)
        ui_env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
        services["mlflow-ui"] = Service(
            "mlflow-ui",
            [str(bin_dir / "mlflow"), "ui", "--backend-store-uri", uri, "--host", HOST, "--port", str(mlflow_port),
             "--workers", "1"],
            project, ui_env, health_url=f"http://{HOST}:{mlflow_port}/health", port=mlflow_port,
            port_var="T2I_MLFLOW_PORT")
    return services


def _running_pid(state: Path, svc: Service) -> int | None:
    """The pid from ``svc``'s pid file if that process is ours and alive; a stale file is removed."""
    pid_file = state / f"{svc.name}.pid"
    pid = _read_pid(pid_file)
    if pid is not None and _owned(pid, svc.signature):
        return pid
    pid_file.unlink(missing_ok=True)
    return None


def _check_port(svc: Service) -> None:
    if svc.port is not None and not _port_free(svc.port):
        raise StackError(f"{svc.name}: port {svc.port} on {HOST} is taken by a process `make stack` did not start; "
                         f"stop it or pick another port with {svc.port_var}=<port>")


def _start(state: Path, svc: Service) -> int:
    _check_port(svc)
    log_path = state / f"{svc.name}.log"
    with open(log_path, "a") as log:
        log.write(f"\n=== {datetime.now().isoformat(timespec='seconds')} {' '.join(svc.argv)}\n")
        log.flush()
        svc.proc = subprocess.Popen(svc.argv, cwd=svc.cwd, env=svc.env, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
    (state / f"{svc.name}.pid").write_text(f"{svc.proc.pid}\n")
    return svc.proc.pid


def _ensure(state: Path, svc: Service, restart: bool = False) -> tuple[int, bool]:
    """(pid, started now): keep ``svc`` if it runs as configured, else (re)start it."""
    pid = _running_pid(state, svc)
    if pid is not None:
        cmd = _cmdline(pid) or []
        if not restart and cmd[-(len(svc.argv) - 1):] == svc.argv[1:]:
            return pid, False
        # ours, but started with other settings (a new port, another tracking store) or told to restart
        _stop_groups([pid])
        (state / f"{svc.name}.pid").unlink(missing_ok=True)
    return _start(state, svc), True


def _fail(state: Path, svc: Service, why: str) -> StackError:
    """Stop a process this call started and could not bring up; the error names its log."""
    if svc.proc is not None:
        if svc.proc.poll() is None:
            _stop_groups([svc.proc.pid], grace=5.0)
        (state / f"{svc.name}.pid").unlink(missing_ok=True)
    return StackError(f"{svc.name} {why}; see {_rel(state / f'{svc.name}.log')}")


def _wait_healthy(state: Path, svc: Service, deadline: float) -> None:
    svc_pid = svc.proc.pid if svc.proc is not None else _read_pid(state / f"{svc.name}.pid") or -1
    while True:
        if svc.health_url and _healthy(svc.health_url):
            return
        if svc.proc is not None and svc.proc.poll() is not None:
            raise _fail(state, svc, f"exited with code {svc.proc.returncode}")
        if svc.proc is None and not _owned(svc_pid, svc.signature):
            raise StackError(f"{svc.name} stopped while starting; see {_rel(state / f'{svc.name}.log')}")
        if time.monotonic() > deadline:
            raise _fail(state, svc, f"did not answer {svc.health_url} in time")
        time.sleep(0.3)


def _wait_worker(state: Path, svc: Service, api_url: str, since: datetime, deadline: float) -> None:
    """Wait until the worker has sent the server a heartbeat at or after ``since``."""
    while True:
        beats = [_heartbeat(w) for w in pool_workers(api_url) if w.get("name") == WORKER_NAME]
        if any(b is not None and b >= since for b in beats):
            return
        if svc.proc is not None and svc.proc.poll() is not None:
            raise _fail(state, svc, f"exited with code {svc.proc.returncode}")
        if time.monotonic() > deadline:
            raise _fail(state, svc, f"did not report to work pool {WORK_POOL!r} in time")
        time.sleep(0.5)


def _prefect_cli(state: Path, args: list[str], project: Path, api_url: str, what: str) -> None:
    """Run a ``prefect`` command against the stack's server; its output goes to .stack/prefect-cli.log."""
    log_path = state / "prefect-cli.log"
    with open(log_path, "a") as log:
        log.write(f"\n=== {datetime.now().isoformat(timespec='seconds')} prefect {' '.join(args)}\n")
        log.flush()
        try:
            r = subprocess.run([str(_bin_dir() / "prefect"), *args], cwd=project, env=stack_env(api_url),
                               stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, timeout=600)
        except subprocess.TimeoutExpired:
            raise StackError(f"{what} took over 600 s; see {_rel(log_path)}") from None
    if r.returncode != 0:
        raise StackError(f"{what} failed with exit code {r.returncode}; see {_rel(log_path)}")


def _ensure_pool(state: Path, project: Path, api_url: str) -> None:
    """Create the process work pool if it is missing; an existing one keeps whatever was set on it."""
    pool = _api(api_url, f"/work_pools/{WORK_POOL}")
    if pool is None:
        _prefect_cli(state, ["work-pool", "create", WORK_POOL, "--type", "process", "--overwrite"], project,
                     api_url, f"prefect work-pool create {WORK_POOL}")
    elif pool.get("type") != "process":
        raise StackError(f"work pool {WORK_POOL!r} on {api_url} has type {pool.get('type')!r}, not 'process'; "
                         f"delete it (prefect work-pool delete {WORK_POOL}) and rerun")


def up(project_dir: str | Path = ".", prefect_port: int | None = None, mlflow_port: int | None = None,
       timeout: float | None = None, echo=print) -> dict:
    """Start (or keep) the stack; returns its URLs and pids. Raises StackError on failure."""
    project = Path(project_dir).resolve()
    if not (project / "prefect.yaml").is_file():
        raise StackError(f"no prefect.yaml in {project}")
    state = _state_dir(project)
    state.mkdir(exist_ok=True)
    prefect_port = _port(prefect_port, "T2I_PREFECT_PORT", DEFAULT_PREFECT_PORT)
    mlflow_port = _port(mlflow_port, "T2I_MLFLOW_PORT", DEFAULT_MLFLOW_PORT)
    if timeout is None:
        timeout = float(os.environ.get("T2I_STACK_TIMEOUT") or DEFAULT_TIMEOUT)
    api_url = f"http://{HOST}:{prefect_port}/api"
    services = _services(project, prefect_port, mlflow_port)
    pids: dict[str, int] = {}

    def report(svc: Service, pid: int, started: bool) -> None:
        pids[svc.name] = pid
        what = "started" if started else "already running"
        echo(f"{svc.name}: {what} (pid {pid}, log {_rel(state / f'{svc.name}.log')})")

    # both servers start at once; the Prefect steps run while the MLflow UI is still importing
    server, ui = services["prefect-server"], services.get("mlflow-ui")
    for svc in (server, ui):  # a taken port fails before anything starts
        if svc is not None and _running_pid(state, svc) is None:
            _check_port(svc)
    started = {svc.name: _ensure(state, svc) for svc in (server, ui) if svc is not None}
    deadline = time.monotonic() + timeout
    _wait_healthy(state, server, deadline)
    report(server, *started[server.name])

    _ensure_pool(state, project, api_url)
    _prefect_cli(state, ["--no-prompt", "deploy", "--all"], project, api_url, "prefect deploy --all")
    echo(f"deployments: {', '.join(deployment_names(api_url)) or '(none)'}")

    # a fresh server means a fresh start for the worker, which may have been polling a dead one
    worker = services["prefect-worker"]
    since = datetime.now(timezone.utc) - timedelta(seconds=2)  # clock slack between us and the server
    pid, new = _ensure(state, worker, restart=started[server.name][1])
    if new:
        _wait_worker(state, worker, api_url, since, time.monotonic() + timeout)
    report(worker, pid, new)

    if ui is not None:
        _wait_healthy(state, ui, deadline)
        report(ui, *started[ui.name])

    env_line = f"export PREFECT_API_URL={api_url}"
    (state / "env").write_text(f"# source {STATE_DIR}/env: point this shell's prefect at the stack's server\n"
                               f"{env_line}\n")
    mlflow_url = services["mlflow-ui"].health_url.removesuffix("/health") if "mlflow-ui" in services \
        else _tracking_uri(project)
    prefect_url = f"http://{HOST}:{prefect_port}"
    echo("")
    echo(f"Prefect UI  {prefect_url}")
    echo(f"MLflow UI   {mlflow_url}")
    echo("In other shells:")
    echo(f"  {env_line}      (or: source {_rel(state / 'env')})")
    return {"prefect_url": prefect_url, "api_url": api_url, "mlflow_url": mlflow_url, "pids": pids}


def _pid_files(state: Path) -> list[Path]:
    """The stack's pid files that exist, worker first (other files in .stack/ are not ours to read)."""
    return [state / f"{name}.pid" for name in SERVICE_ORDER if (state / f"{name}.pid").is_file()]


def down(project_dir: str | Path = ".", echo=print) -> list[int]:
    """Stop the process groups in ``.stack/*.pid`` that ``up`` started and still run; remove the pid files.

    Returns the pids it stopped. Anything else (a server started by hand, a recycled pid) is left alone.
    """
    state = _state_dir(Path(project_dir).resolve())
    targets: list[tuple[Path, int]] = []
    for pid_file in _pid_files(state):
        pid = _read_pid(pid_file)
        if pid is not None and _owned(pid, SIGNATURES[pid_file.stem]):
            targets.append((pid_file, pid))
        else:
            echo(f"{pid_file.stem}: not running (removed stale {_rel(pid_file)})")
            pid_file.unlink(missing_ok=True)
    _stop_groups([pid for _, pid in targets])
    for pid_file, pid in targets:
        pid_file.unlink(missing_ok=True)
        echo(f"{pid_file.stem}: stopped (pid {pid})")
    if not targets:
        echo("nothing to stop")
    return [pid for _, pid in targets]


def status(project_dir: str | Path = ".") -> list[dict]:
    """One row per pid file: name, pid, state (running | stale), health, URL and log."""
    state = _state_dir(Path(project_dir).resolve())
    rows = []
    for pid_file in _pid_files(state):
        name, pid = pid_file.stem, _read_pid(pid_file)
        running = pid is not None and _owned(pid, SIGNATURES[name])
        url = healthy = None
        if running and name != "prefect-worker":
            cmd = _cmdline(pid) or []
            port = cmd[cmd.index("--port") + 1] if "--port" in cmd[:-1] else None
            if port:
                url = f"http://{HOST}:{port}"
                healthy = _healthy(f"{url}/api/health" if name == "prefect-server" else f"{url}/health")
        rows.append({"name": name, "pid": pid, "state": "running" if running else "stale", "healthy": healthy,
                     "url": url, "log": str(state / f"{name}.log")})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.stack", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("up", "down", "status"))
    parser.add_argument("--project-dir", default=".", help="the project (default: the current directory)")
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            up(args.project_dir)
        elif args.command == "down":
            down(args.project_dir)
        else:
            rows = status(args.project_dir)
            if not rows:
                print(f"the stack is not running (no pid files in {_rel(_state_dir(Path(args.project_dir).resolve()))})")
            for r in rows:
                health = {True: "healthy", False: "not answering", None: ""}[r["healthy"]]
                print(f"{r['name']:<15} {r['state']:<8} pid {r['pid'] or '-':<8} {r['url'] or '':<24} {health}")
            env_file = _state_dir(Path(args.project_dir).resolve()) / "env"
            if any(r["state"] == "running" for r in rows) and env_file.is_file():
                print(f"source {_rel(env_file)}")
    except StackError as e:
        print(f"stack: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
