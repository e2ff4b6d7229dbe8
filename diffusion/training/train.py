"""Training: stream shards, join captions to their precomputed embeddings, train the denoiser.

``train(...)`` runs the loop from named pieces: ``build_state`` (model, EMA, optimizer, schedule,
precision), ``resume`` (the newest intact checkpoint; other settings are refused), ``train_step``
(gradient accumulation, clipping, the optimizer, EMA), a ``Monitor`` (loss, throughput and the
non-finite guard, all kept on the device and read only at logging intervals: no host-device sync
per step), ``save_checkpoint`` (the last ``keep_checkpoints``, each written atomically) and
``export`` (the EMA weights as ``model.safetensors`` plus ``model.json``, all that sampling needs).
It reports through a ``TrainLogger`` (MLflow is wired in from outside) and never loads the text
encoder; loading a model for inference goes through ``diffusion.artifacts`` and never imports
this module.

Under torchrun every process trains on its own part of the shards (``diffusion.training.train_data``)
with DistributedDataParallel; rank 0 alone logs, writes checkpoints and exports, and every rank
resumes from the same checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Protocol

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from diffusion.training import distributed, warm_start
from diffusion.artifacts import CHECKPOINT
from diffusion.models import lora
from diffusion.models.store import build_denoiser, save_model
from diffusion.config import TrainConfig, check_denoiser_fits, check_fits, to_dict
from diffusion.training.distributed import Dist
from diffusion.errors import ConfigError, T2IError
from diffusion.data.latents import LatentSpec
from diffusion.models.loss import diffusion_loss, objective_warning
from diffusion.models.unet import Cond, count_params
from diffusion.models.precond import Denoiser
from diffusion.data.shards import raw_samples
from diffusion.data.text import WORD_VECTORS, EmbeddingTable, fingerprint_id, pick_device
from diffusion.training.train_data import Batch, DataPosition, DataSpec, batch_loader, first_samples


class TrainLogger(Protocol):
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_image(self, image: Image.Image, name: str) -> None: ...


class NullLogger:
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_image(self, image: Image.Image, name: str) -> None:
        pass


# --------------------------------------------------------------------------------------------
# Code identity and the schedule

PREVIEW_DIR = "train_samples"  # the MLflow artifact folder of train.sample_every's grids


def code_fingerprint(package_dir: Path | None = None) -> str:
    """Hash of the code the train stage runs, ``codegraph.stage_files("train")``: the same files
    as the stage's deps in dvc.yaml, so a change that makes ``dvc repro`` retrain also stops a
    checkpoint written by the other code from being resumed. ``package_dir``: another copy of
    the package (tests)."""
    import hashlib

    from diffusion import codegraph

    root = package_dir or codegraph.PACKAGE_DIR
    h = hashlib.sha256()
    for name in codegraph.stage_files("train", root):
        data = (root.parent / name).read_bytes()
        h.update(f"{name}\0{len(data)}\0".encode() + data)
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
    # the weights that train (all, or a LoRA adapter alone): a frozen base is the same in both
    pairs = [(e, p.detach()) for e, p in zip(ema.parameters(), model.parameters()) if p.requires_grad]
    torch._foreach_lerp_([e for e, _ in pairs], [p for _, p in pairs], 1.0 - decay)


# --------------------------------------------------------------------------------------------
# State


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype ``train.precision`` asks for (None: float32). auto: bf16 on CUDA."""
    if cfg.precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.precision]


def adamw_kwargs(cfg: TrainConfig, device: torch.device) -> dict:
    """The AdamW settings of the loop: the fused kernel, on CUDA and on the CPU (there one step of
    the default UNet's 286 tensors takes 7 ms fused against 30 ms in PyTorch's per-tensor loop,
    about a tenth of a training step; ``bench/train_bench.py`` times both)."""
    return {"lr": cfg.lr, "weight_decay": cfg.weight_decay, "betas": (0.9, 0.99),
            **({"fused": True} if device.type in ("cuda", "cpu") else {})}


def set_grad_checkpointing(net: torch.nn.Module, cfg: TrainConfig) -> None:
    """``train.grad_checkpointing`` on the raw network (every network of train.denoiser has
    ``set_grad_checkpointing``; it acts only while gradients are recorded)."""
    setter = getattr(net, "set_grad_checkpointing", None)
    if setter is None:
        if cfg.grad_checkpointing:
            raise ConfigError(f"train.grad_checkpointing: the {cfg.denoiser} network ({type(net).__name__}) "
                              "cannot recompute its activations; set train.grad_checkpointing false")
        return
    setter(cfg.grad_checkpointing)


