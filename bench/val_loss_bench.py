"""What train.val_every costs: one training run of params.yaml (default 200 steps, so 4 held-out
evaluations at the default val_every 50), and the loop's own clocks: ``val_seconds`` (the time
spent on val_loss, left out of the throughput) against ``train_seconds``, from the same run, so a
busy machine slows both alike.

    .venv/bin/python bench/val_loss_bench.py --shards data/shards --embeddings data/embeddings [--steps 200]

The shards and embeddings are the pipeline's (``make run``, or ``t2i ingest`` and ``t2i embed``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import cpu_name  # noqa: E402

from diffusion.artifacts import list_shards, square_image_size  # noqa: E402
from diffusion.config import load_params  # noqa: E402
from diffusion.data.text import EmbeddingTable  # noqa: E402
from diffusion.training.train import train  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--shards", default="data/shards")
    ap.add_argument("--embeddings", default="data/embeddings")
    ap.add_argument("--steps", type=int, default=200)
    a = ap.parse_args()
    p = load_params(a.params)
    cfg = replace(p.train, steps=a.steps)
    with tempfile.TemporaryDirectory() as out:
        train(cfg, list_shards(Path(a.shards) / "train"), EmbeddingTable.load(a.embeddings), out,
              image_size=square_image_size(a.shards), progress=False, val_urls=list_shards(Path(a.shards) / "val"))
        meta = json.loads((Path(out) / "model.json").read_text())
    print(json.dumps({"cpu": cpu_name(), "steps": a.steps, "val_every": cfg.val_every, "val_samples": cfg.val_samples,
                      "train_seconds": round(meta["train_seconds"], 1), "val_seconds": round(meta["val_seconds"], 2),
                      "val_share": round(meta["val_seconds"] / meta["train_seconds"], 4),
                      "train_img_per_s": round(meta["train_img_per_s"], 1)}))


if __name__ == "__main__":
    main()
