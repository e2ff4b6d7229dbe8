"""Batch generation throughput: the library call alone, side by side with the same batch through
``t2i generate`` (the batch-generation Prefect flow, what the nightly deployment runs).

    .venv/bin/python bench/batch_bench.py                      # the @champion of ./mlflow.db, 512 images
    .venv/bin/python bench/batch_bench.py --model data/model --images 256

Both runs draw the same prompts and seeds with the model's registered sampler settings, into fresh
batch folders under a temporary directory, one after the other on this machine. Reported:

- library: ``load_generator`` + ``generate_batch`` in this process; images/s of the generation loop;
- flow: ``t2i generate`` as a subprocess; its wall time, the generation loop's images/s as the flow
  reports it, and the fixed start-up (wall time minus the loop: interpreter, imports, Prefect's
  API, model download and load, contact sheet);
- overhead beyond the fixed start-up: how much slower the flow's generation loop is than the
  library's, per image.

It also checks that both runs wrote byte-identical images (same sha256 in both manifests).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from machine import cpu_name  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model URI or folder (default: params batch.model_uri)")
    ap.add_argument("--images", type=int, default=512, help="images per run (default: 512)")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default=None, help="write the JSON report here too")
    args = ap.parse_args()

    import pandas as pd
    import torch

    from diffusion.registry import tracking
    from diffusion.pipeline.batch import batch_dir, generate_batch, load_generator, plan_rows, read_prompts
    from diffusion.config import load_params
    from diffusion.data.shapes import eval_prompts

    p = load_params(args.params)
    model = args.model or p.batch.model_uri
    import mlflow

    mlflow.set_tracking_uri(tracking.tracking_uri(p.mlflow))
    tmp = Path(tempfile.mkdtemp(prefix="t2i-batch-bench-"))
    combos = eval_prompts(p.dataset, 1)
    prompts = [combos[i % len(combos)]["prompt"] for i in range(args.images)]
    (tmp / "prompts.txt").write_text("\n".join(prompts) + "\n")
    load1 = os.getloadavg()[0]

    # 1) the library call alone
    t0 = time.perf_counter()
    gen = load_generator(model, device=p.batch.device, params=p)
    t_load = time.perf_counter() - t0
    rows = plan_rows(gen, read_prompts(tmp / "prompts.txt"), p.batch.seed)
    lib = generate_batch(gen, rows, batch_dir(tmp / "lib", "bench", "2000-01-01"), batch_size=p.batch.batch_size,
                         contact_sheet_size=p.batch.contact_sheet_size, progress=False, log=lambda *_: None)

    # 2) the same batch through the flow (t2i generate)
    env = dict(os.environ, DO_NOT_TRACK="1", PREFECT_SERVER_ANALYTICS_ENABLED="false")
    cmd = [str(Path(sys.executable).parent / "t2i"), "generate", "--prompts", str(tmp / "prompts.txt"),
           "--model", model, "--output-dir", str(tmp / "flow"), "--run-name", "bench", "--date", "2000-01-01",
           "--params", args.params]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        print(r.stderr[-3000:], file=sys.stderr)
        return 1
    flow = json.loads(r.stdout[r.stdout.index("{"):])
    same = list(pd.read_parquet(lib["manifest"])["sha256"]) == list(pd.read_parquet(flow["manifest"])["sha256"])

    report = {
        "cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "load_average_at_start": round(load1, 2), "model": model,
        "model_version": gen.version, "image_size": gen.meta["image_size"], "params": gen.meta.get("params"),
        "sampler": f"{gen.settings.sampler} {gen.settings.steps} steps, guidance {gen.settings.guidance_scale}",
        "images": args.images, "batch_size": p.batch.batch_size,
        "library": {"load_s": round(t_load, 2), "generate_s": lib["seconds"], "images_per_s": lib["images_per_s"]},
        "flow": {"wall_s": round(wall, 2), "generate_s": flow["seconds"], "images_per_s": flow["images_per_s"],
                 "fixed_startup_s": round(wall - flow["seconds"], 2),
                 "wall_images_per_s": round(args.images / wall, 2)},
        "overhead_beyond_startup": round(flow["seconds"] / lib["seconds"] - 1, 4),
        "identical_images": same,
    }
    print(json.dumps(report, indent=2))
    print(f"\nlibrary {lib['images_per_s']:.1f} img/s | flow {flow['images_per_s']:.1f} img/s in its loop, "
          f"{args.images / wall:.1f} img/s over {wall:.1f} s wall ({wall - flow['seconds']:.1f} s fixed start-up) | "
          f"overhead beyond start-up {report['overhead_beyond_startup']:+.1%} | identical images: {same} | "
          f"{report['cpu']}, load {load1:.2f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