def reset_peak_memory(device: torch.device) -> None:
    """Start ``peak_memory_mb``'s count at this point (CUDA: the allocator's peak; the CPU, on Linux:
    the process' peak resident set, VmHWM, via /proc/self/clear_refs)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory_mb(device: torch.device) -> float:
    """The peak memory since ``reset_peak_memory``, in MiB: on CUDA ``torch.cuda.max_memory_allocated``
    (tensors only, not the allocator's cache); on the CPU the peak resident set size of this process
    (data worker processes not included), where /proc is missing (not Linux) the lifetime peak
    ``getrusage``'s ru_maxrss reports."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux, bytes on macOS
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


@dataclass
class TrainState:
    cfg: TrainConfig
    device: torch.device
    dist: Dist
    model: Denoiser  # the module whose weights are saved
    forward: Callable  # what the loss calls: the model, wrapped by DDP and/or torch.compile
    ema: Denoiser
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    amp_dtype: torch.dtype | None
    gen: torch.Generator  # caption dropout and noise draws (on the CPU)
    meta: dict
    step: int = 0
    positions: list[DataPosition] = field(default_factory=list)  # one per data worker
    checkpoint_step: int | None = None  # the step checkpoint.pt holds, when this run wrote or resumed it
    images_seen: int = 0  # training images drawn so far, over all ranks and every run of this training
    set_aside: Path | None = None  # a damaged checkpoint.pt that the next save moves aside (not over a good one)
    stale: list[Path] = field(default_factory=list)  # a finished run's checkpoint-<step>.pt, dropped at the first save

    def autocast(self):
        if self.amp_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.amp_dtype)


def build_state(cfg: TrainConfig, table: EmbeddingTable, image_size: int, latent: LatentSpec | None,
                device: torch.device, d: Dist, init: warm_start.Parent | None = None) -> TrainState:
    """A fresh model, EMA, optimizer and schedule on ``device`` (the same initial weights on every rank);
    with train.init_from, the network starts from that parent's weights (``init``: it already resolved)."""
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    text_dim, pooled_dim = table.tokens.shape[-1], table.pooled.shape[-1]
    try:
        if latent is None:
            check_fits(cfg, image_size, "image size")
        else:
            check_fits(cfg, latent.size, f"latent size ({image_size}px / {image_size // latent.size})")
    except ConfigError as e:
        raise ConfigError(f"train.{cfg.denoiser} does not fit the data: {e}") from None
    channels = 3 if latent is None else latent.channels
    cuda = device.type == "cuda"
    if cuda:  # both ways: train.tf32 false turns off cuDNN's TF32 too (on by default in PyTorch)
        torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
        torch.backends.cudnn.allow_tf32 = cfg.tf32
    model = build_denoiser(cfg, text_dim, pooled_dim, in_channels=channels).to(device)
    parent = warm_start.apply(model, cfg, init, table, latent)  # train.init_from (None: from scratch)
    if cuda and cfg.channels_last and cfg.denoiser == "unet":
        model = model.to(memory_format=torch.channels_last)
    set_grad_checkpointing(model.net, cfg)
    if cfg.lora.rank:  # train.lora: adapters on the (warm-started) base, which is frozen from here
        lora.inject(model.net, lora.targets_for(cfg.denoiser, cfg.lora.target_modules), cfg.lora.rank,
                    cfg.lora.alpha, cfg.lora.dropout)
        if parent is None and d.main:
            print("train.lora adapts a frozen base, here the seed's random network (train.init_from is null): "
                  "its output layer starts at zero, so adapters that do not include it learn nothing; "
                  "set train.init_from to the model to fine-tune")
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], **adamw_kwargs(cfg, device))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    forward: Callable = model
    if d.active:
        forward = torch.nn.parallel.DistributedDataParallel(model, device_ids=None)
    if cfg.compile:
        forward = torch.compile(forward)
    amp_dtype = autocast_dtype(cfg, device)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    # every rank draws its own caption dropout and noise; rank 0 keeps the single-process stream
    gen = torch.Generator().manual_seed(cfg.seed + 1_000_003 * d.rank)
    meta = {"train": to_dict(cfg), "code": code_fingerprint(), "text_dim": text_dim, "pooled_dim": pooled_dim,
            "image_size": image_size, "text_fingerprint": table.fingerprint,
            "text_fingerprint_id": fingerprint_id(table.fingerprint)}
    if latent is not None:
        meta["latents"] = latent.as_dict()
    if parent is not None:  # a different parent is a different run: resume compares it too
        meta["parent"] = parent
    if d.active:
        meta["world"] = d.world
    return TrainState(cfg, device, d, model, forward, ema, opt, sched, scaler, amp_dtype, gen, meta,
                      positions=[DataPosition() for _ in range(max(1, cfg.data_workers))])


# --------------------------------------------------------------------------------------------
# Checkpoints


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


def older_checkpoints(out: Path) -> list[Path]:
    """The kept checkpoints before the newest (``checkpoint-<step>.pt``), oldest first."""
    return sorted((p for p in out.glob("checkpoint-*.pt") if p.stem[len("checkpoint-"):].isdigit()),
                  key=lambda p: int(p.stem[len("checkpoint-"):]))


# train keys that change what is logged or kept, not the weights: a run resumes across them
_BOOKKEEPING = ("log_every", "checkpoint_every", "keep_checkpoints", "sample_every", "val_every", "val_samples",
               "grad_checkpointing")  # recomputes activations, same gradients: a run that ran out of memory turns it on and resumes
