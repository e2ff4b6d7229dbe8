"""Batch generation on Dask workers: the same batch on one worker, then on two (or more), and in this
process alone, with img/s, the speed-up over one worker, and whether every run wrote the same bytes.

    .venv/bin/python bench/batch_scaling_bench.py --model data/model                   # CPU: 1 and 2 workers
    .venv/bin/python bench/batch_scaling_bench.py --model data/model --workers 1,2,4,8 --device cuda  # GPUs

Each worker count gets a fresh ``distributed.LocalCluster`` of single-threaded worker processes (on
the CPU: one torch thread each, the Dask nanny's ``OMP_NUM_THREADS=1``; with ``--device cuda``:
one GPU each, ``cuda:<worker name mod GPU count>``). Every worker loads the model before the clock
starts, and draws one chunk (first calls set up the CPU kernels), so the figure is the steady state of ``generate_batch`` with chunks
submitted to the workers (``render_on_worker``, ``2 x workers`` in flight) and committed in order
by this process, as the ``batch-generation`` flow does without Prefect's per-task bookkeeping.
``local`` is the same batch drawn in this process with one torch thread (``batch.task_runner:
local`` pinned as a worker is). All runs draw the same prompts and seeds; the images must match
byte for byte (sha256 in the manifests).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from machine import cpu_name  # noqa: E402


def _on_workers(n: int, gen, ref, rows, out: Path, batch_size: int) -> dict:
    """The batch on a fresh LocalCluster of ``n`` workers, each holding the model before the clock starts;
    ``gen`` (the model on this process's CPU) only names the model in the batch folder, as in the flow."""
    from distributed import Client, LocalCluster

    size = gen.meta["image_size"]

    from diffusion.pipeline.batch import generate_batch
    from diffusion.pipeline.batch_workers import render_on_worker

    with LocalCluster(n_workers=n, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster, Client(cluster) as client:
        t0 = time.perf_counter()
        for address in client.scheduler_info()["workers"]:  # every worker loads the model and draws one chunk
            client.submit(render_on_worker, ref, rows[:batch_size], size, workers=[address], pure=False).result()
        load = time.perf_counter() - t0
        threads = sorted(client.run(lambda: __import__("torch").get_num_threads()).values())
        summary = generate_batch(gen, rows, out, batch_size=batch_size,
                                 progress=False, log=lambda *_: None, window=2 * n,
                                 submit=lambda chunk: client.submit(render_on_worker, ref, chunk, size, pure=False))
    return {"workers": n, "worker_torch_threads": threads, "load_and_warm_up_s": round(load, 2), **_figures(summary)}


def _figures(summary: dict) -> dict:
    import pandas as pd

    return {"seconds": summary["seconds"], "images_per_s": summary["images_per_s"],
            "sha256": list(pd.read_parquet(summary["manifest"])["sha256"])}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model URI or folder (default: params batch.model_uri)")
    ap.add_argument("--images", type=int, default=128, help="images per run (default: 128)")
    ap.add_argument("--batch-size", type=int, default=16, help="images per chunk (default: 16)")
    ap.add_argument("--workers", default="1,2", help="worker counts, comma-separated (default: 1,2)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | auto (default: cpu)")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--no-local", action="store_true", help="skip the in-process run")
    ap.add_argument("--out", default=None, help="write the JSON report here too")
    args = ap.parse_args()

    import mlflow
    import torch

    from diffusion import threads
    from diffusion.config import load_params
    from diffusion.data.shapes import eval_prompts
    from diffusion.pipeline.batch import generate_batch, load_generator, plan_rows, read_prompts, render_chunk
    from diffusion.pipeline.batch_workers import model_ref
    from diffusion.registry import tracking

    p = load_params(args.params)
    model = args.model or p.batch.model_uri
    mlflow.set_tracking_uri(tracking.tracking_uri(p.mlflow))
    tmp = Path(tempfile.mkdtemp(prefix="t2i-batch-scaling-"))
    combos = eval_prompts(p.dataset, 1)
    (tmp / "prompts.txt").write_text("\n".join(combos[i % len(combos)]["prompt"] for i in range(args.images)) + "\n")
    load1 = os.getloadavg()[0]

    gen = load_generator(model, device="cpu", params=p)
    rows = plan_rows(gen, read_prompts(tmp / "prompts.txt"), p.batch.seed)
    ref = model_ref(gen, args.device, p, tracking.tracking_uri(p.mlflow) if gen.source.startswith("models:/") else None)
    runs = []
    if not args.no_local:
        os.environ.setdefault("T2I_THREADS", "1")
        threads.apply()
        render_chunk(gen, rows[:args.batch_size], gen.meta["image_size"])  # warm up, as the workers do
        local = generate_batch(gen, rows, tmp / "local", batch_size=args.batch_size, progress=False,
                               log=lambda *_: None)
        runs.append({"workers": "local", "worker_torch_threads": [torch.get_num_threads()], **_figures(local)})
    for n in [int(x) for x in args.workers.split(",")]:
        runs.append(_on_workers(n, gen, ref, rows, tmp / f"workers-{n}", args.batch_size))
    return _report(args, gen, runs, load1)


def _report(args, gen, runs: list[dict], load1: float) -> int:
    import torch

    one = next((r for r in runs if r["workers"] == 1), runs[0])
    same = all(r["sha256"] == runs[0]["sha256"] for r in runs)
    for r in runs:
        r["speedup_over_1_worker"] = round(r["images_per_s"] / one["images_per_s"], 3)
        del r["sha256"]
    report = {"cpu": cpu_name(), "cores": os.cpu_count(), "gpus": torch.cuda.device_count(),
              "load_average_at_start": round(load1, 2), "load_average_at_end": round(os.getloadavg()[0], 2),
              "model": gen.source, "image_size": gen.meta["image_size"],
              "sampler": f"{gen.settings.sampler} {gen.settings.steps} steps, guidance {gen.settings.guidance_scale}",
              "images": args.images, "batch_size": args.batch_size, "device": args.device,
              "runs": runs, "identical_images": same}
    print(json.dumps(report, indent=2))
    print("\n" + " | ".join(f"{r['workers']}{'' if r['workers'] == 'local' else ' worker(s)'}: "
                            f"{r['images_per_s']:.2f} img/s (x{r['speedup_over_1_worker']:.2f})" for r in runs)
          + f" | identical images: {same} | {report['cpu']}, load {load1:.2f} -> {report['load_average_at_end']:.2f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
