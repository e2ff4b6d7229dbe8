"""Memory and step time with and without ``train.grad_checkpointing``, on a ``train.size`` preset.

    .venv/bin/python bench/memory_bench.py                                     # CPU: small, 32 px, batch 16
    .venv/bin/python bench/memory_bench.py --batch 8 --steps 3 --warmup 1 --rounds 1   # a smoke run
    .venv/bin/python bench/memory_bench.py --device cuda --size-px 64 --batch 64 --out bench/results/memory-gpu.json

What is measured: params.yaml's train section with ``train.size`` (``--size``, default small: the
29.9M UNet and the 27.9M DiT) and ``train.denoiser`` each of ``--arch``, trained on synthetic data
(random images in [-1, 1] and a random caption table of the params.yaml text tower's widths, as
``bench/train_bench.py`` makes them) through the loop's own ``build_state`` and ``train_step``
(caption dropout, the loss under the loop's autocast: bf16 on CUDA, fp32 on the CPU, backward,
clipping, fused AdamW, the EMA), ``--warmup`` untimed steps, then ``--steps`` timed ones (each
synchronised; its median is the step time).

Every configuration (network x checkpointing off/on) runs in a process of its own, so each peak is
that configuration's alone: the peak the loop logs as ``peak_memory_mb``
(``diffusion.training.train.peak_memory_mb``), counted from just before the model is built. On the
CPU that is the process' peak resident set (Linux VmHWM), which includes torch itself and the
synthetic data, so the table also gives the resident set when counting began ("before") and the
rise over it ("training"), which is what the model, its optimizer and the step's activations
take. "kept" is what checkpointing cuts, alone: the activations autograd keeps for the backward pass
of one training forward (each storage once, the weights left out; one more forward and backward
after the timed steps and the peak). The peak falls by less, or not at all, where the model, its
EMA, gradients and AdamW's two moments (five copies of the weights) and not the activations make
it. On CUDA it is ``torch.cuda.max_memory_allocated`` (tensors; the allocator's cache not
included) and "before" is what was allocated then (nothing). The configurations run in turns,
``--rounds`` times (off, on, off, on, ...), and each figure is the median over the rounds: a slow
spell of a shared machine then hits both ways alike. The load average at the start and the end is
printed: on a busy machine step times are high, the memory figures are not affected.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from machine import cpu_name  # noqa: E402


def rss_mb() -> float:
    """This process' resident set now (Linux), in MiB; 0 where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def train_config(args, arch: str, checkpointing: bool):
    """params.yaml's train section for one configuration (the size preset applied by the parser)."""
    import dataclasses

    from diffusion.config import load_params

    p = load_params(ROOT / args.params, [f"train.size={args.size}", f"train.denoiser={arch}"])
    cfg = dataclasses.replace(p.train, batch_size=args.batch, grad_accum=1, nproc_per_node=1, nnodes=1,
                              compile=False, seed=args.seed, grad_checkpointing=checkpointing)
    return p, cfg


