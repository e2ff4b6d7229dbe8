"""Ingest: a source of image-caption pairs -> WebDataset shards + parquet index + stats JSON.

Output layout (``out_dir``)::

    train/shard-000000.tar ...   val/shard-000000.tar ...
    index-train.parquet  index-val.parquet
    stats.json           accepted / rejected (by reason) per split, captions, combinations
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

from tqdm.auto import tqdm

from diffusion.config import DatasetConfig, IngestConfig
from diffusion.shapes import generate, split_combos
from diffusion.shards import ShardSink


def _reset_split_dirs(out_dir: Path, splits: list[str]) -> None:
    for split in splits:
        shutil.rmtree(out_dir / split, ignore_errors=True)
        (out_dir / f"index-{split}.parquet").unlink(missing_ok=True)


def ingest_builtin(dataset: DatasetConfig, cfg: IngestConfig, out_dir: str | Path) -> dict:
    """Write the built-in shapes dataset as shards. Returns the stats written to stats.json."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    splits = ["train", "val"]
    _reset_split_dirs(out_dir, splits)
    stats: dict = {"source": "builtin", "image_format": cfg.image_format, "splits": {}}
    for split in splits:
        n = dataset.n_train if split == "train" else dataset.n_val
        captions: set[str] = set()
        combos: Counter = Counter()
        held_out = 0
        with ShardSink(out_dir, split, cfg.samples_per_shard, cfg.image_format) as sink:
            for s in tqdm(generate(dataset, split), total=n, desc=f"ingest {split}", unit="img",
                          mininterval=1.0):
                sink.write(s.key, s.image, s.caption, s.meta)
                captions.add(s.caption)
                combos["|".join(s.attrs.values())] += 1
                held_out += s.meta["held_out"]
        stats["splits"][split] = {
            "accepted": n,
            "rejected": {},
            "shards": len(sink.shards),
            "unique_captions": len(captions),
            "combinations": len(combos),
            "combinations_possible": len(split_combos(dataset, split)),
            "held_out_samples": held_out,
        }
    stats["accepted"] = sum(s["accepted"] for s in stats["splits"].values())
    stats["rejected"] = {}
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats
