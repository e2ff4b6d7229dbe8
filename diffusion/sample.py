"""The sample stage: generate the evaluation prompt set and write images + a parquet manifest."""

from __future__ import annotations

import shutil
from pathlib import Path

from diffusion.artifacts import GRID, IMAGES, MANIFEST, write_manifest
from diffusion.config import DatasetConfig, SampleConfig
from diffusion.generate import effective_eta, encode_prompts, generate, make_grid, save_png
from diffusion.precond import Denoiser
from diffusion.shapes import eval_prompts
from diffusion.text import TextEncoder


def eval_rows(dataset: DatasetConfig | None, cfg: SampleConfig, val_captions: list[str]) -> list[dict]:
    """The prompts to sample: with the built-in set, every attribute combination ``per_combo``
    times (with their attributes, for the judge); otherwise ``n_prompts`` validation captions."""
    if dataset is not None:
        return eval_prompts(dataset, cfg.per_combo, cfg.paraphrase_per_combo)
    unique = list(dict.fromkeys(c for c in val_captions if c))
    return [{"prompt": c} for c in unique[: cfg.n_prompts]]


def sample_eval_set(denoiser: Denoiser, meta: dict, encoder: TextEncoder, rows: list[dict],
                    cfg: SampleConfig, out_dir: str | Path, progress: bool = True) -> Path:
    """One image per row (seed = cfg.seed + row index).

    Writes images/NNNNNN.png, manifest.parquet (prompt, seed, the row's attributes, file, settings)
    and grid.png (``grid_size`` prompts spread over the rows).
    """
    out = Path(out_dir)
    shutil.rmtree(out / IMAGES, ignore_errors=True)
    (out / IMAGES).mkdir(parents=True)
    prompts = [r["prompt"] for r in rows]
    seeds = [cfg.seed + i for i in range(len(rows))]
    cond, uncond = encode_prompts(encoder, prompts)
    images = generate(denoiser, cond, uncond, seeds, meta["image_size"], cfg, progress=progress)
    for i, (row, img) in enumerate(zip(rows, images)):
        row.update(seed=seeds[i], file=f"{IMAGES}/{i:06d}.png", sampler=cfg.sampler, spacing=cfg.spacing,
                   steps=cfg.steps, guidance_scale=cfg.guidance_scale, eta=effective_eta(cfg),
                   guidance_interval=str(cfg.guidance_interval))
        save_png(img, out / row["file"])
    write_manifest(rows, out / MANIFEST)
    pick = list(range(0, len(rows), max(1, len(rows) // cfg.grid_size)))[: cfg.grid_size]
    make_grid(images[pick], [prompts[i] for i in pick]).save(out / GRID)
    return out
