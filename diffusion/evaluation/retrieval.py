"""The retrieval evaluator: a small image-text contrastive model trained on the dataset's own pairs.

The judge reads the built-in set's attributes; this works on any captioned data. Like DAMSM
(Xu et al. 2018, AttnGAN) and CLIP (Radford et al. 2021), it maps images and captions into one
space and is trained with the symmetric InfoNCE loss and a learnable temperature on the real
training pairs. The text side reads the embed stage's ``EmbeddingTable`` (per-token states and the
pooled vector), so no text encoder is loaded; the image side is a small CNN at the dataset's image
size (at most ``max_side``). It measures:

- its own accuracy on real validation pairs: image->text and text->image top-1 within batches
  of ``VAL_BATCH`` validation pairs (how far to trust it);
- **R-precision** (AttnGAN): for each image, is its prompt ranked first among itself and
  ``distractors`` other distinct validation captions (drawn per prompt, seeded); chance is
  1 / (distractors + 1). The real images of the same captions give the ceiling;
- a **Fréchet distance** in its image-embedding space between generated and real images, beside
  the floor of two disjoint real sets.

Weights are safetensors and settings JSON (no pickle), as for the judge.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from diffusion.config import RetrievalConfig
from diffusion.data.text import EmbeddingTable, pick_device
from diffusion.errors import MissingInputError
from diffusion.evaluation.judge import light_noise
from diffusion.evaluation.metrics import frechet_distance_features

WEIGHTS = "retrieval.safetensors"
INFO = "retrieval.json"
VAL_BATCH = 100  # validation pairs per batch of the evaluator's own top-1 accuracy
HEADS = 4  # learned queries that pool the caption's tokens (one can pick the colour, another the shape)


class ImageTower(nn.Module):
    """(B, 3, S, S) in [-1, 1] -> (B, dim). Conv blocks halve the side down to 4, then a 2x2 pool
    keeps a coarse map (positions matter in captions) before the projection."""

    def __init__(self, image_size: int, width: int, dim: int):
        super().__init__()
        layers, c_in, c, side = [], 3, width, image_size
        while True:
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.GroupNorm(8, c), nn.SiLU(),
                       nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(8, c), nn.SiLU()]
            if side <= 4:
                break
            layers.append(nn.AvgPool2d(2))
            c_in, c, side = c, min(2 * c, 4 * width), side // 2
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.proj = nn.Linear(4 * c, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.features(x))


class TextTower(nn.Module):
    """Per-token states (B, L, D) with their mask and the pooled vector (B, E) -> (B, dim): a token
    MLP, attention pooling with ``HEADS`` learned queries, plus a projection of the pooled vector."""

    def __init__(self, token_dim: int, pooled_dim: int, dim: int):
        super().__init__()
        self.token = nn.Sequential(nn.LayerNorm(token_dim), nn.Linear(token_dim, dim), nn.GELU(), nn.Linear(dim, dim))
        self.query = nn.Linear(dim, HEADS, bias=False)
        self.pooled = nn.Sequential(nn.LayerNorm(pooled_dim), nn.Linear(pooled_dim, dim))
        self.out = nn.Linear(HEADS * dim + dim, dim)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        h = self.token(tokens)  # (B, L, dim)
        logits = self.query(h).masked_fill(~mask[..., None], float("-inf"))  # (B, L, HEADS)
        weights = logits.softmax(dim=1)
        attended = torch.einsum("blh,bld->bhd", weights, h).flatten(1)  # (B, HEADS * dim)
        return self.out(torch.cat([attended, self.pooled(pooled)], dim=-1))


class RetrievalNet(nn.Module):
    def __init__(self, image_size: int, token_dim: int, pooled_dim: int, width: int = 32, dim: int = 128):
        super().__init__()
        self.image = ImageTower(image_size, width, dim)
        self.text = TextTower(token_dim, pooled_dim, dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))  # CLIP's initial temperature

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image(x), dim=-1)

    def encode_text(self, tokens: torch.Tensor, mask: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text(tokens, mask, pooled), dim=-1)


# ---------------------------------------------------------------------------------------------
# Inputs


def resize(images: np.ndarray, size: int) -> np.ndarray:
    """(N, H, W, 3) uint8 at ``size`` x ``size`` (area filter); unchanged when already that size."""
    if images.shape[1:3] == (size, size):
        return images
    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BOX)) for im in images])


def to_input(images: np.ndarray, size: int) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, size, size) float in [-1, 1]."""
    x = np.ascontiguousarray(resize(images, size))
    return torch.from_numpy(x).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def text_inputs(table: EmbeddingTable, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token states, mask and pooled vectors of table ``rows``, as float32; a caption whose mask is
    empty keeps its first position, so attention pooling has something to read."""
    mask = table.mask[rows].clone()
    mask[:, 0] |= ~mask.any(dim=1)
    return table.tokens[rows].float(), mask, table.pooled[rows].float()


def read_pairs(urls: list[str], table: EmbeddingTable, limit: int, max_side: int,
               only: set[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """Up to ``limit`` (image, caption) pairs from shards, in order, images at most ``max_side``
    square; pairs whose caption is empty or has no embedding are left out. ``only``: just the
    first image of each of these captions."""
    from diffusion.data.shards import iter_samples

    images, captions = [], []
    wanted = None if only is None else set(only)
    for s in iter_samples(urls):
        if len(images) >= limit:
            break
        if not s["caption"] or s["caption"] not in table.rows:
            continue
        if wanted is not None:
            if s["caption"] not in wanted:
                continue
            wanted.discard(s["caption"])
        images.append(s["image"])
        captions.append(s["caption"])
    if not images:
        raise MissingInputError(f"no captioned images with embeddings in {urls[:1]}... (run ingest and embed)")
    side = min(max_side, min(im.shape[0] for im in images))
    return np.stack([resize(im[None], side)[0] for im in images]), captions


# ---------------------------------------------------------------------------------------------
# Training


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of matching (image, caption) pairs. Another pair with the same
    caption is not a negative: its logit is masked out."""
    logits = scale * img @ txt.T  # (B, B)
    same = (rows[:, None] == rows[None, :]) & ~torch.eye(len(rows), dtype=torch.bool, device=rows.device)
    logits = logits.masked_fill(same, float("-inf"))
    target = torch.arange(len(rows), device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def train_retrieval(cfg: RetrievalConfig, images: np.ndarray, captions: list[str], table: EmbeddingTable,
                    progress: bool = True) -> RetrievalNet:
    """Train on (image, caption) pairs; seeded, so the same inputs give the same weights on CPU."""
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = RetrievalNet(images.shape[1], table.tokens.shape[-1], table.pooled.shape[-1], cfg.width, cfg.dim)
    model = model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.1)
    x_all = to_input(images, images.shape[1])
    rows_all = torch.tensor([table.row(c) for c in captions])
    batch = min(cfg.batch_size, len(x_all))
    bar = tqdm(range(cfg.steps), desc="retrieval", unit="step", disable=not progress, mininterval=2.0)
    for _ in bar:
        idx = torch.randperm(len(x_all), generator=gen)[:batch]
        x, rows = x_all[idx], rows_all[idx]
        x = light_noise(x, gen)
        img = model.encode_image(x.to(device))
        txt = model.encode_text(*(t.to(device) for t in text_inputs(table, rows)))
        loss = contrastive_loss(img, txt, model.logit_scale.exp().clamp(max=100), rows.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Embeddings and measures


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def embed_images(model: RetrievalNet, images: np.ndarray, image_size: int, batch_size: int = 512) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, dim) unit vectors, float64."""
    parts = [model.encode_image(to_input(images[i:i + batch_size], image_size).to(_device(model))).double().cpu()
             for i in range(0, len(images), batch_size)]
    return torch.cat(parts).numpy() if parts else np.zeros((0, model.image.proj.out_features))


@torch.no_grad()
def embed_captions(model: RetrievalNet, table: EmbeddingTable, captions: list[str],
                   batch_size: int = 512) -> np.ndarray:
    """Captions (each must have a row in ``table``) -> (N, dim) unit vectors, float64."""
    rows = torch.tensor([table.row(c) for c in captions], dtype=torch.long)
    parts = [model.encode_text(*(t.to(_device(model)) for t in text_inputs(table, rows[i:i + batch_size])))
             .double().cpu() for i in range(0, len(rows), batch_size)]
    return torch.cat(parts).numpy() if parts else np.zeros((0, model.image.proj.out_features))


def pair_accuracy(img: np.ndarray, txt: np.ndarray, captions: list[str], batch: int = VAL_BATCH) -> dict:
    """Top-1 retrieval within consecutive batches of ``batch`` pairs: image->text and text->image.
    A caption equal to the pair's own counts as a hit (the same caption twice cannot be told apart)."""
    i2t, t2i, chance = [], [], []
    for i in range(0, len(img), batch):
        sim = img[i:i + batch] @ txt[i:i + batch].T
        cap = np.array(captions[i:i + batch], dtype=object)
        i2t.append(cap[sim.argmax(axis=1)] == cap)
        t2i.append(cap[sim.argmax(axis=0)] == cap)
        chance += [1 / len(cap)] * len(cap)
    return {"image_to_text": float(np.concatenate(i2t).mean()), "text_to_image": float(np.concatenate(t2i).mean()),
            "chance": float(np.mean(chance)), "batch": batch, "n": len(img)}


def distractors_for(prompt: str, pool: list[str], k: int, seed: int) -> list[str]:
    """``k`` distinct captions of ``pool`` other than ``prompt`` (all of them if fewer), drawn by a
    generator seeded from ``seed`` and the prompt, so a prompt meets the same ones in every set."""
    others = [c for c in pool if c != prompt]
    digest = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "little")
    rng = np.random.default_rng([seed, digest])
    return [others[i] for i in rng.choice(len(others), min(k, len(others)), replace=False)]


