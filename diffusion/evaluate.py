"""Evaluation: score generated images with the judge for prompt adherence.

Metrics (``evaluate_samples``)::

    adherence.{seen,held_out,overall}.{shape,color,size,position,all,n}   generated images
    judge.{seen,held_out,overall}.{...}                                    the judge on real val images
    fingerprint.{prompts,judge,sampling,id}                                what they were measured on

"all" is the fraction of images with every attribute right. Two models' numbers are comparable
only when their ``fingerprint.id`` is the same (the promotion policy refuses otherwise).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from PIL import Image

from diffusion.artifacts import JUDGE_INFO, JUDGE_WEIGHTS, read_manifest
from diffusion.judge import labels_from_metas, load_judge, predict, score


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def evaluation_fingerprint(rows: list[dict], judge_dir: str | Path, sampling: dict) -> dict:
    """What a set of metrics was measured on: the prompt set (prompts and seeds), the judge (its
    weights and vocabulary) and the sampler settings; ``id`` hashes all three."""
    d = Path(judge_dir)
    judge = hashlib.sha256()
    for name in (JUDGE_INFO, JUDGE_WEIGHTS):
        if (d / name).is_file():
            judge.update((d / name).read_bytes())
    fp = {"prompts": _sha([(r["prompt"], int(r["seed"])) for r in rows]), "judge": judge.hexdigest()[:16],
          "sampling": sampling}
    return {**fp, "id": _sha(fp)}


def evaluate_samples(samples_dir: str | Path, judge_dir: str | Path) -> dict:
    samples = Path(samples_dir)
    rows = read_manifest(samples)
    judge, info = load_judge(judge_dir)
    first = rows[0]
    sampling = {k: first[k] for k in ("sampler", "steps", "guidance_scale", "eta")}
    fingerprint = evaluation_fingerprint(rows, judge_dir, sampling)
    if judge is None:
        return {"adherence": None, "judge": None, "note": info["reason"], "samples": len(rows), "sampling": sampling,
                "fingerprint": fingerprint}
    images = np.stack([np.asarray(Image.open(samples / r["file"]).convert("RGB")) for r in rows])
    truth = labels_from_metas(rows, info["vocab"])
    held_out = np.array([bool(r["held_out"]) for r in rows])
    return {
        "adherence": score(predict(judge, images), truth, held_out),
        "judge": info["val"],
        "samples": len(rows),
        "sampling": sampling,
        "fingerprint": fingerprint,
    }