# what a checkpoint must hold to be resumed; a file without them (or unreadable) is damaged
_CHECKPOINT_KEYS = ("meta", "model", "ema", "optimizer", "scheduler", "step", "data", "rng")
# how the refusal names the meta entries outside train
_META_NAMES = {"world": "world size", "code": "code of the train stage", "image_size": "image size",
               "text_fingerprint_id": "caption embeddings", "text_dim": "caption embedding width",
               "pooled_dim": "pooled embedding width"}


def _trajectory(meta: dict) -> dict:
    """``meta`` without the bookkeeping keys: what a checkpoint must match to be resumed. A single
    process writes no ``world``: it is 1. With ``train.lr_schedule: constant`` the LR does not depend
    on ``train.steps``, so steps is bookkeeping too (a finished run extends exactly)."""
    train = {k: v for k, v in meta["train"].items() if k not in _BOOKKEEPING}
    if train.get("lr_schedule") == "constant":
        train.pop("steps", None)
    return {"world": 1, **meta, "train": train}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _with_defaults(written: dict, defaults: dict) -> dict:
    """``written`` (a checkpoint's train settings) with the keys it lacks taken from ``defaults``, nested."""
    out = dict(written)
    for k, v in defaults.items():
        if k not in out:
            out[k] = v
        elif isinstance(v, dict) and isinstance(out[k], dict):
            out[k] = _with_defaults(out[k], v)
    return out


def trajectory_changes(old: dict, new: dict) -> list[str]:
    """The settings that differ between two checkpoints' ``meta``, one "key old -> new" each
    (train keys dotted, e.g. ``train.lora.rank 4 -> 8``; the text fingerprint by its id)."""
    # a train key added to the project since the checkpoint was written held its default then
    old = {**old, "train": _with_defaults(old["train"], to_dict(TrainConfig()))}
    a, b = _flat(_trajectory(old)), _flat(_trajectory(new))
    missing = "(unset)"
    changes = []
    for key in sorted(set(a) | set(b), key=lambda k: (not k.startswith("train."), k)):
        if key.startswith("text_fingerprint.") or a.get(key, missing) == b.get(key, missing):
            continue  # the fingerprint's fields are summed up by text_fingerprint_id
        changes.append(f"{_META_NAMES.get(key, key)} {a.get(key, missing)} -> {b.get(key, missing)}")
    return changes


class _Damaged(Exception):
    """A checkpoint file that cannot be read as one (truncated, garbage, keys missing)."""


def _load_checkpoint(path: Path) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated zip, bytes that are no checkpoint, an unpicklable object
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise _Damaged(reason[:160]) from None
    if not isinstance(ckpt, dict):
        raise _Damaged(f"it holds a {type(ckpt).__name__}, not a checkpoint")
    missing = [k for k in _CHECKPOINT_KEYS if k not in ckpt]
    if missing or not isinstance(ckpt["meta"], dict) or "train" not in ckpt["meta"]:
        raise _Damaged(f"missing {', '.join(missing) or 'meta.train'}")
    return ckpt


def _set_aside_name(path: Path) -> Path:
    """``checkpoint.pt.damaged`` (``.damaged.1``, ... when that is taken: nothing is overwritten)."""
    target, n = path.with_name(path.name + ".damaged"), 0
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.damaged.{n}")
    return target


def _newest_intact(out: Path, main: bool) -> tuple[Path, dict] | None:
    """(path, checkpoint) of the newest intact checkpoint in ``out``: checkpoint.pt, else the kept
    ones newest first; each damaged one is named in one line (rank 0). None when there is none at
    all; ``T2IError`` when every one is damaged (nothing deleted)."""
    path = out / CHECKPOINT
    damaged: list[str] = []
    for candidate in [p for p in [path, *reversed(older_checkpoints(out))] if p.is_file()]:
        try:
            return candidate, _load_checkpoint(candidate)
        except _Damaged as e:
            damaged.append(f"{candidate.name} ({e})")
            if main:
                print(f"{candidate} is damaged, skipping it: {e}")
    if damaged:
        raise T2IError(f"no intact checkpoint in {out}, damaged: {'; '.join(damaged)}. Nothing was deleted: "
                       f"move them away (or use another --out) to train anew")
    return None


def _refuse_changes(candidate: Path, step: int, old_steps: int, changes: list[str], out: Path) -> None:
    """An unfinished checkpoint of other settings: one line naming each change and what to do."""
    fix = "set them back to resume it"
    if any(c.startswith("train.steps ") for c in changes):
        fix += (" (train.steps: the cosine LR schedule is laid out over train.steps, so a run cannot continue "
                "exactly under another)")
    if any(c.startswith(_META_NAMES["code"]) for c in changes):
        fix += " (the code: run the version that wrote it)"
    raise T2IError(f"{candidate} (step {step} of {old_steps}) was written with other settings: "
                   f"{', '.join(changes)}; {fix}, or train anew in another --out (or delete "
                   f"{out}/checkpoint*.pt); nothing was overwritten")


