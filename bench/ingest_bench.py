#!/usr/bin/env python
"""Ingestion benchmark: the project's ``diffusion.data.ingest`` side by side with img2dataset.

One command (run it with the project's interpreter, from anywhere)::

    .venv/bin/python bench/ingest_bench.py                    # the real run (2000 images, 100k memory run)
    .venv/bin/python bench/ingest_bench.py --images 100 --memory-samples 3000   # a quick smoke run

What it measures (bench/README.md explains each figure):

(a) local folder: N generated 1024px JPEGs (+ .txt captions) -> 256px center_crop jpg shards, the
    project's ingest on threads and on processes; samples/s = accepted / seconds of the ingest() call.
(b) URL list: the same images served by a local aiohttp server on 127.0.0.1; the project's ingest
    (source "urls") and img2dataset (in its own venv, bench/.venv-img2dataset) each run as a
    subprocess; samples/s = successes / wall seconds of the whole subprocess (start-up and imports
    included for both).
(memory) a table source of small JPEGs (default 100k rows) -> 64px, in a subprocess whose RSS
    (process tree, psutil) is sampled every 0.5 s; RSS at 10/50/100 % of the committed units and the peak.

The report is printed and written as JSON to bench/results/ingest-<timestamp>.json. Generated
inputs are cached in bench/.cache/ and reused by later runs with the same sizes and seed.
This is not a test: pytest never collects it (testpaths is tests/).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import io
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
GENERATOR_VERSION = 1  # bump when the generated inputs change, so stale caches are rebuilt

# --------------------------------------------------------------------------------------------
# Code run in child processes (python -c), so every measured run is a fresh interpreter.

# The project's ingest, called as a library. argv[1]: {"ingest": IngestConfig kwargs, "out": dir}.
# Prints one line "BENCH_RESULT {json}" with its own timings.
INGEST_CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
from diffusion.config import DownloadConfig, IngestConfig
from diffusion.data.ingest import ingest
t1 = time.perf_counter()
job = json.loads(sys.argv[1])
kw = dict(job["ingest"])
download = DownloadConfig(**kw.pop("download", {}))
cfg = IngestConfig(**kw, download=download)
stats = ingest(cfg, None, job["out"], progress=False)
t2 = time.perf_counter()
print("BENCH_RESULT " + json.dumps({
    "import_s": t1 - t0, "call_s": t2 - t1, "items": stats["items"], "accepted": stats["accepted"],
    "rejected": stats["rejected"], "units": len(stats["units"]),
    "maxrss_self_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "maxrss_children_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
}), flush=True)
"""

