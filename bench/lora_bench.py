"""LoRA against full fine-tuning on the same network: trainable parameters, step time, peak memory.

    .venv/bin/python bench/lora_bench.py                                       # CPU: small UNet, 32 px, batch 16
    .venv/bin/python bench/lora_bench.py --batch 8 --steps 3 --warmup 1 --rounds 1    # a smoke run
    .venv/bin/python bench/lora_bench.py --device cuda --size-px 64 --batch 64 --arch unet,dit --out bench/results/lora-gpu.json

What is measured: params.yaml's train section with ``train.size`` (``--size``, default small: the
29.9M UNet) and ``train.denoiser`` each of ``--arch``, trained on synthetic data (random images in
[-1, 1] and a random caption table of the params.yaml text tower's widths, as ``bench/train_bench.py``
makes them) through the loop's own ``build_state`` and ``train_step`` (caption dropout, the loss under
the loop's autocast: bf16 on CUDA, fp32 on the CPU, backward, clipping, fused AdamW, the EMA), in two
ways: every weight trains (``train.lora.rank 0``), or LoRA of ``--rank`` on the default targets
(``diffusion.models.lora.DEFAULT_TARGETS``: the attention projections; the base frozen, the optimizer
and the EMA over the adapter alone). ``--warmup`` untimed steps, then ``--steps`` timed ones (each
synchronised; its median is the step time). The network starts from the seed: what is timed is the
same whatever the base's weights.

Trainable parameters: the tensors the optimizer holds (``requires_grad``), and the checkpoint's size
on disk (``diffusion.training.train.save_checkpoint``: the adapter and its optimizer state under LoRA).

Every configuration runs in a process of its own, so each peak is its own: the peak the loop logs as
``peak_memory_mb`` (``diffusion.training.train.peak_memory_mb``), counted from just before the model
is built. On the CPU that is the process' peak resident set (Linux VmHWM), which includes torch
itself and the synthetic data, so the table also gives the rise over the resident set when counting
began ("training"): the model, its optimizer state and the step's activations. On CUDA it is
``torch.cuda.max_memory_allocated``. The configurations run in turns, ``--rounds`` times (full, lora,
full, lora, ...), and each figure is the median over the rounds: a slow spell of a shared machine then
hits both ways alike. The load average at the start and the end is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from machine import cpu_name  # noqa: E402


def train_config(args, arch: str, rank: int):
    """params.yaml's train section for one configuration (the size preset applied by the parser)."""
    import dataclasses

    from diffusion.config import LoRAConfig, load_params

    p = load_params(ROOT / args.params, [f"train.size={args.size}", f"train.denoiser={arch}"])
    cfg = dataclasses.replace(p.train, batch_size=args.batch, grad_accum=1, nproc_per_node=1, nnodes=1,
                              compile=False, seed=args.seed, lora=LoRAConfig(rank=rank))
    return p, cfg


def child(args) -> dict:
    """One configuration, in this process: time the steps, read the peak, write one checkpoint."""
    from memory_bench import timed_training

    from diffusion.models.unet import count_params
    from diffusion.training.train import save_checkpoint

    p, cfg = train_config(args, args.child_arch, args.child_rank)
    run = timed_training(args, p, cfg)
    state, peak, before = run["state"], run["peak"], run["before"]
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(state, Path(tmp))
        ckpt_mb = sum(f.stat().st_size for f in Path(tmp).iterdir()) / 2**20
    trainable = sum(p.numel() for p in state.model.parameters() if p.requires_grad)
    return {"arch": args.child_arch, "rank": args.child_rank, "params_millions": count_params(state.model.net) / 1e6,
            "trainable_millions": trainable / 1e6, "step_ms": 1000 * statistics.median(run["times"]), "peak_mb": peak,
            "before_mb": before, "training_mb": peak - before, "checkpoint_mb": ckpt_mb, "loss": run["loss"]}