def resume(state: TrainState, out: Path) -> None:
    """Continue from the newest intact checkpoint in ``out`` (``checkpoint.pt``, else the newest
    ``checkpoint-<step>.pt``) when it was written with the same settings and code (every rank reads
    the same file and takes its own data positions and random streams).

    - A damaged file (unreadable, truncated, keys missing) is named in one line and the next older
      one is tried; the run resumes from the newest intact one and says which. A damaged
      ``checkpoint.pt`` is moved aside as ``checkpoint.pt.damaged`` by the next save (never renamed
      over a kept checkpoint). With none intact: ``T2IError``, and nothing is deleted.
    - A finished run (its step reached its own ``train.steps``) is trained anew.
    - An unfinished run written with other settings (trajectory keys: all of ``meta`` but the
      bookkeeping train keys) or other code: ``T2IError`` naming each change, old -> new, and
      nothing is overwritten.
    """
    path = out / CHECKPOINT
    found = _newest_intact(out, state.dist.main)
    if found is None:
        return
    candidate, ckpt = found
    step, old_steps = ckpt["step"], ckpt["meta"]["train"].get("steps", state.cfg.steps)
    changes = trajectory_changes(ckpt["meta"], state.meta)
    if (changes and step >= old_steps) or (not changes and step >= state.cfg.steps):
        if state.dist.main:
            why = ""
            if any(c.startswith("train.steps ") for c in changes):
                why = (f" (train.steps {old_steps} -> {state.cfg.steps} cannot continue it exactly: the cosine LR "
                       "schedule is laid out over train.steps; with train.lr_schedule constant a finished run "
                       "extends)")
            print(f"{candidate} is a finished run ({step} steps): training anew{why}")
        state.stale = older_checkpoints(out)  # its kept checkpoints must not outlive this run's in the rotation
        if candidate != path and path.is_file():
            state.set_aside = path
        return
    if changes:
        _refuse_changes(candidate, step, old_steps, changes, out)
    lora.load_trainable_state_dict(state.model, ckpt["model"])  # train.lora: the checkpoint holds the adapter alone
    lora.load_trainable_state_dict(state.ema, ckpt["ema"])
    state.opt.load_state_dict(ckpt["optimizer"])
    state.sched.load_state_dict(ckpt["scheduler"])
    if state.scaler is not None and ckpt.get("scaler"):
        state.scaler.load_state_dict(ckpt["scaler"])
    state.step = ckpt["step"]
    state.images_seen = ckpt.get("images_seen", step * state.cfg.batch_size)  # older checkpoints: full batches
    state.positions = [DataPosition(**p) for p in ckpt["data"][state.dist.rank]]
    _set_rng_state(ckpt["rng"][state.dist.rank], state.gen)
    if candidate == path:
        state.checkpoint_step = step
    elif path.is_file():
        state.set_aside = path  # damaged: the next save moves it aside rather than rotating it in
    if state.dist.main:
        print(f"resuming from {candidate} at step {step} (epoch {state.positions[0].epoch}, "
              f"{state.images_seen} images seen, lr {state.sched.get_last_lr()[0]:.6g})")


def save_checkpoint(state: TrainState, out: Path) -> None:
    """Every rank hands in its data positions and random streams; rank 0 writes checkpoint.pt
    atomically, first moving the previous one aside as checkpoint-<step>.pt and dropping all but
    the newest ``keep_checkpoints``. After a resume from an older checkpoint, the damaged
    checkpoint.pt is moved to checkpoint.pt.damaged instead (kept, never rotated over a good one);
    a run that trains anew over a finished one drops that run's checkpoint-<step>.pt at its first
    save (they would sort among its own, and a later fallback would take them)."""
    data = distributed.gather([dataclasses.asdict(p) for p in state.positions], state.dist)
    rng = distributed.gather(_rng_state(state.gen), state.dist)
    if not state.dist.main:
        return
    path = out / CHECKPOINT
    tmp = path.with_suffix(".tmp")
    torch.save({"meta": state.meta, "model": lora.trainable_state_dict(state.model),
                "ema": lora.trainable_state_dict(state.ema),
                "optimizer": state.opt.state_dict(), "scheduler": state.sched.state_dict(),
                "scaler": state.scaler.state_dict() if state.scaler is not None else None,
                "step": state.step, "images_seen": state.images_seen, "epoch": state.positions[0].epoch,
                "data": data, "rng": rng}, tmp)
    if state.set_aside is not None:
        if state.set_aside.is_file():
            damaged = _set_aside_name(state.set_aside)
            state.set_aside.replace(damaged)
            print(f"moved the damaged {state.set_aside.name} aside as {damaged.name}")
        state.set_aside = None
    for old in state.stale:  # a finished run's, when this run trains anew: never a fallback for this one
        old.unlink(missing_ok=True)
    state.stale = []
    previous = state.checkpoint_step
    if previous is not None and previous < state.step and state.cfg.keep_checkpoints > 1 and path.is_file():
        path.replace(out / f"checkpoint-{previous:08d}.pt")
    tmp.replace(path)  # atomic
    state.checkpoint_step = state.step
    older = older_checkpoints(out)
    for old in older[: max(0, len(older) - (state.cfg.keep_checkpoints - 1))]:
        old.unlink()


