"""A training run under torchrun for tests/test_distributed.py: the library loop on every rank.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_train.py CONFIG.json

CONFIG.json: {"train": {TrainConfig overrides}, "shards": dir, "embeddings": dir, "out": dir,
"log": file (rank 0's logged metrics, JSON lines), "kill_at": step (rank 0 dies there, as a
crash would: without cleanup)}.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace
from pathlib import Path


class FileLogger:
    def __init__(self, path: str, kill_at: int | None):
        self.path, self.kill_at = Path(path), kill_at

    def log_metrics(self, metrics, step):
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.kill_at is not None and step >= self.kill_at:
            os._exit(9)  # a crash: no cleanup, no checkpoint

    def log_image(self, image, name):
        pass


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    from diffusion.artifacts import shard_urls
    from diffusion.config import TrainConfig, UNetConfig
    from diffusion.data.text import EmbeddingTable
    from diffusion.training.train import train

    t = dict(spec["train"])
    unet = UNetConfig(**t.pop("unet", {}))
    cfg = replace(TrainConfig(**t), unet=unet)
    train(cfg, shard_urls(spec["shards"], "train"), EmbeddingTable.load(spec["embeddings"]), spec["out"],
          image_size=16, logger=FileLogger(spec["log"], spec.get("kill_at")), progress=False,
          val_urls=shard_urls(spec["shards"], "val"))


if __name__ == "__main__":
    main()
