"""Typed view of params.yaml: one frozen dataclass per section, parsed once at the edge.

``load_params(path)`` reads the file and checks every key against these dataclasses: a missing
key, an unknown key (usually a typo) or a value of the wrong type raises ``ConfigError`` with the
dotted key name, e.g. ``params.yaml: train.lr must be a number, got 'fast'``. Library functions take
these objects (or plain arguments) and never open params.yaml themselves.

Every field has a default, so a section may list only the keys it changes; the shipped
params.yaml spells every key out so that DVC can track each one.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import io
import itertools
import math
import tokenize
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, TypeVar, Union

import yaml

from diffusion.errors import ConfigError

_Section = TypeVar("_Section")

# --------------------------------------------------------------------------------------------
# Sections. Each one checks its own fields in ``check(key)``, which the parser calls with the
# section's dotted key (``train``, ``train.unet``) once the types are right; the few checks that
# read two sections are ``_check_across``.


def _at_least_one(section: Any, key: str, *names: str) -> None:
    """Counts and sizes: ``key.name`` must be >= 1 for each of ``names``."""
    for name in names:
        value = getattr(section, name)
        if value < 1:
            raise ConfigError(f"{key}.{name} must be >= 1, got {value}")


@dataclass(frozen=True)
class DatasetConfig:
    """The built-in shapes dataset (diffusion.data.shapes)."""

    seed: int = 0  # each image and its caption are drawn from (seed, split, index)
    image_size: int = 16  # px; 16 is what a 2-core CPU can learn well in ~10 minutes
    n_train: int = 20000  # images rendered for the train split
    n_val: int = 2000  # images rendered for the val split (the judge's and the metrics' real images)
    supersample: int = 8  # render at image_size*supersample, then area-downsample (anti-aliasing)
    background: list[int] = field(default_factory=lambda: [245, 245, 245])  # RGB of the canvas
    # any of circle, square, triangle, diamond, cross
    shapes: list[str] = field(default_factory=lambda: ["circle", "square", "triangle"])
    # colour name (the caption's word) -> RGB
    colors: dict[str, list[int]] = field(
        default_factory=lambda: {
            "red": [220, 38, 38],
            "green": [34, 160, 60],
            "blue": [40, 80, 220],
            "yellow": [235, 200, 20],
            "purple": [140, 50, 190],
            "orange": [245, 130, 20],
        }
    )
    # shape extent as a fraction of the image side
    sizes: dict[str, float] = field(default_factory=lambda: {"small": 0.36, "large": 0.58})
    # horizontal centre as a fraction of the image width
    positions: dict[str, float] = field(
        default_factory=lambda: {"left": 0.32, "center": 0.5, "right": 0.68}
    )
    jitter: float = 0.03  # uniform +- jitter of the centre (fraction of the side), both axes
    # each training caption leaves an attribute out with this probability (diffusion.data.captions);
    # the model then learns to choose it itself, as for a user's prompt that does not say
    caption_omit: dict[str, float] = field(
        default_factory=lambda: {"shape": 0.1, "color": 0.1, "size": 0.1, "position": 0.1}
    )
    # attribute combinations that never appear in the training split (only in val / evaluation)
    holdout: list[dict[str, str]] = field(
        default_factory=lambda: [
            {"color": "red", "shape": "triangle"},
            {"color": "green", "shape": "circle"},
            {"color": "blue", "shape": "square"},
        ]
    )

    def check(self, key: str) -> None:
        """Sizes and colours, and every shape, omitted attribute and held-out combination known."""
        if self.image_size < 8 or self.image_size % 4:
            raise ConfigError(f"{key}.image_size must be a multiple of 4 and >= 8, got {self.image_size}")
        for name, rgb in list(self.colors.items()) + [("background", self.background)]:
            if len(rgb) != 3 or not all(0 <= c <= 255 for c in rgb):
                raise ConfigError(f"{key} colour {name} must be three values in 0..255, got {rgb}")
        for s in self.shapes:
            if s not in ("circle", "square", "triangle", "diamond", "cross"):
                raise ConfigError(f"{key}.shapes: unknown shape {s!r} (circle, square, triangle, diamond, cross)")
        attrs = {"shape": set(self.shapes), "color": set(self.colors), "size": set(self.sizes),
                 "position": set(self.positions)}
        for i, combo in enumerate(self.holdout):
            for k, v in combo.items():
                if k not in attrs:
                    raise ConfigError(f"{key}.holdout[{i}]: unknown attribute {k!r} ({', '.join(attrs)})")
                if v not in attrs[k]:
                    raise ConfigError(f"{key}.holdout[{i}]: {k} {v!r} is not one of {sorted(attrs[k])}")
        for k, v in self.caption_omit.items():
            if k not in attrs:
                raise ConfigError(f"{key}.caption_omit: unknown attribute {k!r} ({', '.join(attrs)})")
            if not 0 <= v < 1:
                raise ConfigError(f"{key}.caption_omit.{k} must be in [0, 1), got {v}")
        combos = itertools.product(self.shapes, self.colors, self.sizes, self.positions)
        names = ("shape", "color", "size", "position")
        if all(any(all(dict(zip(names, c))[k] == v for k, v in h.items()) for h in self.holdout) for c in combos):
            raise ConfigError(f"{key}.holdout removes every combination from the training split")
        _at_least_one(self, key, "n_train", "n_val")


@dataclass(frozen=True)
class DownloadConfig:
    """HTTP fetching for URL sources (diffusion.data.ingest.download)."""

    timeout: float = 10.0  # seconds, per connect and per read
    retries: int = 2  # extra attempts after a timeout, a connection error, 429 or 5xx
    backoff: float = 0.5  # seconds before the first retry; doubles each time
    max_bytes: int = 20_000_000  # responses larger than this are dropped (byte_cap)
    concurrency: int = 32  # downloads in flight per worker
    # sent with every request; its product token (t2i-diffusion) is the bot X-Robots-Tag rules name
    user_agent: str = "t2i-diffusion/0.1 (+https://github.com/t2i-diffusion)"
    # X-Robots-Tag directives that opt an image out (img2dataset's defaults); [] disables the check
    disallowed_header_directives: list[str] = field(
        default_factory=lambda: ["noai", "noimageai", "noindex", "noimageindex"]
    )


@dataclass(frozen=True)
class OpenmojiConfig:
    """The OpenMoji source (ingest.source: openmoji, diffusion.data.openmoji): the npm package's colour
    SVGs rendered at ingest.image_size, captioned from their annotations; val holds whole annotations
    (ingest.val_fraction of them, by hash)."""

    version: str = "17.0.0"  # npm package version fetched when ingest.path is null or npm
    cache: str = "data/sources/openmoji"  # where the fetched tarball and the unpacked SVGs are kept (git-ignored)
    skintones: bool = False  # keep the skin-tone variants (each goes to its base emoji's split)
    caption_variants: bool = True  # training captions: the annotation or a tag/phrase variant per emoji; false: annotation only
    supersample: int = 4  # render at image_size x this, then average each block down (anti-aliased edges)

    def check(self, key: str) -> None:
        _at_least_one(self, key, "supersample")


@dataclass(frozen=True)
class IngestConfig:
    """Where the images and captions come from and how they become WebDataset shards
    (diffusion.data.ingest); the built-in set is rendered from the dataset section."""

    source: str = "builtin"  # builtin | folder | table | webdataset | urls | openmoji
    # folder root, table file, shard URL(s)/glob, or URL list; unused by builtin; openmoji: an
    # openmoji-*.tgz, the unpacked package folder, or null/npm (npm pack into ingest.openmoji.cache once)
    path: Optional[str] = None
    caption_column: str = "caption"  # table/urls: caption column; folder/webdataset: caption field in .json
    image_column: str = "image"  # table: image bytes ({bytes, path} struct or binary) or a path/URL string
    url_column: str = "url"  # urls: the URL column
    image_size: int = 256  # output side (external sources; the built-in set renders at dataset.image_size)
    # center_crop | pad | keep_ratio (largest side = image_size) | bucket (each image keeps its aspect
    # in the nearest of a set of width x height buckets of about image_size^2 pixels)
    resize_mode: str = "center_crop"
    # resize_mode bucket: null = computed from image_size, bucket_step and max_aspect_ratio; or a list
    # of [width, height] (each a multiple of bucket_step)
    buckets: Optional[list[list[int]]] = None
    bucket_step: int = 64  # bucket sides are multiples of this: the denoiser's factor (times a VAE's)
    min_size: int = 64  # shorter side below this (before resizing): too_small
    max_aspect_ratio: float = 3.0  # longer/shorter side above this: aspect_ratio
    max_pixels: int = 89_478_485  # width*height above this: too_large (Pillow's bomb limit)
    background: list[int] = field(default_factory=lambda: [255, 255, 255])  # transparency and padding
    image_format: str = "png"  # png keeps the built-in colours exact; jpg/webp for photos
    quality: int = 95  # jpg/webp
    caption_max_chars: int = 512  # longer captions are cut, at a word boundary if that keeps 80% of them
    caption_errors: str = "replace"  # non-UTF-8 caption bytes: replace (U+FFFD) or reject (bad_encoding)
    keep_empty_captions: bool = False  # true: keep them (unconditional training); false: empty_caption
    dedupe: bool = True  # drop exact duplicates of the decoded, resized image (duplicate)
    val_fraction: float = 0.05  # external sources: share of keys (by hash) that go to val
    samples_per_shard: int = 5000  # input items per work unit; a unit writes one shard per split
    max_shard_bytes: int = 1_000_000_000  # a unit's shard rolls over to a new part beyond this
    workers: int = 2  # work units processed in parallel
    task_runner: str = "threads"  # threads | processes | dask (Prefect task runner of the ingest flow)
    dask_address: Optional[str] = None  # dask: null = a LocalCluster of `workers` processes; else tcp://host:8786
    download: DownloadConfig = field(default_factory=DownloadConfig)
    openmoji: OpenmojiConfig = field(default_factory=OpenmojiConfig)  # the openmoji source

    def check(self, key: str) -> None:
        _at_least_one(self, key, "samples_per_shard", "bucket_step")
        if self.resize_mode == "bucket":
            bucket_set(self)  # one line naming the key where the set is empty or off the step


@dataclass(frozen=True)
class LatentsConfig:
    """Latent diffusion (diffusion.data.latents): encode every image once with a pretrained autoencoder
    (the latents stage) and train and sample in its latent space. Off (pixel space) while vae is null."""

    # diffusers AutoencoderKL: a hub id (stabilityai/sd-vae-ft-mse), a diffusers folder, or one
    # checkpoint file (.safetensors/.ckpt); null: train in pixel space
    vae: Optional[str] = None
    subfolder: Optional[str] = None  # the VAE inside a whole pipeline's repo or folder: "vae"
    config: Optional[str] = None  # single file: its architecture (diffusers folder or hub id); offline, required
    scaling_factor: Optional[float] = None  # null: the VAE config's (0.18215 for Stable Diffusion)
    dtype: str = "auto"  # encode/decode compute: auto (CPU float32; CUDA float16, or bfloat16 if force_upcast)
    device: str = "auto"  # auto | cpu | cuda (auto: CUDA when present)
    batch_size: int = 32  # images per encoder (and decoder) call

    def check(self, key: str) -> None:
        _at_least_one(self, key, "batch_size")
        if self.scaling_factor is not None and self.scaling_factor <= 0:
            raise ConfigError(f"{key}.scaling_factor must be > 0 (or null), got {self.scaling_factor}")


@dataclass(frozen=True)
class EmbedConfig:
    """The caption encoder (diffusion.data.text): an open_clip text tower; the embed stage encodes
    every caption once and training reads the stored states."""

    model: str = "ViT-S-32-alt"  # any open_clip architecture with a CLIP text transformer
    pretrained: Optional[str] = None  # null: seeded random init; a tag (laion2b_s34b_b79k) or a file
    seed: int = 0  # seed of the random initialisation when pretrained is null
    # per-token states: "last" or "penultimate" block (after ln_final), or "token_embedding" (each
    # word's vector, the same in any sentence; pooled = their mean); auto: token_embedding for the
    # random tower, last for pretrained weights (diffusion.data.text.resolve_layer)
    layer: str = "auto"
    batch_size: int = 256  # captions per text-encoder call
    device: str = "auto"  # auto | cpu | cuda

    def check(self, key: str) -> None:
        _at_least_one(self, key, "batch_size")


@dataclass(frozen=True)
class JudgeConfig:
    """The judge (diffusion.evaluation.judge): a small CNN trained on rendered images to read each
    attribute back; adherence is how often it reads a generated image's prompt."""

    seed: int = 0  # initialisation and batch order
    n_images: int = 20000  # rendered from every combination (the judge is a measuring instrument)
    steps: int = 1000  # optimizer steps (AdamW, one-cycle schedule)
    batch_size: int = 128  # images per step
    lr: float = 2.0e-3  # peak learning rate of the one-cycle schedule
    width: int = 32  # channels of the first conv block (2x and 4x in the next two)
    device: str = "auto"  # auto | cpu | cuda

    def check(self, key: str) -> None:
        _at_least_one(self, key, "steps")