# --------------------------------------------------------------------------------------------
# One step


@dataclass
class TextTable:
    """The caption embeddings on the training device, and the row of the empty caption."""

    tokens: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor
    lengths: torch.Tensor
    empty: int
    word_vectors: bool = False  # the tokens are word vectors (the same in any sentence), pooled their mean

    @classmethod
    def of(cls, table: EmbeddingTable, device: torch.device) -> "TextTable":
        mask = table.mask.to(device)
        return cls(table.tokens.to(device), mask, table.pooled.to(device), mask.sum(1).cpu(), table.empty_row,
                   table.fingerprint.get("layer") == WORD_VECTORS)

    def cond(self, rows: torch.Tensor) -> Cond:
        """Rows (on the CPU) -> conditioning cut to the longest caption among them."""
        length = int(self.lengths[rows].max())  # from a CPU tensor: no device sync
        rows = rows.to(self.tokens.device, non_blocking=True)
        return Cond(self.tokens[rows, :length].float(), self.mask[rows, :length], self.pooled[rows].float())

    def training_cond(self, rows: torch.Tensor, cfg: TrainConfig, gen: torch.Generator) -> Cond:
        """What a training step conditions on: caption dropout for classifier-free guidance
        (``train.cond_dropout``: the row becomes the empty caption), the cut to the longest caption,
        then ``train.unseen_words`` on the captions kept (word-vector tables only); draws from ``gen``."""
        drop = torch.rand(rows.shape, generator=gen) < cfg.cond_dropout
        cond = self.cond(torch.where(drop, torch.full_like(rows, self.empty), rows))
        if cfg.unseen_words > 0 and self.word_vectors:
            cond = add_unseen_words(cond, ~drop, cfg.unseen_words, cfg.unseen_words_max, gen)
        return cond


def add_unseen_words(cond: Cond, keep: torch.Tensor, chance: float, most: int, gen: torch.Generator) -> Cond:
    """``train.unseen_words``: each caption where ``keep`` (B,) is True gets, with probability
    ``chance``, 1..``most`` extra random word vectors, and its pooled vector (the mean of its word
    vectors) takes them in.

    A word that no training caption holds has, in a randomly initialised tower's table, a vector
    the model never learned to read: a random direction, LayerNorm-ed like every other. Trained
    only on the training wording, a small model lets such words pull its picture towards what it
    saw most; trained with some of them in its captions, it learns that they say nothing. The
    extra vectors are drawn the same way (standard normal, then LayerNorm without affine, as the
    random tower's ``ln_final``), appended behind the caption's tokens with the mask extended
    (neither denoiser's cross-attention has positions; the tower's word vectors carry none either).
    Draws from ``gen`` on the CPU, so a run is reproducible on any device.
    """
    b, _, d = cond.tokens.shape
    n_add = torch.randint(1, most + 1, (b,), generator=gen) * ((torch.rand(b, generator=gen) < chance) & keep)
    new = F.layer_norm(torch.randn(b, most, d, generator=gen), (d,))
    added = torch.arange(most)[None] < n_add[:, None]  # (B, most)
    new = new * added[..., None]
    dev = cond.tokens.device
    n = cond.mask.sum(1).float()
    pooled = (cond.pooled * n[:, None] + new.sum(1).to(dev)) / (n + n_add.to(dev))[:, None]
    return Cond(torch.cat([cond.tokens, new.to(dev)], 1), torch.cat([cond.mask, added.to(dev)], 1), pooled)


def micro_loss(state: TrainState, batch: Batch, text: TextTable, posterior: bool) -> torch.Tensor:
    """The loss of one micro-batch (caption dropout for guidance, a fresh latent draw), on the device."""
    cfg, gen = state.cfg, state.gen
    x0 = batch.x0
    if posterior:  # a fresh draw of each image's latent distribution
        x0 = x0 + batch.std * torch.randn(x0.shape, generator=gen)
    cond = text.training_cond(batch.rows, cfg, gen)
    x0 = x0.to(state.device, non_blocking=True)
    if state.device.type == "cuda" and cfg.channels_last and cfg.denoiser == "unet":
        x0 = x0.contiguous(memory_format=torch.channels_last)
    with state.autocast():
        return diffusion_loss(state.model, x0, cond, weighting=cfg.loss_weighting, gamma=cfg.min_snr_gamma,
                              generator=gen if state.device.type == "cpu" else None, forward=state.forward,
                              offset_noise=cfg.offset_noise, timesteps=cfg.timestep_sampling,
                              loc=cfg.timestep_loc, scale=cfg.timestep_scale).mean()


