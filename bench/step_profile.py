"""Where one training step's time goes: a profile of the loop's own step for one or more configs.

    python bench/step_profile.py --device cuda --size 64 --batch 128 \\
        --variant unet=train.unet.patch=2 \\
        --variant unet-compiled=train.unet.patch=2,train.compile=true \\
        --variant dit-p4=train.denoiser=dit,train.dit.patch=4,train.dit.width=768,train.dit.heads=12,train.dit.depth=9 \\
        --profile

Each variant is the params file (default ``params/photos-256.yaml``, the ~110M networks) with
``-s``-style overrides (``train.KEY=VALUE``, comma-separated). It builds the model through the
loop's own ``build_state`` (which also sets the variant's TF32, channels_last and compile) and
times ``train_step`` (caption dropout, autocast, loss, backward, clipping, fused AdamW, schedule,
EMA) on synthetic batches (bench/train_bench.py's), then splits the step:

- ``fwd``: the loss alone under ``no_grad``; ``fwd+bwd``: the loss and its backward;
  ``step``: the whole ``train_step``. All in milliseconds, synchronised, median of the timed steps.
- GFLOP per image (forward + backward, torch's FLOP counter on the eager module), achieved
  TFLOP/s and, on CUDA, MFU against the dense bf16 peak (bench/train_bench.py's table).
- ``--profile``: torch.profiler over a few steps: the kernel time per step and how busy it keeps
  the device (kernel time / the timed step, and / the profiled wall; well below 1 means the host
  launching work, not the GPU, sets the pace; the profiler itself slows the host, so the first
  figure is the fairer one), the kernel time by kind
  (convolution, matmul, attention, norm, elementwise, optimizer/EMA, layout copies, compiled
  triton kernels) and the top kernels.

- ``--diffusers``: also diffusers' UNet2DConditionModel matched to the first variant's UNet, as
  bench/train_bench.py matches and trains it (eager); with ``--profile`` the kernels (operators on
  the CPU) of every variant are then listed side by side, ms and calls a step.

Prints one block per variant and a summary table; ``--out`` also writes it as JSON. The variants
run one after another, not in turns: for img/s against diffusers, bench/train_bench.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from machine import cpu_name  # noqa: E402
from train_bench import (DiffusersTrainer, LoopTrainer, count_flops, free, make_batches, match_diffusers,  # noqa: E402
                         meta_params, peak_tflops, sync, synthetic_table, text_dims)

from diffusion.models.unet import count_params  # noqa: E402

# kernel-name substrings -> kind, first match wins (cuDNN, cuBLAS(Lt), flash/efficient attention,
# ATen's norm, elementwise and foreach kernels, inductor's triton kernels)
KINDS = [("attention", ("sdpa", "flash", "fmha", "attention", "efficient", "attn")),
         ("conv", ("fprop", "dgrad", "wgrad", "conv", "implicit_gemm")),
         ("matmul", ("gemm", "nvjet", "cutlass", "sm90_xmma", "cublas", "splitk", "aten::mm", "aten::addmm",
                     "aten::bmm")),
         ("optimizer/ema", ("adam", "multi_tensor", "foreach", "lerp", "clip", "vector_norm")),
         ("norm", ("group_norm", "groupnorm", "layer_norm", "layernorm", "rowwisemoments", "computefused",
                   "computeinternalgradients", "gammabetabackward", "welford", "norm")),
         ("layout/copy", ("nchwtonhwc", "nhwctonchw", "copy", "transpose", "catarray", "cat_", "memcpy", "memset")),
         ("triton (compiled)", ("triton",)),
         ("elementwise/reduce", ("elementwise", "vectorized", "reduce", "unrolled", "index", "scatter", "gather"))]


COMPARED = 80  # kernels (operators on the CPU) kept per variant for the side-by-side table


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, keys in KINDS:
        if any(k in low for k in keys):
            return kind
    return "other"


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``NAME=k=v,k=v`` -> (name, params overrides)."""
    name, _, spec = text.partition("=")
    if not name:
        raise SystemExit(f"--variant {text!r}: expected NAME=KEY=VALUE,...")
    overrides = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        if "=" not in item:
            raise SystemExit(f"--variant {name}: {item!r} is not KEY=VALUE")
        overrides.append(item)
    return name, overrides