def timed_training(args, p, cfg) -> dict:
    """Build the training state of ``cfg`` on synthetic data and time ``args.warmup + args.steps``
    steps in this process (``bench/lora_bench.py`` shares it): the state, a batch and the text table
    for further reads, the step times after the warm-up, the memory in use before the state was
    built and the peak since (``train.peak_memory_mb``), and the last loss."""
    import torch

    from train_bench import make_batches, synthetic_table, text_dims

    from diffusion.training.distributed import Dist
    from diffusion.training.train import TextTable, build_state, peak_memory_mb, reset_peak_memory, train_step

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    text_dim, pooled_dim, layer = text_dims(p.embed)
    table = synthetic_table(256, args.tokens, text_dim, pooled_dim, args.seed, {"layer": layer, "model": p.embed.model})
    batches = make_batches(4, args.batch, args.size_px, 256, args.seed, pin=device.type == "cuda")
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated(device) / 2**20
    else:
        before = rss_mb()
    reset_peak_memory(device)
    state = build_state(cfg, table, args.size_px, None, device, Dist())
    state.model.train()
    text = TextTable.of(table, device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    times = []
    for i in range(args.warmup + args.steps):
        sync()
        t0 = time.perf_counter()
        loss, _ = train_step(state, [batches[i % len(batches)]], text, False)
        float(loss)  # waits for the step
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    sync()
    return {"state": state, "batch": batches[0], "text": text, "times": times, "before": before,
            "peak": peak_memory_mb(device), "loss": float(loss)}


def child(args) -> dict:
    """One configuration, in this process: time the steps and read the peak."""
    from diffusion.models.unet import count_params

    p, cfg = train_config(args, args.child_arch, args.child_checkpointing)
    run = timed_training(args, p, cfg)
    state, peak, before = run["state"], run["peak"], run["before"]
    kept = kept_for_backward_mb(state, run["batch"], run["text"])
    return {"arch": args.child_arch, "grad_checkpointing": args.child_checkpointing,
            "params_millions": round(count_params(state.model.net) / 1e6, 2),
            "step_ms": 1000 * statistics.median(run["times"]), "peak_mb": peak, "before_mb": before,
            "training_mb": peak - before, "kept_mb": kept, "loss": run["loss"]}


def kept_for_backward_mb(state, batch, text) -> float:
    """MiB of activations autograd keeps for the backward pass of one training forward (each storage
    once, the weights left out): what checkpointing cuts, whatever else the peak holds. Read after the
    timed steps and the peak, on one more forward and backward (its gradients are dropped)."""
    import torch

    from diffusion.training.train import micro_loss

    weights = {p.untyped_storage().data_ptr() for p in state.model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = micro_loss(state, batch, text, False)
    loss.backward()
    state.opt.zero_grad(set_to_none=True)
    return sum(seen.values()) / 2**20


def run_child(args, arch: str, checkpointing: bool) -> dict:
    cmd = [sys.executable, __file__, "--child-arch", arch, "--size", args.size, "--size-px", str(args.size_px),
           "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--device", args.device, "--threads", str(args.threads), "--tokens", str(args.tokens),
           "--seed", str(args.seed), "--params", args.params]
    if checkpointing:
        cmd.append("--child-checkpointing")
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"arch": arch, "grad_checkpointing": checkpointing, "error": tail}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="small", help="train.size preset (default: small)")
    ap.add_argument("--arch", default="unet,dit", help="train.denoiser values, comma-separated (default: unet,dit)")
    ap.add_argument("--size-px", type=int, default=32, help="image side in px (default: 32)")
    ap.add_argument("--batch", type=int, default=16, help="batch size (default: 16)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per configuration (default: 5)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps before them (default: 2)")
    ap.add_argument("--rounds", type=int, default=2, help="turns of every configuration (default: 2)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's default)")
    ap.add_argument("--tokens", type=int, default=16, help="caption token slots (default: 16)")
    ap.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="also write the JSON report here")
    ap.add_argument("--child-arch", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child_arch:
        print(json.dumps(child(args)))
        return 0
    if args.rounds < 1 or args.steps < 1:
        raise SystemExit("--rounds and --steps must be at least 1")
    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is available")
    arches = [a.strip() for a in args.arch.split(",") if a.strip()]
    load0 = os.getloadavg()[0]
    dev = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu (fp32)"
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores; torch {torch.__version__}; device {dev}; "
          f"load average at start {load0:.2f}")
    print(f"run: train.size {args.size}, {args.size_px} px, batch {args.batch}, {args.warmup} warmup + "
          f"{args.steps} timed steps, {args.rounds} round(s), each configuration in its own process", flush=True)

    rows: dict[tuple[str, bool], list[dict]] = {}
    t_start = time.perf_counter()
    for r in range(args.rounds):
        for arch in arches:
            for ckpt in (False, True):
                row = run_child(args, arch, ckpt)
                rows.setdefault((arch, ckpt), []).append(row)
                shown = row.get("error") or (f"{row['step_ms']:.0f} ms/step, peak {row['peak_mb']:.0f} MiB "
                                             f"(training {row['training_mb']:.0f}, activations kept "
                                             f"{row['kept_mb']:.0f})")
                print(f"  round {r + 1}: {arch:<10} checkpointing {'on ' if ckpt else 'off'}  {shown}", flush=True)
    load1 = os.getloadavg()[0]

    def med(runs: list[dict], key: str) -> float:
        return statistics.median(x[key] for x in runs)

    print()
    print(f"{'network':<10} {'params':>7} {'checkpointing':>13} {'ms/step':>8} {'peak MiB':>9} {'before':>7} "
          f"{'training MiB':>12} {'kept MiB':>8} {'vs off':>16}")
    table = []
    for arch in arches:
        off = [x for x in rows[(arch, False)] if "error" not in x]
        for ckpt in (False, True):
            runs = [x for x in rows[(arch, ckpt)] if "error" not in x]
            if not runs:
                print(f"{arch:<10} {'':>7} {'on' if ckpt else 'off':>13}  failed: {rows[(arch, ckpt)][0]['error']}")
                continue
            row = {"arch": arch, "grad_checkpointing": ckpt, "params_millions": runs[0]["params_millions"],
                   **{k: med(runs, k) for k in ("step_ms", "peak_mb", "before_mb", "training_mb", "kept_mb")},
                   "rounds": runs}
            vs = ""
            if ckpt and off:
                row["time_ratio"] = row["step_ms"] / med(off, "step_ms")
                row["training_memory_ratio"] = row["training_mb"] / med(off, "training_mb")
                vs = f"x{row['time_ratio']:.2f} t, x{row['training_memory_ratio']:.2f} mem"
            table.append(row)
            print(f"{arch:<10} {row['params_millions']:>6.1f}M {'on' if ckpt else 'off':>13} {row['step_ms']:>8.0f} "
                  f"{row['peak_mb']:>9.0f} {row['before_mb']:>7.0f} {row['training_mb']:>12.0f} {row['kept_mb']:>8.0f} "
                  f"{vs:>16}")
    print(f"\nload average at the end {load1:.2f} (start {load0:.2f}); {time.perf_counter() - t_start:.0f} s")
    if args.device == "cpu" and max(load0, load1) > (os.cpu_count() or 1) / 2:
        print(f"note: other work shares these {os.cpu_count()} cores: step times are high; memory is not affected")
    if args.out:
        machine = {"cpu": cpu_name(), "cores": os.cpu_count(), "device": dev, "torch": torch.__version__,
                   "load_average": [load0, load1]}
        settings = {k: v for k, v in vars(args).items() if not k.startswith("child")}
        Path(args.out).write_text(json.dumps({"machine": machine, "args": settings, "rows": table}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
