"""Real-data image metrics: FID, KID and CLIP score, computed offline.

- **FID** (Heusel et al. 2017): the Fréchet distance between Gaussians fitted to Inception-v3 pool
  features (2048-d) of the generated and the real images. Lower is better.
- **KID** (Bińkowski et al. 2018): the unbiased MMD² with the cubic polynomial kernel on the same
  features, averaged over random subsets (mean, std). Unlike FID it has no bias from small sample
  counts, so it is the one to read on small evaluation sets.
- **CLIP score** (Hessel et al. 2021, torchmetrics' definition): 100 · max(cos(image, prompt), 0)
  with an open_clip model, averaged over images. Higher is better.

The Inception network is torch-fidelity's port of the TensorFlow graph behind published FID numbers;
CLIP is any open_clip model. Neither is ever downloaded: the weights must be a local file or, for
CLIP, a pretrained tag already in the local cache. A metric whose weights are missing is
**skipped, never a crash**: ``real_data_metrics`` returns ``None`` for it and the reason (with
where to put the file) under ``"skipped"``, and still computes the others.

The real set's features are cached under a key naming the set, the extractor's weights and the
sample count (``cached_reference``), so a rerun extracts features of the generated images only.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg
from tqdm.auto import tqdm

from diffusion.artifacts import atomic_write_bytes, sha256_file
from diffusion.errors import T2IError
from diffusion.data.text import model_config, pick_device

# torch-fidelity's converted TF-Inception weights: its file name and URL_INCEPTION_V3
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
INCEPTION_DIM = 2048


# ---------------------------------------------------------------------------------------------
# Distances between feature sets


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) features -> mean (D,) and covariance (D, D), float64."""
    f = np.asarray(features, np.float64)
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """||mu1 - mu2||² + Tr(S1 + S2 - 2 sqrt(S1 S2)), as pytorch-fid computes it."""
    mu1, mu2, sigma1, sigma2 = (np.asarray(a, np.float64) for a in (mu1, mu2, sigma1, sigma2))
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():  # singular product: move both covariances off the boundary
        offset = np.eye(len(sigma1)) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):  # rounding leaves a tiny imaginary part; a large one means bad input
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrt(S1 S2) has a large imaginary part ({np.abs(covmean.imag).max():.3g}): "
                             "are both covariances positive semi-definite?")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def frechet_distance_features(f1: np.ndarray, f2: np.ndarray) -> float:
    """The Fréchet distance between the Gaussians fitted to two feature sets (rows are samples).

    A set of n <= D samples has covariance S1 = AᵀA (A: its centred rows / sqrt(n-1)), and the
    nonzero eigenvalues of S1 S2 are those of the (n, n) matrix A S2 Aᵀ: so Tr sqrt(S1 S2) is exact
    from a small symmetric eigenproblem, seconds instead of the minutes a (D, D) matrix square root
    takes on a 2-core CPU at D = 2048.
    """
    f1, f2 = sorted((np.asarray(f1, np.float64), np.asarray(f2, np.float64)), key=len)  # symmetric in f1, f2
    if len(f1) > f1.shape[1]:
        return frechet_distance(*feature_stats(f1), *feature_stats(f2))
    mu2, sigma2 = feature_stats(f2)
    a = (f1 - f1.mean(axis=0)) / np.sqrt(len(f1) - 1)
    tr_covmean = np.sqrt(np.linalg.eigvalsh(a @ sigma2 @ a.T).clip(min=0)).sum()
    diff = f1.mean(axis=0) - mu2
    return float(diff @ diff + (a * a).sum() + np.trace(sigma2) - 2 * tr_covmean)