@dataclass(frozen=True)
class RetrievalConfig:
    """The retrieval evaluator (diffusion.evaluation.retrieval): a small image-text contrastive model
    trained on the dataset's own real training pairs, for R-precision and FD on any data."""

    seed: int = 0  # initialisation and batch order
    steps: int = 1000  # optimizer steps (AdamW, one-cycle schedule)
    batch_size: int = 128  # pairs per step (each image's negatives are the batch's other captions)
    lr: float = 2.0e-3  # peak learning rate of the one-cycle schedule
    width: int = 32  # channels of the image tower's first conv block (doubling per level, at most 4x)
    dim: int = 128  # the shared image-text embedding space
    max_images: int = 20000  # training pairs read from the train shards (the first ones, in shard order)
    max_side: int = 64  # images larger than this are downscaled to it (the tower runs at 16-64 px)
    distractors: int = 99  # R-precision: other validation captions each prompt is ranked against
    device: str = "auto"  # auto | cpu | cuda

    def check(self, key: str) -> None:
        _at_least_one(self, key, "steps", "batch_size", "width", "dim", "max_images", "distractors")
        if self.max_side < 8:
            raise ConfigError(f"{key}.max_side must be >= 8, got {self.max_side}")
        if self.width % 8:  # the image tower's GroupNorm uses 8 groups
            raise ConfigError(f"{key}.width must be a multiple of 8, got {self.width}")


