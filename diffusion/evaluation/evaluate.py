"""Evaluation: how well generated images follow their prompts, and how much they look like the data.

Metrics (``evaluate_samples``; reports/metrics.json)::

    adherence.<group>.{shape,color,size,position,all,n}  the judge on generated images (groups: judge.GROUPS)
    judge.{overall,seen,held_out}.{...}                the judge on real validation images (how far to trust it)
    fd_judge.{generated,real_floor,n_generated,n_real} Frechet distance in the judge's feature space
    fidelity.{generated,real}.{speckle,grain}          pixel noise where the data is flat (see ``fidelity``)
    image.{fid,kid.mean,kid.std,clip_score}            standard metrics, each where its weights are present
    retrieval.r_precision.{generated,real}.{all,seen,held_out}.{mean,n,chance}
                                                       the retrieval evaluator (any data): is the prompt
                                                       ranked first among itself and 99 validation captions
    retrieval.fd.{generated,real_floor,n_generated,n_real}  Frechet distance in its image features
    retrieval.evaluator.{...}                          its own scores on real validation pairs
    fingerprint.{prompts,judge,sampling,id}            what they were measured on

"all" is the fraction of images with every attribute the prompt names right. ``overall``/``seen``/
``held_out`` use the training wording; ``new_wording``/``new_wording_held_out`` use frames and
phrasings no training caption uses (``captions.HELD_OUT``); ``partial`` prompts name only some
attributes and are scored on those. FD-judge, fidelity
and the image metrics use the training-wording images and real validation images. Two models'
numbers are comparable only when their ``fingerprint.id`` is the same (the promotion policy
refuses otherwise).

The judge's adherence and FD-judge exist only for the built-in data (the judge reads its
attributes); the retrieval block and fidelity work on any data (the retrieval evaluator is trained
by the judge stage on the dataset's own pairs), and FID/KID/CLIP score on any data with their weights.
A metric that cannot be computed is recorded with the reason, never a crash.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from diffusion.artifacts import JUDGE_INFO, JUDGE_WEIGHTS, RETRIEVAL_DIR, read_manifest
from diffusion.config import EvaluateConfig, Params
from diffusion.errors import ConfigError
from diffusion.evaluation.judge import embed, groups_of, labels_from_metas, load_judge, predict, score
from diffusion.evaluation.metrics import frechet_distance_features, real_data_metrics
from diffusion.evaluation.retrieval import INFO as RETRIEVAL_INFO
from diffusion.evaluation.retrieval import WEIGHTS as RETRIEVAL_WEIGHTS

SPECKLE_LEVELS = 24  # a background pixel this many 8-bit levels off the background colour is a speck
OBJECT_LEVELS = 40  # pixels this far off the background colour may belong to the object


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def evaluation_fingerprint(rows: list[dict], judge_dir: str | Path, sampling: dict) -> dict:
    """What a set of metrics was measured on: the prompt set (prompts and seeds), the evaluators
    (the judge's weights and vocabulary, and the retrieval evaluator's where the judge stage
    trained one) and the sampler settings; ``id`` hashes all three."""
    d = Path(judge_dir)
    judge = hashlib.sha256()
    for name in (JUDGE_INFO, JUDGE_WEIGHTS, f"{RETRIEVAL_DIR}/{RETRIEVAL_INFO}", f"{RETRIEVAL_DIR}/{RETRIEVAL_WEIGHTS}"):
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
                     real_key: dict | None = None, progress: bool = True, retrieval: dict | None = None) -> dict:
    """Every metric of the module docstring for the sample stage's output. ``real_images(n)``
    returns up to n real validation images (uint8, N x H x W x 3); ``real_key`` identifies that
    real set for the reference-statistics cache; ``retrieval``: the keyword arguments of
    ``retrieval_metrics`` but the images and rows (None: no retrieval metrics)."""
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
    if retrieval is not None:
        result["retrieval"] = retrieval_metrics(images, rows, n_real=cfg.real_images, **retrieval)
    return result


def retrieval_metrics(images: np.ndarray, rows: list[dict], directory: str | Path, table, val_urls: list[str],
                      val_captions: list[str], train_captions: set[str], n_real: int,
                      train_urls: list[str] = ()) -> dict:
    """The retrieval evaluator's block (``retrieval.evaluate_retrieval``) for generated ``images``
    of prompt ``rows``: beside up to ``n_real`` real validation images with their captions (and,
    from ``train_urls``, one real training image of each prompt that is a training caption, for
    the seen captions' real figure), the distinct validation captions as distractors, seen/held-out
    split by the training captions. The FD compares with the validation images only."""
    from diffusion.evaluation.retrieval import evaluate_retrieval, read_pairs

    prompts = [r["prompt"] for r in rows]
    val, val_pairs = read_pairs(val_urls, table, n_real, images.shape[1])
    real, real_captions = val, val_pairs
    seen = set(prompts) & train_captions
    if seen and train_urls:
        taught, taught_captions = read_pairs(list(train_urls), table, len(seen), val.shape[1], only=seen)
        real, real_captions = np.concatenate([val, taught]), val_pairs + taught_captions
    return evaluate_retrieval(directory, table, images, prompts, real, real_captions, sorted(set(val_captions)),
                              train_captions, fd_real=val)


def cache_dir(cfg: EvaluateConfig) -> Path:
    return Path(cfg.cache_dir).expanduser() if cfg.cache_dir else Path.home() / ".cache" / "t2i-diffusion" / "eval"


def _device(cfg: EvaluateConfig) -> str:
    from diffusion.data.text import pick_device

    return str(pick_device(cfg.device))


# ---------------------------------------------------------------------------------------------
# The promotion metric: one the evaluation produces for this data, on this machine

AUTO_METRIC = {True: "adherence.held_out.all", False: "retrieval.r_precision.generated.all.mean"}
BUILTIN_ONLY = ("adherence.", "judge.", "fd_judge.")  # the judge reads the built-in set's attributes
ANY_DATA = ("retrieval.", "fidelity.")  # the retrieval evaluator and fidelity work on any data


def promotion_metric(p: Params) -> str:
    """``promote.metric``, with "auto" resolved for the data: the judge's held-out all-correct on the
    built-in set, else the retrieval evaluator's R-precision of generated images."""
    m = p.promote.metric
    return AUTO_METRIC[p.ingest.source == "builtin"] if m == "auto" else m


def check_promotion_metric(p: Params) -> str:
    """The promotion metric, resolved; a ``ConfigError`` (one line) when the evaluation cannot
    produce it for this data (the judge's metrics off the built-in set) or on this machine (FID/KID
    without Inception weights, the CLIP score without CLIP weights). Run before training, so a
    policy that could never decide is refused before hours are spent."""
    from diffusion.evaluation.metrics import resolve_clip, resolve_inception_weights

    metric, builtin = promotion_metric(p), p.ingest.source == "builtin"
    why = None
    if metric.startswith(BUILTIN_ONLY) and not builtin:
        why = f"the judge's metrics exist only for the built-in set (ingest.source is {p.ingest.source})"
    elif metric.startswith(("image.fid", "image.kid")):
        found, reason = resolve_inception_weights(p.evaluate.inception_weights)
        why = None if found else reason
    elif metric.startswith("image.clip_score"):
        spec, reason = resolve_clip(p.evaluate.clip_model, p.evaluate.clip_pretrained)
        why = reason if spec is None else None
    elif not metric.startswith(BUILTIN_ONLY + ANY_DATA):
        why = "it is none of adherence.*, judge.*, fd_judge.*, retrieval.*, fidelity.*, image.{fid,kid,clip_score}"
    if why:
        raise ConfigError(f"promote.metric {metric!r} cannot be measured here: {why}; "
                          f"set promote.metric to auto ({AUTO_METRIC[builtin]} for this data)")
    return metric