def kernel_inception_distance(f1: np.ndarray, f2: np.ndarray, *, subsets: int = 100, subset_size: int = 1000,
                              degree: int = 3, gamma: float | None = None, coef0: float = 1.0,
                              seed: int = 0) -> tuple[float, float]:
    """Unbiased MMD² with the kernel (gamma x·y + coef0)^degree, over random subsets: (mean, std).

    The same estimator, kernel defaults (gamma = 1/D) and subset draws as torch-fidelity.
    """
    f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    if min(len(f1), len(f2)) < 2:
        raise ValueError(f"KID needs at least 2 samples per set (got {len(f1)} and {len(f2)})")
    m = min(subset_size, len(f1), len(f2))
    gamma = 1.0 / f1.shape[1] if gamma is None else gamma

    def kernel(x, y):
        return (x @ y.T * gamma + coef0) ** degree

    rng = np.random.RandomState(seed)
    mmds = np.empty(subsets)
    for i in range(subsets):
        x = f1[rng.choice(len(f1), m, replace=False)]
        y = f2[rng.choice(len(f2), m, replace=False)]
        k_xx, k_yy = kernel(x, x), kernel(y, y)
        within = k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)  # pairs i != j only
        mmds[i] = within / (m * (m - 1)) - 2 * kernel(x, y).mean()
    return float(mmds.mean()), float(mmds.std())


# ---------------------------------------------------------------------------------------------
# Feature extractors


def _check_images(images: np.ndarray) -> None:
    if not (isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 4
            and images.shape[-1] == 3):
        raise ValueError(f"expected uint8 images (N, H, W, 3), got {getattr(images, 'dtype', type(images))} "
                         f"{getattr(images, 'shape', '')}")


def _file_id(path: Path) -> str:
    return f"sha256:{sha256_file(path)[:16]}"


def _first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def resolve_inception_weights(setting: str | None) -> tuple[Path | None, str]:
    """(weights file, reason): "auto" looks in the torch hub cache and $T2I_WEIGHTS_DIR, any other
    string is a path; None/"none"/"off" disable FID and KID. Never downloads."""
    if setting is None or str(setting).lower() in ("none", "off"):
        return None, "disabled"
    if setting == "auto":
        dirs = [Path(torch.hub.get_dir()) / "checkpoints"]
        if os.environ.get("T2I_WEIGHTS_DIR"):
            dirs.append(Path(os.environ["T2I_WEIGHTS_DIR"]))
        for d in dirs:
            if (d / INCEPTION_FILE).is_file():
                return d / INCEPTION_FILE, f"found in {d}"
        return None, (f"no Inception weights: download {INCEPTION_URL} into {' or '.join(map(str, dirs))} "
                      "(or a folder named by $T2I_WEIGHTS_DIR), or set evaluate.inception_weights to the file's path")
    path = Path(setting).expanduser()
    if path.is_file():
        return path, f"file {path}"
    return None, f"Inception weights file not found: {path} (inception_weights)"


class InceptionFeatures:
    """torch-fidelity's TF-Inception-v3 port: (N, H, W, 3) uint8 images -> (N, 2048) pool features.

    Any image size: the network resizes to 299 x 299 itself, bilinearly as TensorFlow 1.x did.
    """

    def __init__(self, weights_path: str | Path, device: str = "cpu", batch_size: int = 64, progress: bool = True):
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        path = Path(weights_path)
        try:
            # torch-fidelity unpickles the file (weights_only=False): first make sure it holds only tensors
            torch.load(path, map_location="cpu", weights_only=True)
            net = FeatureExtractorInceptionV3("inception-v3-compat", [str(INCEPTION_DIM)],
                                              feature_extractor_weights_path=str(path))
        except Exception as e:  # noqa: BLE001 - a bad file raises pickle, torch or state-dict errors
            raise T2IError(f"cannot load Inception weights {path} ({_first_line(e)})") from None
        self.device = pick_device(device)
        self.net = net.to(self.device)
        self.batch_size, self.progress = batch_size, progress
        self.weights_id = _file_id(path)

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        _check_images(images)
        feats = [np.zeros((0, INCEPTION_DIM))]
        for i in tqdm(range(0, len(images), self.batch_size), desc="inception features", unit="batch",
                      disable=not self.progress, mininterval=1.0):
            # torch-fidelity takes uint8 (N, 3, H, W) in [0, 255] and does its own resize and scaling
            x = torch.from_numpy(np.ascontiguousarray(images[i:i + self.batch_size])).permute(0, 3, 1, 2)
            (f,) = self.net(x.to(self.device))
            feats.append(f.double().cpu().numpy())
        return np.concatenate(feats)


