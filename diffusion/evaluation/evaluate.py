"""Evaluation: how well generated images follow their prompts, and how much they look like the data.

Metrics (``evaluate_samples``; reports/metrics.json)::

    adherence.<group>.{shape,color,size,position,all,n}  the judge on generated images (groups: judge.GROUPS)
    judge.{overall,seen,held_out}.{...}                the judge on real validation images (how far to trust it)
    fd_judge.{generated,real_floor,n_generated,n_real} Frechet distance in the judge's feature space
    fidelity.{generated,real}.{speckle,grain}          pixel noise where the data is flat (see ``fidelity``)
    image.{fid,kid.mean,kid.std,clip_score}            standard metrics, each where its weights are present
    fingerprint.{prompts,judge,sampling,id}            what they were measured on

"all" is the fraction of images with every attribute the prompt names right. ``overall``/``seen``/
``held_out`` use the training wording; ``new_wording``/``new_wording_held_out`` use frames and
phrasings no training caption uses (``captions.HELD_OUT``); ``partial`` prompts name only some
attributes and are scored on those. FD-judge, fidelity
and the image metrics use the training-wording images and real validation images. Two models'
numbers are comparable only when their ``fingerprint.id`` is the same (the promotion policy
refuses otherwise).

The judge's adherence and FD-judge exist only for the built-in data (the judge reads its
attributes); fidelity works on any data, and FID/KID/CLIP score on any data with their weights.
A metric that cannot be computed is recorded with the reason, never a crash.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from diffusion.artifacts import JUDGE_INFO, JUDGE_WEIGHTS, read_manifest
from diffusion.config import EvaluateConfig
from diffusion.evaluation.judge import embed, groups_of, labels_from_metas, load_judge, predict, score
from diffusion.evaluation.metrics import frechet_distance_features, real_data_metrics

SPECKLE_LEVELS = 24  # a background pixel this many 8-bit levels off the background colour is a speck
OBJECT_LEVELS = 40  # pixels this far off the background colour may belong to the object


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


def fidelity(images: np.ndarray) -> dict:
    """Noise in the background, where the built-in set's images are perfectly flat. Per image:
    the background colour is the median of the border pixels; the object is the largest
    8-connected region more than ``OBJECT_LEVELS`` off it, grown by one pixel (its anti-aliased
    rim); everything else is background. Then, averaged over images:

    - ``speckle``: the fraction of background pixels more than ``SPECKLE_LEVELS`` 8-bit levels off
      the background colour in some channel (the coloured specks a person sees in a grid);
    - ``grain``: the mean deviation of background pixels from that colour, in 8-bit levels.

    Real built-in images score exactly 0 on both. On photos (no flat background) the numbers
    measure texture rather than noise: compare them with the real images' only. An image with no
    background left (noise everywhere) counts as all speckle."""
    from scipy import ndimage

    if len(images) == 0:
        return {"speckle": float("nan"), "grain": float("nan")}
    ring = np.ones((3, 3), bool)
    speckle, grain = [], []
    for img in images.astype(np.int16):
        border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
        dev = np.abs(img - np.median(border, axis=0)).max(axis=-1)
        labels, n = ndimage.label(dev > OBJECT_LEVELS, structure=ring)
        obj = np.zeros(dev.shape, bool)
        if n:
            sizes = ndimage.sum_labels(np.ones_like(dev), labels, range(1, n + 1))
            obj = ndimage.binary_dilation(labels == 1 + int(np.argmax(sizes)), structure=ring)
        background = dev[~obj]
        if background.size:
            speckle.append((background > SPECKLE_LEVELS).mean())
            grain.append(background.mean())
        else:  # no flat background left anywhere: all of it is noise (or the image is a photo)
            speckle.append(1.0)
            grain.append(dev.mean())
    return {"speckle": float(np.mean(speckle)), "grain": float(np.mean(grain))}


def real_reference(judge, real: np.ndarray, n: int) -> dict:
    """What generated sets of ``n`` images are compared with, computed once per real set: the
    fidelity of ``n`` real images, and (with a judge) its features of every real image and the
    real-vs-real FD-judge floor at this sample count."""
    ref = {"n_real": len(real), "fidelity": fidelity(real[:n]), "features": None, "real_floor": None}
    if judge is not None:
        ref["features"] = embed(judge, real)
        if len(real) >= n + 2 and n >= 2:
            ref["real_floor"] = frechet_distance_features(ref["features"][:n], ref["features"][n:])
    return ref


def fd_judge(judge, generated: np.ndarray, real: np.ndarray, reference: dict | None = None) -> dict:
    """Frechet distance between generated and real images in the judge's feature space, and the
    same distance between two disjoint real sets of the same sizes (the floor a perfect model
    reaches at this sample count). ``reference``: ``real_reference`` of ``real``, if already made."""
    ref = reference or real_reference(judge, real, len(generated))
    out = {"generated": frechet_distance_features(embed(judge, generated), ref["features"]),
           "n_generated": len(generated), "n_real": ref["n_real"]}
    if ref["real_floor"] is not None:
        out["real_floor"] = ref["real_floor"]
    return out


def load_images(directory: Path, rows: list[dict]) -> np.ndarray:
    return np.stack([np.asarray(Image.open(directory / r["file"]).convert("RGB")) for r in rows])


def score_images(images: np.ndarray, rows: list[dict], judge, info: dict, real: np.ndarray | None,
                 reference: dict | None = None) -> dict:
    """Adherence (judge), FD-judge and fidelity of generated ``images`` for prompt ``rows``; the
    part of ``evaluate_samples`` the sweep also runs at every point (with the same ``reference``,
    ``real_reference`` of ``real``, made once)."""
    groups = groups_of(rows)
    plain = images[groups["overall"]]
    if real is not None and reference is None:
        reference = real_reference(judge, real, len(plain))
    out = {"adherence": None, "fd_judge": None,
           "fidelity": {"generated": fidelity(plain), "real": reference["fidelity"] if reference else None}}
    if judge is not None:
        out["adherence"] = score(predict(judge, images), labels_from_metas(rows, info["vocab"]), groups)
        if real is not None:
            out["fd_judge"] = fd_judge(judge, plain, real, reference)
    return out


def evaluate_samples(samples_dir: str | Path, judge_dir: str | Path,
                     real_images: Callable[[int], np.ndarray] | None = None, cfg: EvaluateConfig | None = None,
                     real_key: dict | None = None, progress: bool = True) -> dict:
    """Every metric of the module docstring for the sample stage's output. ``real_images(n)``
    returns up to n real validation images (uint8, N x H x W x 3); ``real_key`` identifies that
    real set for the reference-statistics cache."""
    samples = Path(samples_dir)
    cfg = cfg or EvaluateConfig()
    rows = read_manifest(samples)
    judge, info = load_judge(judge_dir)
    first = rows[0]
    sampling = {k: first.get(k) for k in ("sampler", "spacing", "steps", "guidance_scale", "eta", "guidance_interval")}
    images = load_images(samples, rows)
    real = real_images(cfg.real_images) if real_images is not None else None
    result = {**score_images(images, rows, judge, info, real), "judge": info.get("val") if judge is not None else None,
              "samples": len(rows), "sampling": sampling,
              "fingerprint": evaluation_fingerprint(rows, judge_dir, sampling)}
    if judge is None:
        result["note"] = info["reason"]
    if real is not None:
        plain = groups_of(rows)["overall"]
        result["image"] = real_data_metrics(
            images[plain], [r["prompt"] for r, keep in zip(rows, plain) if keep], lambda: real,
            inception_weights=cfg.inception_weights, clip_model=cfg.clip_model, clip_pretrained=cfg.clip_pretrained,
            real_key={**(real_key or {}), "n": len(real)}, cache_dir=cache_dir(cfg), device=_device(cfg),
            kid_subset_size=cfg.kid_subset_size, progress=progress)
    return result


def cache_dir(cfg: EvaluateConfig) -> Path:
    return Path(cfg.cache_dir).expanduser() if cfg.cache_dir else Path.home() / ".cache" / "t2i-diffusion" / "eval"


def _device(cfg: EvaluateConfig) -> str:
    from diffusion.data.text import pick_device

    return str(pick_device(cfg.device))