def run_child(args, arch: str, rank: int) -> dict:
    cmd = [sys.executable, __file__, "--child-arch", arch, "--child-rank", str(rank), "--size", args.size,
           "--size-px", str(args.size_px), "--batch", str(args.batch), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--device", args.device, "--threads", str(args.threads),
           "--tokens", str(args.tokens), "--seed", str(args.seed), "--params", args.params]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"arch": arch, "rank": rank, "error": tail}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="small", help="train.size preset (default: small)")
    ap.add_argument("--arch", default="unet", help="train.denoiser values, comma-separated (default: unet)")
    ap.add_argument("--rank", type=int, default=8, help="train.lora.rank of the LoRA runs (default: 8)")
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
    ap.add_argument("--child-rank", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child_arch:
        print(json.dumps(child(args)))
        return 0
    if args.rounds < 1 or args.steps < 1 or args.rank < 1:
        raise SystemExit("--rounds, --steps and --rank must be at least 1")
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
    print(f"run: train.size {args.size}, {args.size_px} px, batch {args.batch}, LoRA rank {args.rank} on the "
          f"attention projections, {args.warmup} warmup + {args.steps} timed steps, {args.rounds} round(s), "
          "each configuration in its own process", flush=True)

    ranks = (0, args.rank)
    rows: dict[tuple[str, int], list[dict]] = {}
    t_start = time.perf_counter()
    for r in range(args.rounds):
        for arch in arches:
            for rank in ranks:
                row = run_child(args, arch, rank)
                rows.setdefault((arch, rank), []).append(row)
                shown = row.get("error") or (f"{row['step_ms']:.0f} ms/step, peak {row['peak_mb']:.0f} MiB "
                                             f"(training {row['training_mb']:.0f})")
                print(f"  round {r + 1}: {arch:<8} {'lora r' + str(rank) if rank else 'full':<8} {shown}", flush=True)
    load1 = os.getloadavg()[0]

    def med(runs: list[dict], key: str) -> float:
        return statistics.median(x[key] for x in runs)

    print()
    print(f"{'network':<8} {'training':<8} {'params':>7} {'trainable':>10} {'ckpt MiB':>8} {'ms/step':>8} "
          f"{'peak MiB':>9} {'training MiB':>12} {'vs full':>22}")
    table = []
    for arch in arches:
        full = [x for x in rows[(arch, 0)] if "error" not in x]
        for rank in ranks:
            name = f"lora r{rank}" if rank else "full"
            runs = [x for x in rows[(arch, rank)] if "error" not in x]
            if not runs:
                print(f"{arch:<8} {name:<8} failed: {rows[(arch, rank)][0]['error']}")
                continue
            row = {"arch": arch, "rank": rank, **{k: runs[0][k] for k in ("params_millions", "trainable_millions",
                                                                          "checkpoint_mb")},
                   **{k: med(runs, k) for k in ("step_ms", "peak_mb", "before_mb", "training_mb")}, "rounds": runs}
            vs = ""
            if rank and full:
                row["time_ratio"] = row["step_ms"] / med(full, "step_ms")
                row["training_memory_ratio"] = row["training_mb"] / med(full, "training_mb")
                vs = f"x{row['time_ratio']:.2f} time, x{row['training_memory_ratio']:.2f} mem"
            table.append(row)
            print(f"{arch:<8} {name:<8} {row['params_millions']:>6.1f}M {row['trainable_millions']:>9.3f}M "
                  f"{row['checkpoint_mb']:>8.1f} {row['step_ms']:>8.0f} {row['peak_mb']:>9.0f} "
                  f"{row['training_mb']:>12.0f} {vs:>22}")
    print(f"\nload average at the end {load1:.2f} (start {load0:.2f}); {time.perf_counter() - t_start:.0f} s")
    if args.device == "cpu" and max(load0, load1) > (os.cpu_count() or 1) / 2:
        print(f"note: other work shares these {os.cpu_count()} cores: step times are high; memory is not affected")
    if args.out:
        Path(args.out).write_text(json.dumps({"machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "device": dev,
                                                          "torch": torch.__version__, "load_average": [load0, load1]},
                                              "args": {k: v for k, v in vars(args).items() if not k.startswith("child")},
                                              "rows": table}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