@dataclass(frozen=True)
class ClipSpec:
    model: str
    checkpoint: Path  # a local file: a user's weights file or a tag's file in the local cache
    preprocess: dict  # a tag's image_mean / image_std / image_interpolation / image_resize_mode
    quick_gelu: bool  # a tag trained with QuickGELU on an architecture that defaults to GELU


def _cached_tag_file(pcfg: dict) -> Path | None:
    """Where open_clip would find a pretrained tag's file without a download, or None."""
    from huggingface_hub import try_to_load_from_cache

    if pcfg.get("hf_hub"):
        repo, filename = os.path.split(pcfg["hf_hub"])
        if filename:  # open_clip prefers a .safetensors twin of a .bin / .pth file
            names = [str(Path(filename).with_suffix(".safetensors")), filename]
        else:
            names = ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        for name in names:
            hit = try_to_load_from_cache(repo, name)  # reads the local cache only
            if isinstance(hit, str):
                return Path(hit)
    if pcfg.get("url"):
        file = Path("~/.cache/clip").expanduser() / os.path.basename(pcfg["url"])
        if file.is_file():
            return file
    return None


def resolve_clip(model: str, pretrained: str | None) -> tuple[ClipSpec | None, str]:
    """(spec, reason) for CLIP weights that are already on this machine: a file, or a pretrained tag
    found in the local cache. Never downloads; anything else is a reason to skip the CLIP score."""
    if pretrained is None:
        return None, (f"clip_score needs weights: set evaluate.clip_pretrained to a weights file for {model} "
                      "or to an open_clip tag already in the local cache")
    try:
        model_config(model)
    except T2IError as e:
        return None, str(e)
    import open_clip

    path = Path(pretrained).expanduser()
    if path.is_file():
        return ClipSpec(model, path, {}, False), f"file {path}"
    if "/" in pretrained or path.suffix in (".pt", ".pth", ".bin", ".safetensors"):
        return None, f"CLIP weights file not found: {path} (clip_pretrained)"
    pcfg = open_clip.get_pretrained_cfg(model, pretrained)
    if not pcfg:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(model)) or "none"
        return None, f"clip_pretrained {pretrained!r} is neither a file nor an open_clip tag of {model} (tags: {tags})"
    file = _cached_tag_file(pcfg)
    if file is None:
        return None, (f"CLIP weights {model}/{pretrained} are not in the local cache and are never downloaded here: "
                      "fetch them on a machine with internet, or set evaluate.clip_pretrained to a weights file")
    preprocess = {f"image_{k}": pcfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if pcfg.get(k)}
    return ClipSpec(model, file, preprocess, bool(pcfg.get("quick_gelu"))), f"cached {model}/{pretrained}"


