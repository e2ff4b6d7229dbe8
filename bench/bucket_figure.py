"""Figure for aspect-ratio buckets (ingest.resize_mode bucket): mixed-aspect images rendered here,
what ingest made of them (each in its bucket, none squared), and a tiny UNet trained on them
drawing at two aspect ratios.

    .venv/bin/python bench/bucket_figure.py [--steps 1000] [--out docs/images/aspect_buckets.png]

Runs on the CPU in about 30 minutes (1000 steps, 2 shared cores); everything lives in a temporary folder but the figure.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--out", default=str(ROOT / "docs" / "images" / "aspect_buckets.png"))
    a = ap.parse_args()

    import torch
    import webdataset as wds

    from conftest import tiny_params_dict
    from test_buckets import SIDE, bucket_cfg, render_corpus
    from diffusion.artifacts import list_shards, shard_buckets
    from diffusion.config import SampleConfig, parse_params
    from diffusion.data.ingest import ingest
    from diffusion.data.text import captions_from_index, embed_captions, load_text_encoder
    from diffusion.models.store import load_model
    from diffusion.sampling.generate import generate, table_cond
    from diffusion.training.train import train

    torch.set_num_threads(2)
    p = parse_params(tiny_params_dict(), "tiny")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        render_corpus(tmp / "src")
        t0 = time.perf_counter()
        stats = ingest(bucket_cfg(tmp / "src"), None, tmp / "shards", progress=False)
        print(f"ingest: {stats['accepted']} images in {time.perf_counter() - t0:.1f} s, buckets {stats['bucket_counts']}")
        e = p.embed
        enc = load_text_encoder(e.model, e.pretrained, e.seed, e.layer, "cpu")
        table = embed_captions(enc, captions_from_index(tmp / "shards"), progress=False)
        cfg = replace(p.train, steps=a.steps, batch_size=8, warmup_steps=20, checkpoint_every=a.steps, log_every=50,
                      shuffle_buffer=16, data_workers=0, val_every=0)
        t0 = time.perf_counter()
        train(cfg, list_shards(tmp / "shards" / "train"), table, tmp / "model", image_size=SIDE,
              buckets=shard_buckets(tmp / "shards"), progress=False)
        print(f"train: {a.steps} steps in {time.perf_counter() - t0:.1f} s")
        den, meta = load_model(tmp / "model")
        src = sorted((tmp / "src").glob("*.png"))
        picks = [next(f for f in src if f.stem.startswith(k)) for k in ("wide", "tall", "square", "landscape")]
        originals = [np.asarray(Image.open(f).convert("RGB")) for f in picks]
        by_stem = {}
        for s in wds.WebDataset(list_shards(tmp / "shards" / "train") + list_shards(tmp / "shards" / "val"),
                                shardshuffle=False, empty_check=False):
            by_stem[s["txt"].decode()] = np.asarray(Image.open(io.BytesIO(s["png"])).convert("RGB"))
        ingested = [by_stem[(f.with_suffix(".txt")).read_text()] for f in picks]
        drawn = {}
        for (w, h), words in (((48, 16), "wide"), ((16, 48), "tall")):
            captions = [f"a {words} banner red green blue number {i}" for i in range(4)]
            cond, uncond = table_cond(table, captions)
            drawn[(w, h)] = generate(den, cond, uncond, list(range(4)), (w, h), SampleConfig(steps=30))
    figure(originals, ingested, drawn, Path(a.out))
    print(f"wrote {a.out}")


def figure(originals, ingested, drawn, out: Path, scale: int = 3) -> None:
    """Three rows: the rendered inputs, what ingest stored (bucket sizes), the model's drawings."""
    rows = [("rendered input", originals, 1), ("after ingest (bucket)", ingested, scale),
            ("drawn at 48x16 and 16x48", [*drawn[(48, 16)][:2], *drawn[(16, 48)][:2]], scale)]
    pad, label = 16, 16
    cells = [[(Image.fromarray(np.asarray(im)).resize((im.shape[1] * k, im.shape[0] * k), Image.Resampling.NEAREST),
               f"{im.shape[1]}x{im.shape[0]}") for im in ims] for _, ims, k in rows]
    width = max(sum(c.width for c, _ in r) + pad * (len(r) + 1) for r in cells)
    height = sum(max(c.height for c, _ in r) + label + pad for r in cells) + pad
    fig = Image.new("RGB", (width, height), (255, 255, 255))
    d = ImageDraw.Draw(fig)
    y = pad // 2
    for (title, _, _), r in zip(rows, cells):
        d.text((pad, y), title, fill=(0, 0, 0))
        y += label
        x = pad
        for c, size in r:
            fig.paste(c, (x, y))
            d.text((x, y + c.height + 2), size, fill=(90, 90, 90))
            x += c.width + pad
        y += max(c.height for c, _ in r) + pad
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.save(out)


if __name__ == "__main__":
    main()