# Static file server for (b). argv[1]: the folder to serve. Prints "PORT <n>" once listening.
SERVER_CHILD = r"""
import asyncio, sys
from aiohttp import web

async def main():
    app = web.Application()
    app.router.add_static("/", sys.argv[1], show_index=False, follow_symlinks=False)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=2048)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    print(f"PORT {port}", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def child_env() -> dict:
    env = dict(os.environ)
    env.setdefault("DO_NOT_TRACK", "1")
    env["NO_ALBUMENTATIONS_UPDATE"] = "1"  # img2dataset's albumentations would check PyPI at import
    env["WANDB_MODE"] = "disabled"
    env["PYTHONUNBUFFERED"] = "1"
    return env


# --------------------------------------------------------------------------------------------
# Machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def version_of(pkg: str) -> str:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "n/a"


def machine_info() -> dict:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    import psutil

    return {
        "cores": cores,
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "platform": platform.platform(),
        "torch": version_of("torch"),
        "pillow": version_of("pillow"),
        "pyarrow": version_of("pyarrow"),
        "httpx": version_of("httpx"),
        "aiohttp": version_of("aiohttp"),
        "loadavg_at_start": list(os.getloadavg()),
    }


# --------------------------------------------------------------------------------------------
# Inputs: 1024px photo-like JPEGs with captions (folder), small JPEGs in a parquet table


_GRID: dict[int, tuple] = {}

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "teal", "grey", "pink", "brown"]
SHAPES = ["circle", "square", "triangle", "stripe", "blob"]
SCENES = ["a field", "a wall", "the sky", "a table", "water", "a street", "sand", "snow"]


def caption_for(i: int, rng) -> str:
    c1, c2 = rng.choice(COLOURS, 2, replace=False)
    return (f"photo {i}: a {c1} {rng.choice(SHAPES)} and a {c2} {rng.choice(SHAPES)} "
            f"in front of {rng.choice(SCENES)}")


def make_photo(i: int, seed: int, size: int = 1024) -> tuple[bytes, str]:
    """A deterministic photo-like JPEG (smooth colour field, gradient, texture, shapes, sensor
    noise) of about 190-310 KB at 1024px, quality 90; and its caption."""
    import numpy as np
    from PIL import Image, ImageDraw

    if size not in _GRID:
        _GRID[size] = tuple(np.mgrid[0:size, 0:size].astype(np.float32) / size)
    yy, xx = _GRID[size]
    rng = np.random.default_rng([seed, 0, i])
    lo = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(lo).resize((size, size), Image.BICUBIC), dtype=np.float32)
    ang = rng.uniform(0, 2 * np.pi)
    img += (np.cos(ang) * xx + np.sin(ang) * yy)[..., None] * rng.uniform(-80, 80, 3).astype(np.float32)
    mid = rng.integers(88, 168, (size // 16, size // 16, 3), dtype=np.uint8)
    img += np.asarray(Image.fromarray(mid).resize((size, size), Image.BILINEAR), dtype=np.float32) - 128
    im = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = (int(v) for v in rng.integers(0, size, 2))
        w, h = (int(v) for v in rng.integers(size // 25, size // 2, 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        kind = int(rng.integers(0, 3))
        if kind == 0:
            draw.ellipse([x0, y0, x0 + w, y0 + h], fill=colour)
        elif kind == 1:
            draw.rectangle([x0, y0, x0 + w, y0 + h], fill=colour)
        else:
            draw.polygon([tuple(int(v) for v in rng.integers(0, size, 2)) for _ in range(3)], fill=colour)
    a = np.asarray(im, dtype=np.float32)
    a += rng.standard_normal(a.shape, dtype=np.float32) * rng.uniform(4, 8)
    buf = io.BytesIO()
    Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue(), caption_for(i, rng)


def _write_photo(job: tuple[Path, int, int]) -> int:
    folder, i, seed = job
    data, caption = make_photo(i, seed)
    (folder / f"img-{i:06d}.jpg").write_bytes(data)
    (folder / f"img-{i:06d}.txt").write_text(caption + "\n", encoding="utf-8")
    return len(data)


def prepare_images(cache: Path, n: int, seed: int, jobs: int) -> dict:
    """bench/.cache/images-<n>-s<seed>/: reused when its marker says it is complete."""
    folder = cache / f"images-{n}-s{seed}"
    marker = cache / f"images-{n}-s{seed}.done.json"
    if marker.is_file():
        info = json.loads(marker.read_text())
        if info.get("version") == GENERATOR_VERSION and info.get("n") == n and folder.is_dir():
            log(f"reusing {n} cached images in {folder}")
            return {**info, "folder": str(folder), "generated_now": False}
    log(f"generating {n} 1024px JPEGs into {folder} ({jobs} processes)...")
    shutil.rmtree(folder, ignore_errors=True)
    marker.unlink(missing_ok=True)
    folder.mkdir(parents=True)
    t0 = time.perf_counter()
    sizes = []
    work = [(folder, i, seed) for i in range(n)]
    if jobs > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(jobs) as pool:
            for k, s in enumerate(pool.imap(_write_photo, work, chunksize=8), 1):
                sizes.append(s)
                if k % max(1, n // 10) == 0:
                    log(f"  {k}/{n} images")
    else:
        for k, job in enumerate(work, 1):
            sizes.append(_write_photo(job))
            if k % max(1, n // 10) == 0:
                log(f"  {k}/{n} images")
    info = {"version": GENERATOR_VERSION, "n": n, "seed": seed, "bytes_total": sum(sizes),
            "kb_min": min(sizes) / 1024, "kb_mean": sum(sizes) / len(sizes) / 1024, "kb_max": max(sizes) / 1024,
            "generate_s": time.perf_counter() - t0}
    marker.write_text(json.dumps(info, indent=1))
    log(f"  done in {info['generate_s']:.0f} s, {info['kb_min']:.0f}-{info['kb_max']:.0f} KB per image")
    return {**info, "folder": str(folder), "generated_now": True}


def _table_batch(job: tuple[int, int, int]) -> tuple[list[bytes], list[str]]:
    """Rows [start, start+count) of the memory table: distinct 128px JPEGs of varied content."""
    import numpy as np
    from PIL import Image

    start, count, seed = job
    s = 128
    rng = np.random.default_rng([seed, 1, start])
    lo = rng.integers(0, 256, (count, 4, 4, 3), dtype=np.uint8)
    amp = rng.uniform(2, 12, count).astype(np.float32)
    boxes = rng.integers(0, s, (count, 4))
    colours = rng.integers(0, 256, (count, 3))
    images, captions = [], []
    for k in range(count):
        a = np.asarray(Image.fromarray(lo[k]).resize((s, s), Image.BILINEAR), dtype=np.float32)
        x0, x1 = sorted(boxes[k, :2])
        y0, y1 = sorted(boxes[k, 2:])
        a[y0:y1 + 1, x0:x1 + 1] = colours[k]
        a += rng.standard_normal((s, s, 3), dtype=np.float32) * amp[k]
        buf = io.BytesIO()
        Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        images.append(buf.getvalue())
        captions.append(caption_for(start + k, rng))
    return images, captions


def prepare_table(cache: Path, n: int, seed: int, jobs: int, rows_per_group: int = 1000) -> dict:
    """bench/.cache/table-<n>-s<seed>.parquet, written row group by row group (flat memory)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = cache / f"table-{n}-s{seed}-rg{rows_per_group}-v{GENERATOR_VERSION}.parquet"
    if path.is_file():
        log(f"reusing cached table {path}")
        return {"path": str(path), "rows": n, "rows_per_group": rows_per_group, "bytes": path.stat().st_size,
                "generated_now": False}
    log(f"generating a {n}-row table of 128px JPEGs into {path} ({jobs} processes)...")
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    schema = pa.schema([("image", pa.binary()), ("caption", pa.string())])
    work = [(a, min(rows_per_group, n - a), seed) for a in range(0, n, rows_per_group)]
    t0 = time.perf_counter()
    done = 0
    with pq.ParquetWriter(tmp, schema) as writer:
        def put(batch):
            nonlocal done
            writer.write_table(pa.table({"image": batch[0], "caption": batch[1]}, schema=schema))
            done += len(batch[0])
            if (done // rows_per_group) % max(1, len(work) // 10) == 0:
                log(f"  {done}/{n} rows")

        if jobs > 1:
            import multiprocessing as mp

            with mp.get_context("fork").Pool(jobs) as pool:
                for batch in pool.imap(_table_batch, work):
                    put(batch)
        else:
            for job in work:
                put(_table_batch(job))
    os.replace(tmp, path)
    log(f"  done in {time.perf_counter() - t0:.0f} s, {path.stat().st_size / 2**20:.0f} MB")
    return {"path": str(path), "rows": n, "rows_per_group": rows_per_group, "bytes": path.stat().st_size,
            "generated_now": True,
            "generate_s": time.perf_counter() - t0}


def warm_file_cache(folder: Path) -> dict:
    """Read every input file once, so each timed run starts with the same (warm) page cache."""
    t0 = time.perf_counter()
    total = 0
    for p in sorted(folder.iterdir()):
        with open(p, "rb") as f:
            while chunk := f.read(1 << 20):
                total += len(chunk)
    return {"bytes": total, "seconds": time.perf_counter() - t0}


# --------------------------------------------------------------------------------------------
# Running things


def tree_memory(proc) -> tuple[float, float | None]:
    """(RSS, PSS) in MB of a psutil process and all its descendants. RSS counts pages shared by
    forked workers once per process; PSS splits them, so its sum is the tree's real footprint."""
    import psutil

    rss, pss, have_pss = 0, 0, True
    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0.0, None
    for p in procs:
        try:
            rss += p.memory_info().rss
            if have_pss:
                try:
                    pss += p.memory_full_info().pss
                except (psutil.AccessDenied, AttributeError):
                    have_pss = False
        except psutil.Error:
            continue
    return rss / 2**20, (pss / 2**20 if have_pss else None)


def count_units(out: Path) -> int:
    d = out / "_units"
    try:
        return sum(1 for p in d.iterdir() if p.name[:1].isdigit() and p.name.endswith(".json"))
    except OSError:
        return 0


def run_measured(cmd: list[str], log_dir: Path, name: str, *, env: dict | None = None, cwd: Path = REPO,
                 sample_interval: float | None = None, units_dir: Path | None = None,
                 timeout: float | None = None) -> dict:
    """Run cmd to completion; wall seconds, CPU seconds of it and its waited-for descendants,
    and optionally a memory timeline of its process tree every ``sample_interval`` seconds."""
    import psutil

    log_dir.mkdir(parents=True, exist_ok=True)
    out_path, err_path = log_dir / f"{name}.stdout", log_dir / f"{name}.stderr"
    before = os.times()
    with open(out_path, "wb") as fo, open(err_path, "wb") as fe:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env or child_env(), stdout=fo, stderr=fe,
                                start_new_session=True)
        ps = psutil.Process(proc.pid)
        samples = []
        try:
            while True:
                try:
                    proc.wait(timeout=sample_interval or 1.0)
                    break
                except subprocess.TimeoutExpired:
                    pass
                if timeout and time.perf_counter() - t0 > timeout:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    raise RuntimeError(f"{name}: still running after {timeout:.0f} s, killed")
                if sample_interval:
                    rss, pss = tree_memory(ps)
                    if rss <= 0:  # the process was exiting: nothing to read
                        continue
                    samples.append({"t": round(time.perf_counter() - t0, 3), "rss_mb": round(rss, 1),
                                    "pss_mb": None if pss is None else round(pss, 1),
                                    "units": count_units(units_dir) if units_dir else None})
        except BaseException:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            raise
        wall = time.perf_counter() - t0
    after = os.times()
    stdout = out_path.read_text(errors="replace")
    stderr = err_path.read_text(errors="replace")
    result = None
    for line in stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            result = json.loads(line[len("BENCH_RESULT "):])
    return {"cmd": cmd, "rc": proc.returncode, "wall_s": wall,
            "cpu_s": (after.children_user - before.children_user) + (after.children_system - before.children_system),
            "result": result, "samples": samples, "stdout_tail": stdout[-2000:], "stderr_tail": stderr[-3000:]}


def ingest_cmd(python: str, ingest_kw: dict, out: Path) -> list[str]:
    return [python, "-c", INGEST_CHILD, json.dumps({"ingest": ingest_kw, "out": str(out)})]


def fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def check_child(run: dict, what: str) -> dict:
    if run["rc"] != 0 or run["result"] is None:
        raise RuntimeError(f"{what} failed (exit {run['rc']}):\n{run['stderr_tail']}")
    return run["result"]


def median(xs: list[float]) -> float:
    s = sorted(xs)
    m = len(s) // 2
    return s[m] if len(s) % 2 else (s[m - 1] + s[m]) / 2


# --------------------------------------------------------------------------------------------
# (a) local folder


def bench_local(args, images: dict, work: Path) -> dict:
    folder = Path(images["folder"])
    warm = warm_file_cache(folder)
    log(f"(a) file cache warmed: read {warm['bytes'] / 2**20:.0f} MB in {warm['seconds']:.1f} s")
    base = {"source": "folder", "path": str(folder), "image_size": 256, "resize_mode": "center_crop",
            "image_format": "jpg", "quality": 95, "samples_per_shard": args.shard_size, "workers": args.workers,
            "dedupe": True}
    out = {"images": args.images, "file_cache": "warm (every file read once just before)", "warmup": warm,
           "runs": {}}
    for runner in ("threads", "processes"):
        runs = []
        for r in range(args.repeat):
            dest = fresh(work / f"local-{runner}")
            log(f"(a) t2i ingest, folder source, task_runner={runner} (run {r + 1}/{args.repeat})...")
            run = run_measured(ingest_cmd(args.python, {**base, "task_runner": runner}, dest), work / "logs",
                               f"local-{runner}-{r}")
            res = check_child(run, f"ingest (folder, {runner})")
            runs.append({"accepted": res["accepted"], "items": res["items"], "rejected": res["rejected"],
                         "call_s": res["call_s"], "import_s": res["import_s"], "wall_s": run["wall_s"],
                         "cpu_s": run["cpu_s"], "samples_per_s": res["accepted"] / res["call_s"]})
            log(f"    {runs[-1]['samples_per_s']:.1f} samples/s ({res['accepted']}/{res['items']} accepted, "
                f"{res['call_s']:.2f} s in ingest(), {run['wall_s']:.2f} s with start-up)")
            if not args.keep_output:
                shutil.rmtree(dest, ignore_errors=True)
        out["runs"][runner] = {"samples_per_s": median([x["samples_per_s"] for x in runs]), "all": runs}
    if args.cli:
        out["cli"] = bench_cli(args, folder, work)
    return out