class ClipScorer:
    """Per-image CLIP score 100 · max(cos(image, prompt), 0) with an open_clip model, using the
    model's own preprocessing (resize to its input size, centre crop, normalise) and tokenizer."""

    def __init__(self, model: str, pretrained: str | None, device: str = "cpu", batch_size: int = 64,
                 progress: bool = True):
        import open_clip

        spec, reason = resolve_clip(model, pretrained)
        if spec is None:
            raise T2IError(reason)
        self.device = pick_device(device)
        try:
            net, _, self.preprocess = open_clip.create_model_and_transforms(
                model, pretrained=str(spec.checkpoint), force_quick_gelu=spec.quick_gelu, device=self.device,
                **spec.preprocess)
        except Exception as e:  # noqa: BLE001 - whatever open_clip raises, the CLIP score is skipped
            raise T2IError(f"cannot load CLIP {model} from {spec.checkpoint} ({_first_line(e)})") from None
        self.net = net.eval()
        self.tokenizer = open_clip.get_tokenizer(model)
        self.batch_size, self.progress = batch_size, progress
        self.weights_id = f"{model}:{_file_id(spec.checkpoint)}"

    @torch.no_grad()
    def __call__(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        from PIL import Image

        _check_images(images)
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        scores = [np.zeros(0)]
        for i in tqdm(range(0, len(images), self.batch_size), desc="clip score", unit="batch",
                      disable=not self.progress, mininterval=1.0):
            x = torch.stack([self.preprocess(Image.fromarray(im)) for im in images[i:i + self.batch_size]])
            tokens = self.tokenizer(prompts[i:i + self.batch_size])
            image = F.normalize(self.net.encode_image(x.to(self.device)), dim=-1)
            text = F.normalize(self.net.encode_text(tokens.to(self.device)), dim=-1)
            scores.append((100 * (image * text).sum(-1).clamp(min=0)).double().cpu().numpy())
        return np.concatenate(scores)


# ---------------------------------------------------------------------------------------------
# The real set's features, cached; all metrics at once


def cached_reference(cache_dir: Path, key: dict, compute: Callable[[], np.ndarray]) -> np.ndarray:
    """``compute()`` once per ``key``, then read from ``cache_dir/<hash of key>.npz`` (key inside)."""
    key_json = json.dumps(key, sort_keys=True, default=str)
    path = Path(cache_dir) / f"{hashlib.sha256(key_json.encode()).hexdigest()[:16]}.npz"
    if path.is_file():
        with np.load(path) as cached:
            return cached["features"]
    features = np.asarray(compute(), np.float64)
    buf = io.BytesIO()
    np.savez(buf, features=features, key=np.array(key_json))
    atomic_write_bytes(path, buf.getvalue())
    return features


def real_data_metrics(generated: np.ndarray, prompts: list[str], real: Callable[[], np.ndarray] | np.ndarray, *,
                      inception_weights: str | None = "auto", clip_model: str = "ViT-B-32",
                      clip_pretrained: str | None = None, real_key: dict, cache_dir: Path, device: str = "cpu",
                      kid_subset_size: int = 1000, progress: bool = True) -> dict:
    """FID and KID of ``generated`` against the real images, and the CLIP score of ``generated``
    against ``prompts``. ``real`` (uint8 images, or a function returning them) is only read when the
    cache under ``real_key`` misses (``n_real`` stays None if it is never needed). A metric that cannot
    run is None, with its reason in "skipped"."""
    _check_images(generated)
    out = {"fid": None, "kid": None, "clip_score": None, "skipped": {}, "n_generated": len(generated),
           "n_real": None if callable(real) else len(real), "extractors": {"inception": None, "clip": None}}

    path, reason = resolve_inception_weights(inception_weights)
    try:
        inception = InceptionFeatures(path, device, progress=progress) if path else None
    except T2IError as e:
        inception, reason = None, str(e)
    if inception is None:
        out["skipped"].update(fid=reason, kid=reason)
    else:
        out["extractors"]["inception"] = inception.weights_id
        fake = inception(generated)
        key = {**real_key, "features": f"inception-v3-tf:{INCEPTION_DIM}", "weights": inception.weights_id}
        ref = cached_reference(cache_dir, key, lambda: inception(real() if callable(real) else real))
        out["n_real"] = len(ref)
        if min(len(fake), len(ref)) < 2:
            reason = f"needs at least 2 images per set (got {len(fake)} generated, {len(ref)} real)"
            out["skipped"].update(fid=reason, kid=reason)
        else:
            out["fid"] = frechet_distance_features(fake, ref)
            mean, std = kernel_inception_distance(fake, ref, subset_size=kid_subset_size)
            out["kid"] = {"mean": mean, "std": std}

    try:
        clip = ClipScorer(clip_model, clip_pretrained, device, progress=progress)
    except T2IError as e:
        out["skipped"]["clip_score"] = str(e)
    else:
        out["extractors"]["clip"] = clip.weights_id
        out["clip_score"] = float(clip(generated, prompts).mean())
    return out