def r_precision(model: RetrievalNet, table: EmbeddingTable, image_size: int, images: np.ndarray,
                prompts: list[str], pool: list[str], distractors: int = 99, seed: int = 0,
                groups: dict[str, np.ndarray] | None = None) -> dict:
    """R-precision (R = 1): the fraction of images whose prompt scores above every one of its
    ``distractors`` other captions of ``pool`` (distinct validation captions). ``groups`` (name ->
    boolean mask over the images, e.g. seen / held_out) adds the same per group. Each result holds
    mean, n and chance (1 / candidates)."""
    pool = list(dict.fromkeys(c for c in pool if c))
    img = embed_images(model, images, image_size)
    vec = dict(zip(pool, embed_captions(model, table, pool)))
    for p in set(prompts) - set(vec):
        vec[p] = embed_captions(model, table, [p])[0]
    hit, chance = np.zeros(len(prompts), bool), np.zeros(len(prompts))
    for i, p in enumerate(prompts):
        others = distractors_for(p, pool, distractors, seed)
        hit[i] = img[i] @ vec[p] > max((img[i] @ vec[c] for c in others), default=-np.inf)
        chance[i] = 1 / (len(others) + 1)

    def summary(mask: np.ndarray) -> dict:
        n = int(mask.sum())
        return {"mean": float(hit[mask].mean()) if n else float("nan"), "n": n,
                "chance": float(chance[mask].mean()) if n else float("nan")}

    out = {"all": summary(np.ones(len(prompts), bool))}
    out.update({name: summary(np.asarray(mask, bool)) for name, mask in (groups or {}).items()})
    return out