def bench_cli(args, folder: Path, work: Path) -> dict:
    """Secondary figure: the same as (a) threads through `t2i ingest` (Prefect flow, its start-up included)."""
    t2i = Path(args.python).with_name("t2i")
    dest = fresh(work / "local-cli")
    sets = {"ingest.image_size": 256, "ingest.resize_mode": "center_crop", "ingest.image_format": "jpg",
            "ingest.quality": 95, "ingest.samples_per_shard": args.shard_size, "ingest.workers": args.workers,
            "ingest.task_runner": "threads", "ingest.dedupe": "true"}
    cmd = [str(t2i), "ingest", "--out", str(dest), "--source", "folder", "--input", str(folder)]
    for k, v in sets.items():
        cmd += ["-s", f"{k}={v}"]
    log("(a) t2i ingest CLI (Prefect flow), threads...")
    run = run_measured(cmd, work / "logs", "local-cli")
    if run["rc"] != 0:
        return {"error": f"exit {run['rc']}: {run['stderr_tail'][-500:]}", "wall_s": run["wall_s"]}
    stats = json.loads((dest / "stats.json").read_text())
    if not args.keep_output:
        shutil.rmtree(dest, ignore_errors=True)
    return {"wall_s": run["wall_s"], "accepted": stats["accepted"], "cpu_s": run["cpu_s"],
            "samples_per_s": stats["accepted"] / run["wall_s"]}


# --------------------------------------------------------------------------------------------
# (b) URL list over 127.0.0.1


class Server:
    """aiohttp static file server in a child process of the project's interpreter."""

    def __init__(self, python: str, root: Path, log_dir: Path):
        import psutil

        log_dir.mkdir(parents=True, exist_ok=True)
        self.err = open(log_dir / "server.stderr", "wb")  # noqa: SIM115 - open while the server runs
        self.proc = subprocess.Popen([python, "-c", SERVER_CHILD, str(root)], stdout=subprocess.PIPE,
                                     stderr=self.err, env=child_env(), start_new_session=True)
        line = self.proc.stdout.readline().decode().strip()  # blocks until listening (or exit)
        if not line.startswith("PORT "):
            self.stop()
            raise RuntimeError(f"HTTP server did not start: {(log_dir / 'server.stderr').read_text()[-1000:]}")
        self.port = int(line.split()[1])
        self.ps = psutil.Process(self.proc.pid)

    def cpu_s(self) -> float:
        t = self.ps.cpu_times()
        return t.user + t.system

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.err.close()


def i2d_paths() -> tuple[Path, Path]:
    venv = BENCH / ".venv-img2dataset"
    return venv, venv / "bin" / "python"


def ensure_img2dataset(args) -> dict:
    """bench/.venv-img2dataset with img2dataset in it (never the project venv: img2dataset pins
    webdataset<0.3 and pulls an old `dataclasses` backport that breaks pydantic/Prefect)."""
    venv, py = i2d_paths()
    probe = [str(py), "-c", "import importlib.metadata as m, img2dataset; print(m.version('img2dataset'))"]
    if py.is_file():
        r = subprocess.run(probe, capture_output=True, text=True, env=child_env(), check=False)
        if r.returncode == 0:
            return {"venv": str(venv), "version": r.stdout.strip(), "installed_now": False}
        log(f"{venv} exists but `import img2dataset` fails there; reinstalling")
    log(f"creating {venv} ({sys.executable} -m venv)...")
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    log(f"{py} -m pip install {args.img2dataset_spec} (its own venv; a minute or two)...")
    r = subprocess.run([str(py), "-m", "pip", "install", "--quiet", args.img2dataset_spec],
                       capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"pip install {args.img2dataset_spec} failed in {venv}:\n{(r.stdout + r.stderr)[-3000:]}")
    r = subprocess.run(probe, capture_output=True, text=True, env=child_env(), check=False)
    if r.returncode != 0:
        raise RuntimeError(f"img2dataset installed but does not import:\n{r.stderr[-3000:]}")
    return {"venv": str(venv), "version": r.stdout.strip(), "installed_now": True}


def write_url_list(images: dict, port: int, work: Path) -> tuple[Path, Path]:
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    folder = Path(images["folder"])
    names = sorted(p.name for p in folder.glob("*.jpg"))
    urls = [f"http://127.0.0.1:{port}/{n}" for n in names]
    captions = [(folder / n).with_suffix(".txt").read_text(encoding="utf-8").strip() for n in names]
    table = pa.table({"url": urls, "caption": captions})
    work.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, work / "urls.parquet")
    pacsv.write_csv(table, work / "urls.csv")
    return work / "urls.parquet", work / "urls.csv"


def i2d_successes(out: Path) -> dict:
    tot = {"count": 0, "successes": 0, "failed_to_download": 0, "failed_to_resize": 0}
    errors: dict[str, int] = {}
    for f in sorted(out.glob("*_stats.json")):
        s = json.loads(f.read_text())
        for k in tot:
            tot[k] += int(s.get(k, 0))
        for k, v in (s.get("status_dict") or {}).items():
            errors[k] = errors.get(k, 0) + v
    tot["status"] = {k: v for k, v in errors.items() if k != "success"}
    return tot


