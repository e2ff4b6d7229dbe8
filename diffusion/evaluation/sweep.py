"""Quality against cost: every sampler at every step count, then guidance scales, scored like the
evaluate stage (adherence, FD-judge, fidelity) and timed, so a user can pick a sampler and a step
count from a table and a plot instead of folklore.

Outputs (``write_sweep``; reports/sweep/ in the pipeline)::

    points.csv            every sampler point: sampler, spacing, steps, evals, seconds_per_image, metrics
    guidance.csv          the guidance-scale sweep at the sample section's sampler
    curves/<sampler>-<spacing>.csv   one series per sampler for ``dvc plots show``
    quality_vs_cost.png, guidance.png, sweep.md (with the recommended setting)

Every point draws the same prompts with the same seeds, so differences are the sampler's.
"""

from __future__ import annotations

import csv
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from diffusion.artifacts import SWEEP_PAGE
from diffusion.config import SampleConfig, SweepConfig
from diffusion.evaluation.evaluate import real_reference, score_images
from diffusion.sampling.generate import effective_eta, encode_prompts, generate
from diffusion.evaluation.judge import groups_of
from diffusion.sampling.samplers import network_evals

COLUMNS = ("sampler", "spacing", "steps", "evals", "guidance_scale", "eta", "seconds_per_image",
           "all", "seen", "held_out", "fd_judge", "speckle", "grain")


def sweep_settings(cfg: SweepConfig, base: SampleConfig) -> tuple[list[SampleConfig], list[SampleConfig]]:
    """(sampler points, guidance points): every sampler of ``cfg`` at every step count on
    ``cfg.spacing`` plus the DDPM reference over every timestep, then ``base`` at each guidance scale."""
    points = [replace(base, sampler=s, steps=n, spacing=cfg.spacing, eta=None)
              for s in cfg.samplers for n in cfg.steps]
    if cfg.reference_steps:
        points.append(replace(base, sampler="ddpm", steps=cfg.reference_steps, spacing="uniform", eta=None))
    guidance = [replace(base, guidance_scale=g) for g in cfg.guidance_scales]
    return points, guidance


def run_points(settings: list[SampleConfig], denoiser, encoder, image_size: int, rows: list[dict], seeds: list[int],
               judge, info: dict, real: np.ndarray | None, progress: bool = True, log=None) -> list[dict]:
    """Generate ``rows`` at each setting, time it and score it. Returns one record per setting."""
    cond, uncond = encode_prompts(encoder, [r["prompt"] for r in rows])
    reference = real_reference(judge, real, int(groups_of(rows)["overall"].sum())) if real is not None else None
    records = []
    for s in tqdm(settings, desc="sweep", unit="point", disable=not progress):
        t0 = time.perf_counter()
        images = generate(denoiser, cond, uncond, seeds, image_size, s)
        seconds = (time.perf_counter() - t0) / len(rows)
        scores = score_images(images, rows, judge, info, real, reference)
        adh, fd = scores["adherence"] or {}, scores["fd_judge"] or {}
        rec = {"sampler": s.sampler, "spacing": s.spacing, "steps": s.steps, "evals": network_evals(s.sampler, s.steps),
               "guidance_scale": s.guidance_scale, "eta": effective_eta(s), "seconds_per_image": seconds,
               "all": adh.get("overall", {}).get("all", float("nan")),
               "seen": adh.get("seen", {}).get("all", float("nan")),
               "held_out": adh.get("held_out", {}).get("all", float("nan")),
               "fd_judge": fd.get("generated", float("nan")),
               **scores["fidelity"]["generated"]}
        records.append(rec)
        if log:
            log(rec)
    return records


def curve_name(point: dict) -> str:
    """The series a point belongs to in curves/ (and in ``dvc plots show``): sampler-spacing."""
    return f"{point['sampler']}-{point['spacing']}"


def _write_csv(path: Path, records: list[dict], columns=COLUMNS) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        w.writerows(records)


def _plot(points: list[dict], guidance: list[dict], out: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = {"quality against cost": out / "quality_vs_cost.png", "guidance scale": out / "guidance.png"}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), dpi=100)
    for name in dict.fromkeys(curve_name(p) for p in points):
        ser = sorted((p for p in points if curve_name(p) == name), key=lambda p: p["evals"])
        x = [p["evals"] for p in ser]
        style = dict(marker="o", label=name if len(ser) > 1 else f"{name} {ser[0]['steps']} steps")
        for ax, key in zip(axes, ("fd_judge", "all", "speckle")):
            ax.plot(x, [p[key] for p in ser], **style)
    for ax, label in zip(axes, ("FD-judge (lower is better)", "all-correct adherence", "speckle (pixel fraction)")):
        ax.set_xscale("log")
        ax.set_xlabel("network evaluations per image (cost; seconds in points.csv)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(paths["quality against cost"])
    plt.close(fig)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), dpi=100)
    g = [p["guidance_scale"] for p in guidance]
    for ax, key, label in zip(axes, ("fd_judge", "all", "speckle"), ("FD-judge", "all-correct adherence", "speckle")):
        ax.plot(g, [p[key] for p in guidance], marker="o")
        ax.set_xlabel("guidance scale")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(paths["guidance scale"])
    plt.close(fig)
    return paths


def write_sweep(points: list[dict], guidance: list[dict], out_dir: str | Path) -> Path:
    """CSVs, per-sampler curves, plots and the page (see the module docstring). Returns the page."""
    from diffusion.evaluation.report import sweep_page

    out = Path(out_dir)
    _write_csv(out / "points.csv", points)
    _write_csv(out / "guidance.csv", guidance)
    for name in dict.fromkeys(curve_name(p) for p in points):
        _write_csv(out / "curves" / f"{name}.csv", [p for p in points if curve_name(p) == name])
    return sweep_page(points, guidance, out / SWEEP_PAGE, _plot(points, guidance, out))
