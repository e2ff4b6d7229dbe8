"""Sampling speed and quality per sampler and step count, on a trained model, on this machine.

    .venv/bin/python bench/sample_bench.py                       # data/model, data/judge, data/shards
    .venv/bin/python bench/sample_bench.py --points ddim:20,dpmpp_2m:10:karras,ddpm:1000 --per-combo 2

Each point is ``sampler:steps[:spacing][:key=value...]`` with keys ``g`` (guidance scale), ``gi``
(guidance interval ``lo-hi`` in sigma), ``clip`` (0/1, clamp x0) and ``eta``; the default list is
the quality-vs-cost sweep of params.yaml (``sweep`` section) plus DDIM-20 uniform (the shipped
default). Every point draws the same prompts (one per attribute combination of the built-in set,
``--per-combo`` times) with the same seeds, one after the other in this process; reported per point:
images/s and seconds per image of the sampling loop (text encoding excluded), network evaluations
per image, all-correct adherence (judge), FD-judge against real validation images, and background
speckle/grain (diffusion.evaluation.evaluate.fidelity). The CPU model, torch threads and the load average at
the start are printed with the table: compare points within one run, not across machines.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from machine import cpu_name  # noqa: E402


def parse_point(text: str, base):
    """``sampler:steps[:spacing][:key=value]...`` -> a SampleConfig derived from ``base``."""
    parts = text.split(":")
    cfg = replace(base, sampler=parts[0], steps=int(parts[1]), eta=None,
                  spacing="uniform" if parts[0] == "ddpm" else base.spacing)
    for extra in parts[2:]:
        key, _, value = extra.partition("=")
        if not value:
            cfg = replace(cfg, spacing=key)
        elif key == "g":
            cfg = replace(cfg, guidance_scale=float(value))
        elif key == "gi":
            lo, hi = value.split("-")
            cfg = replace(cfg, guidance_interval=[float(lo), float(hi)])
        elif key == "clip":
            cfg = replace(cfg, clip_denoised=bool(int(value)))
        elif key == "eta":
            cfg = replace(cfg, eta=float(value))
        else:
            raise SystemExit(f"unknown point option {key!r} in {text!r}")
    return cfg


def label(cfg) -> str:
    extra = "" if cfg.guidance_interval is None else f" gi={cfg.guidance_interval[0]:g}-{cfg.guidance_interval[1]:g}"
    extra += "" if cfg.clip_denoised else " noclip"
    extra += "" if cfg.eta is None else f" eta={cfg.eta:g}"
    return f"{cfg.sampler}-{cfg.steps} {cfg.spacing} g={cfg.guidance_scale:g}{extra}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="data/model")
    ap.add_argument("--judge", default="data/judge")
    ap.add_argument("--shards", default="data/shards")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--points", help="comma-separated points (default: the sweep section + ddim:20:uniform)")
    ap.add_argument("--per-combo", type=int, default=1, help="images per attribute combination (default: 1)")
    ap.add_argument("--out", help="also write the JSON report here")
    args = ap.parse_args()

    import torch

    from diffusion.data.shards import val_images
    from diffusion.models import store
    from diffusion.config import load_params
    from diffusion.sampling.generate import check_fingerprint
    from diffusion.evaluation.judge import load_judge
    from diffusion.data.shapes import eval_prompts
    from diffusion.evaluation.sweep import run_points, sweep_settings
    from diffusion.data.text import load_text_encoder

    p = load_params(args.params)
    if args.points:
        points = [parse_point(t.strip(), p.sample) for t in args.points.split(",") if t.strip()]
    else:
        points = [replace(p.sample, sampler="ddim", steps=20, spacing="uniform", eta=None)]
        points += sweep_settings(p.sweep, p.sample)[0]
    denoiser, meta = store.load_model(args.model, "cpu")
    e = p.embed
    encoder = load_text_encoder(e.model, e.pretrained, e.seed, e.layer, "cpu")
    check_fingerprint(encoder, meta)
    judge, info = load_judge(args.judge)
    rows = eval_prompts(p.dataset, args.per_combo)
    real = val_images(args.shards, p.evaluate.real_images)
    load = os.getloadavg()[0]
    header = (f"CPU: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} "
              f"threads, load average {load:.2f} at the start; {len(rows)} images per point, batch "
              f"{p.sample.batch_size}")
    print(header, flush=True)
    if load > (os.cpu_count() or 1) / 2:
        print("warning: the machine is busy; timings will be low and noisy", flush=True)
    t0 = time.perf_counter()
    records = run_points(points, denoiser, encoder, meta["image_size"], rows, list(range(len(rows))), judge, info,
                         real, progress=False, log=lambda r: print(f"  {r['sampler']}-{r['steps']} done", flush=True))
    print(f"\n{header}\n")
    print("| point | evals/img | img/s | s/img | all-correct | held-out | FD-judge | speckle | grain |")
    print("|---|---|---|---|---|---|---|---|---|")
    for cfg, r in zip(points, records):
        r["point"] = label(cfg)
        print(f"| {r['point']} | {r['evals']} | {1 / r['seconds_per_image']:.1f} | {r['seconds_per_image']:.4f} | "
              f"{r['all']:.1%} | {r['held_out']:.1%} | {r['fd_judge']:.3g} | {r['speckle']:.2%} | {r['grain']:.2f} |")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"header": header, "points": records}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