def bench_urls(args, images: dict, work: Path) -> dict:
    n = images["n"]
    out: dict = {"images": n, "concurrency_per_worker": args.concurrency, "workers": args.workers,
                 "img2dataset_threads_per_process": args.i2d_threads, "timeout_s": args.timeout,
                 "task_runner": args.url_runner}
    i2d = None
    if not args.no_img2dataset:
        try:
            i2d = ensure_img2dataset(args)
            out["img2dataset"] = dict(i2d)
        except Exception as e:  # noqa: BLE001 - reported, the rest of the benchmark still runs
            out["img2dataset"] = {"error": str(e)}
            log(f"(b) img2dataset unavailable: {e}")
    server = Server(args.python, Path(images["folder"]), work / "logs")
    try:
        parquet, csv = write_url_list(images, server.port, work / "urls")
        log(f"(b) serving {images['folder']} on http://127.0.0.1:{server.port}/ (aiohttp, pid {server.proc.pid})")
        # Warm-up: one import of each tool, so neither timed run pays for a cold disk cache of its packages.
        subprocess.run([args.python, "-c", "import diffusion.data.ingest"], cwd=REPO, env=child_env(), check=True)
        if i2d:
            subprocess.run([str(i2d_paths()[1]), "-c", "import img2dataset"], env=child_env(), check=True)
        ours_kw = {"source": "urls", "path": str(parquet), "url_column": "url", "caption_column": "caption",
                   "image_size": 256, "resize_mode": "center_crop", "image_format": "jpg", "quality": 95,
                   "samples_per_shard": args.shard_size, "workers": args.workers, "task_runner": args.url_runner,
                   "dedupe": True, "download": {"concurrency": args.concurrency, "timeout": float(args.timeout)}}
        t2i_runs, i2d_runs = [], []
        for r in range(args.repeat):
            dest = fresh(work / "urls-t2i")
            log(f"(b) t2i ingest, urls source, {args.workers} workers x {args.concurrency} downloads "
                f"(run {r + 1}/{args.repeat})...")
            c0 = server.cpu_s()
            run = run_measured(ingest_cmd(args.python, ours_kw, dest), work / "logs", f"urls-t2i-{r}",
                               timeout=args.run_timeout)
            res = check_child(run, "ingest (urls)")
            t2i_runs.append({"ok": res["accepted"], "items": res["items"], "rejected": res["rejected"],
                             "wall_s": run["wall_s"], "call_s": res["call_s"], "import_s": res["import_s"],
                             "cpu_s": run["cpu_s"], "server_cpu_s": server.cpu_s() - c0,
                             "samples_per_s": res["accepted"] / run["wall_s"],
                             "samples_per_s_call": res["accepted"] / res["call_s"]})
            log(f"    {t2i_runs[-1]['samples_per_s']:.1f} samples/s ({res['accepted']}/{n} ok, "
                f"{run['wall_s']:.2f} s wall, {res['call_s']:.2f} s in ingest())")
            if not args.keep_output:
                shutil.rmtree(dest, ignore_errors=True)
            if not i2d:
                continue
            dest = fresh(work / "urls-img2dataset")
            cmd = [str(i2d_paths()[0] / "bin" / "img2dataset"),
                   "--url_list", str(parquet), "--input_format", "parquet",
                   "--url_col", "url", "--caption_col", "caption",
                   "--output_format", "webdataset", "--output_folder", str(dest),
                   "--image_size", "256", "--resize_mode", "center_crop",
                   "--encode_format", "jpg", "--encode_quality", "95",
                   "--number_sample_per_shard", str(args.shard_size),
                   "--processes_count", str(args.workers), "--thread_count", str(args.i2d_threads),
                   "--disable_all_reencoding", "False", "--enable_wandb", "False",
                   "--distributor", "multiprocessing", "--timeout", str(args.timeout)]
            log(f"(b) img2dataset, {args.workers} processes x {args.i2d_threads} threads (run {r + 1}/{args.repeat})...")
            c0 = server.cpu_s()
            run = run_measured(cmd, work / "logs", f"urls-img2dataset-{r}", cwd=work, timeout=args.run_timeout)
            if run["rc"] != 0:
                raise RuntimeError(f"img2dataset failed (exit {run['rc']}):\n{run['stderr_tail']}")
            st = i2d_successes(dest)
            i2d_runs.append({"ok": st["successes"], "items": st["count"], "failed_to_download": st["failed_to_download"],
                             "failed_to_resize": st["failed_to_resize"], "errors": st["status"],
                             "wall_s": run["wall_s"], "cpu_s": run["cpu_s"], "server_cpu_s": server.cpu_s() - c0,
                             "samples_per_s": st["successes"] / run["wall_s"]})
            log(f"    {i2d_runs[-1]['samples_per_s']:.1f} samples/s ({st['successes']}/{n} ok, {run['wall_s']:.2f} s wall)")
            if not args.keep_output:
                shutil.rmtree(dest, ignore_errors=True)
    finally:
        server.stop()
        log("(b) HTTP server stopped")
    out["url_list"] = {"parquet": str(parquet), "csv": str(csv)}
    out["t2i"] = {"samples_per_s": median([x["samples_per_s"] for x in t2i_runs]),
                  "ok": min(x["ok"] for x in t2i_runs), "all": t2i_runs}
    if i2d_runs:
        out["img2dataset_run"] = {"samples_per_s": median([x["samples_per_s"] for x in i2d_runs]),
                                  "ok": min(x["ok"] for x in i2d_runs), "all": i2d_runs}
        out["ratio"] = out["t2i"]["samples_per_s"] / out["img2dataset_run"]["samples_per_s"]
    out["complete"] = out["t2i"]["ok"] == n and (not i2d_runs or out["img2dataset_run"]["ok"] == n)
    return out


