"""Readable evaluation pages: reports/evaluation.md (evaluate stage) and reports/sweep.md (sweep).

Plain markdown with relative image links, so it reads on GitHub, in an editor preview, and as an
MLflow artifact (logged with the images it shows).
"""

from __future__ import annotations

import math
from pathlib import Path

ATTRS = ("shape", "color", "size", "position", "all")


def _num(v, fmt: str = ".3g") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, fmt)


def _pct(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.1%}"


def _rel(target: str | Path, page: Path) -> str:
    import os

    return Path(os.path.relpath(Path(target).resolve(), page.parent.resolve())).as_posix()


def evaluation_page(metrics: dict, page: str | Path, grid: str | Path | None = None,
                    sweep_page: str | Path | None = None) -> Path:
    """Write the evaluate stage's page: sampling settings, the grid, adherence per group,
    FD-judge, fidelity against real images, FID/KID/CLIP score or why they were skipped, and the
    sweep's plots where ``sweep_page`` exists (else how to make them)."""
    page = Path(page)
    s = metrics.get("sampling") or {}
    lines = ["# Evaluation", "",
             f"{metrics.get('samples', '?')} images, sampler **{s.get('sampler')}** ({s.get('spacing') or 'uniform'} "
             f"spacing), {s.get('steps')} steps, guidance {s.get('guidance_scale')}, eta {s.get('eta')}"
             + (f", guidance interval {s['guidance_interval']}" if s.get("guidance_interval") not in (None, "None") else "")
             + f". Fingerprint `{(metrics.get('fingerprint') or {}).get('id', '-')}`.", ""]
    if grid and Path(grid).is_file():
        lines += [f"![sample grid]({_rel(grid, page)})", ""]
    lines += _adherence_lines(metrics) + _retrieval_lines(metrics.get("retrieval")) + _fidelity_lines(metrics)
    if metrics.get("image"):
        lines += _standard_metrics_lines(metrics["image"])
    if sweep_page is not None:
        lines += _sweep_lines(sweep_page, page)
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text("\n".join(lines) + "\n")
    return page


def _adherence_lines(metrics: dict) -> list[str]:
    """The page's adherence section: the judge's scores per group on the generated images (and
    on real ones), or why adherence does not apply."""
    adherence = metrics.get("adherence")
    if not adherence:
        return [f"Adherence: not applicable ({metrics['note']}).", ""] if metrics.get("note") else []
    lines = ["## Prompt adherence (the judge on generated images)", "",
             "| group | n | " + " | ".join(ATTRS) + " |", "|---|---|" + "---|" * len(ATTRS)]
    for group, sc in adherence.items():
        lines.append(f"| {group} | {sc['n']} | " + " | ".join(_pct(sc.get(a)) for a in ATTRS) + " |")
    judge = metrics.get("judge") or {}
    if judge:
        lines += ["", "The judge itself on real validation images (all-correct): "
                  + ", ".join(f"{g} {_pct(sc.get('all'))}" for g, sc in judge.items()) + "."]
    from diffusion.evaluation.judge import GROUPS

    return lines + [""] + [f"- *{g}*: {GROUPS[g]}" for g in adherence if g in GROUPS] + [""]


def _retrieval_lines(block: dict | None) -> list[str]:
    """The page's R-precision table (the retrieval evaluator, any data): generated against real
    images of the same captions, per group, with chance; the FD in its features; how far to trust it."""
    if not block:
        return []
    rp = block["r_precision"]
    lines = ["## Prompt adherence (R-precision, the retrieval evaluator)", "",
             "Is an image's prompt ranked first among itself and up to 99 other validation captions, by a small "
             "image-text model trained on this dataset's own pairs?", "",
             "| captions | generated | n | real images | n | chance |", "|---|---|---|---|---|---|"]
    for group in ("all", "seen", "held_out"):
        g, r = rp["generated"].get(group) or {}, rp["real"].get(group) or {}
        lines.append(f"| {group.replace('_', '-')} | {_pct(g.get('mean'))} | {g.get('n', 0)} | {_pct(r.get('mean'))} | "
                     f"{r.get('n', 0)} | {_pct(g.get('chance'))} |")
    fd, ev = block.get("fd") or {}, block.get("evaluator") or {}
    lines += ["", f"FD in its image features: generated {_num(fd.get('generated'))}, real floor "
              f"{_num(fd.get('real_floor'))} ({fd.get('n_generated')} generated, {fd.get('n_real')} real)."]
    if ev:
        lines.append("The evaluator on real validation pairs: " + ", ".join(
            f"{k.replace('_', ' ')} {_pct(v)}" for k, v in ev.items() if isinstance(v, float)) + ".")
    if block.get("no_embedding"):
        lines.append(f"{block['no_embedding']} prompts had no embedding (wordings the embed stage never saw): "
                     "left out of R-precision.")
    return lines + [""]


