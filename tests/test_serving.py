"""`mlflow models serve` of the registered @champion: JSON prompts in, base64 PNG images out.

One real server (a subprocess on a free loopback port, reading the session's SQLite registry)
answers every test in this module; it is stopped, with its uvicorn workers, at the end.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
from e2e_helpers import BIN, base_env, free_port
from PIL import Image

pytestmark = pytest.mark.e2e

RECORDS = [{"prompt": "a large red circle on the left", "seed": 1}, {"prompt": "a small blue square", "seed": 2}]


class ModelServer:
    """`mlflow models serve -m models:/<name>@champion --env-manager local` in its own process group."""

    def __init__(self, registered: dict, log_path: Path, start_timeout: float = 120):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.log = open(log_path, "w")  # noqa: SIM115 (open for the server's lifetime, closed in stop)
        self.proc = subprocess.Popen(
            [str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{registered['name']}@champion",
             "--env-manager", "local", "--host", "127.0.0.1", "--port", str(self.port)],
            env=base_env(MLFLOW_TRACKING_URI=registered["tracking_uri"]), cwd=registered["dir"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.started = time.monotonic()
        self.deadline = self.started + start_timeout
        self.ready_after: float | None = None

    def wait_ready(self) -> None:
        """Block until GET /ping answers 200 (start-up is ~20 s on 2 cores: the CLI imports mlflow
        and copies the model, then a uvicorn worker imports torch/open_clip and loads it)."""
        while self.ready_after is None:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow models serve exited ({self.proc.returncode}):\n{self.tail()}")
            if time.monotonic() > self.deadline:
                raise RuntimeError(f"mlflow models serve did not answer /ping in time:\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/ping", timeout=2) as r:
                    if r.status == 200:
                        self.ready_after = time.monotonic() - self.started
                        print(f"[test] /ping answered {self.ready_after:.1f} s after start", file=self.log, flush=True)
            except OSError:
                time.sleep(0.25)

    def tail(self, n: int = 3000) -> str:
        """The end of the server log, without the artifact download progress bars."""
        self.log.flush()
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(ln for ln in lines if "Downloading artifacts" not in ln)[-n:]

    def invoke(self, body: dict, timeout: float = 60) -> tuple[int, dict]:
        """POST ``body`` to /invocations; (HTTP status, decoded JSON body) whatever the status."""
        self.wait_ready()
        req = urllib.request.Request(f"{self.url}/invocations", data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def predictions(self, body: dict) -> list[dict]:
        status, answer = self.invoke(body)
        assert status == 200, f"{status}: {answer}\n{self.tail()}"
        return answer["predictions"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
            except ProcessLookupError:
                pass
        # workers left behind by a leader that died first
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.log.close()


@pytest.fixture(scope="module")
def server(registered_model, tmp_path_factory):
    """Started here, waited for on the first request (so the in-process load overlaps start-up)."""
    srv = ModelServer(registered_model, tmp_path_factory.mktemp("serve") / "serve.log")
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def in_process(registered_model):
    """The same registered version, loaded in this process."""
    import mlflow

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(registered_model["tracking_uri"])
    try:
        return mlflow.pyfunc.load_model(f"models:/{registered_model['name']}/{registered_model['version']}")
    finally:
        mlflow.set_tracking_uri(previous)


def png(b64: str) -> bytes:
    return base64.b64decode(b64)


def test_served_images_are_the_in_process_ones(server, in_process):
    rows = server.predictions({"dataframe_records": RECORDS})
    assert [(r["prompt"], r["seed"]) for r in rows] == [(r["prompt"], r["seed"]) for r in RECORDS]
    local = in_process.predict(pd.DataFrame(RECORDS))
    for row, expected in zip(rows, local["image"]):
        data = png(row["image"])
        img = Image.open(io.BytesIO(data))
        assert img.format == "PNG" and img.size == (16, 16) and img.mode == "RGB"
        assert data == expected  # seed-deterministic across the HTTP path, byte for byte
    assert rows[0]["image"] != rows[1]["image"]


def test_params_override_the_registered_sampler(server, in_process):
    one = [RECORDS[0]]
    default = server.predictions({"dataframe_records": one})[0]["image"]
    fewer = server.predictions({"dataframe_records": one, "params": {"steps": 2}})[0]["image"]
    assert fewer != default
    local = in_process.predict(pd.DataFrame(one), params={"steps": 2})
    assert png(fewer) == local["image"][0]
    # another sampler and spacing by name; eta left out takes that sampler's own default
    other = {"sampler": "dpmpp_2m_sde", "spacing": "uniform", "steps": 3}
    served = server.predictions({"dataframe_records": one, "params": other})[0]["image"]
    assert served != default and png(served) == in_process.predict(pd.DataFrame(one), params=other)["image"][0]


def test_negative_prompt_and_seed_are_optional(server, in_process):
    plain = server.predictions({"dataframe_records": [RECORDS[0]]})[0]["image"]
    # one record with a negative prompt, one without: the column is optional per record
    records = [{**RECORDS[0], "negative_prompt": "a blue square"}, RECORDS[0]]
    rows = server.predictions({"dataframe_records": records})
    assert rows[0]["image"] != plain  # it reaches the sampler (not dropped by the signature)
    assert rows[1]["image"] == plain
    local = in_process.predict(pd.DataFrame([records[0]]))
    assert png(rows[0]["image"]) == local["image"][0]
    # no seed column: the model's default seeds (0, 1, ...)
    unseeded = server.predictions({"dataframe_records": [{"prompt": RECORDS[0]["prompt"]}]})
    assert unseeded[0]["seed"] == 0


def test_a_request_without_prompts_is_an_error_not_a_hang(server):
    status, answer = server.invoke({"dataframe_records": [{"seed": 1}]}, timeout=30)
    assert status == 400 and "missing inputs ['prompt']" in answer["message"]
    # a bad sampler setting is refused by name (not silently sampled as DDIM)
    status, answer = server.invoke({"dataframe_records": [RECORDS[0]], "params": {"sampler": "plms"}}, timeout=30)
    assert status == 400 and "sampler must be one of ddpm, ddim, euler" in answer["message"]
    status, answer = server.invoke({"dataframe_records": [RECORDS[0]], "params": {"spacing": "leading"}}, timeout=30)
    assert status == 400 and "spacing must be one of" in answer["message"]
    status, answer = server.invoke({"dataframe_records": [RECORDS[0]], "params": {"steps": 0}}, timeout=30)
    assert status == 400 and "steps must be in 1.." in answer["message"]