# --------------------------------------------------------------------------------------------
# Memory over a large run


def at_fraction(samples: list[dict], total_units: int, frac: float) -> dict | None:
    """The first sample taken once ``frac`` of the units were committed.

    For 100 % that would be a sample taken after the work is over (the worker pool is shut down
    and, with processes, its RSS is gone), so "100 %" is the last sample taken while units were
    still being processed, if that is past the 50 % point; else the first one after the last commit.
    """
    have = [s for s in samples if s["units"] is not None]
    if frac >= 1.0:
        before = [s for s in have if s["units"] < total_units]
        if before and before[-1]["units"] >= math.ceil(0.5 * total_units):
            return before[-1]
    need = max(1, math.ceil(frac * total_units))
    return next((s for s in have if s["units"] >= need), None)


def bench_memory(args, table: dict, work: Path, runner: str) -> dict:
    n = table["rows"]
    total_units = math.ceil(n / args.shard_size)
    dest = fresh(work / f"memory-{runner}")
    kw = {"source": "table", "path": table["path"], "image_column": "image", "caption_column": "caption",
          "image_size": args.memory_size, "resize_mode": "center_crop", "image_format": "jpg", "quality": 95,
          "samples_per_shard": args.shard_size, "workers": args.workers, "task_runner": runner, "dedupe": True}
    log(f"(memory) t2i ingest, table source, {n} rows -> {args.memory_size}px, {runner}, "
        f"{total_units} units; RSS sampled every {args.sample_interval} s...")
    run = run_measured(ingest_cmd(args.python, kw, dest), work / "logs", f"memory-{runner}",
                       sample_interval=args.sample_interval, units_dir=dest, timeout=args.run_timeout)
    res = check_child(run, f"ingest (table, {runner})")
    samples = run["samples"]
    points = {}
    for label, frac in (("10%", 0.10), ("50%", 0.50), ("100%", 1.0)):
        s = at_fraction(samples, total_units, frac)
        points[label] = s
    peak = max(samples, key=lambda s: s["rss_mb"]) if samples else None
    after = [s for s in samples if s["units"] == total_units]  # index merge and stats.json
    peak_pss = max((s for s in samples if s["pss_mb"] is not None), key=lambda s: s["pss_mb"], default=None)
    out = {"runner": runner, "samples": n, "units": total_units, "output_px": args.memory_size,
           "accepted": res["accepted"], "rejected": res["rejected"], "call_s": res["call_s"],
           "import_s": res["import_s"], "wall_s": run["wall_s"], "cpu_s": run["cpu_s"],
           "samples_per_s": res["accepted"] / res["call_s"],
           "rss_mb": {k: (v["rss_mb"] if v else None) for k, v in points.items()},
           "pss_mb": {k: (v["pss_mb"] if v else None) for k, v in points.items()},
           "at_s": {k: (v["t"] if v else None) for k, v in points.items()},
           "units_at": {k: (v["units"] if v else None) for k, v in points.items()},
           "finalize_rss_mb": max((s["rss_mb"] for s in after), default=None),
           "peak_rss_mb": peak["rss_mb"] if peak else None, "peak_rss_at_s": peak["t"] if peak else None,
           "peak_pss_mb": peak_pss["pss_mb"] if peak_pss else None,
           "maxrss_main_process_mb": res["maxrss_self_mb"], "maxrss_worker_processes_mb": res["maxrss_children_mb"],
           "timeline": samples}
    log(f"    {out['samples_per_s']:.1f} samples/s; RSS {out['rss_mb']}; peak {out['peak_rss_mb']} MB")
    if not args.keep_output:
        shutil.rmtree(dest, ignore_errors=True)
    return out


# --------------------------------------------------------------------------------------------
# Report


def fmt_mb(x) -> str:
    return "n/a" if x is None else f"{x:.0f} MB"