@dataclass(frozen=True)
class UNetConfig:
    """The UNet denoiser (diffusion.models.unet), the default network: ResNet blocks at each level,
    self- and cross-attention at attn_levels. A train.size other than custom replaces it."""

    channels: int = 48  # width at the first (space-to-depth) level
    # each level's width as a multiple of channels; the side halves from one level to the next
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 2])
    blocks_per_level: int = 1  # ResNet blocks a level on the way down
    attn_levels: list[int] = field(default_factory=lambda: [1, 2])  # levels with self+cross attn
    heads: int = 4  # attention heads
    patch: int = 2  # space-to-depth fold before the first conv (2: 2x2 pixels -> 12 channels)
    dropout: float = 0.0  # in the ResNet blocks
    # blocks a level on the way up; null: blocks_per_level + 1 (ADM's UNet, diffusers' up blocks)
    up_blocks: Optional[int] = None
    # nearest_conv: nearest 2x, then a 3x3 conv (ADM, diffusers); conv_nearest: a 3x3 conv at the
    # lower resolution to the next level's width, then nearest 2x (a quarter of the FLOPs or less)
    upsample: str = "nearest_conv"
    # the caption's token states projected once to this width for every block's cross-attention
    # keys and values (null: each block projects the text tower's full width itself, as diffusers)
    ctx_dim: Optional[int] = None
    # true: each residual branch's last layer (ResNet conv2, attention and MLP outputs) and the
    # output conv start at zero, so every block starts as the identity and the output at zero
    # (ADM); false: PyTorch's default init there, as diffusers' UNet2DConditionModel (learns
    # captions in fewer steps on OpenMoji: docs/results.md, "Time to quality against diffusers")
    zero_init: bool = True
    # true: LayerNorm each attention head's queries and keys (learned scale and shift) before
    # their dot product (QK-norm, as SD3 and ViT-22B), so the attention logits cannot grow with
    # the weights; on OpenMoji it drew the captions better (seen R-precision 75.0% against 71.1%;
    # docs/results.md), and the OpenMoji presets set it
    qk_norm: bool = False
    # transformer layers over the caption's tokens (self-attention under the padding mask, then an
    # MLP), run once before every cross-attention reads them: each word's state then depends on
    # its neighbours in the caption (a context refiner); 0: the tokens as the embed stage wrote them
    text_layers: int = 0

    @property
    def blocks_up(self) -> int:
        """Blocks a level on the way up, ``up_blocks`` resolved (null: blocks_per_level + 1)."""
        return self.blocks_per_level + 1 if self.up_blocks is None else self.up_blocks

    def check(self, key: str) -> None:
        """Attention levels, up blocks and widths the network can be built with."""
        _at_least_one(self, key, "heads", "patch")  # divisors below (and in check_fits)
        n_levels = len(self.channel_mult)
        if any(not 0 <= lvl < n_levels for lvl in self.attn_levels):
            raise ConfigError(f"{key}.attn_levels must index channel_mult (0..{n_levels - 1})")
        if not 1 <= self.blocks_up <= self.blocks_per_level + 1:
            raise ConfigError(f"{key}.up_blocks must be 1..blocks_per_level + 1 = {self.blocks_per_level + 1} "
                              f"(or null), got {self.up_blocks}")
        if self.ctx_dim is not None and self.ctx_dim < 1:
            raise ConfigError(f"{key}.ctx_dim must be >= 1 (or null), got {self.ctx_dim}")
        if self.text_layers < 0:
            raise ConfigError(f"{key}.text_layers must be >= 0, got {self.text_layers}")
        for mult in self.channel_mult:
            if (self.channels * mult) % self.heads or (self.channels * mult) % 8:
                raise ConfigError(f"{key}: every level width must divide by heads and by 8 (GroupNorm)")


@dataclass(frozen=True)
class DiTConfig:
    """A transformer denoiser (diffusion.models.dit): patches of the image (or latent) as tokens, adaLN
    conditioning on the timestep + pooled text, cross-attention to the caption tokens. A train.size
    other than custom replaces it."""

    width: int = 384  # token width
    depth: int = 12  # transformer blocks
    heads: int = 6  # attention heads
    patch: int = 2  # side of the square of pixels (or latents) that makes one token
    mlp_ratio: float = 4.0  # MLP hidden width as a multiple of width

    def check(self, key: str) -> None:
        _at_least_one(self, key, "heads")  # a divisor below
        if self.width % self.heads or self.width % 4 or self.depth < 1 or self.patch < 1:
            raise ConfigError(f"{key}: width must divide by heads and by 4 (2D positions), depth and patch "
                              "must be >= 1")


# train.denoiser diffusers with neither config nor pretrained: a small SD-shaped UNet2DConditionModel
# for 16-32 px (widths 32/64/64, cross-attention at the two lower levels, 4 heads; ~1.9M parameters at
# a text width of 256). in_channels, out_channels and cross_attention_dim come from the data.
DIFFUSERS_SMALL_UNET = {
    "block_out_channels": [32, 64, 64], "layers_per_block": 1, "attention_head_dim": 4, "norm_num_groups": 16,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "sample_size": 32,
}


@dataclass(frozen=True)
class DiffusersConfig:
    """train.denoiser diffusers (diffusion.models.diffusers_unet): a diffusers UNet2DConditionModel behind
    the same denoiser contract, from a config, or from pretrained weights (offline: local files or the
    Hugging Face cache only). Neither: DIFFUSERS_SMALL_UNET, a small UNet for 16-32 px."""

    # null | a mapping of UNet2DConditionModel keyword arguments | a folder (or cached hub id) with its
    # config.json; null with pretrained: the pretrained model's own config
    config: Any = None
    # null: fresh weights | a diffusers folder | a single .safetensors file (needs config) | a cached hub id
    pretrained: Optional[str] = None
    subfolder: Optional[str] = None  # the UNet's folder inside config/pretrained (unet for a whole pipeline)

    def check(self, key: str) -> None:
        if self.config is not None and not isinstance(self.config, (dict, str)):
            raise ConfigError(f"{key}.config must be null, a mapping of UNet2DConditionModel arguments or a "
                              f"folder/hub id, got {self.config!r}")
        if self.pretrained and self.pretrained.endswith(".safetensors") and self.config is None:
            raise ConfigError(f"{key}.pretrained {self.pretrained} is a single file: set {key}.config to its "
                              "UNet2DConditionModel config (a mapping or a folder with config.json)")


