"""Evaluation: score generated images with the judge for prompt adherence.

Metrics (``evaluate_samples``)::

    adherence.{seen,held_out,overall}.{shape,color,size,position,all,n}   generated images
    judge.{seen,held_out,overall}.{...}                                    the judge on real val images

"all" is the fraction of images with every attribute right.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from diffusion.errors import MissingInputError
from diffusion.judge import labels_from_metas, load_judge, predict, score
from diffusion.sample import MANIFEST


def evaluate_samples(samples_dir: str | Path, judge_dir: str | Path) -> dict:
    samples = Path(samples_dir)
    if not (samples / MANIFEST).is_file():
        raise MissingInputError(f"sample manifest not found at {samples / MANIFEST} (run the sample stage first)")
    judge, info = load_judge(judge_dir)
    rows = pq.read_table(samples / MANIFEST).to_pylist()
    first = rows[0]
    sampling = {k: first[k] for k in ("sampler", "steps", "guidance_scale", "eta")}
    if judge is None:
        return {"adherence": None, "judge": None, "note": info["reason"], "samples": len(rows), "sampling": sampling}
    images = np.stack([np.asarray(Image.open(samples / r["file"]).convert("RGB")) for r in rows])
    truth = labels_from_metas(rows, info["vocab"])
    held_out = np.array([bool(r["held_out"]) for r in rows])
    return {
        "adherence": score(predict(judge, images), truth, held_out),
        "judge": info["val"],
        "samples": len(rows),
        "sampling": sampling,
    }
