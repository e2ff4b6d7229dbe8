"""The training loop's other CUDA paths, briefly, on shards and embeddings already made
(bench/gpu_check.sh part 3): fp16 autocast with the grad scaler, the DiT denoiser, and
torch.compile, each a tiny model for a few steps through ``diffusion.training.train.train``.

    python bench/gpu_variants.py SHARDS_DIR EMBEDDINGS_DIR [--steps 60] [--out DIR]

Prints, per variant, the wall time, the last logged loss and gradient norm, the run's img/s and
the fraction of time spent waiting for data; exits 1 if any variant fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = [("fp16 autocast + GradScaler (tiny UNet)", {"precision": "fp16"}),
            ("bf16, DiT (tiny)", {"denoiser": "dit"}),
            ("bf16, torch.compile (tiny UNet)", {"compile": True})]


class Log:
    def __init__(self):
        self.metrics: dict[str, float] = {}

    def log_metrics(self, metrics, step):
        self.metrics.update(metrics)

    def log_image(self, image, name):
        pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shards")
    ap.add_argument("embeddings")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--out", default=None, help="where the runs write (default: a temporary folder)")
    args = ap.parse_args()

    from diffusion import artifacts as art
    from diffusion.config import load_params
    from diffusion.data.text import EmbeddingTable
    from diffusion.training.train import train

    p = load_params(ROOT / "params.yaml", ["train.size=tiny", f"train.steps={args.steps}", "train.batch_size=128",
                                           "train.data_workers=4", "train.warmup_steps=20", "train.log_every=20",
                                           f"train.checkpoint_every={args.steps}"])
    table = EmbeddingTable.load(args.embeddings)
    urls = art.shard_urls(args.shards, "train")
    size = art.square_image_size(args.shards)
    out = Path(args.out or tempfile.mkdtemp(prefix="t2i-gpu-variants-"))
    failed = 0
    for i, (name, over) in enumerate(VARIANTS):
        cfg = dataclasses.replace(p.train, **over)
        log, t0 = Log(), time.perf_counter()
        try:
            train(cfg, urls, table, out / f"variant-{i}", image_size=size, logger=log, progress=False)
        except Exception as e:  # report and go on to the next
            print(f"{name}: FAILED: {type(e).__name__}: {e}", flush=True)
            failed += 1
            continue
        m = log.metrics
        print(f"{name}: {args.steps} steps at {size}px, batch {cfg.batch_size}, in {time.perf_counter() - t0:.1f} s "
              f"wall; last loss {m['loss']:.4f}, grad norm {m['grad_norm']:.3g}, {m['train_img_per_s']:.0f} img/s "
              f"over the run, data wait {m['data_wait_fraction']:.1%} of the last interval", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