def fd_images(model: RetrievalNet, image_size: int, generated: np.ndarray, real: np.ndarray) -> dict:
    """Fréchet distance in the evaluator's image space between ``generated`` and real images, and
    the floor a perfect model reaches: with real = [A; B], ``len(A) = len(generated)``, both are
    measured against B (generated vs B, and A vs B), so they differ only in the first set. With too
    few real images for two sets, generated is measured against all of them and there is no floor."""
    n = len(generated)
    feats = embed_images(model, real, image_size)
    out = {"n_generated": n, "n_real": len(real)}
    if len(real) >= n + 2 and n >= 2:
        out["generated"] = frechet_distance_features(embed_images(model, generated, image_size), feats[n:])
        out["real_floor"] = frechet_distance_features(feats[:n], feats[n:])
    else:
        out["generated"] = frechet_distance_features(embed_images(model, generated, image_size), feats)
    return out


# ---------------------------------------------------------------------------------------------
# Files


def save_retrieval(model: RetrievalNet, cfg: RetrievalConfig, image_size: int, metrics: dict,
                   out_dir: str | Path) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / WEIGHTS))
    info = {"image_size": image_size, "token_dim": model.text.token[1].in_features,
            "pooled_dim": model.text.pooled[1].in_features, "width": cfg.width, "dim": cfg.dim,
            "distractors": cfg.distractors, "seed": cfg.seed, "val": metrics}
    (out / INFO).write_text(json.dumps(info, indent=2) + "\n")


