"""Generation: prompts -> images with a trained denoiser, the text encoder and a sampler.

``generate(...)`` is the one place where conditioning, classifier-free guidance, per-image seeds
and the sampler meet; the sample stage, the training grid and the registered MLflow model all call
it. Each image's noise comes from its own ``torch.Generator(seed)``, so an image depends only on its
prompt, its seed and the settings, not on its neighbours in a batch (the batch's size can still
move a pixel by one 8-bit level: CPU kernels round by batch shape).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from diffusion.errors import T2IError
from diffusion.models.unet import Cond
from diffusion.models.precond import Denoiser, GuidedDenoiser
from diffusion.config import SampleConfig
from diffusion.sampling.samplers import clamped, initial_noise, per_image_noise, sampler_eta, sampler_fn
from diffusion.models.schedules import sampling_sigmas
from diffusion.data.text import EmbeddingTable, TextEncoder, embed_captions, fingerprint_id


def effective_eta(cfg: SampleConfig) -> float:
    """The noise amount ``cfg``'s sampler really uses: ddpm is always 1; ``sample.eta`` null means
    the sampler's own default (dpmpp_2m_sde 1, the others 0); heun and dpmpp_2m are deterministic."""
    return sampler_eta(cfg.sampler, cfg.eta)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def autocast_for(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


@torch.no_grad()
def generate(denoiser: Denoiser, cond: Cond, uncond: Cond, seeds: list[int], image_size: int | tuple[int, int],
             cfg: SampleConfig, *, progress: bool = False) -> np.ndarray:
    """Sample one image per row of ``cond`` with the sampler settings of ``cfg`` (sampler,
    steps, spacing, eta, guidance_scale, guidance_interval, clip_denoised, batch_size). ``uncond``
    is what guidance pushes away from: one row (the empty caption) for every image, or one row per
    image (negative prompts).

    A latent model (``denoiser.codec`` set) samples latents and decodes them; ``clip_denoised``
    then clamps x0_hat to the largest value of the training latents instead of [-1, 1].

    ``image_size``: the side of square images, or (width, height) (an aspect bucket of the model,
    ``diffusion.data.buckets.requested_size``).

    Returns (N, H, W, 3) uint8.
    """
    width, height = (int(image_size[0]), int(image_size[1])) if isinstance(image_size, (tuple, list)) \
        else (int(image_size), int(image_size))
    device = next(denoiser.net.parameters()).device
    sigmas = sampling_sigmas(denoiser.sigmas.double().cpu(), cfg.steps, cfg.spacing)
    sample = sampler_fn(cfg.sampler)
    interval = tuple(cfg.guidance_interval) if cfg.guidance_interval else None
    codec = denoiser.codec
    if codec is None:
        shape, bound = (3, height, width), 1.0
    else:
        factor = codec.spec.image_size // codec.spec.size  # the VAE's; an aspect bucket is a multiple of it
        if (isinstance(image_size, int) and image_size != codec.spec.image_size) or width % factor or height % factor:
            raise T2IError(f"the model decodes {codec.spec.image_size}px images, {width}x{height} were asked for")
        shape, bound = (codec.spec.channels, height // factor, width // factor), codec.spec.abs_max
    out = []
    starts = range(0, len(seeds), cfg.batch_size)
    for start in tqdm(starts, desc="sample", unit="batch", disable=not progress):
        sl = slice(start, start + cfg.batch_size)
        c = cond.select(sl).to(device)
        u = uncond.expand(c.tokens.shape[0]) if uncond.tokens.shape[0] == 1 else uncond.select(sl)
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds[sl]]
        guided = GuidedDenoiser(denoiser, c, u.to(device), cfg.guidance_scale, interval)
        x = initial_noise(gens, shape, float(sigmas[0]), device)
        with autocast_for(device):
            x = sample(clamped(guided, bound if cfg.clip_denoised else None), x, sigmas, eta=effective_eta(cfg),
                       noise_fn=per_image_noise(gens, shape, device))
        if codec is not None:
            x = codec.decode(x.float())
        out.append(to_uint8(x))
    return np.concatenate(out) if out else np.zeros((0, height, width, 3), np.uint8)


def encode_prompts(encoder: TextEncoder, prompts: list[str], batch_size: int = 256,
                   negatives: list[str] | None = None) -> tuple[Cond, Cond]:
    """(cond for the prompts, uncond) through the embed stage's own path (``embed_captions``:
    each unique text once, float16 as the table stores it), so sampling sees exactly what training
    saw. uncond is the empty caption (one row), or with ``negatives`` one row per prompt (an empty
    negative is the empty caption)."""
    table = embed_captions(encoder, list(prompts) + list(negatives or []), batch_size, progress=False)
    return table_cond(table, prompts, negatives)


def table_cond(table: EmbeddingTable, captions: list[str], negatives: list[str] | None = None) -> tuple[Cond, Cond]:
    """Conditioning straight from an embedding table: one row per caption, and the empty caption
    (one row) or one row per negative prompt as uncond."""
    def rows(texts):
        idx = torch.tensor([table.row(t) for t in texts])
        return Cond(table.tokens[idx].float(), table.mask[idx], table.pooled[idx].float())

    neg = negatives if negatives is not None and any(negatives) else [""]
    return rows(captions), rows(neg)


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
        im = Image.fromarray(np.asarray(img))
        scale = cell / max(im.size)  # a non-square image keeps its aspect, centred in its cell
        w, h = max(1, round(im.width * scale)), max(1, round(im.height * scale))
        grid.paste(im.resize((w, h), Image.Resampling.NEAREST), (x + (cell - w) // 2, y + (cell - h) // 2))
        lines = textwrap.wrap(cap, chars)[:4]
        for j, line in enumerate(lines):
            draw.text((x, y + cell + 2 + 13 * j), line, fill=(0, 0, 0), font=font)
    return grid


def save_png(array: np.ndarray, path: str | Path) -> None:
    Image.fromarray(array).save(path, format="PNG")
