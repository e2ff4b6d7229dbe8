"""Generation: prompts -> images with a trained denoiser, the text encoder and a sampler.

``generate(...)`` is the one place where conditioning, classifier-free guidance, per-image seeds
and the sampler meet; the sample stage, the training grid and the registered MLflow model all call
it. Each image's noise comes from its own ``torch.Generator(seed)``, so an image depends only on its
prompt, its seed and the settings, never on the batch it was drawn in.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from diffusion.errors import T2IError
from diffusion.model import Cond
from diffusion.precond import Denoiser, GuidedDenoiser
from diffusion.samplers import initial_noise, per_image_noise, sample_ancestral
from diffusion.schedules import sampling_sigmas
from diffusion.text import EmbeddingTable, TextEncoder, fingerprint_id


@dataclass(frozen=True)
class SamplerSettings:
    sampler: str = "ddim"  # ddim | ddpm
    steps: int = 20
    eta: float = 0.0
    guidance_scale: float = 4.0
    batch_size: int = 256
    clip_denoised: bool = True  # clamp x0_hat to the data range [-1, 1] at every step

    @property
    def effective_eta(self) -> float:
        return 1.0 if self.sampler == "ddpm" else self.eta


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def autocast_for(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


@torch.no_grad()
def generate(denoiser: Denoiser, cond: Cond, uncond: Cond, seeds: list[int], image_size: int,
             settings: SamplerSettings, *, progress: bool = False) -> np.ndarray:
    """Sample one image per row of ``cond``. ``uncond`` is what guidance pushes away from: one row
    (the empty caption) for every image, or one row per image (negative prompts).

    Returns (N, H, W, 3) uint8.
    """
    device = next(denoiser.parameters()).device
    sigmas = sampling_sigmas(denoiser.sigmas.double().cpu(), settings.steps)
    shape = (3, image_size, image_size)
    out = []
    starts = range(0, len(seeds), settings.batch_size)
    for start in tqdm(starts, desc="sample", unit="batch", disable=not progress):
        sl = slice(start, start + settings.batch_size)
        c = Cond(cond.tokens[sl], cond.mask[sl], cond.pooled[sl]).to(device)
        n = c.tokens.shape[0]
        if uncond.tokens.shape[0] == 1:
            u = Cond(uncond.tokens.expand(n, -1, -1), uncond.mask.expand(n, -1), uncond.pooled.expand(n, -1))
        else:
            u = Cond(uncond.tokens[sl], uncond.mask[sl], uncond.pooled[sl])
        u = u.to(device)
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds[sl]]
        guided = GuidedDenoiser(denoiser, c, u, settings.guidance_scale)
        x = initial_noise(gens, shape, float(sigmas[0]), device)
        with autocast_for(device):
            x = sample_ancestral(guided, x, sigmas, eta=settings.effective_eta,
                                 noise_fn=per_image_noise(gens, shape, device),
                                 clip_denoised=1.0 if settings.clip_denoised else None)
        out.append(to_uint8(x))
    return np.concatenate(out) if out else np.zeros((0, image_size, image_size, 3), np.uint8)


def _pad_to(t: torch.Tensor, length: int) -> torch.Tensor:
    pad = length - t.shape[1]
    if pad <= 0:
        return t
    return torch.nn.functional.pad(t, (0, 0, 0, pad) if t.dim() == 3 else (0, pad))


def encode_prompts(encoder: TextEncoder, prompts: list[str], batch_size: int = 256,
                   negatives: list[str] | None = None) -> tuple[Cond, Cond]:
    """(cond for the prompts, uncond), rounded through float16 as the embedding table stores
    them, so sampling sees exactly what training saw. uncond is the empty caption (one row), or
    with ``negatives`` one row per prompt (an empty negative is the empty caption)."""
    cond = _encode(encoder, prompts, batch_size)
    uncond = _encode(encoder, negatives if negatives is not None and any(negatives) else [""], batch_size)
    return cond, uncond


def _encode(encoder: TextEncoder, texts: list[str], batch_size: int) -> Cond:
    parts = [encoder.encode(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)]
    length = max(p[0].shape[1] for p in parts)
    tokens = torch.cat([_pad_to(p[0], length) for p in parts]).half().float()
    mask = torch.cat([_pad_to(p[1], length) for p in parts])
    pooled = torch.cat([p[2] for p in parts]).half().float()
    return Cond((tokens * mask[..., None]).cpu(), mask.cpu(), pooled.cpu())


def table_cond(table: EmbeddingTable, captions: list[str]) -> tuple[Cond, Cond]:
    """Conditioning straight from the precomputed embedding table (no text encoder)."""
    rows = torch.tensor([table.row(c) for c in captions])
    e = torch.tensor([table.empty_row])
    return (Cond(table.tokens[rows].float(), table.mask[rows], table.pooled[rows].float()),
            Cond(table.tokens[e].float(), table.mask[e], table.pooled[e].float()))


def check_fingerprint(encoder: TextEncoder, meta: dict) -> None:
    if fingerprint_id(encoder.fingerprint) != meta["text_fingerprint_id"]:
        raise T2IError(
            "text encoder does not match the one the model was trained with "
            f"(trained: {meta['text_fingerprint']['model']} {meta['text_fingerprint']['weights']}; "
            f"now: {encoder.fingerprint['model']} {encoder.fingerprint['weights']}); re-run embed and train"
        )


# --------------------------------------------------------------------------------------------
# Sample grid


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow built without FreeType
        return ImageFont.load_default()


def make_grid(images: np.ndarray | list, captions: list[str], *, cols: int = 6, cell: int = 96) -> Image.Image:
    """Images in a grid, each scaled to ``cell`` px with its prompt written under it."""
    n = len(captions)
    cols = max(1, min(cols, n))
    rows = (n + cols - 1) // cols
    font = _font(11)
    chars = max(8, cell // 6)
    text_h = 4 * 13
    W, H = cols * (cell + 8) + 8, rows * (cell + text_h + 8) + 8
    grid = Image.new("RGB", (W, H), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, (img, cap) in enumerate(zip(images, captions)):
        r, c = divmod(i, cols)
        x, y = 8 + c * (cell + 8), 8 + r * (cell + text_h + 8)
        grid.paste(Image.fromarray(np.asarray(img)).resize((cell, cell), Image.Resampling.NEAREST), (x, y))
        lines = textwrap.wrap(cap, chars)[:4]
        for j, line in enumerate(lines):
            draw.text((x, y + cell + 2 + 13 * j), line, fill=(0, 0, 0), font=font)
    return grid


def save_png(array: np.ndarray, path: str | Path) -> None:
    Image.fromarray(array).save(path, format="PNG")