@dataclass(frozen=True)
class LoRAConfig:
    """LoRA fine-tuning (diffusion.models.lora): low-rank adapters on the denoiser's attention
    projections; only they train and are checkpointed, the base (train.init_from or the seed) is frozen."""

    rank: int = 0  # the adapters' rank; 0: off (every weight trains)
    alpha: Optional[float] = None  # the update is scaled by alpha / rank; null: alpha = rank
    dropout: float = 0.0  # dropout on the adapters' input
    # modules to adapt, by name or name suffix (peft's target_modules); []: the attention projections
    # of train.denoiser (diffusion.models.lora.DEFAULT_TARGETS)
    target_modules: list[str] = field(default_factory=list)

    def check(self, key: str) -> None:
        if self.rank < 0:
            raise ConfigError(f"{key}.rank must be >= 0 (0: off), got {self.rank}")
        if self.alpha is not None and not self.alpha > 0:
            raise ConfigError(f"{key}.alpha must be > 0 (or null: alpha = rank), got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"{key}.dropout must be in [0, 1), got {self.dropout}")


@dataclass(frozen=True)
class TrainConfig:
    """Training the denoiser (diffusion.training.train): the optimizer, the objective, checkpoints,
    the GPU path and torchrun; train.unet and train.dit are the networks."""

    seed: int = 0  # initialisation, data order and noise draws (each process offsets its own)
    # warm start (diffusion.training.warm_start): begin from another model's EMA weights, a registered
    # version (models:/<name>@champion, models:/<name>/<version>), a train-stage model folder, or a
    # diffusers UNet (folder or .safetensors; train.denoiser diffusers). The step, optimizer and
    # schedule start fresh; a run's own checkpoint.pt still resumes it. null: from scratch
    init_from: Optional[str] = None
    device: str = "auto"  # auto: CUDA when present, else the CPU
    steps: int = 2000  # optimizer steps
    batch_size: int = 64  # the global batch: split over torchrun processes and gradient-accumulation steps
    grad_accum: int = 1  # micro-batches per optimizer step (each batch_size / (processes * grad_accum))
    # null: the rate of train.size and denoiser (size_lr; the rates and why are at SIZE_LR)
    lr: Optional[float] = None
    lr_schedule: str = "cosine"  # cosine | constant (both after linear warmup)
    warmup_steps: int = 200  # the rate rises linearly to lr over these steps
    weight_decay: float = 0.0  # AdamW's
    grad_clip: float = 1.0  # the gradients' global norm is clipped to this
    # the EMA's decay at each step is min(ema_decay, (1 + step) / (10 + step)): the warm-up term,
    # not ema_decay, sets it below about 9000 steps for 0.999 (0.9955 at step 2000)
    ema_decay: float = 0.999
    cond_dropout: float = 0.1  # caption dropout for classifier-free guidance
    # the chance that a training caption gets 1..unseen_words_max extra random word vectors, as the
    # words of a prompt the model never saw would add: it learns to read past them (tables of word
    # vectors only, embed.layer token_embedding; off for contextual states); 0: the seed's captions
    unseen_words: float = 0.0
    unseen_words_max: int = 3  # most extra word vectors one caption gets
    # objective: the seed's DDPM (linear betas, epsilon prediction, MSE) ...

    timesteps: int = 1000  # T: the noise levels of the DDPM schedule
    beta_min: float = 1.0e-4  # the betas' first ...
    beta_max: float = 0.02  # ... and last
    # linear: the seed's betas, linear from beta_min to beta_max; scaled_linear: Stable Diffusion's,
    # sqrt(beta) linear between the square roots, squared (SD: beta_min 0.00085, beta_max 0.012)
    beta_schedule: str = "linear"
    # rescale the betas to zero terminal SNR (Lin et al. 2024): the last level is pure noise, as at
    # the start of sampling, so very dark or bright images can be drawn; pair with prediction v and
    # sample.spacing trailing (the top level is a finite stand-in: schedules.ZERO_SNR_ALPHABAR)
    zero_terminal_snr: bool = False
    prediction: str = "eps"  # eps | v: the network predicts the noise, or v (Salimans & Ho 2022)
    # "none" is the seed's plain MSE; "min_snr" weights timesteps by min-SNR-gamma (Hang et al. 2023)
    loss_weighting: str = "none"
    min_snr_gamma: float = 5.0  # min_snr: w = min(SNR, gamma) / SNR (/ (SNR + 1) for v)
    # the training timesteps: uniform over 0..T-1 (the seed's), or logit_normal (SD3, Esser et al.
    # 2024): t = T * sigmoid(timestep_loc + timestep_scale * z), most steps on the middle noise levels
    timestep_sampling: str = "uniform"
    timestep_loc: float = 0.0  # logit_normal: > 0 shifts the steps to higher noise
    timestep_scale: float = 1.0  # logit_normal: the spread (larger: more of both ends)
    # offset noise (Guttenberg 2023): training noise gets offset_noise x one extra normal draw per
    # image and channel, shared by all its pixels, so the model learns to move an image's mean
    # (darker, brighter images); 0: off (0.05-0.1 is usual); not in the held-out val_loss
    offset_noise: float = 0.0
    # latent models: "posterior" draws z = mean + std * noise from the stored distribution at each
    # step (diffusers' training scripts); "mean" uses the mean
    latent_sampling: str = "posterior"
    shuffle_buffer: int = 2000  # samples held to shuffle the shard stream
    data_workers: int = 1  # DataLoader processes decoding shards beside the training step (per process); 0: inline
    checkpoint_every: int = 500  # steps between checkpoints (where a killed run resumes)
    keep_checkpoints: int = 2  # checkpoint.pt (the newest) and the K-1 before it (checkpoint-<step>.pt)
    log_every: int = 50  # steps between logged metrics
    # every N steps rank 0 draws the EMA's sample grid (the train stage's captions and seeds) and logs
    # it to MLflow as train_samples/step_<N>.png, to watch a long run; 0: only the finished model's
    sample_every: int = 0
    # every N steps (and at the last) rank 0 logs val_loss: the EMA's loss on the first val_samples
    # samples of the val split at noise and timesteps drawn once from their own seed, the same at every
    # evaluation (training's random streams untouched); 0: off
    val_every: int = 50
    val_samples: int = 128  # val samples in the held-out loss (fewer where the val split is smaller); 0: off
    threads: int = 0  # torch CPU threads; 0 = torch's default
    # auto | fp32 | bf16 | fp16, the GPU path: auto = bf16 autocast on CUDA, fp32 on the CPU; fp16
    # trains with a grad scaler
    precision: str = "auto"
    tf32: bool = True  # CUDA: TF32 matmuls and convolutions
    channels_last: bool = True  # CUDA: NHWC memory format for the UNet's convolutions
    compile: bool = False  # torch.compile the network (minutes of compile; pays off on long GPU runs)
    # recompute each network block's activations in the backward pass instead of keeping them: less
    # memory for about one more forward a step, the same gradients (bench/memory_bench.py measures both)
    grad_checkpointing: bool = False
    nproc_per_node: int = 1  # torchrun: processes (GPUs) per node
    nnodes: int = 1  # torchrun: nodes; several meet at rdzv_endpoint (c10d rendezvous)
    rdzv_endpoint: str = "127.0.0.1:29400"  # host:port of the rendezvous, the same on every node
    rdzv_id: str = "t2i-train"  # the run's id at the rendezvous: nodes with the same id train together
    # unet | dit (diffusion.models.dit) | diffusers (a diffusers UNet2DConditionModel, train.diffusers): the
    # network behind the same denoiser contract
    denoiser: str = "unet"
    # custom: train.unet / train.dit as written; tiny (a 3.6M UNet, 48 wide) | small (~30M) | base
    # (~110M): SIZE_PRESETS replaces both (any resolution that is a multiple of 16)
    size: str = "custom"
    unet: UNetConfig = field(default_factory=UNetConfig)
    dit: DiTConfig = field(default_factory=DiTConfig)
    diffusers: DiffusersConfig = field(default_factory=DiffusersConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)

    def __post_init__(self):
        if self.lr is None:  # every TrainConfig holds a number: the size's rate
            object.__setattr__(self, "lr", size_lr(self.size, self.denoiser))

    def check(self, key: str) -> None:
        """The loop's own settings (train.unet and train.dit check themselves)."""
        _at_least_one(self, key, "steps", "batch_size", "grad_accum", "keep_checkpoints", "unseen_words_max",
                      "nproc_per_node", "nnodes")
        if self.sample_every < 0:
            raise ConfigError(f"{key}.sample_every must be >= 0 (0: off), got {self.sample_every}")
        for name in ("val_every", "val_samples"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{key}.{name} must be >= 0 (0: off), got {getattr(self, name)}")
        if not 0 < self.beta_min < self.beta_max < 1:
            raise ConfigError(f"{key}.beta_min/beta_max must satisfy 0 < beta_min < beta_max < 1")
        if self.zero_terminal_snr and self.timesteps < 2:
            raise ConfigError(f"{key}.zero_terminal_snr needs {key}.timesteps >= 2 (the rescale keeps the first "
                              f"level and zeroes the last), got {self.timesteps}")
        if not 0 <= self.offset_noise <= 1:
            raise ConfigError(f"{key}.offset_noise must be in [0, 1] (0: off; 0.05-0.1 is usual), "
                              f"got {self.offset_noise}")
        if not self.timestep_scale > 0:
            raise ConfigError(f"{key}.timestep_scale must be > 0 (logit_normal's spread), got {self.timestep_scale}")
        if not self.lr > 0:
            raise ConfigError(f"{key}.lr must be > 0 (or null: the rate of {key}.size), got {self.lr}")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"{key}.ema_decay must be in [0, 1), got {self.ema_decay}")
        if not 0 <= self.cond_dropout < 1:
            raise ConfigError(f"{key}.cond_dropout must be in [0, 1), got {self.cond_dropout}")
        if not 0 <= self.unseen_words <= 1:
            raise ConfigError(f"{key}.unseen_words must be in [0, 1], got {self.unseen_words}")
        per_step = self.nproc_per_node * self.nnodes * self.grad_accum
        if self.batch_size % per_step:
            raise ConfigError(f"{key}.batch_size {self.batch_size} must divide by nproc_per_node x nnodes x "
                              f"grad_accum = {per_step}")
        if self.data_workers < 0:
            raise ConfigError(f"{key}.data_workers must be >= 0, got {self.data_workers}")
        if self.init_from is not None and (not isinstance(self.init_from, str) or not self.init_from.strip()):
            raise ConfigError(f"{key}.init_from must be a models:/ URI or a path (null: from scratch), "
                              f"got {self.init_from!r}")


@dataclass(frozen=True)
class SampleConfig:
    """Sampler settings (what ``generate`` reads; the registered model keeps the sampler keys)
    and the evaluation prompt set of the sample stage."""

    sampler: str = "ddpm"  # ddpm (ancestral) | ddim | euler | heun | dpmpp_2m | dpmpp_2m_sde (diffusion.sampling.samplers)
    steps: int = 20  # noise levels visited (heun evaluates the network 2 * steps - 1 times)
    spacing: str = "karras"  # karras | uniform | trailing (diffusion.models.schedules.sampling_sigmas)
    eta: Optional[float] = None  # ddim/euler/dpmpp_2m_sde noise: null = the sampler's default (sde 1, else 0)
    guidance_scale: float = 4.0  # classifier-free guidance D_u + s * (D_c - D_u); 1: the conditional alone
    # [sigma_lo, sigma_hi]: guidance only at noise levels inside (Kynkaanniemi et al. 2024); null: all
    guidance_interval: Optional[list[float]] = None
    clip_denoised: bool = True  # clamp x0_hat to the data range [-1, 1] at every evaluation
    per_combo: int = 4  # evaluation images per attribute combination (built-in set)
    new_wording_per_combo: int = 2  # built-in set: images per combination in held-out wording (captions.HELD_OUT)
    partial_per_combo: int = 1  # built-in set: images per combination from prompts naming only some attributes
    n_prompts: int = 256  # other sources: this many validation captions
    n_seen_prompts: int = 128  # other sources: and this many training captions (R-precision on seen captions)
    seed: int = 0  # image i is drawn from seed + i (whatever batch it falls in)
    batch_size: int = 256  # images per sampler call
    device: str = "auto"  # auto | cpu | cuda
    grid_size: int = 24  # images in the sample grid PNG

    def check(self, key: str) -> None:
        """Counts only: the sampler settings against train.timesteps are ``sampler_problems``."""
        _at_least_one(self, key, "steps", "per_combo")


# train.size: the networks of each size (parameters with the default 384-wide text tower)
SIZE_PRESETS: dict[str, dict] = {
    "tiny": {"unet": UNetConfig(),  # 3.6M
             "dit": DiTConfig(width=192, depth=6, heads=3)},  # 5.8M
    "small": {"unet": UNetConfig(channels=64, channel_mult=[1, 2, 3, 4], blocks_per_level=2, attn_levels=[1, 2, 3],
                                 heads=4),  # 29.9M
              "dit": DiTConfig(width=384, depth=8, heads=6)},  # 27.9M
    "base": {"unet": UNetConfig(channels=128, channel_mult=[1, 2, 3, 4], blocks_per_level=2, attn_levels=[1, 2, 3],
                                heads=8),  # 114M
             "dit": DiTConfig(width=640, depth=12, heads=10)},  # 111M
}


# train.lr null: the peak learning rate of each size. The networks are of the seed's kind (AdamW,
# cosine); bigger ones need smaller steps: on an H200, train.size base at 1e-3 collapsed to a
# constant output (loss 1.0) within 100 steps and trained at 1e-4. A custom UNet takes 2e-3: the
# narrow default (params.yaml, 1.7M parameters) drew held-out combinations as well as the 48-wide
# network (tiny) at it, and worse at 1e-3 (docs/results.md, "Halving the default's training
# compute"); a custom DiT keeps 1e-3 (CUSTOM_DIT_LR): 2e-3 was not tried on it.
SIZE_LR: dict[str, float] = {"custom": 2.0e-3, "tiny": 1.0e-3, "small": 3.0e-4, "base": 1.0e-4}
CUSTOM_DIT_LR = 1.0e-3


def size_lr(size: str, denoiser: str = "unet") -> float:
    """The peak learning rate ``train.lr: null`` stands for: the size's, or a custom DiT's."""
    if size == "custom" and denoiser == "dit":
        return CUSTOM_DIT_LR
    return SIZE_LR.get(size, SIZE_LR["custom"])


# the keys of SampleConfig that decide an image (registered with a model, overridable per call)
SAMPLER_KEYS = ("sampler", "steps", "spacing", "eta", "guidance_scale", "guidance_interval", "clip_denoised")


def sampler_problems(cfg: SampleConfig, timesteps: int) -> list[str]:
    """What is wrong with the sampler settings of ``cfg`` for a model of ``timesteps`` steps
    (params validation and the served model's per-call overrides both ask this)."""
    problems = []
    if cfg.sampler not in CHOICES["sample.sampler"]:
        problems.append(f"sampler must be one of {', '.join(CHOICES['sample.sampler'])}, got {cfg.sampler!r}")
    if cfg.spacing not in CHOICES["sample.spacing"]:
        problems.append(f"spacing must be one of {', '.join(CHOICES['sample.spacing'])}, got {cfg.spacing!r}")
    if not 1 <= cfg.steps <= timesteps:
        problems.append(f"steps must be in 1..{timesteps}, got {cfg.steps}")
    if cfg.eta is not None and not 0 <= cfg.eta <= 1:
        problems.append(f"eta must be in [0, 1], got {cfg.eta}")
    gi = cfg.guidance_interval
    if gi is not None and (len(gi) != 2 or not 0 <= gi[0] < gi[1]):
        problems.append(f"guidance_interval must be [sigma_lo, sigma_hi] with 0 <= lo < hi, got {gi}")
    return problems


@dataclass(frozen=True)
class EvaluateConfig:
    """Image-quality metrics beside the judge's adherence (diffusion.evaluation.evaluate, diffusion.evaluation.metrics)."""

    # FID/KID: torch-fidelity's Inception weights (weights-inception-2015-12-05-6726825d.pth):
    # "auto" uses the file when it is in torch's hub cache or $T2I_WEIGHTS_DIR; a path; or null (off)
    inception_weights: Optional[str] = "auto"
    clip_model: str = "ViT-B-32"  # CLIP score: an open_clip architecture ...
    clip_pretrained: Optional[str] = None  # ... and its weights: a tag (only if cached) or a local file
    real_images: int = 2000  # real validation images for the reference statistics (cached by fingerprint)
    kid_subset_size: int = 1000  # images per KID subset (torch-fidelity's default)
    cache_dir: Optional[str] = None  # reference statistics; null: ~/.cache/t2i-diffusion/eval
    batch_size: int = 64  # images per Inception or CLIP call
    device: str = "auto"  # auto | cpu | cuda


@dataclass(frozen=True)
class SweepConfig:
    """The quality-vs-cost map (t2i sweep / the sweep DVC stage): every sampler at every step count,
    then guidance scales at the sample section's sampler, scored like the evaluate stage."""

    # the samplers compared (any of sample.sampler's choices)
    samplers: list[str] = field(default_factory=lambda: ["ddpm", "ddim", "heun", "dpmpp_2m", "dpmpp_2m_sde"])
    steps: list[int] = field(default_factory=lambda: [5, 10, 20, 50, 100])  # step counts each sampler runs
    spacing: str = "karras"  # the spacing of the sampler sweep (the uniform DDPM-1000 point is added)
    reference_steps: int = 1000  # ddpm ancestral over every timestep: the reference point; 0: none
    # guidance scales tried at the sample section's sampler and steps
    guidance_scales: list[float] = field(default_factory=lambda: [1.0, 2.0, 3.0, 4.0, 6.0, 8.0])
    per_combo: int = 1  # images per attribute combination at each point (built-in set)
    n_prompts: int = 128  # other sources: validation captions per point
    seed: int = 0  # image i of every point is drawn from seed + i, so points differ only in their settings

    def check(self, key: str) -> None:
        for name in self.samplers:
            if name not in CHOICES["sample.sampler"]:
                raise ConfigError(f"{key}.samplers: {name!r} is not one of {', '.join(CHOICES['sample.sampler'])}")


@dataclass(frozen=True)
class RegisterConfig:
    """The MLflow registered model (t2i register adds each trained model as a new version)."""

    model_name: str = "t2i-shapes"  # the registered model's name
    # a LoRA model (train.lora.rank > 0): register the merged weights (a plain model) instead of the
    # base + adapter (smaller to ship, no adapter to apply at load; the same images)
    merge_lora: bool = False


@dataclass(frozen=True)
class PromoteConfig:
    """The promotion policy: when a new version takes the alias from the current champion."""

    auto: bool = True  # the pipeline's promote stage applies the policy to each new version
    alias: str = "champion"  # the alias the winner takes (batch.model_uri names it)
    # a metric tag of the versions (as in reports/metrics.json); auto: adherence.held_out.all on the
    # built-in set, retrieval.r_precision.generated.all.mean on any other data. A metric the evaluation
    # cannot produce here (the judge's off the built-in set, FID without weights) is refused before training
    metric: str = "auto"
    direction: str = "maximize"  # maximize | minimize
    min_margin: float = 0.01  # the candidate must beat the champion by at least this much
    floor: float = 0.5  # a first champion must reach this (maximize: >=, minimize: <=)


@dataclass(frozen=True)
class BatchConfig:
    """Batch generation from a registered model (t2i generate, the batch-generation flow)."""

    model_uri: str = "models:/t2i-shapes@champion"  # or models:/<name>/<version>, or a local model folder
    output_dir: str = "data/batches"  # batches land in <output_dir>/<YYYY-MM-DD>/<run name>/
    batch_size: int = 64  # images generated (and committed) together; a kill loses at most one batch
    seed: int = 0  # rows without a seed get seed + their row number
    device: str = "auto"  # auto | cpu | cuda
    contact_sheet_size: int = 48  # images on the contact sheet
    task_runner: str = "local"  # local (chunks drawn in the flow's process) | dask (chunks drawn on Dask workers)
    workers: int = 2  # dask: workers of the LocalCluster (one GPU or one CPU thread each); chunks in flight: 2x this
    dask_address: Optional[str] = None  # dask: null = a LocalCluster of `workers` processes; else tcp://host:8786

    def check(self, key: str) -> None:
        _at_least_one(self, key, "batch_size", "workers")
        if self.dask_address and self.task_runner != "dask":
            raise ConfigError(f"{key}.dask_address is set ({self.dask_address}) but {key}.task_runner is "
                              f"{self.task_runner}: set {key}.task_runner=dask, or dask_address back to null")


@dataclass(frozen=True)
class ServeConfig:
    """Serving a registered model over HTTP with batching (t2i serve, diffusion.registry.serving)."""

    model_uri: str = "models:/t2i-shapes@champion"  # or models:/<name>/<version>
    host: str = "127.0.0.1"  # 0.0.0.0 to answer other machines
    port: int = 5001  # /invocations, /ping, /health (as mlflow models serve)
    max_batch: int = 16  # images drawn in one sampler call; a request with more records is refused (413)
    max_wait_ms: float = 60.0  # how long the oldest waiting request may wait for others to fill a batch
    # every sampler call at one shape (max_batch rows, text padded to a 16-token bucket), so an image is
    # the same bit for bit whatever it was batched with (CPU kernels may round by shape); false: only the
    # gathered rows (cheaper when requests come alone; identical where kernels do not round by shape)
    fixed_shape: bool = True

    def check(self, key: str) -> None:
        _at_least_one(self, key, "max_batch", "port")
        if self.max_wait_ms < 0:
            raise ConfigError(f"{key}.max_wait_ms must be >= 0, got {self.max_wait_ms}")


@dataclass(frozen=True)
class MlflowConfig:
    """Where runs and registered models are kept (diffusion.registry.tracking)."""

    tracking_uri: str = "sqlite:///mlflow.db"  # MLFLOW_TRACKING_URI in the environment wins
    experiment: str = "t2i-shapes"  # the experiment runs are logged under


@dataclass(frozen=True)
class Params:
    """The whole of params.yaml: one field a section."""

    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    latents: LatentsConfig = field(default_factory=LatentsConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    register: RegisterConfig = field(default_factory=RegisterConfig)
    promote: PromoteConfig = field(default_factory=PromoteConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)


# Values restricted to a fixed set, checked after typing.
CHOICES: dict[str, tuple[str, ...]] = {
    "ingest.source": ("builtin", "folder", "table", "webdataset", "urls", "openmoji"),
    "ingest.image_format": ("png", "jpg", "webp"),
    "ingest.resize_mode": ("center_crop", "pad", "keep_ratio", "bucket"),
    "ingest.caption_errors": ("replace", "reject"),
    "ingest.task_runner": ("threads", "processes", "dask"),
    "batch.task_runner": ("local", "dask"),
    "latents.dtype": ("auto", "float32", "float16", "bfloat16"),
    "latents.device": ("auto", "cpu", "cuda"),
    "train.latent_sampling": ("posterior", "mean"),
    "train.precision": ("auto", "fp32", "bf16", "fp16"),
    "train.denoiser": ("unet", "dit", "diffusers"),
    "train.unet.upsample": ("nearest_conv", "conv_nearest"),
    "train.size": ("custom", "tiny", "small", "base"),
    "embed.layer": ("auto", "last", "penultimate", "token_embedding"),
    "train.lr_schedule": ("cosine", "constant"),
    "train.prediction": ("eps", "v"),
    "train.loss_weighting": ("none", "min_snr"),
    "train.timestep_sampling": ("uniform", "logit_normal"),
    "train.beta_schedule": ("linear", "scaled_linear"),
    "train.device": ("auto", "cpu", "cuda"),
    "embed.device": ("auto", "cpu", "cuda"),
    "judge.device": ("auto", "cpu", "cuda"),
    "retrieval.device": ("auto", "cpu", "cuda"),
    "sample.device": ("auto", "cpu", "cuda"),
    "sample.sampler": ("ddpm", "ddim", "euler", "heun", "dpmpp_2m", "dpmpp_2m_sde"),
    "sample.spacing": ("uniform", "trailing", "karras"),
    "sweep.spacing": ("uniform", "trailing", "karras"),
    "evaluate.device": ("auto", "cpu", "cuda"),
    "promote.direction": ("maximize", "minimize"),
    "batch.device": ("auto", "cpu", "cuda"),
}


# --------------------------------------------------------------------------------------------
# Parsing


def _type_name(tp: Any) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    if tp in names:
        return names[tp]
    origin = typing.get_origin(tp)
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0]).removeprefix('a ').removeprefix('an ')}s"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return str(tp)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the type hint ``tp``; return it (ints widen to floats)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, key)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    bad = ConfigError(f"{key} must be {_type_name(tp)}, got {value!r}")
    if tp is Any:  # a free-form value (train.diffusers.config), checked by its section
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    if origin is list:
        if not isinstance(value, list):
            raise bad
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        k_tp, v_tp = typing.get_args(tp)
        return {_coerce(k, k_tp, key): _coerce(v, v_tp, f"{key}.{k}") for k, v in value.items()}
    raise TypeError(f"unsupported config type {tp} for {key}")  # a bug in this module


