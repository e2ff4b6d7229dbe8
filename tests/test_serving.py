"""`mlflow models serve` and `t2i serve` of the registered @champion: JSON prompts in, base64 PNG
images out.

Two real servers (subprocesses on free loopback ports, reading the session's SQLite registry, started
together so their start-ups overlap) answer every test in this module; they are stopped, with their
workers, at the end. `t2i serve` batches concurrent requests (diffusion/registry/serving.py).
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from concurrent.futures import ThreadPoolExecutor

from e2e_helpers import BIN, base_env, free_port
from PIL import Image

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[1]

RECORDS = [{"prompt": "a large red circle on the left", "seed": 1}, {"prompt": "a small blue square", "seed": 2}]


class ModelServer:
    """`mlflow models serve -m models:/<name>@champion --env-manager local` in its own process group."""

    def __init__(self, registered: dict, log_path: Path, start_timeout: float = 120, command: list[str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.log = open(log_path, "w")  # noqa: SIM115 (open for the server's lifetime, closed in stop)
        self.proc = subprocess.Popen(
            (command or [str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{registered['name']}@champion",
                         "--env-manager", "local", "--host", "127.0.0.1"]) + ["--port", str(self.port)],
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
def server(registered_model, tmp_path_factory, batch_server):
    """Started here, waited for on the first request (so the in-process load overlaps start-up);
    after ``batch_server`` has been started, so that both start at once."""
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


# ---------------------------------------------------------------------------------------------
# t2i serve: the same API, concurrent requests batched

MAX_BATCH = 8


@pytest.fixture(scope="module")
def batch_server(registered_model, tmp_path_factory):
    """`t2i serve` of the same @champion; a long wait (300 ms) so a burst lands in one call however
    slowly the test's threads start on a busy machine."""
    cmd = [str(BIN / "t2i"), "serve", "--params", str(ROOT / "params.yaml"), "--host", "127.0.0.1",
           "--max-batch", str(MAX_BATCH), "--max-wait-ms", "300"]
    srv = ModelServer(registered_model, tmp_path_factory.mktemp("t2i-serve") / "serve.log", command=cmd)
    try:
        yield srv
    finally:
        srv.stop()


def health(srv: ModelServer) -> dict:
    srv.wait_ready()
    with urllib.request.urlopen(f"{srv.url}/health", timeout=10) as r:
        return json.loads(r.read())


def burst(srv: ModelServer, bodies: list[dict]) -> list[tuple[int, dict]]:
    """POST every body at once, from its own thread; (status, answer) per body, in order."""
    srv.wait_ready()
    go = threading.Barrier(len(bodies))

    def send(body):
        go.wait()
        return srv.invoke(body)

    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(send, bodies))


def test_batched_answers_are_each_request_served_alone(server, batch_server):
    singles = [{"dataframe_records": [{"prompt": RECORDS[i % 2]["prompt"], "seed": 10 + i}]} for i in range(5)]
    pair = {"dataframe_records": RECORDS}
    bodies = singles + [pair]
    before = health(batch_server)
    answers = burst(batch_server, bodies)
    after = health(batch_server)
    assert all(status == 200 for status, _ in answers), answers
    # one burst of 6 requests (7 images) took one or two sampler calls, not six
    assert after["sampler_calls"] - before["sampler_calls"] <= 2, (before, after)
    assert after["images"] - before["images"] == 7
    for body, (_, answer) in zip(bodies, answers):
        alone = batch_server.predictions(body)  # each request again, by itself
        assert answer["predictions"] == alone  # same prompt, seed and PNG bytes
        assert [(r["prompt"], r["seed"]) for r in alone] == [(r["prompt"], r["seed"]) for r in body["dataframe_records"]]
    assert len({a["predictions"][0]["image"] for _, a in answers}) == len(bodies)  # seeds differ, images differ
    # mlflow models serve draws the pair at its own shape (2 rows, its prompts' token length) and
    # breaks its base64 into lines: the same PNG bytes on the 2-core EPYC; a CPU whose kernels round
    # by batch shape may move a pixel by one 8-bit level (docs/operations.md#batch-generation)
    for theirs, ours in zip(server.predictions(pair), answers[-1][1]["predictions"]):
        a, b = (np.asarray(Image.open(io.BytesIO(png(r["image"]))), dtype=int) for r in (theirs, ours))
        assert np.abs(a - b).max() <= 1 and (a != b).mean() < 0.05, (np.abs(a - b).max(), (a != b).mean())
    img = Image.open(io.BytesIO(png(answers[0][1]["predictions"][0]["image"])))
    assert img.format == "PNG" and img.size == (16, 16) and img.mode == "RGB"


def test_bad_requests_are_one_line_and_lose_nothing(batch_server):
    good = {"dataframe_records": [RECORDS[0]], "params": {"steps": 2}}
    other = {"dataframe_records": [RECORDS[1]]}  # other settings: drawn in its own call
    too_big = {"dataframe_records": [RECORDS[0]] * (MAX_BATCH + 1)}
    bad = [too_big, {"dataframe_records": [{"seed": 1}]}, {"dataframe_records": [RECORDS[0]], "params": {"sampler": "plms"}},
           {"dataframe_records": [{"prompt": "x", "seed": "one"}]}, {"records": []}]
    answers = burst(batch_server, [good, other] + bad)
    assert answers[0] == (200, {"predictions": batch_server.predictions(good)})
    assert answers[1] == (200, {"predictions": batch_server.predictions(other)})
    assert answers[0][1]["predictions"][0]["image"] != answers[1][1]["predictions"][0]["image"]
    (s1, a1), (s2, a2), (s3, a3), (s4, a4), (s5, a5) = answers[2:]
    assert s1 == 413 and a1["message"] == (f"{MAX_BATCH + 1} records in one request; this server draws at most "
                                           f"{MAX_BATCH} (serve.max_batch): split the request")
    assert s2 == 400 and "missing inputs ['prompt']" in a2["message"]
    assert s3 == 400 and "sampler must be one of ddpm, ddim, euler" in a3["message"]
    assert s4 == 400 and a4["message"] == "seed must be an integer"
    assert s5 == 400 and "exactly one of dataframe_records" in a5["message"]
    assert all("\n" not in a["message"] for _, a in answers[2:])
    req = urllib.request.Request(f"{batch_server.url}/invocations", data=b"{not json", method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 400 and json.loads(e.value.read())["message"].startswith("the body is not JSON")