def _fidelity_lines(metrics: dict) -> list[str]:
    """The page's fidelity table: FD-judge where measured, speckle and grain of generated and real images."""
    lines = ["## Fidelity", "", "| measure | generated | real | what it means |", "|---|---|---|---|"]
    fd = metrics.get("fd_judge")
    if fd:
        lines.append(f"| FD-judge | {_num(fd.get('generated'))} | {_num(fd.get('real_floor'))} | Frechet distance in the "
                     f"judge's features to {fd.get('n_real')} real images; *real* is two real sets of the same sizes "
                     "(the floor at this sample count) |")
    fid = metrics.get("fidelity") or {}
    gen, real = fid.get("generated") or {}, fid.get("real") or {}
    lines.append(f"| speckle | {_pct(gen.get('speckle'))} | {_pct(real.get('speckle'))} | background pixels "
                 "far off the background colour (coloured specks) |")
    lines.append(f"| grain | {_num(gen.get('grain'), '.2f')} | {_num(real.get('grain'), '.2f')} | mean deviation "
                 "of the background from its colour, 8-bit levels |")
    return lines


def _standard_metrics_lines(image: dict) -> list[str]:
    """The page's FID, KID and CLIP score table, and why any of them was skipped."""
    kid = image.get("kid") or {}
    lines = ["", "## Standard metrics", "", "| metric | value |", "|---|---|",
             f"| FID | {_num(image.get('fid'), '.2f')} |",
             f"| KID | {_num(kid.get('mean'), '.4f')} ± {_num(kid.get('std'), '.4f')} |",
             f"| CLIP score | {_num(image.get('clip_score'), '.2f')} |"]
    names = {"fid": "FID", "kid": "KID", "clip_score": "CLIP score"}
    for name, why in (image.get("skipped") or {}).items():
        lines.append(f"\n*{names.get(name, name)} skipped*: {why}")
    return lines


def _sweep_lines(sweep_page: str | Path, page: Path) -> list[str]:
    """The page's quality-against-cost section: the sweep's plots and a link to its page where the
    sweep has run, else the command that runs it."""
    lines = ["", "## Quality against cost", ""]
    if Path(sweep_page).is_file():
        for png in ("quality_vs_cost.png", "guidance.png"):
            if (Path(sweep_page).parent / png).is_file():
                lines += [f"![{png[:-4]}]({_rel(Path(sweep_page).parent / png, page)})", ""]
        lines.append(f"Tables and the recommended setting: [the sweep]({_rel(sweep_page, page)}).")
    else:
        lines.append("Not measured yet: `dvc repro analysis/dvc.yaml:sweep` (or `t2i pipeline --stage sweep`) "
                     f"maps every sampler and step count into {_rel(sweep_page, page)}.")
    return lines


def sweep_page(points: list[dict], guidance: list[dict], page: str | Path, plots: dict[str, str | Path]) -> Path:
    """The sweep's page: its plots and a table per sweep, with the recommendation (``recommend``)."""
    page = Path(page)
    lines = ["# Quality against cost", ""]
    for title, path in plots.items():
        lines += [f"![{title}]({_rel(path, page)})", ""]
    best = recommend(points)
    if best:
        lines += [f"**Recommended**: `{best['sampler']}` at {best['steps']} steps ({best['spacing']} spacing): "
                  f"{_pct(best['all'])} all-correct, FD-judge {_num(best['fd_judge'])}, "
                  f"{_num(best['seconds_per_image'], '.4f')} s/image.", ""]
    head = "| sampler | spacing | steps | evals | s/image | all-correct | seen | held-out | FD-judge | speckle | grain |"
    lines += ["## Samplers and step counts", "", head, "|" + "---|" * 11]
    lines += [_row(p) for p in points]
    lines += ["", "## Guidance scale", "", head.replace("| sampler |", "| guidance | sampler |"), "|" + "---|" * 12]
    lines += [f"| {p['guidance_scale']} " + _row(p) for p in guidance]
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text("\n".join(lines) + "\n")
    return page


def _row(p: dict) -> str:
    return (f"| {p['sampler']} | {p['spacing']} | {p['steps']} | {p['evals']} | {_num(p['seconds_per_image'], '.4f')} | "
            f"{_pct(p['all'])} | {_pct(p['seen'])} | {_pct(p['held_out'])} | {_num(p['fd_judge'])} | "
            f"{_pct(p['speckle'])} | {_num(p['grain'], '.2f')} |")


def recommend(points: list[dict]) -> dict | None:
    """The cheapest sweep point (fewest network evaluations per image, then seconds) whose
    all-correct adherence is within 2 points of the best and whose FD-judge is at most 1.25x the
    best (NaN metrics never qualify)."""
    ok = [p for p in points if p["all"] == p["all"] and p["fd_judge"] == p["fd_judge"]]
    if not ok:
        return None
    top, floor = max(p["all"] for p in ok), min(p["fd_judge"] for p in ok)
    good = [p for p in ok if p["all"] >= top - 0.02 and p["fd_judge"] <= 1.25 * floor]
    return min(good, key=lambda p: (p["evals"], p["seconds_per_image"]))