def _build(cls: type, data: Any, prefix: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix} must be a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        dotted = ", ".join(f"{prefix}.{k}" if prefix else str(k) for k in unknown)
        raise ConfigError(f"unknown key {dotted} (known: {', '.join(sorted(known))})")
    kwargs = {}
    for name in known:
        if name in data:
            key = f"{prefix}.{name}" if prefix else name
            kwargs[name] = _coerce(data[name], hints[name], key)
            if key in CHOICES and kwargs[name] not in CHOICES[key]:
                raise ConfigError(
                    f"{key} must be one of {', '.join(CHOICES[key])}, got {kwargs[name]!r}"
                )
    return cls(**kwargs)


def _check_tree(section: Any, key: str) -> None:
    """``section.check(key)``, then each nested section's (``train``, then ``train.unet``, ``train.dit``)."""
    if hasattr(section, "check"):
        section.check(key)
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            _check_tree(value, f"{key}.{f.name}" if key else f.name)


def parse_section(cls: type[_Section], data: Any, key: str, source: str | None = None) -> _Section:
    """One section (``cls``, with its nested sections) from a mapping, checked as params.yaml's is:
    unknown keys, wrong types, values outside CHOICES and the section's own checks raise ConfigError
    naming ``key.field`` (prefixed with ``source``); missing keys take the defaults. A model.json's
    ``train`` comes back through here (diffusion.models.store.load_model), so a bundle written
    before a key existed still loads."""
    try:
        section = _build(cls, data, key)
        _check_tree(section, key)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}" if source else str(e)) from None
    return section