def timed(fn, device, n: int) -> float:
    """Median milliseconds of ``fn`` over ``n`` synchronised calls, after one untimed call (a
    compiled model compiles its no-grad graph on the first forward under ``no_grad``)."""
    fn()
    out = []
    for _ in range(n):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(out)


def profile_steps(trainer, batches: list, device, steps: int, top: int) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for i in range(steps):
            trainer.step(batches[i % len(batches)])
        sync(device)
        wall = time.perf_counter() - t0
    kernels: dict[str, float] = {}
    calls: dict[str, int] = {}
    if device.type == "cuda":
        for e in prof.events():
            # kernels only: record_function ranges (Optimizer.step#...) also show on the GPU timeline
            if e.device_type == torch.autograd.DeviceType.CUDA and not getattr(e, "is_user_annotation", False):
                kernels[e.name] = kernels.get(e.name, 0.0) + e.device_time / 1e3  # ms
                calls[e.name] = calls.get(e.name, 0) + 1
    else:  # the CPU: self time of the operators
        for e in prof.key_averages():
            kernels[e.key] = e.self_cpu_time_total / 1e3
            calls[e.key] = e.count
    busy = sum(kernels.values())
    by_kind: dict[str, float] = {}
    for name, ms in kernels.items():
        by_kind[kind_of(name)] = by_kind.get(kind_of(name), 0.0) + ms
    return {"steps": steps, "wall_ms_per_step": 1e3 * wall / steps, "kernel_ms_per_step": busy / steps,
            "busy_fraction": busy / (1e3 * wall) if wall else None,
            "by_kind_ms_per_step": {k: v / steps for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
            "top": [{"name": n[:140], "kind": kind_of(n), "ms_per_step": ms / steps}
                    for n, ms in sorted(kernels.items(), key=lambda kv: -kv[1])[:top]],
            "kernels": {n[:140]: {"ms_per_step": ms / steps, "calls_per_step": calls[n] / steps}
                        for n, ms in sorted(kernels.items(), key=lambda kv: -kv[1])[:COMPARED]}}


def diffusers_trainer(cfg, text_dim: int, pooled_dim: int, table, device):
    """diffusers' UNet2DConditionModel matched to ``cfg.unet`` as bench/train_bench.py matches it
    (parameters within 10%, the same levels, blocks, attention resolutions and 2x2 fold), trained
    the way that benchmark trains it (``DiffusersTrainer``: the loop's optimizer settings, clipping
    and EMA), eager."""
    from diffusion.models.unet import UNet
    from diffusion.training.train import adamw_kwargs

    u = cfg.unet
    ours = meta_params(lambda: UNet(u, text_dim=text_dim, pooled_dim=pooled_dim, in_channels=3))
    m = match_diffusers(u, ours, text_dim, pooled_dim, 3 * u.patch**2, device.type == "cuda")
    tr = DiffusersTrainer(m, u.patch, cfg, table, device, adamw_kwargs(cfg, device),
                          device.type == "cuda" and cfg.channels_last, False)
    return tr, {"matched_to_params": ours, "base": m["base"], "heads": m["heads"], "ratio": m["ratio"]}


def run_variant(name: str, overrides: list[str], args, device, peak, diffusers: bool = False) -> dict:
    """Time (and with --profile, profile) one variant: ours through the loop's own pieces or, with
    ``diffusers``, the diffusers UNet matched to the variant's UNet."""
    import torch

    from diffusion.config import load_params
    from diffusion.training.train import micro_loss

    p = load_params(ROOT / args.params, overrides)
    cfg = dataclasses.replace(p.train, batch_size=args.batch, grad_accum=1, nproc_per_node=1, nnodes=1,
                              seed=args.seed)
    text_dim, pooled_dim, layer = text_dims(p.embed)  # the layer decides train.unseen_words, as in the loop
    table = synthetic_table(1024, args.tokens, text_dim, pooled_dim, args.seed, {"layer": layer, "synthetic": True})
    batches = make_batches(4, args.batch, args.size, 1024, args.seed, pin=device.type == "cuda")
    t0 = time.perf_counter()
    if diffusers:
        if cfg.denoiser != "unet":
            raise SystemExit("--diffusers: the first variant must be a UNet (train.denoiser: unet)")
        tr, match = diffusers_trainer(cfg, text_dim, pooled_dim, table, device)
        row = {"variant": name, "overrides": overrides, "denoiser": "diffusers-unet", "params": count_params(tr.net),
               "size": args.size, "batch": args.batch, "compiled": False, "net": match}

        def loss(batch):
            return tr.loss(batch, tr.forward)
    else:
        tr = LoopTrainer(cfg, table, args.size, device)
        row = {"variant": name, "overrides": overrides, "denoiser": cfg.denoiser,
               "params": count_params(tr.net), "size": args.size, "batch": args.batch, "compiled": cfg.compile,
               "net": dataclasses.asdict(cfg.dit if cfg.denoiser == "dit" else cfg.unet)}

        def loss(batch):
            return micro_loss(tr.state, batch, tr.text, False)
    by_op: dict[str, int] = {}
    flops = count_flops(tr, batches[0], by_op)
    row["gflop_per_img"] = flops / args.batch / 1e9
    row["gflop_per_img_by_kind"] = kinds = {}
    for op, n in by_op.items():  # mm/addmm: the linear layers; bmm: attention (counted through the math backend)
        kind = "conv" if op.startswith("convolution") else "attention" if "bmm" in op else "matmul" if "mm" in op else op
        kinds[kind] = kinds.get(kind, 0.0) + n / args.batch / 1e9
    for i in range(args.warmup):  # compile, cuDNN autotuning, allocator warm-up
        tr.step(batches[i % len(batches)])
    sync(device)
    row["setup_s"] = time.perf_counter() - t0
    it = itertools.count()

    def step():
        tr.step(batches[next(it) % len(batches)])

    def fwd():
        with torch.no_grad():
            loss(batches[next(it) % len(batches)])

    def fwd_bwd():
        loss(batches[next(it) % len(batches)]).backward()
        tr.opt.zero_grad(set_to_none=True)

    row["step_ms"] = timed(step, device, args.steps)
    row["fwd_ms"] = timed(fwd, device, args.steps)
    row["fwd_bwd_ms"] = timed(fwd_bwd, device, args.steps)
    # back-to-back steps without a sync between them (what training does): the throughput figure
    sync(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    row["img_per_s"] = args.batch * args.steps / (time.perf_counter() - t0)
    row["tflop_per_s"] = flops * row["img_per_s"] / args.batch / 1e12
    if peak:
        row["mfu"] = row["tflop_per_s"] / peak
    if device.type == "cuda":
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if args.profile:
        row["profile"] = prof = profile_steps(tr, batches, device, args.profile_steps, args.top)
        # the profiler slows the host; kernel time over the unprofiled step is the fairer busy figure
        prof["busy_of_timed_step"] = prof["kernel_ms_per_step"] / row["step_ms"]
    return row


def print_row(r: dict) -> None:
    mfu = f", MFU {100 * r['mfu']:.1f}%" if r.get("mfu") is not None else ""
    print(f"\n== {r['variant']}: {r['denoiser']} {r['params'] / 1e6:.2f}M params{' (compiled)' if r['compiled'] else ''}, "
          f"{r['size']}px, batch {r['batch']}, overrides {r['overrides']}")
    print(f"   {r['img_per_s']:.1f} img/s, {r['gflop_per_img']:.3g} GFLOP/img, {r['tflop_per_s']:.3g} TFLOP/s{mfu}; "
          f"ms: fwd {r['fwd_ms']:.1f}, fwd+bwd {r['fwd_bwd_ms']:.1f}, step {r['step_ms']:.1f} "
          f"(setup {r['setup_s']:.0f} s" + (f", peak {r['peak_mem_gib']:.1f} GiB)" if "peak_mem_gib" in r else ")"))
    if r.get("gflop_per_img_by_kind"):
        print("   GFLOP/img by kind: " + ", ".join(f"{k} {v:.3g}" for k, v in r["gflop_per_img_by_kind"].items()))
    prof = r.get("profile")
    if prof:
        print(f"   profile over {prof['steps']} steps: wall {prof['wall_ms_per_step']:.1f} ms/step, kernels "
              f"{prof['kernel_ms_per_step']:.1f} ms/step: busy {100 * (prof['busy_fraction'] or 0):.0f}% of the profiled "
              f"wall, {100 * prof['busy_of_timed_step']:.0f}% of the timed step")
        print("   by kind (ms/step): " + ", ".join(f"{k} {v:.1f}" for k, v in prof["by_kind_ms_per_step"].items()))
        for k in prof["top"]:
            print(f"     {k['ms_per_step']:7.2f} ms  {k['kind']:18s} {k['name']}")


def print_compared(rows: list[dict], top: int) -> None:
    """Kernels (operators on the CPU) side by side across the profiled variants: ms and calls a step,
    the ``top`` costliest in any of them. Where two networks run the same operators, this shows
    whether one runs them faster or only runs fewer of them."""
    if len(rows) < 2:
        return
    names = {n for r in rows for n in r["profile"]["kernels"]}
    worst = sorted(names, key=lambda n: -max(r["profile"]["kernels"].get(n, {}).get("ms_per_step", 0.0) for r in rows))
    width = max(12, *(len(r["variant"]) for r in rows))
    print(f"\nper kernel, ms a step (calls a step), the {top} costliest in any variant:")
    print(f"{'kernel':56s} " + " ".join(f"{r['variant'][:width]:>{width + 8}s}" for r in rows))
    for n in worst[:top]:
        cells = []
        for r in rows:
            k = r["profile"]["kernels"].get(n)
            cells.append(f"{k['ms_per_step']:{width}.2f} ({k['calls_per_step']:5.0f})" if k else f"{'-':>{width + 8}s}")
        print(f"{n[:56]:56s} " + " ".join(cells))
    tot = [r["profile"]["kernel_ms_per_step"] for r in rows]
    print(f"{'all kernels':56s} " + " ".join(f"{t:{width}.2f}{'':8s}" for t in tot))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", action="append", required=True, help="NAME=train.KEY=VALUE,... (repeatable)")
    ap.add_argument("--params", default="params/photos-256.yaml", help="the params file the variants change")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=16, help="caption token slots (bench/train_bench.py's default)")
    ap.add_argument("--steps", type=int, default=10, help="timed calls of each kind (default: 10)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--profile", action="store_true", help="torch.profiler: busy fraction, time by kind, top kernels")
    ap.add_argument("--profile-steps", type=int, default=3)
    ap.add_argument("--top", type=int, default=15, help="kernels listed per variant (default: 15)")
    ap.add_argument("--diffusers", action="store_true",
                    help="also the diffusers UNet matched to the first variant's UNet (bench/train_bench.py's match), eager")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="also write the rows as JSON")
    args = ap.parse_args()

    import torch

    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    peak, dev_name = peak_tflops(device, None)
    print(f"machine: {cpu_name()}; torch {torch.__version__}; device {dev_name}"
          + (f" (dense bf16 peak {peak:g} TFLOP/s)" if peak else ""), flush=True)
    rows, out = [], Path(args.out) if args.out else None
    runs = [(*parse_variant(text), False) for text in args.variant]
    if args.diffusers:
        runs.append(("diffusers-unet", runs[0][1], True))
    for name, overrides, diffusers in runs:
        try:
            row = run_variant(name, overrides, args, device, peak, diffusers)
        except Exception as e:  # one variant failing (out of memory, a compile error) leaves the others
            print(f"\n== {name}: FAILED: {type(e).__name__}: {str(e)[:400]}", flush=True)
            row = {"variant": name, "overrides": overrides, "error": f"{type(e).__name__}: {str(e)[:400]}"}
        else:
            print_row(row)
            sys.stdout.flush()
        free(device)  # the variant's model, optimizer and compiled graphs are gone once run_variant returns
        rows.append(row)
        if out:  # after every variant: what ran survives a later crash or time limit
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"device": dev_name, "cpu": cpu_name(), "torch": torch.__version__,
                                       "rows": rows}, indent=2) + "\n")
    print(f"\n{'variant':24s} {'params':>8s} {'GFLOP/img':>9s} {'img/s':>8s} {'TFLOP/s':>8s} {'MFU':>6s} "
          f"{'fwd':>7s} {'fwd+bwd':>8s} {'step':>7s} {'busy':>5s}")
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:24s} failed: {r['error'][:80]}")
            continue
        busy = r.get("profile", {}).get("busy_of_timed_step")
        mfu = f"{100 * r['mfu']:5.1f}%" if r.get("mfu") is not None else "     -"
        print(f"{r['variant']:24s} {r['params'] / 1e6:7.1f}M {r['gflop_per_img']:9.3g} {r['img_per_s']:8.1f} "
              f"{r['tflop_per_s']:8.3g} {mfu} "
              f"{r['fwd_ms']:7.1f} {r['fwd_bwd_ms']:8.1f} {r['step_ms']:7.1f} "
              + (f"{100 * busy:4.0f}%" if busy is not None else "    -"))
    print_compared([r for r in rows if "profile" in r], args.top)
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
