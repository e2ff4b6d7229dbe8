"""Serving under concurrent load: `t2i serve` (batched) against `mlflow models serve` (one at a time).

    .venv/bin/python bench/serve_bench.py                        # makes a default-architecture model first
    .venv/bin/python bench/serve_bench.py --tracking-uri sqlite:///mlflow.db --model models:/t2i-shapes@champion
    .venv/bin/python bench/serve_bench.py --concurrency 16 64    # fewer bursts

It starts one server at a time on a free loopback port (so the two never share the CPUs), waits for
/ping, sends one warm-up request, then for each concurrency N sends N single-image requests at once
(each its own prompt and seed, one thread each) and reports, per server and N: p50 and p95 latency
of a request, the wall time of the burst and images per second. Then the speed-up of the batched
server's burst wall time, the server's resident memory (its whole process tree: one replica), and
whether the two servers answered the same images (PNG bytes; else the largest 8-bit difference).

Without ``--model`` it ingests 240 built-in images, embeds them, trains the default params'
network for 10 steps and registers it in a temporary MLflow store: what a request costs depends on
the network and the sampler settings (the registered defaults), not on how well it is trained.
`mlflow models serve` runs with ``-t 900``: its 60 s default would time the tail of a 256-request
burst out. The CPU and load average are printed beside the figures: the machine may be shared.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from machine import cpu_name  # noqa: E402

BIN = Path(sys.executable).parent


def make_model(root: Path) -> tuple[str, str]:
    """A default-architecture model registered as t2i-shapes@champion in a store under ``root``."""
    import mlflow
    import yaml

    from diffusion.artifacts import shard_urls
    from diffusion.config import parse_params
    from diffusion.data.ingest import ingest
    from diffusion.data.text import EmbeddingTable, captions_from_index, embed_captions, load_text_encoder
    from diffusion.registry.pyfunc import log_and_register
    from diffusion.training.train import train

    d = yaml.safe_load((ROOT / "params.yaml").read_text())
    d["dataset"].update(n_train=240, n_val=60)
    d["ingest"]["samples_per_shard"] = 100
    d["train"].update(steps=10, warmup_steps=2, checkpoint_every=10, log_every=5, shuffle_buffer=50)
    p = parse_params(d, "serve-bench")
    ingest(p.ingest, p.dataset, root / "shards", progress=False)
    enc = load_text_encoder(p.embed.model, p.embed.pretrained, p.embed.seed, p.embed.layer, "cpu")
    embed_captions(enc, captions_from_index(root / "shards"), progress=False).save(root / "emb")
    train(p.train, shard_urls(root / "shards", "train"), EmbeddingTable.load(root / "emb"), root / "model",
          image_size=p.dataset.image_size, progress=False)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment_id=mlflow.create_experiment("serve-bench", (root / "art").as_uri()))
    info = log_and_register(root / "model", enc, p.sample, {"bench": 0.0}, "t2i-shapes")
    mlflow.MlflowClient().set_registered_model_alias("t2i-shapes", "champion", str(info["version"]))
    return uri, "models:/t2i-shapes@champion"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], tracking_uri: str, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking_uri, DO_NOT_TRACK="1",
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")  # mlflow execs uvicorn
    proc = subprocess.Popen(cmd + ["--port", str(port)], env=env, cwd=ROOT, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[:3]} exited:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{cmd[:3]} did not answer /ping in 300 s")


def stop(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=30)
            return
        except (subprocess.TimeoutExpired, ProcessLookupError):
            continue


def rss_mb(proc: subprocess.Popen) -> float:
    """Resident memory of the server and its children (uvicorn workers)."""
    import psutil

    root = psutil.Process(proc.pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]) / 2 ** 20


def post(url: str, record: dict) -> tuple[float, str]:
    body = json.dumps({"dataframe_records": [record]}).encode()
    req = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=900) as r:
        image = json.loads(r.read())["predictions"][0]["image"]
    return time.perf_counter() - t0, image


def burst(url: str, records: list[dict]) -> dict:
    """All ``records`` at once, one request each; latency percentiles, wall time, images/s."""
    go = threading.Barrier(len(records))

    def send(record):
        go.wait()
        return post(url, record)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(records)) as pool:
        results = list(pool.map(send, records))
    wall = time.perf_counter() - t0
    lat = np.array([r[0] for r in results])
    return {"n": len(records), "p50_s": round(float(np.percentile(lat, 50)), 3),
            "p95_s": round(float(np.percentile(lat, 95)), 3), "max_s": round(float(lat.max()), 3),
            "wall_s": round(wall, 3), "images_per_s": round(len(records) / wall, 2),
            "images": [r[1] for r in results]}


def run_server(name: str, cmd: list[str], tracking_uri: str, records: dict[int, list[dict]], tmp: Path) -> dict:
    t0 = time.perf_counter()
    proc, url = start(cmd, tracking_uri, tmp / f"{name}.log")
    out = {"start_s": round(time.perf_counter() - t0, 1), "bursts": {}}
    try:
        post(url, {"prompt": "warm up", "seed": 0})
        for n, recs in records.items():
            out["bursts"][n] = burst(url, recs)
            b = out["bursts"][n]
            print(f"  {name:<22} {n:>4} concurrent: p50 {b['p50_s']:.2f} s  p95 {b['p95_s']:.2f} s  "
                  f"wall {b['wall_s']:.2f} s  {b['images_per_s']:.1f} img/s", flush=True)
        out["rss_mb"] = round(rss_mb(proc))
        if name == "t2i serve":
            with urllib.request.urlopen(f"{url}/health", timeout=10) as r:
                out["health"] = json.loads(r.read())
    finally:
        stop(proc)
    return out


def compare(a: list[str], b: list[str]) -> dict:
    """Same PNG bytes per request, or else the largest 8-bit difference of the decoded pixels."""
    import base64
    import io

    from PIL import Image

    a, b = [base64.b64decode(x) for x in a], [base64.b64decode(y) for y in b]  # mlflow's base64 has line breaks
    same = sum(x == y for x, y in zip(a, b))
    diff = max((int(np.abs(np.asarray(Image.open(io.BytesIO(x)), dtype=int)
                           - np.asarray(Image.open(io.BytesIO(y)), dtype=int)).max())
                for x, y in zip(a, b) if x != y), default=0)
    return {"identical": same, "of": len(a), "max_level_difference": diff}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tracking-uri", help="an MLflow store holding --model (default: a fresh one)")
    ap.add_argument("--model", default="models:/t2i-shapes@champion")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--max-batch", type=int, default=None, help="t2i serve's (default: params serve.max_batch)")
    ap.add_argument("--max-wait-ms", type=float, default=None, help="t2i serve's (default: params serve.max_wait_ms)")
    ap.add_argument("--out", help="write the JSON report here too")
    args = ap.parse_args()

    from diffusion.config import load_params
    from diffusion.data.shapes import eval_prompts

    load_start = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="t2i-serve-bench-"))
    tracking_uri, model = (args.tracking_uri, args.model) if args.tracking_uri else make_model(tmp)
    p = load_params(ROOT / "params.yaml")
    combos = eval_prompts(p.dataset, 1)
    records = {n: [{"prompt": combos[i % len(combos)]["prompt"], "seed": 1000 + i} for i in range(n)]
               for n in args.concurrency}
    t2i = [str(BIN / "t2i"), "serve", "--model", model, "--host", "127.0.0.1"]
    if args.max_batch:
        t2i += ["--max-batch", str(args.max_batch)]
    if args.max_wait_ms is not None:
        t2i += ["--max-wait-ms", str(args.max_wait_ms)]
    servers = {"mlflow models serve": [str(BIN / "mlflow"), "models", "serve", "-m", model, "--env-manager", "local",
                                       "--host", "127.0.0.1", "-t", "900"],
               "t2i serve": t2i}
    print(f"{cpu_name()}, {os.cpu_count()} CPUs, load average {load_start:.2f} at start; model {model}")
    results = {name: run_server(name, cmd, tracking_uri, records, tmp) for name, cmd in servers.items()}
    base, ours = results["mlflow models serve"], results["t2i serve"]
    report = {"cpu": cpu_name(), "cpus": os.cpu_count(), "load_average_at_start": round(load_start, 2),
              "load_average_at_end": round(os.getloadavg()[0], 2), "model": model,
              "serve": {"max_batch": args.max_batch or p.serve.max_batch,
                        "max_wait_ms": p.serve.max_wait_ms if args.max_wait_ms is None else args.max_wait_ms,
                        "fixed_shape": p.serve.fixed_shape},
              "servers": {}, "speedup_wall": {}, "same_images": {}}
    for n in args.concurrency:
        report["speedup_wall"][n] = round(base["bursts"][n]["wall_s"] / ours["bursts"][n]["wall_s"], 2)
        report["same_images"][n] = compare(base["bursts"][n]["images"], ours["bursts"][n]["images"])
    for name, r in results.items():
        report["servers"][name] = {**r, "bursts": {n: {k: v for k, v in b.items() if k != "images"}
                                                   for n, b in r["bursts"].items()}}
    print(json.dumps(report, indent=2))
    print(f"\n{'':<22} {'N':>4} {'p50 s':>7} {'p95 s':>7} {'wall s':>7} {'img/s':>7}")
    for name, r in results.items():
        for n, b in r["bursts"].items():
            print(f"{name:<22} {n:>4} {b['p50_s']:>7.2f} {b['p95_s']:>7.2f} {b['wall_s']:>7.2f} {b['images_per_s']:>7.1f}")
    print("speed-up of the burst (wall):", ", ".join(f"{n}: {s}x" for n, s in report["speedup_wall"].items()),
          f"| memory: mlflow {base['rss_mb']} MB, t2i {ours['rss_mb']} MB | {report['cpu']}")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