def train_step(state: TrainState, micro_batches: list[Batch], text: TextTable, posterior: bool
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over ``grad_accum`` micro-batches: (mean loss, gradient norm), both left
    on the device. Gradients are all-reduced once, on the last micro-batch."""
    opt, n = state.opt, len(micro_batches)
    opt.zero_grad(set_to_none=True)
    total = torch.zeros((), device=state.device)
    for i, batch in enumerate(micro_batches):
        sync = contextlib.nullcontext() if i == n - 1 or not state.dist.active else state.forward.no_sync()
        with sync:
            loss = micro_loss(state, batch, text, posterior) / n
            (state.scaler.scale(loss) if state.scaler is not None else loss).backward()
        total += loss.detach()
    if state.scaler is not None:
        state.scaler.unscale_(opt)
    grad_norm = torch.nn.utils.clip_grad_norm_(state.model.parameters(), state.cfg.grad_clip)
    if state.scaler is not None:
        state.scaler.step(opt)  # skips the step when fp16 gradients overflowed
        state.scaler.update()
    else:
        opt.step()
    state.sched.step()
    # EMA warms up so the average is not dominated by the random initialisation
    ema_update(state.ema, state.model, min(state.cfg.ema_decay, (1 + state.step) / (10 + state.step)))
    state.step += 1
    state.images_seen += sum(b.x0.shape[0] for b in micro_batches) * state.dist.world  # every rank's equal share
    state.positions[micro_batches[-1].worker] = micro_batches[-1].position
    return total, grad_norm


class Monitor:
    """Loss, throughput, data waiting and the non-finite guard, accumulated on the device; read
    (one sync) at logging intervals and before each checkpoint."""

    def __init__(self, state: TrainState):
        dev = state.device
        self.state = state
        self.loss_sum = torch.zeros((), device=dev)
        self.n = 0
        self.first_bad = torch.full((), -1, dtype=torch.long, device=dev)  # first step with a non-finite value
        self.step_t = torch.full((), state.step, dtype=torch.long, device=dev)
        self.check_grads = state.scaler is None  # fp16: the scaler skips overflowed steps itself
        self.t_start = self.t_log = time.perf_counter()
        self.seen = 0
        self.wait = 0.0
        self.grad_norm = torch.zeros((), device=dev)

    def fetch(self, data: Iterator[Batch]) -> Batch:
        t0 = time.perf_counter()
        batch = next(data)
        self.wait += time.perf_counter() - t0
        return batch

    def record(self, loss: torch.Tensor, grad_norm: torch.Tensor, images: int) -> None:
        self.step_t += 1
        bad = ~torch.isfinite(loss)
        if self.check_grads:
            bad |= ~torch.isfinite(grad_norm)
        self.first_bad = torch.where(bad & (self.first_bad < 0), self.step_t, self.first_bad)
        self.loss_sum += loss
        self.grad_norm = grad_norm.detach()
        self.n += 1
        self.seen += images * self.state.dist.world

    def check(self, checkpoint: Path) -> None:
        """Stop with the step of the first non-finite loss or gradient (on any rank)."""
        first = distributed.all_max(self.first_bad.clone(), self.state.dist)
        if int(first) >= 0:
            kept = f"the last good checkpoint {checkpoint} is kept" if checkpoint.is_file() else "no checkpoint was written yet"
            raise T2IError(f"training diverged: non-finite loss or gradient at step {int(first)}; {kept}. "
                           "Lower train.lr or train.grad_clip, or try train.precision fp32")

    def pause(self, seconds: float) -> None:
        """Leave ``seconds`` of other work (a preview grid) out of img_per_s and data_wait_fraction."""
        self.t_start += seconds
        self.t_log += seconds

    def metrics(self) -> dict[str, float]:
        now = time.perf_counter()
        loss = distributed.all_mean(self.loss_sum / max(1, self.n), self.state.dist)
        wall = now - self.t_log
        out = {"loss": float(loss), "lr": self.state.sched.get_last_lr()[0], "grad_norm": float(self.grad_norm),
               "img_per_s": self.seen / (now - self.t_start), "data_wait_fraction": self.wait / wall if wall > 0 else 0.0,
               "epoch": self.state.positions[0].epoch, "images_seen": self.state.images_seen,
               "peak_memory_mb": peak_memory_mb(self.state.device)}
        self.loss_sum.zero_()
        self.n, self.wait, self.t_log = 0, 0.0, now
        return out


# --------------------------------------------------------------------------------------------
# The held-out loss

VAL_SEED = 7_919  # offsets train.seed for the held-out loss's own generator (never the training streams)


@dataclass
class Validation:
    """``train.val_every``: the EMA's loss on a fixed held-out set, on rank 0.

    The first ``train.val_samples`` samples of the val split (shard order, no shuffle; latents as
    their means), each with its caption (no dropout, no unseen words), a timestep and noise drawn
    once from a generator seeded by ``train.seed + VAL_SEED``: every evaluation scores the same
    (x0, t, noise, caption) tuples, so the curve moves only when the weights do. Its draws touch no
    training random stream, so the weights are those of a run without it. The objective and weighting
    are training's; the network is the EMA (what is exported). Other ranks skip it: the EMA is the
    same on every rank and is not wrapped by DDP, so no collective runs and they wait at the next one.
    """

    x0: torch.Tensor  # (N, C, H, W) on the device
    rows: torch.Tensor  # (N,) embedding rows, on the CPU
    t: torch.Tensor  # (N,) timesteps, on the device
    noise: torch.Tensor  # like x0
    text: TextTable
    chunk: int  # samples per forward pass: one rank's training micro-batch
    seconds: float = 0.0  # time spent evaluating (left out of img_per_s)

    @classmethod
    def build(cls, state: TrainState, urls: list[str] | None, table: EmbeddingTable, text: TextTable,
              latent: LatentSpec | None) -> "Validation | None":
        cfg = state.cfg
        if not (cfg.val_every and cfg.val_samples and state.dist.main):
            return None
        got = first_samples(urls, table, cfg.val_samples, latent) if urls else None
        if got is None:
            print("train.val_every is set but there are no val samples: no val_loss is logged")
            return None
        x0, rows = got
        gen = torch.Generator().manual_seed(cfg.seed + VAL_SEED)
        t = torch.randint(0, len(state.ema.sigmas), (len(rows),), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        dev = state.device
        chunk = max(1, cfg.batch_size // (state.dist.world * cfg.grad_accum))
        return cls(x0.to(dev), rows, t.to(dev), noise.to(dev), text, chunk)

    @torch.no_grad()
    def loss(self, state: TrainState) -> float:
        """The EMA's mean per-sample loss over the held-out set."""
        t0 = time.perf_counter()
        state.ema.eval()
        total = torch.zeros((), device=state.device)
        for i in range(0, len(self.rows), self.chunk):
            j = i + self.chunk
            with state.autocast():
                per = diffusion_loss(state.ema, self.x0[i:j], self.text.cond(self.rows[i:j]),
                                     weighting=state.cfg.loss_weighting, gamma=state.cfg.min_snr_gamma,
                                     t=self.t[i:j], noise=self.noise[i:j])
            total += per.float().sum()
        value = float(total) / len(self.rows)
        self.seconds += time.perf_counter() - t0
        return value


# --------------------------------------------------------------------------------------------
# The loop


def preview(state: TrainState, grid_fn):
    """The EMA's sample grid, every ``train.sample_every`` steps and at the end. Sampling draws
    from its own seeded generators, so the run's weights and data order are those of a run without it."""
    state.ema.eval()
    with torch.no_grad():
        return grid_fn(state.ema, state.step)


def export(state: TrainState, out: Path, summary: dict) -> None:
    state.ema.eval()
    save_model(state.ema, out, {**state.meta, "steps_done": state.step, "params": count_params(state.model.net),
                                "device": state.device.type, **summary})


def train(cfg: TrainConfig, shard_urls: list[str], table: EmbeddingTable, out_dir: str | Path, *,
          image_size: int, latent: LatentSpec | None = None, logger: TrainLogger | None = None, grid_fn=None,
          progress: bool = True, val_urls: list[str] | None = None, init: warm_start.Parent | None = None,
          buckets: list[tuple[int, int]] | None = None) -> Path:
    """Train for ``cfg.steps`` steps (resuming from out_dir's newest intact checkpoint: ``resume``).

    ``shard_urls`` are image shards, or latent shards with ``latent`` saying which latent space
    (the latents stage); ``image_size`` is the side of the images the model produces.
    ``grid_fn(denoiser, step) -> PIL.Image`` may render a sample grid at the end for the logger
    (as sample_grid.png), and every ``train.sample_every`` steps before it (as
    train_samples/step_<step>.png). ``val_urls`` (the val split's shards, of the same kind as
    ``shard_urls``) feed ``val_loss`` every ``train.val_every`` steps (``Validation``); ``init``: build_state's.
    ``buckets``: the (width, height) aspect buckets of bucketed shards (ingest.resize_mode bucket):
    each batch comes from one bucket, and model.json lists them (the sizes generation accepts).
    Under torchrun, call it on every rank: rank 0 logs and writes. Returns the directory holding
    model.safetensors and model.json.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    d = distributed.setup(device)
    device = distributed.device_for(device, d)
    logger = logger if logger is not None and d.main else NullLogger()
    if d.main and (warning := objective_warning(cfg)):
        print(warning)
    reset_peak_memory(device)  # peak_memory_mb: this run's peak, from here
    if buckets:
        check_denoiser_fits(cfg, buckets, image_size // latent.size if latent else 1)
    state = build_state(cfg, table, image_size, latent, device, d, init)
    if buckets:  # before resume: a checkpoint of other buckets is another trajectory
        state.meta["buckets"] = [list(b) for b in buckets]
    resume(state, out)
    logger.log_metrics({"params_millions": count_params(state.model.net) / 1e6}, state.step)

    data, text = _inputs(state, shard_urls, table, latent)
    val = Validation.build(state, val_urls, table, text, latent)
    posterior = latent is not None and cfg.latent_sampling == "posterior"
    monitor = Monitor(state)
    bar = tqdm(total=cfg.steps, initial=state.step, desc="train", unit="step", disable=not (progress and d.main),
               mininterval=2.0)
    state.model.train()
    while state.step < cfg.steps:
        micro = [monitor.fetch(data) for _ in range(cfg.grad_accum)]
        loss, grad_norm = train_step(state, micro, text, posterior)
        monitor.record(loss, grad_norm, sum(b.x0.shape[0] for b in micro))
        bar.update(1)
        _after_step(state, out, monitor, logger, bar, grid_fn, val)
    bar.close()
    _finish(state, out, monitor, logger, grid_fn, val)
    distributed.teardown(d)
    return out


def _finish(state: TrainState, out: Path, monitor: Monitor, logger: TrainLogger, grid_fn,
            val: Validation | None) -> None:
    """The run's summary (time, throughput, peak memory) logged, and on rank 0 the export and the
    final sample grid."""
    elapsed = time.perf_counter() - monitor.t_start
    summary = {"train_seconds": elapsed, "train_img_per_s": monitor.seen / elapsed if elapsed > 0 else 0.0,
               "peak_memory_mb": peak_memory_mb(state.device)}
    if val is not None:
        summary["val_seconds"] = val.seconds
    if state.dist.main:
        logger.log_metrics(summary, state.step)
        export(state, out, summary)
        if grid_fn is not None:
            logger.log_image(preview(state, grid_fn), "sample_grid.png")


def _inputs(state: TrainState, shard_urls: list[str], table: EmbeddingTable,
            latent: LatentSpec | None) -> tuple[Iterator[Batch], TextTable]:
    """This rank's batches (each a 1/``train.grad_accum`` share of its part of a step's batch,
    from ``state.positions`` on) and the caption table on the state's device. Says so where
    train.unseen_words is set but the table holds no word vectors to draw from."""
    cfg, device, d = state.cfg, state.device, state.dist
    per_forward = cfg.batch_size // (d.world * cfg.grad_accum)
    spec = DataSpec(shard_urls, cfg.seed, cfg.shuffle_buffer, per_forward, d.rank, d.world, cfg.data_workers, latent,
                    buckets=bool(state.meta.get("buckets")))
    data = batch_loader(spec, table, state.positions, pin_memory=device.type == "cuda")
    text = TextTable.of(table, device)
    if d.main:
        _say_if_fewer_than_a_batch(shard_urls, cfg.batch_size)
    if cfg.unseen_words > 0 and not text.word_vectors and d.main:
        print(f"train.unseen_words {cfg.unseen_words:g} is off: the caption table holds "
              f"{table.fingerprint.get('layer')!r} states of {table.fingerprint.get('model')}, not word vectors")
    return data, text


def _say_if_fewer_than_a_batch(shard_urls: list[str], batch_size: int) -> None:
    """A training split smaller than one batch still trains: the stream runs epoch after epoch,
    so each batch holds every sample several times, each with its own noise and timestep. Says so
    in one line (reading at most ``batch_size`` samples' bytes, never the whole split)."""
    n = sum(1 for _ in itertools.islice(raw_samples(shard_urls), batch_size))
    if 0 < n < batch_size:
        print(f"train: the training shards hold {n} samples, fewer than train.batch_size {batch_size}: each "
              f"batch repeats them (about {batch_size / n:.1f} times, each with its own noise and timestep), "
              f"so a step sees {n} distinct images; set train.batch_size to {n} or less for shorter steps")


def _after_step(state: TrainState, out: Path, monitor: Monitor, logger: TrainLogger, bar, grid_fn,
                val: Validation | None = None) -> None:
    """What follows step ``state.step``: the metrics every ``train.log_every`` steps, a checkpoint
    every ``train.checkpoint_every`` (both at the last step too), and on rank 0 the held-out loss
    every ``train.val_every`` steps (and at the last) and the preview grid every ``train.sample_every``
    steps before the last (the time of both left out of the throughput)."""
    cfg, step = state.cfg, state.step
    if val is not None and (step % cfg.val_every == 0 or step == cfg.steps):
        t0 = time.perf_counter()
        logger.log_metrics({"val_loss": val.loss(state)}, step)
        monitor.pause(time.perf_counter() - t0)
    if step % cfg.log_every == 0 or step == cfg.steps:
        monitor.check(out / CHECKPOINT)
        metrics = monitor.metrics()
        logger.log_metrics(metrics, step)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", img_s=f"{metrics['img_per_s']:.0f}")
    if step % cfg.checkpoint_every == 0 or step == cfg.steps:
        monitor.check(out / CHECKPOINT)
        save_checkpoint(state, out)
    if grid_fn is not None and cfg.sample_every and step % cfg.sample_every == 0 and step < cfg.steps and state.dist.main:
        t0 = time.perf_counter()
        logger.log_image(preview(state, grid_fn), f"{PREVIEW_DIR}/step_{step:07d}.png")
        monitor.pause(time.perf_counter() - t0)
