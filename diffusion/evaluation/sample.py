"""The sample stage: generate the evaluation prompt set and write images + a parquet manifest."""

from __future__ import annotations

import shutil

import numpy as np
from pathlib import Path

from diffusion.artifacts import GRID, IMAGES, MANIFEST, write_manifest
from diffusion.config import DatasetConfig, SampleConfig
from diffusion.sampling.generate import effective_eta, encode_prompts, generate, make_grid, save_png
from diffusion.models.precond import Denoiser
from diffusion.data.shapes import eval_prompts
from diffusion.data.text import TextEncoder


def eval_rows(dataset: DatasetConfig | None, cfg: SampleConfig, val_captions: list[str],
              train_captions: list[str] = ()) -> list[dict]:
    """The prompts to sample: with the built-in set, ``shapes.eval_prompts`` (every attribute
    combination in training and held-out wording, and prompts naming only some attributes, with
    their attributes for the judge); otherwise the first ``n_prompts`` distinct validation captions,
    then ``n_seen_prompts`` distinct training captions spread evenly over the training index (not
    already drawn), so that adherence is measured on captions the model was taught too."""
    if dataset is not None:
        return eval_prompts(dataset, cfg.per_combo, cfg.new_wording_per_combo, cfg.partial_per_combo)
    unique = list(dict.fromkeys(c for c in val_captions if c))[: cfg.n_prompts]
    taught = [c for c in dict.fromkeys(c for c in train_captions if c) if c not in set(unique)]
    if cfg.n_seen_prompts and taught:
        step = max(1, len(taught) // cfg.n_seen_prompts)
        unique += taught[::step][: cfg.n_seen_prompts]
    return [{"prompt": c} for c in unique]


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
    pick = grid_rows(rows, cfg.grid_size)
    make_grid(images[pick], [prompts[i] for i in pick]).save(out / GRID)
    return out


def grid_rows(rows: list[dict], size: int) -> list[int]:
    """``size`` row indices for the sample grid, spread evenly over each evaluation group in turn
    (training wording, held-out wording, partial prompts; ``judge.groups_of``) so the grid shows
    examples of every group."""
    from diffusion.evaluation.judge import groups_of

    groups = [np.flatnonzero(m) for name, m in groups_of(rows).items() if name != "overall"] \
        if rows and "wording" in rows[0] else [np.arange(len(rows))]
    groups = [g for g in groups if len(g)]
    if not groups:
        return []
    pick: list[int] = []
    for i, g in enumerate(groups):
        share = size // len(groups) + (i < size % len(groups))
        pick += [int(g[j]) for j in np.linspace(0, len(g) - 1, min(share, len(g))).round().astype(int)]
    return sorted(set(pick))[:size]
