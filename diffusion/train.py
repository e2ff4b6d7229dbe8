"""Training: stream shards, join captions to their precomputed embeddings, train the denoiser.

``train(...)`` is a plain loop. It reports through a ``TrainLogger`` (MLflow is wired in from
outside), writes a full checkpoint every ``checkpoint_every`` steps (model, EMA, optimizer, LR
schedule, step, RNG states and the data position: a rerun continues exactly where it stopped), and
ends by exporting the EMA weights as ``model.safetensors`` plus ``model.json``, which is all that
sampling needs. It never loads the text encoder.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from diffusion.artifacts import CHECKPOINT, build_denoiser, save_model
from diffusion.config import TrainConfig, check_unet_fits, to_dict
from diffusion.errors import ConfigError, MissingInputError, T2IError
from diffusion.latents import LatentSpec, scale_latents
from diffusion.loss import diffusion_loss
from diffusion.model import Cond, count_params
from diffusion.shards import decode_sample, raw_samples
from diffusion.text import EmbeddingTable, fingerprint_id, pick_device



class TrainLogger(Protocol):
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_image(self, image: Image.Image, name: str) -> None: ...


class NullLogger:
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_image(self, image: Image.Image, name: str) -> None:
        pass


# --------------------------------------------------------------------------------------------
# Data: a resumable, seeded stream over the shards


@dataclass
class DataPosition:
    epoch: int = 0
    offset: int = 0  # samples of this epoch already consumed


class ShardStream:
    """Endless stream of decoded samples ({key, image uint8 HxWx3, caption, meta}) from shards.

    Epoch e visits the shards in an order seeded by (seed, e) and shuffles samples through a
    buffer seeded the same way, so the stream is a pure function of (urls, seed) and a position
    (epoch, offset) can be restored by replaying the epoch without decoding the skipped samples.
    ``rank``/``world`` split shards between torch.distributed ranks (one shard list per node).
    """

    def __init__(self, urls: list[str], seed: int, shuffle_buffer: int, rank: int = 0, world: int = 1):
        if not urls:
            raise MissingInputError("no training shards given")
        self.urls, self.seed, self.buffer = list(urls), seed, shuffle_buffer
        self.rank, self.world = rank, world
        self.position = DataPosition()

    def _epoch(self, epoch: int) -> Iterator[dict]:
        rng = random.Random(self.seed * 1_000_003 + epoch)
        urls = self.urls[:]
        rng.shuffle(urls)
        urls = urls[self.rank::self.world] or urls  # fewer shards than ranks: every rank reads all
        buf: list[dict] = []
        for sample in raw_samples(urls):
            buf.append(sample)
            if len(buf) >= self.buffer:
                j = rng.randrange(len(buf))
                buf[j], buf[-1] = buf[-1], buf[j]
                yield buf.pop()
        rng.shuffle(buf)
        yield from buf

    def __iter__(self) -> Iterator[dict]:
        while True:
            pos = self.position
            got = 0
            for i, raw in enumerate(self._epoch(pos.epoch)):
                if i < pos.offset:
                    continue
                s = decode_sample(raw)
                pos.offset = i + 1
                got += 1
                yield s
            if got == 0 and pos.offset == 0:
                raise MissingInputError(f"training shards hold no samples: {self.urls[:2]}...")
            self.position = DataPosition(pos.epoch + 1, 0)


def batches(stream: ShardStream, table: EmbeddingTable, batch_size: int,
            latent: LatentSpec | None = None) -> Iterator[Batch]:
    """Batches of (images (B, 3, H, W) float in [-1, 1], embedding rows (B,), stream position after it);
    from latent shards (``latent`` given) the scaled posterior means and standard deviations."""
    it = iter(stream)
    while True:
        xs, stds, rows = [], [], []
        for _ in range(batch_size):
            s = next(it)
            if latent is None:
                xs.append(s["image"])
            else:
                xs.append(s["mean"])
                stds.append(s["std"])
            rows.append(table.row(s["caption"]))
        if latent is None:
            x, std = torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0), None
        else:
            x, std = scale_latents(np.stack(xs), np.stack(stds), latent)
        yield Batch(x, torch.tensor(rows, dtype=torch.long), dataclasses.replace(stream.position), std)


@dataclass
class Batch:
    x0: torch.Tensor
    rows: torch.Tensor
    position: DataPosition  # where the stream stands after this batch (saved in checkpoints)
    std: torch.Tensor | None = None  # latent batches: the posterior's std (x0 holds its mean)


class BatchStream(torch.utils.data.IterableDataset):
    """``batches`` as an IterableDataset, so a DataLoader worker process can produce them.

    Tar parsing and PNG decoding then run beside the training step instead of between steps;
    each batch carries its own stream position, so checkpoints stay exact.
    """

    def __init__(self, stream: ShardStream, table: EmbeddingTable, batch_size: int, latent: LatentSpec | None = None):
        super().__init__()
        self.stream, self.table, self.batch_size, self.latent = stream, table, batch_size, latent

    def __iter__(self) -> Iterator[Batch]:
        return batches(self.stream, self.table, self.batch_size, self.latent)


def batch_loader(stream: ShardStream, table: EmbeddingTable, batch_size: int, workers: int,
                 latent: LatentSpec | None = None) -> Iterator[Batch]:
    if workers == 0:
        return batches(stream, table, batch_size, latent)
    loader = torch.utils.data.DataLoader(BatchStream(stream, table, batch_size, latent), batch_size=None,
                                         num_workers=1, prefetch_factor=4, persistent_workers=False)
    return iter(loader)


# --------------------------------------------------------------------------------------------
# Code identity and the schedule


def code_fingerprint() -> str:
    """Hash of the modules that define the model and its training: a checkpoint written by other
    code is not resumed."""
    import hashlib

    here = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for name in ("train.py", "model.py", "precond.py", "loss.py", "schedules.py"):
        h.update((here / name).read_bytes())
    return h.hexdigest()[:16]


def lr_factor(step: int, cfg: TrainConfig) -> float:
    # 1) linear warmup from 0
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    # 2) cosine decay to zero over the remaining steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    ema_p = list(ema.parameters())
    torch._foreach_lerp_(ema_p, [p.detach() for p in model.parameters()], 1.0 - decay)


# --------------------------------------------------------------------------------------------
# The loop


def _rng_state(gen: torch.Generator) -> dict:
    state = {"torch": torch.random.get_rng_state(), "python": random.getstate(), "batch": gen.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, gen: torch.Generator) -> None:
    torch.random.set_rng_state(state["torch"])
    random.setstate(state["python"])
    gen.set_state(state["batch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def train(cfg: TrainConfig, shard_urls: list[str], table: EmbeddingTable, out_dir: str | Path, *,
          image_size: int, latent: LatentSpec | None = None, logger: TrainLogger | None = None, grid_fn=None,
          progress: bool = True) -> Path:
    """Train for ``cfg.steps`` steps (resuming from out_dir/checkpoint.pt if its config matches).

    ``shard_urls`` are image shards, or latent shards with ``latent`` saying which latent space
    (the latents stage); ``image_size`` is the side of the images the model produces.
    ``grid_fn(denoiser, step) -> PIL.Image`` may render a sample grid at the end for the logger.
    Returns the directory holding model.safetensors and model.json.
    """
    logger = logger or NullLogger()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = pick_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    text_dim, pooled_dim = table.tokens.shape[-1], table.pooled.shape[-1]
    try:
        if latent is None:
            check_unet_fits(cfg.unet, image_size, "image size")
        else:
            check_unet_fits(cfg.unet, latent.size, f"latent size ({image_size}px / {image_size // latent.size})")
    except ConfigError as e:
        raise ConfigError(f"train.unet does not fit the data: {e}") from None
    channels = 3 if latent is None else latent.channels

    model = build_denoiser(cfg.unet, text_dim, pooled_dim, cfg, in_channels=channels).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    gen = torch.Generator().manual_seed(cfg.seed)  # caption dropout and noise draws (on CPU)
    stream = ShardStream(shard_urls, cfg.seed, cfg.shuffle_buffer)
    step = 0
    run_meta = {"train": to_dict(cfg), "code": code_fingerprint(), "text_dim": text_dim, "pooled_dim": pooled_dim, "image_size": image_size,
                "text_fingerprint": table.fingerprint, "text_fingerprint_id": fingerprint_id(table.fingerprint)}
    if latent is not None:
        run_meta["latents"] = latent.as_dict()

    ckpt_path = out / CHECKPOINT
    if ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if ckpt["step"] >= cfg.steps:
            print(f"{ckpt_path} is a finished run: training anew")
        elif ckpt["meta"] == run_meta:
            model.load_state_dict(ckpt["model"])
            ema.load_state_dict(ckpt["ema"])
            opt.load_state_dict(ckpt["optimizer"])
            sched.load_state_dict(ckpt["scheduler"])
            step = ckpt["step"]
            stream.position = DataPosition(**ckpt["data"])
            _set_rng_state(ckpt["rng"], gen)
            print(f"resuming from {ckpt_path} at step {step}")
        else:
            print(f"ignoring {ckpt_path}: it was written with different settings")

    n_params = count_params(model.net)
    logger.log_metrics({"params_millions": n_params / 1e6}, step)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    empty = table.empty_row
    tokens, mask, pooled = table.tokens.to(device), table.mask.to(device), table.pooled.to(device)
    lengths = mask.sum(1)

    def save_checkpoint() -> None:
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save({"meta": run_meta, "model": model.state_dict(), "ema": ema.state_dict(),
                    "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step,
                    "data": dataclasses.asdict(position), "rng": _rng_state(gen)}, tmp)
        tmp.replace(ckpt_path)  # atomic

    data = batch_loader(stream, table, cfg.batch_size, cfg.data_workers, latent)
    posterior = latent is not None and cfg.latent_sampling == "posterior"
    position = stream.position
    bar = tqdm(total=cfg.steps, initial=step, desc="train", unit="step", disable=not progress, mininterval=2.0)
    t_start, seen, loss_acc, n_acc = time.perf_counter(), 0, 0.0, 0
    model.train()
    while step < cfg.steps:
        batch = next(data)
        x0, rows, position = batch.x0, batch.rows, batch.position
        if posterior:  # a fresh draw of each image's latent distribution
            x0 = x0 + batch.std * torch.randn(x0.shape, generator=gen)
        drop = torch.rand(rows.shape, generator=gen) < cfg.cond_dropout  # classifier-free guidance
        rows = torch.where(drop, torch.full_like(rows, empty), rows).to(device)
        length = int(lengths[rows].max())  # attend to the batch's longest caption, not the table's
        cond = Cond(tokens[rows, :length].float(), mask[rows, :length], pooled[rows].float())
        x0 = x0.to(device, non_blocking=True)
        with autocast:
            loss = diffusion_loss(model, x0, cond, weighting=cfg.loss_weighting, gamma=cfg.min_snr_gamma,
                                  generator=gen if device.type == "cpu" else None).mean()
        if not torch.isfinite(loss):
            raise T2IError(f"training diverged at step {step} (loss {loss.item()}); lower train.lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        # EMA warms up so the average is not dominated by the random initialisation
        ema_update(ema, model, min(cfg.ema_decay, (1 + step) / (10 + step)))
        step += 1
        seen += x0.shape[0]
        loss_acc += loss.item()
        n_acc += 1
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.steps:
            elapsed = time.perf_counter() - t_start
            metrics = {"loss": loss_acc / n_acc, "lr": sched.get_last_lr()[0], "grad_norm": float(grad_norm),
                       "img_per_s": seen / elapsed, "epoch": position.epoch}
            logger.log_metrics(metrics, step)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", img_s=f"{metrics['img_per_s']:.0f}")
            loss_acc, n_acc = 0.0, 0
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            save_checkpoint()
    bar.close()
    elapsed = time.perf_counter() - t_start
    summary = {"train_seconds": elapsed, "train_img_per_s": seen / elapsed if elapsed > 0 else 0.0}
    logger.log_metrics(summary, step)
    ema.eval()
    save_model(ema, out, {**run_meta, "steps_done": step, "params": n_params, "device": device.type, **summary})
    if grid_fn is not None:
        logger.log_image(grid_fn(ema, step), "sample_grid.png")
    return out
