"""A training run's compute, counted: forward+backward FLOPs of the loop's own loss on real batches.

    .venv/bin/python bench/train_flops.py \
        --variant before=train.unet.channels=48,train.unseen_words=0 --variant default=

Each variant is the params file (default params.yaml) with ``-s``-style overrides
(``train.KEY=VALUE``, comma-separated; ``NAME=`` alone is the file as it is). For each, the
training loop's ``build_state`` builds the network, and ``micro_loss`` (caption dropout,
``train.unseen_words``, the noise draw, the loss, from the same seeded generator as the loop) runs
forward and backward on the first ``--batches`` batches the loop would train on, read from the
pipeline's shards and caption table (``--shards``, ``--embeddings``: ``data/shards`` and
``data/embeddings`` after ``t2i pipeline``), under ``torch.utils.flop_counter.FlopCounterMode``.

FLOPs counted: matrix products, convolutions and attention (under the math SDPA backend, whose
matrix products the counter sees; the CPU flash kernel has no FLOP formula), as
bench/train_bench.py counts them; optimizer, EMA and elementwise work are not counted. A caption's
length changes the cross-attention's work, so the real batches (real captions, the run's own
augmentation) are what is counted, not a synthetic one. GFLOP/img is the mean over the counted
batches; the run's compute is that x train.steps x train.batch_size; "vs first" divides by the
first variant's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from machine import cpu_name  # noqa: E402
from step_profile import parse_variant  # noqa: E402


def count_variant(name: str, overrides: list[str], args) -> dict:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from diffusion import artifacts as art
    from diffusion.config import load_params
    from diffusion.training.distributed import Dist
    from diffusion.models.unet import count_params
    from diffusion.data.text import EmbeddingTable
    from diffusion.training.train import TextTable, build_state, micro_loss
    from diffusion.training.train_data import DataSpec, batch_loader

    p = load_params(ROOT / args.params, overrides)
    cfg = dataclasses.replace(p.train, grad_accum=1, nproc_per_node=1, nnodes=1, data_workers=0, compile=False)
    table = EmbeddingTable.load(art.require(args.embeddings, "embeddings", "embed"))
    size = art.square_image_size(args.shards)
    device = torch.device("cpu")
    state = build_state(cfg, table, size, None, device, Dist())
    text = TextTable.of(table, device)
    spec = DataSpec(art.shard_urls(args.shards, "train"), cfg.seed, cfg.shuffle_buffer, cfg.batch_size, workers=0)
    data = batch_loader(spec, table, state.positions)
    flops, images, lengths = 0, 0, []
    for _ in range(args.batches):
        batch = next(data)
        counter = FlopCounterMode(display=False)
        with sdpa_kernel([SDPBackend.MATH]), counter:
            micro_loss(state, batch, text, False).backward()
        state.opt.zero_grad(set_to_none=True)
        flops += counter.get_total_flops()
        images += batch.x0.shape[0]
        lengths.append(int(text.lengths[batch.rows].max()))
    per_img = flops / images
    return {"variant": name, "overrides": overrides, "params": count_params(state.model.net), "image_size": size,
            "steps": cfg.steps, "batch_size": cfg.batch_size, "unseen_words": cfg.unseen_words,
            "word_vectors": text.word_vectors, "batches_counted": args.batches,
            "mean_longest_caption_tokens": sum(lengths) / len(lengths),
            "gflop_per_img": per_img / 1e9, "run_pflop": per_img * cfg.steps * cfg.batch_size / 1e15}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", action="append", required=True, help="NAME=train.KEY=VALUE,... (repeatable)")
    ap.add_argument("--params", default="params.yaml", help="the params file the variants change")
    ap.add_argument("--shards", default="data/shards", help="the ingest stage's folder (default: data/shards)")
    ap.add_argument("--embeddings", default="data/embeddings", help="the embed stage's folder")
    ap.add_argument("--batches", type=int, default=20, help="real batches counted per variant (default: 20)")
    ap.add_argument("--out", default=None, help="also write the rows as JSON")
    args = ap.parse_args()
    if args.batches < 1:
        raise SystemExit("--batches must be at least 1")
    import torch

    print(f"machine: {cpu_name()}; torch {torch.__version__}; counting on the CPU (FLOPs do not depend on it)")
    rows = []
    for text in args.variant:
        name, overrides = parse_variant(text)
        rows.append(count_variant(name, overrides, args))
        r = rows[-1]
        print(f"[flops] {name}: {r['gflop_per_img']:.4f} GFLOP/img over {args.batches} batches", flush=True)
    w = max(7, *(len(r["variant"]) for r in rows))
    print(f"\n{'variant':<{w}} {'params':>8} {'px':>3} {'steps x batch':>13} {'tokens':>6} {'GFLOP/img':>9} "
          f"{'run PFLOP':>9} {'vs first':>8}")
    for r in rows:
        print(f"{r['variant']:<{w}} {r['params'] / 1e6:>7.2f}M {r['image_size']:>3} "
              f"{r['steps']:>6} x {r['batch_size']:<4} {r['mean_longest_caption_tokens']:>6.1f} "
              f"{r['gflop_per_img']:>9.4f} {r['run_pflop']:>9.4f} {r['run_pflop'] / rows[0]['run_pflop']:>7.3f}x")
    print("tokens: the mean over counted batches of the longest caption (the context every caption is cut to), "
          "before train.unseen_words adds up to train.unseen_words_max")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"machine": cpu_name(), "rows": rows}, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