def parse_params(data: Any, source: str = "params") -> Params:
    """Build ``Params`` from an already-loaded mapping; errors are prefixed with ``source``."""
    try:
        params = _build(Params, data, "")
        if params.train.size != "custom":  # a size preset replaces the networks' settings
            preset = SIZE_PRESETS[params.train.size]
            params = dataclasses.replace(params, train=dataclasses.replace(params.train, **preset))
        _check_tree(params, "")
        _check_across(params)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return params


def load_params(path: str | Path, overrides: list[str] | None = None) -> Params:
    """Read params.yaml (plus ``section.key=value`` overrides) into a checked ``Params``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}") from None
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        node[leaf] = yaml.safe_load(raw)
    return parse_params(data, source=str(path))


def _check_across(p: Params) -> None:
    """The checks that read two sections: step counts against train.timesteps, and the denoiser
    against the side it must tile (the image's; a latent model's is checked at train)."""
    t = p.train
    if any(not 1 <= n <= t.timesteps for n in [*p.sweep.steps, p.sweep.reference_steps or 1]):
        raise ConfigError(f"sweep.steps and sweep.reference_steps must be in 1..{t.timesteps} (reference 0: none)")
    for problem in sampler_problems(p.sample, t.timesteps):
        raise ConfigError(f"sample.{problem} (train.timesteps is {t.timesteps})" if "steps must" in problem
                          else f"sample.{problem}")
    if not p.latents.vae:
        size_key, size = ("dataset.image_size", p.dataset.image_size) if p.ingest.source == "builtin" else \
            ("ingest.image_size", p.ingest.image_size)
        check_fits(t, size, size_key)


# --------------------------------------------------------------------------------------------
# Aspect-ratio buckets: the set is a pure function of ingest's settings (diffusion.data.buckets uses it)


def compute_buckets(side: int, step: int, max_aspect: float) -> list[tuple[int, int]]:
    """The buckets of a ``side`` x ``side`` pixel budget: for every width that is a multiple of
    ``step``, the tallest height (a multiple of ``step``) that keeps the area within the budget,
    where neither side is more than ``max_aspect`` times the other; each with its transpose (so tall
    and wide images are served alike), the largest of equal aspect ratios, sorted from tall to wide.
    The square ``side`` x ``side`` is one of them whenever ``side`` is a multiple of ``step``."""
    return list(_computed(side, step, float(max_aspect)))


@functools.cache
def _computed(side: int, step: int, max_aspect: float) -> tuple[tuple[int, int], ...]:
    budget = side * side
    found: set[tuple[int, int]] = set()
    w = step
    while w * step <= budget:
        h = budget // w // step * step
        if h >= step and max(w, h) <= max_aspect * min(w, h) + 1e-9:
            found |= {(w, h), (h, w)}
        w += step
    best: dict[tuple[int, int], tuple[int, int]] = {}  # reduced aspect ratio -> its largest bucket
    for b in found:
        g = math.gcd(*b)
        ratio = (b[0] // g, b[1] // g)
        if ratio not in best or b[0] * b[1] > best[ratio][0] * best[ratio][1]:
            best[ratio] = b
    return tuple(sorted(best.values(), key=lambda b: (b[0] / b[1], b[0])))


def bucket_set(cfg) -> list[tuple[int, int]]:
    """``cfg``'s (an IngestConfig) buckets: ``ingest.buckets`` as given, or computed from
    ``image_size``, ``bucket_step`` and ``max_aspect_ratio``. Raises a one-line ConfigError for an
    empty set or a bucket whose sides are not multiples of ``ingest.bucket_step``."""
    step = cfg.bucket_step
    if cfg.buckets is None:
        got = compute_buckets(cfg.image_size, step, cfg.max_aspect_ratio)
        if not got:
            raise ConfigError(f"ingest.bucket_step {step} leaves no bucket within ingest.image_size "
                              f"{cfg.image_size} and ingest.max_aspect_ratio {cfg.max_aspect_ratio}: lower the step")
        return got
    out: list[tuple[int, int]] = []
    for i, b in enumerate(cfg.buckets):
        if len(b) != 2 or min(b) < 1:
            raise ConfigError(f"ingest.buckets[{i}] must be [width, height] of positive integers, got {b}")
        if b[0] % step or b[1] % step:
            raise ConfigError(f"ingest.buckets[{i}] {b[0]}x{b[1]} is not a multiple of ingest.bucket_step {step}")
        out.append((int(b[0]), int(b[1])))
    if not out:
        raise ConfigError("ingest.buckets is empty: give [width, height] pairs, or null to compute them")
    return sorted(set(out), key=lambda b: (b[0] / b[1], b[0]))


def check_fits(t: "TrainConfig", size: int, size_key: str) -> None:
    """The denoiser must tile a ``size`` side: the UNet folds ``patch`` and halves the side at each
    level; the DiT cuts ``patch`` x ``patch`` tokens; a diffusers UNet halves it at each of its
    block_out_channels but the last (a config given as a folder or hub id is not read here)."""
    if t.denoiser == "diffusers":
        spec = DIFFUSERS_SMALL_UNET if t.diffusers.config is None and not t.diffusers.pretrained else t.diffusers.config
        if isinstance(spec, dict):
            levels = 2 ** (len(spec.get("block_out_channels", [320, 640, 1280, 1280])) - 1)
            if size % levels:
                raise ConfigError(f"{size_key} {size} must be divisible by 2^(len(block_out_channels)-1) = {levels} "
                                  "(train.diffusers.config)")
        return
    if t.denoiser == "dit":
        if size % t.dit.patch:
            raise ConfigError(f"{size_key} {size} must be divisible by train.dit.patch {t.dit.patch}")
        return
    u = t.unet
    levels = 2 ** (len(u.channel_mult) - 1)
    if size % u.patch or (size // u.patch) % levels:
        raise ConfigError(f"{size_key}/patch ({size}/{u.patch}) must be divisible by 2^(len(channel_mult)-1) = {levels}")


def check_denoiser_fits(train_cfg, buckets, factor: int = 1) -> None:
    """Every bucket (divided by ``factor``: a latent model's VAE factor) must tile the denoiser; the
    one line names the bucket and ingest.bucket_step."""
    for b in buckets:
        for side in (b[0] // factor, b[1] // factor):
            try:
                check_fits(train_cfg, side, "side")
            except ConfigError as e:
                raise ConfigError(f"train.{train_cfg.denoiser} does not fit bucket {b[0]}x{b[1]}"
                                  f"{f' (latents /{factor})' if factor > 1 else ''}: {e}; "
                                  "choose ingest.bucket_step (or ingest.buckets) to match") from None


def to_dict(obj: Any) -> dict:
    """A params section as a plain dict (for MLflow params and checkpoints)."""
    return dataclasses.asdict(obj)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists and leaves are kept as values."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


# --------------------------------------------------------------------------------------------
# Reference: every key with its type, default and meaning (t2i params, docs/configuration.md).
# A field's meaning is the comment at the end of its line, or the comment lines right above it
# (both, joined, if it has both); a comment block parted from the field by a blank line is a
# heading and belongs to no field. A section's meaning is its class docstring.


@dataclass(frozen=True)
class KeyDoc:
    """One params.yaml key as ``t2i params`` prints it."""

    key: str  # dotted: train.unet.channels
    type: str  # the annotation as written in this file: Optional[int]
    default: str  # as YAML writes it: null, [1, 2, 2], auto
    doc: str  # the field's comment, on one line


@dataclass(frozen=True)
class SectionDoc:
    """One section (``train.unet`` for a nested one) and its keys."""

    key: str
    doc: str  # the class docstring, on one line
    keys: tuple[KeyDoc, ...]


def comment_docs(source: str) -> dict[str, tuple[str, dict[str, str]]]:
    """{class name: (its docstring, {field: its comment})} for the classes of a module's ``source``,
    each on one line (the rules are above this section's first class)."""
    lines = source.splitlines()
    comments = {t.start[0]: t.string.lstrip("#").strip()
                for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type == tokenize.COMMENT}
    own_line = {n for n in comments if lines[n - 1].lstrip().startswith("#")}
    docs = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        fields = {}
        for stmt in node.body:
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                above, n = [], stmt.lineno - 1
                while n in own_line:  # the block right above, up to a blank line or code
                    above.insert(0, comments[n])
                    n -= 1
                beside = [comments[n] for n in range(stmt.lineno, stmt.end_lineno + 1)
                          if n in comments and n not in own_line]
                fields[stmt.target.id] = " ".join(above + beside)
        docs[node.name] = (" ".join((ast.get_docstring(node) or "").split()), fields)
    return docs


@functools.lru_cache(maxsize=1)
def _source_docs() -> dict[str, tuple[str, dict[str, str]]]:
    return comment_docs(Path(__file__).read_text())


def _yaml(value: Any) -> str:
    """``value`` as it would stand in params.yaml: flow style, one line."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 20, sort_keys=False).strip()
    return text.removesuffix("...").strip()


def _reference(cls: type, key: str) -> list[SectionDoc]:
    """``cls``'s section, then its nested sections (``train``, ``train.unet``, ``train.dit``)."""
    class_doc, field_docs = _source_docs()[cls.__name__]
    hints = typing.get_type_hints(cls)
    rows, nested = [], []
    for f in dataclasses.fields(cls):
        dotted = f"{key}.{f.name}" if key else f.name
        if dataclasses.is_dataclass(hints[f.name]):
            nested += _reference(hints[f.name], dotted)
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append(KeyDoc(dotted, str(f.type), _yaml(default), field_docs.get(f.name, "")))
    return ([SectionDoc(key, class_doc, tuple(rows))] if key else []) + nested


def params_reference(section: str | None = None) -> list[SectionDoc]:
    """Every section of params.yaml (or ``section`` and the sections inside it) with each key's
    type, default and meaning, read from the dataclasses above and the comments beside them."""
    sections = _reference(Params, "")
    if section is None:
        return sections
    chosen = [s for s in sections if s.key == section or s.key.startswith(section + ".")]
    if not chosen:
        raise ConfigError(f"unknown section {section} (sections: {', '.join(s.key for s in sections)})")
    return chosen


def reference_text(sections: list[SectionDoc]) -> str:
    """``t2i params``: each section's line, then its keys' type, default and meaning in columns."""
    out = []
    for s in sections:
        w_key, w_type = max(len(r.key) for r in s.keys), max(len(r.type) for r in s.keys)
        w_default = min(24, max(len(r.default) for r in s.keys))  # longer: the meaning on the next line
        out += ["", f"{s.key}: {s.doc}"]
        for r in s.keys:
            head = f"  {r.key:<{w_key}}  {r.type:<{w_type}}  "
            if len(r.default) <= w_default:
                out.append(f"{head}{r.default:<{w_default}}  {r.doc}")
            else:
                out += [head + r.default, " " * (len(head) + w_default + 2) + r.doc]
    return "\n".join(out[1:]) + "\n"


REFERENCE_HEADER = """\
# Configuration reference

Generated by `t2i params --markdown > docs/configuration.md` from the dataclasses in
`diffusion/config.py` and the comment beside each field. Do not edit this page by hand: change the
comment and run the command again (tests/test_params_reference.py fails while the page is stale).

Every key has a default, so a section of params.yaml may list only the keys it changes (the shipped
params.yaml spells each one out so that DVC tracks it). `t2i params [SECTION]` prints the same
reference in the terminal.
"""


def reference_markdown(sections: list[SectionDoc]) -> str:
    """docs/configuration.md: the header, then a table a section."""

    def code(text: str) -> str:  # in a table cell a | ends the cell, even inside backticks
        return "`" + text.replace("|", "\\|") + "`"

    def text(doc: str) -> str:  # and outside them <x> would be an HTML tag and * emphasis
        return doc.replace("|", "\\|").replace("<", "\\<").replace("*", "\\*")

    out = [REFERENCE_HEADER]
    for s in sections:
        out += [f"## {s.key}", "", s.doc, "", "| key | type | default | meaning |", "|---|---|---|---|"]
        out += [f"| {code(r.key)} | {code(r.type)} | {code(r.default)} | {text(r.doc)} |" for r in s.keys]
        out.append("")
    return "\n".join(out)