def report_lines(res: dict) -> list[str]:
    m = res["machine"]
    lines = [f"machine: {m['cores']} cores, {m['cpu_model']}, {m['ram_gb']} GB RAM, python {m['python']}, "
             f"torch {m['torch']}, pillow {m['pillow']}; load average at start "
             + "/".join(f"{x:.2f}" for x in m["loadavg_at_start"])]
    if m["loadavg_at_start"][0] > 0.5 * m["cores"]:
        lines.append(f"  WARNING: the machine was busy at start (load {m['loadavg_at_start'][0]:.2f} on "
                     f"{m['cores']} cores): throughput figures are lower than on a quiet machine")
    img = res.get("images")
    if img:
        lines.append(f"inputs: {img['n']} x 1024px JPEG q90, {img['kb_min']:.0f}-{img['kb_max']:.0f} KB "
                     f"(mean {img['kb_mean']:.0f} KB), {'generated now' if img['generated_now'] else 'cached'}")
    args = res["args"]
    if img and img["n"] < args["workers"] * args["shard_size"]:
        units = math.ceil(img["n"] / args["shard_size"])
        lines.append(f"  NOTE: {img['n']} images make {units} shard(s) of {args['shard_size']} for {args['workers']} "
                     "workers; both tools parallelise by shard, so workers idle: use --images >= workers x "
                     "--shard-size for throughput figures")
    a = res.get("local")
    if a:
        t, p = a["runs"]["threads"], a["runs"]["processes"]
        lines.append(f"(a) local folder, {a['images']} x 1024px JPEG -> 256px jpg: threads {t['samples_per_s']:.1f} "
                     f"samples/s, processes {p['samples_per_s']:.1f} samples/s")
        lines.append(f"    file cache warm (all {a['warmup']['bytes'] / 2**20:.0f} MB read once before); "
                     f"{a['runs']['threads']['all'][-1]['items']} items, shards of {res['args']['shard_size']}, "
                     f"{res['args']['workers']} workers")
        for name, r in (("threads", t), ("processes", p)):
            x = r["all"][-1]
            lines.append(f"    {name}: {x['accepted']}/{x['items']} accepted in {x['call_s']:.2f} s of ingest(); "
                         f"{x['wall_s']:.2f} s with interpreter start-up and imports ({x['import_s']:.2f} s); "
                         f"CPU {x['cpu_s']:.1f} s incl. start-up ({1000 * x['cpu_s'] / max(1, x['accepted']):.1f} ms/sample)")
        if a.get("cli"):
            c = a["cli"]
            lines.append("    t2i ingest CLI (Prefect flow, threads): "
                         + (f"{c['samples_per_s']:.1f} samples/s over {c['wall_s']:.1f} s wall "
                            f"({c['accepted']} accepted)" if "error" not in c else f"failed: {c['error']}"))
    b = res.get("urls")
    if b:
        n = b["images"]
        t = b["t2i"]
        line = f"(b) URL list via 127.0.0.1: t2i {t['samples_per_s']:.1f} samples/s ({t['ok']}/{n} ok)"
        if "img2dataset_run" in b:
            i = b["img2dataset_run"]
            line += (f", img2dataset {i['samples_per_s']:.1f} samples/s ({i['ok']}/{n} ok), "
                     f"ratio {b['ratio']:.2f}x")
        else:
            line += f", img2dataset not run ({b.get('img2dataset', {}).get('error', 'disabled')[:300]})"
        lines.append(line)
        x = t["all"][-1]
        lines.append(f"    t2i: {b['workers']} workers ({b['task_runner']}) x {b['concurrency_per_worker']} downloads; "
                     f"{x['wall_s']:.2f} s wall incl. start-up ({x['call_s']:.2f} s in ingest(): "
                     f"{x['samples_per_s_call']:.1f} samples/s); CPU {x['cpu_s']:.1f} s, server CPU {x['server_cpu_s']:.1f} s"
                     + (f"; rejected {x['rejected']}" if x["rejected"] else ""))
        if "img2dataset_run" in b:
            x = b["img2dataset_run"]["all"][-1]
            lines.append(f"    img2dataset {b['img2dataset']['version']}: {b['workers']} processes x "
                         f"{b['img2dataset_threads_per_process']} threads; {x['wall_s']:.2f} s wall; CPU {x['cpu_s']:.1f} s, "
                         f"server CPU {x['server_cpu_s']:.1f} s"
                         + (f"; errors {x['errors']}" if x["errors"] else ""))
        if not b["complete"]:
            lines.append("    WARNING: not every URL was downloaded by both tools: the comparison is not like for like")
    if res.get("memory_table"):
        mt = res["memory_table"]
        lines.append(f"memory table: {mt['rows']} rows of 128px JPEG q90 ({mt['bytes'] / 2**20:.0f} MB parquet, row groups of "
                     f"{mt['rows_per_group']}), {'generated now' if mt['generated_now'] else 'cached'}")
    for mem in res.get("memory", []):
        r = mem["rss_mb"]
        lines.append(f"memory, {mem['samples']} samples ({mem['runner']}, {mem['output_px']}px): RSS {fmt_mb(r['10%'])} "
                     f"at 10%, {fmt_mb(r['50%'])} at 50%, {fmt_mb(r['100%'])} at 100%, peak {fmt_mb(mem['peak_rss_mb'])}; "
                     f"{mem['samples_per_s']:.0f} samples/s")
        p = mem["pss_mb"]
        growth = (r["100%"] - r["10%"]) if r["10%"] is not None and r["100%"] is not None else None
        lines.append(f"    PSS (shared pages split between processes) {fmt_mb(p['10%'])} / {fmt_mb(p['50%'])} / "
                     f"{fmt_mb(p['100%'])}, peak {fmt_mb(mem['peak_pss_mb'])}; growth 10%->100%: "
                     + ("n/a" if growth is None else f"{growth:+.0f} MB") +
                     f"; {mem['accepted']}/{mem['samples']} accepted, {mem['units']} units, "
                     f"{len(mem['timeline'])} RSS samples")
        lines.append(f"    after the last unit (index merge, stats): RSS {fmt_mb(mem['finalize_rss_mb'])}; kernel peak "
                     f"(ru_maxrss) of the ingest process {fmt_mb(mem['maxrss_main_process_mb'])}"
                     + (f", of its largest worker process {fmt_mb(mem['maxrss_worker_processes_mb'])}"
                        if mem["runner"] == "processes" else ""))
    return lines


