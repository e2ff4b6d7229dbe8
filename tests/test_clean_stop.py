"""A stopped t2i command leaves nothing behind: SIGTERM (what `kill`, systemd and container runtimes
send) or SIGINT to `t2i train` mid-run ends the process, its temporary Prefect API server (a uvicorn
child) and its DataLoader workers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from conftest import tiny_params_dict

pytestmark = pytest.mark.e2e  # a real training run with its Prefect server: ~30 s on 2 cores


def start_training(tmp_path: Path, shards: Path, embeddings: Path) -> subprocess.Popen:
    params = tiny_params_dict()
    params["train"]["steps"] = 100_000  # still training when the signal comes
    params["train"]["data_workers"] = 1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "OMP_WAIT_POLICY")}
    env.update(DO_NOT_TRACK="1", PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_HOME=str(tmp_path / "prefect"),
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="150")  # a fresh database on a busy machine
    cmd = [sys.executable, "-m", "flows.cli", "train", "--shards", str(shards), "--embeddings", str(embeddings),
           "--out", str(tmp_path / "model")]
    return subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def wait_for_children(proc: subprocess.Popen, timeout: float = 180) -> list[psutil.Process]:
    """The command's children once its Prefect server and a DataLoader worker are up."""
    me, deadline = psutil.Process(proc.pid), time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        kids = me.children(recursive=True)
        server = [k for k in kids if "uvicorn" in " ".join(k.cmdline())]
        if server and len(kids) > len(server):
            time.sleep(2)  # let the training loop take a few steps
            return me.children(recursive=True)
        time.sleep(0.5)
    raise AssertionError("no Prefect server and DataLoader worker within the timeout")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_ends_t2i_train_and_everything_it_started(tmp_path, tiny_shards, tiny_embeddings, sig):
    proc = start_training(tmp_path, tiny_shards, tiny_embeddings)
    try:
        kids = wait_for_children(proc)
        server = next(k for k in kids if "uvicorn" in " ".join(k.cmdline()))
        assert server.environ().get("OMP_WAIT_POLICY") == "PASSIVE"  # children inherit the wait policy
        proc.send_signal(sig)
        code = proc.wait(timeout=60)
        assert code == 128 + sig  # 143 after SIGTERM, 130 after Ctrl-C
        _, alive = psutil.wait_procs(kids, timeout=10)
        assert not alive, f"left running after {sig.name}: " + ", ".join(" ".join(k.cmdline()) for k in alive)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