def load_retrieval(directory: str | Path, device: str = "cpu") -> tuple[RetrievalNet, dict]:
    d = Path(directory)
    if not (d / INFO).is_file():
        raise MissingInputError(f"retrieval evaluator not found at {d} (run the judge stage first)")
    info = json.loads((d / INFO).read_text())
    model = RetrievalNet(info["image_size"], info["token_dim"], info["pooled_dim"], info["width"], info["dim"])
    model.load_state_dict(load_file(str(d / WEIGHTS)))
    return model.to(device).eval(), info


def validate(model: RetrievalNet, table: EmbeddingTable, image_size: int, images: np.ndarray,
             captions: list[str], cfg: RetrievalConfig) -> dict:
    """The evaluator on real validation pairs: top-1 accuracy within batches and R-precision of the
    real images against the other validation captions."""
    acc = pair_accuracy(embed_images(model, images, image_size), embed_captions(model, table, captions), captions)
    rp = r_precision(model, table, image_size, images, captions, captions, cfg.distractors, cfg.seed)
    return {**acc, "r_precision": rp["all"]}


def build_retrieval(cfg: RetrievalConfig, train_urls: list[str], val_urls: list[str], table: EmbeddingTable,
                    out_dir: str | Path, progress: bool = True) -> dict:
    """Read the real training pairs, train the evaluator, score it on the real validation pairs,
    save it to ``out_dir``. Returns the validation scores."""
    images, captions = read_pairs(train_urls, table, cfg.max_images, cfg.max_side)
    model = train_retrieval(cfg, images, captions, table, progress)
    val_images, val_captions = read_pairs(val_urls, table, cfg.max_images, cfg.max_side)
    metrics = validate(model, table, images.shape[1], val_images, val_captions, cfg)
    save_retrieval(model, cfg, images.shape[1], metrics, out_dir)
    return metrics


# ---------------------------------------------------------------------------------------------
# The evaluation block


def seen_groups(captions: list[str], train_captions: set[str]) -> dict[str, np.ndarray]:
    """``seen`` (the caption is a training caption) and ``held_out`` (it is not) masks."""
    seen = np.array([c in train_captions for c in captions], bool)
    return {"seen": seen, "held_out": ~seen}


def evaluate_retrieval(directory: str | Path, table: EmbeddingTable, generated: np.ndarray, prompts: list[str],
                       real: np.ndarray, real_captions: list[str], pool: list[str], train_captions: set[str],
                       fd_real: np.ndarray | None = None) -> dict:
    """The ``retrieval.*`` metrics for generated images of ``prompts``, beside the same for the real
    images ``real`` of ``real_captions``: R-precision (all, seen, held_out) against distractors from
    ``pool`` (distinct validation captions), FD in the evaluator's image space with its real floor,
    (against ``fd_real`` where given, else ``real``) and the evaluator's own validation scores. Prompts without an embedding (a caption the embed
    stage never saw) are left out of R-precision and counted under ``no_embedding``."""
    model, info = load_retrieval(directory)
    size, k, seed = info["image_size"], info["distractors"], info["seed"]
    keep = np.array([p in table.rows for p in prompts], bool)
    kept = [p for p, ok in zip(prompts, keep) if ok]
    real_keep = np.array([c in table.rows for c in real_captions], bool)
    real_kept = [c for c, ok in zip(real_captions, real_keep) if ok]
    pool = [c for c in pool if c in table.rows]
    rp = {"generated": r_precision(model, table, size, generated[keep], kept, pool, k, seed,
                                   seen_groups(kept, train_captions)),
          "real": r_precision(model, table, size, real[real_keep], real_kept, pool, k, seed,
                              seen_groups(real_kept, train_captions))}
    fd = fd_images(model, size, generated, real if fd_real is None else fd_real)
    return {"r_precision": rp, "fd": fd, "evaluator": info["val"],
            "no_embedding": int((~keep).sum())}