# --------------------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--images", type=int, default=2000, help="(a)/(b): number of 1024px JPEGs")
    ap.add_argument("--memory-samples", type=int, default=100_000, help="memory run: rows of the table source")
    ap.add_argument("--only", default="a,b,memory", help="comma-separated sections to run: a, b, memory")
    ap.add_argument("--shard-size", type=int, default=1000, help="samples per shard / work unit, both tools")
    ap.add_argument("--workers", type=int, default=2, help="t2i workers and img2dataset processes")
    ap.add_argument("--concurrency", type=int, default=32, help="(b) t2i downloads in flight per worker")
    ap.add_argument("--i2d-threads", type=int, default=None,
                    help="(b) img2dataset --thread_count (per process); default: --concurrency, so both tools "
                         "have workers x concurrency downloads in flight")
    ap.add_argument("--timeout", type=int, default=10, help="(b) per-request timeout, seconds, both tools")
    ap.add_argument("--url-runner", choices=["threads", "processes"], default="threads",
                    help="(b) t2i task_runner")
    ap.add_argument("--memory-runner", default="threads,processes",
                    help="memory run: comma-separated task runners to measure")
    ap.add_argument("--memory-size", type=int, default=64, help="memory run: output side in pixels")
    ap.add_argument("--memory-row-group", type=int, default=1000,
                    help="memory run: rows per parquet row group of the table (the ingest reads whole row groups)")
    ap.add_argument("--sample-interval", type=float, default=0.5, help="memory run: seconds between RSS samples")
    ap.add_argument("--repeat", type=int, default=1, help="(a)/(b): timed runs per configuration (median reported)")
    ap.add_argument("--cli", action="store_true",
                    help="(a) also time `t2i ingest` (Prefect flow, ~8 s of start-up) as a secondary figure")
    ap.add_argument("--no-img2dataset", action="store_true", help="(b) skip img2dataset (no venv, no install)")
    ap.add_argument("--img2dataset-spec", default="img2dataset", help="pip requirement installed in its venv")
    ap.add_argument("--seed", type=int, default=0, help="seed of the generated inputs")
    ap.add_argument("--gen-jobs", type=int, default=os.cpu_count() or 1, help="processes generating inputs")
    ap.add_argument("--cache-dir", type=Path, default=BENCH / ".cache", help="generated inputs and scratch output")
    ap.add_argument("--results-dir", type=Path, default=BENCH / "results", help="where the JSON report goes")
    ap.add_argument("--keep-output", action="store_true", help="keep the shards each run wrote (under cache-dir/work)")
    ap.add_argument("--run-timeout", type=float, default=3600, help="kill a single measured run after this many seconds")
    ap.add_argument("--python", default=sys.executable, help="the project's interpreter (runs the ingest children)")
    args = ap.parse_args(argv)
    args.i2d_threads = args.i2d_threads or args.concurrency
    args.sections = {s.strip() for s in args.only.split(",") if s.strip()}
    unknown = args.sections - {"a", "b", "memory"}
    if unknown:
        ap.error(f"--only: unknown section(s) {', '.join(sorted(unknown))} (a, b, memory)")
    runners = [r.strip() for r in args.memory_runner.split(",") if r.strip()]
    if not runners or set(runners) - {"threads", "processes"}:
        ap.error("--memory-runner: threads, processes or both (comma-separated)")
    args.memory_runners = runners
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    probe = subprocess.run([args.python, "-c", "import diffusion.data.ingest, psutil"], cwd=REPO, capture_output=True,
                           text=True, env=child_env(), check=False)
    if probe.returncode != 0:
        print(f"ingest_bench: {args.python} cannot import the project (run it with the project's venv, "
              f".venv/bin/python bench/ingest_bench.py):\n{probe.stderr[-1500:]}", file=sys.stderr)
        return 2
    started = _dt.datetime.now()
    cache: Path = args.cache_dir
    cache.mkdir(parents=True, exist_ok=True)
    work = cache / "work"
    res: dict = {"benchmark": "ingest", "version": 1, "started": started.isoformat(timespec="seconds"),
                 "machine": machine_info(),
                 "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                          if k not in ("sections",)}}
    res["args"]["sections"] = sorted(args.sections)
    failures = []
    t0 = time.perf_counter()
    if args.sections & {"a", "b"}:
        res["images"] = prepare_images(cache, args.images, args.seed, args.gen_jobs)
    if "a" in args.sections:
        try:
            res["local"] = bench_local(args, res["images"], work)
        except Exception as e:  # noqa: BLE001 - one failed section does not lose the others
            failures.append(f"(a) {e}")
            log(f"(a) FAILED: {e}")
    if "b" in args.sections:
        try:
            res["urls"] = bench_urls(args, res["images"], work)
            if "error" in res["urls"].get("img2dataset", {}):
                failures.append(f"(b) img2dataset unavailable: {res['urls']['img2dataset']['error']}")
            if not res["urls"]["complete"]:
                failures.append("(b) not every URL was downloaded by both tools")
        except Exception as e:  # noqa: BLE001
            failures.append(f"(b) {e}")
            log(f"(b) FAILED: {e}")
    if "memory" in args.sections:
        table = prepare_table(cache, args.memory_samples, args.seed, args.gen_jobs, args.memory_row_group)
        res["memory_table"] = table
        res["memory"] = []
        for runner in args.memory_runners:
            try:
                res["memory"].append(bench_memory(args, table, work, runner))
            except Exception as e:  # noqa: BLE001
                failures.append(f"(memory, {runner}) {e}")
                log(f"(memory, {runner}) FAILED: {e}")
    res["total_s"] = time.perf_counter() - t0
    res["loadavg_at_end"] = list(os.getloadavg())
    res["failures"] = failures
    lines = report_lines(res)
    lines += [f"FAILED: {f.splitlines()[0]}" for f in failures]
    res["report"] = lines
    args.results_dir.mkdir(parents=True, exist_ok=True)
    path = args.results_dir / f"ingest-{started:%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(res, indent=1, default=str) + "\n")
    print("\n".join(lines))
    print(f"(full results: {path}; total {res['total_s']:.0f} s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
