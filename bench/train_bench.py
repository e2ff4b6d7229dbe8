"""Training throughput: our UNet (and DiT) against diffusers' UNet2DConditionModel, matched in
parameters, plus the data loader against what training consumes, on this machine.

    .venv/bin/python bench/train_bench.py                                      # CPU: 16 and 32 px, batch 64
    .venv/bin/python bench/train_bench.py --sizes 16 --steps 3 --warmup 1 --batch 16   # a smoke run
    .venv/bin/python bench/train_bench.py --device cuda --preset 100m --sizes 64 --batch 128 --compile \\
        --out bench/results/train-gpu.json                                   # the whole GPU comparison

The GPU command runs in a few minutes on one H100/H200 (torch.compile of our UNet is most of it);
``bash bench/gpu_check.sh`` runs it together with the train stage on CUDA (docs/results.md,
"Training on a GPU (H200)", has its figures). A model that fails (a compile error, out of memory) is
reported in the notes and the others still run; with ``--out`` the rows timed so far are also
written to ``<out>.partial.json`` after each model.

What is measured, in one process, one model after the other (on the CPU in turns, see 1.):

1. Training throughput (img/s, ms/step) of each model at each ``--sizes`` side, the same batch
   size, the same number of timed steps after the same warmup (excluded), ``torch.manual_seed``
   fixed, models in train mode. On the CPU every model of a size is built first and then timed in
   turn, ``--rounds`` (3) times ``--steps`` steps, and its img/s is its median round: a slow spell
   of a shared machine (these 2-core machines vary by 10-30% from minute to minute) then hits every
   model alike instead of whichever ran during it; "vs diffusers" is then the median of the
   per-round ratios; the rounds are in the log and the JSON. On CUDA (``--rounds`` 1) each model
   is built, timed and freed alone. Every model trains on the same few pre-made batches (random
   images in [-1, 1], held on the CPU, pinned on CUDA, copied to the device each step as the
   loop does) and the same random caption table. One step is what ``diffusion.training.train`` does:
   caption dropout (train.cond_dropout) on the table rows, the conditioning cut to the batch's
   longest caption, the loss under the loop's autocast (bf16 on CUDA, fp32 on the CPU),
   backward, gradient clipping (train.grad_clip), AdamW (train.lr, weight_decay, betas (0.9,
   0.99), fused), the LR schedule and the EMA update; no per-step host sync.
   - ours: ``diffusion.training.train.build_state`` + ``train_step`` themselves (the loop's own code:
     ``diffusion.models.precond.Denoiser`` + ``diffusion.models.loss.diffusion_loss``, channels_last, compile).
   - diffusers: the equivalent step of diffusers' training scripts: t ~ U{0..T-1}, noise,
     ``DDPMScheduler.add_noise`` (the same linear betas), ``unet(x_t, t, encoder_hidden_states,
     encoder_attention_mask, class_labels=pooled)``, MSE to the noise. Our loss is the same
     epsilon MSE (train.prediction eps, loss_weighting none are forced on both sides: the 100m
     preset's min-SNR weighting is off here). Same optimizer, clipping, EMA, channels_last, batches.
2. FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` over one eager forward+backward of each
   model (matmuls, convolutions and attention; attention is counted under the math SDPA backend,
   because the CPU flash kernel has no FLOP formula; optimizer and elementwise work are not
   counted), on the first 8 images of the timed batch and scaled to the whole batch (FLOPs are
   linear in it; the math backend's attention matrices at batch 128 would not fit). GFLOP/img = that / batch; TFLOP/s = FLOPs per step / the median
   round's step time. On CUDA, MFU = TFLOP/s / the GPU's dense bf16 peak (H100 SXM and H200: 989
   TFLOP/s; ``--peak-tflops`` overrides; printed).
3. The data loader alone: real WebDataset shards of the built-in dataset (``diffusion.data.ingest``,
   at ``--loader-size`` px, ``--loader-samples`` training images, shards of 1000) and their
   caption table (``diffusion.pipeline.stages.embed``: the params.yaml text tower, random init, offline),
   then ``diffusion.training.train``'s ``batch_loader`` with the training batch size, shuffle buffer and
   data workers (a DataLoader worker process, pinned memory on CUDA), timed over
   ``--loader-batches`` batches after the first (worker start and shuffle-buffer fill, reported
   apart). Reported against our UNet's training img/s at the same size: the goal is >= 10x.

Matching (printed at the start of a run, and in the JSON):
- ours: ``--preset default`` is params.yaml ``train.unet`` (48 x [1, 2, 2], 1 block a level, 2 up,
  attention at levels 1 and 2 and in the middle, 4 heads, 2x2 space-to-depth: 16 px -> maps of
  8, 4, 2 with attention at 4x4 and 2x2); ``--preset 100m`` is params/photos-256.yaml's 116M
  UNet (128 x [1, 2, 3, 4], 2 blocks, attention at levels 1-3, 8 heads) with patch 2 for pixels,
  so 64 px gives the same 32/16/8/4 maps as that preset's 32x32 latents.
- text: the dims the preset's text tower really produces (``diffusion.data.text.model_config``):
  params.yaml's ViT-S-32-alt with a random tower (layer token_embedding) gives 256-wide token
  states and a 256-wide pooled vector (384 is its vision width, unused); photos-256's pretrained
  ViT-B-32 (layer last) 512 and 512. A random table of ``--tokens`` (16) token slots per caption,
  each caption 8-16 real tokens with its padding mask, the empty caption (2 tokens) in row 0;
  every batch holds full-length captions, so it is always cut to ``--tokens`` (fixed shapes:
  torch.compile does not recompile in the timed steps). The built-in captions' real length (mean
  about 12, longest 18 tokens) is printed by section 3.
- diffusers: ``UNet2DConditionModel`` with the same levels and channel multipliers
  (DownBlock2D where we have no attention, CrossAttnDownBlock2D where we do; the mirror image up,
  UNetMidBlock2DCrossAttn), ``layers_per_block`` = blocks_per_level (both have one more block a
  level on the way up), ``resnet_time_scale_shift="scale_shift"`` (our ResBlocks' FiLM),
  ``use_linear_projection``, ``cross_attention_dim`` = text width (where ours projects the
  caption once, ``train.unet.ctx_dim``: diffusers' ``encoder_hid_dim_type="text_proj"`` to
  ``cross_attention_dim`` = ctx_dim, the same one projection), the pooled vector through
  ``class_embed_type="projection"`` (an MLP added to the timestep embedding, where ours adds one
  Linear: both sides use it), the caption mask as ``encoder_attention_mask``. It runs on the same
  space-to-depth input (``pixel_unshuffle`` before, ``pixel_shuffle`` after, ``in_channels`` =
  3 x patch^2), so its feature maps and attention resolutions are ours. Its base width: among
  the multiples of 4 whose parameter count is within 10% of ours, the one that allows head dims
  closest to ours (on CUDA first those that allow multiples of 8 where ours are, so both can use
  the fused attention kernels), then the closest count; the run stops (exit 2) if none is within
  10%. Heads: the count that gives those head dims. Its transformer blocks are heavier per width
  (GEGLU MLP x4, proj_in/out) than ours (GELU MLP x2), so it comes out narrower. GroupNorm
  groups: gcd(32, widths). Default preset: 28 x [1, 2, 2], 4 heads (head dims 14 to our 16),
  1,556,420 vs our 1,685,836 parameters (0.923; the 48-wide UNet default before it, now
  train.size tiny, got 44 x [1, 2, 2], 3,619,364 vs 3,581,420); 100m: 112 x [1, 2, 3, 4], 7 heads (head dims
  32/48/64, ours too), 109.9M vs our 115.9M (0.948). ``--match-only`` prints it and stops.
- DiT (``--arch`` dit): the preset's ``train.dit`` with its
  width (multiple of 4 x heads; 8 x heads on CUDA) and if need be its depth chosen to match our
  UNet's parameter count within 10%. Its "vs diffusers" is against the diffusers UNet.

Columns: params of the network (EMA, optimizer state not counted), img/s = batch x steps / timed
seconds (the median round), ms/step, GFLOP per image (forward+backward), achieved TFLOP/s, MFU
(CUDA), peak memory (CUDA), and ours / diffusers img/s at the same size (the median of the
per-round ratios). The CPU model, torch version and threads head
the table: compare rows within one run, not across machines, and run on a quiet machine.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from machine import cpu_name  # noqa: E402

from diffusion.models.unet import count_params  # noqa: E402

TOLERANCE = 0.10  # parameter counts must agree within this
LOADER_GOAL = 10.0  # the loader must outrun training this many times
# dense bf16 peaks (TFLOP/s) by device-name substring, first match wins
PEAKS = [("GH200", 989.0), ("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0),
         ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0)]
PRESETS = {
    "default": {"params": "params.yaml", "patch": None},
    "100m": {"params": "params/photos-256.yaml", "patch": 2},  # its latent UNet, on 2x2-folded pixels
}


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Configs and matching


def text_dims(embed) -> tuple[int, int, str]:
    """(token width, pooled width, layer) that the preset's text tower produces."""
    from diffusion.data.text import model_config, resolve_layer

    cfg = model_config(embed.model)
    width = int(cfg["text_cfg"]["width"])
    layer = resolve_layer(embed.layer, embed.pretrained)
    # token_embedding: pooled = mean of the word vectors (width); else the projected features (embed_dim)
    return width, (width if layer == "token_embedding" else int(cfg["embed_dim"])), layer


def meta_params(build) -> int:
    import torch

    with torch.device("meta"):
        return count_params(build())


def unet_widths(u, base: int | None = None) -> list[int]:
    return [(base or u.channels) * m for m in u.channel_mult]


def unet_fits(u, size: int) -> bool:
    return size % u.patch == 0 and (size // u.patch) % (2 ** (len(u.channel_mult) - 1)) == 0


def unet_maps(u, size: int) -> str:
    side = size // u.patch
    maps = [side // 2**i for i in range(len(u.channel_mult))]
    attn = [f"{maps[i]}x{maps[i]}" for i in sorted(u.attn_levels)]
    return (f"maps {', '.join(f'{m}x{m}' for m in maps)}; attention at {', '.join(attn) or 'none'} "
            f"+ mid {maps[-1]}x{maps[-1]}")


def attn_widths(u, base: int | None = None) -> list[int]:
    w = unet_widths(u, base)
    return [w[i] for i in sorted(set(u.attn_levels))] + [w[-1]]  # the middle block attends too


def diffusers_kwargs(u, base: int, heads: int, text_dim: int, pooled_dim: int, in_ch: int) -> dict:
    n = len(u.channel_mult)
    widths = unet_widths(u, base)
    # ours with train.unet.ctx_dim projects the caption once for every block: diffusers' text_proj
    # (encoder_hid_proj) does the same, its blocks then reading cross_attention_dim = ctx_dim
    ctx = {} if not u.ctx_dim else \
        {"encoder_hid_dim": text_dim, "encoder_hid_dim_type": "text_proj"}
    return {
        "sample_size": None, "in_channels": in_ch, "out_channels": in_ch,
        "down_block_types": tuple("CrossAttnDownBlock2D" if i in u.attn_levels else "DownBlock2D" for i in range(n)),
        "up_block_types": tuple("CrossAttnUpBlock2D" if i in u.attn_levels else "UpBlock2D" for i in reversed(range(n))),
        "mid_block_type": "UNetMidBlock2DCrossAttn", "block_out_channels": tuple(widths),
        "layers_per_block": u.blocks_per_level, "norm_num_groups": math.gcd(32, *widths),
        "cross_attention_dim": u.ctx_dim or text_dim, **ctx,
        "attention_head_dim": heads,  # diffusers: this is the head COUNT
        "use_linear_projection": True, "class_embed_type": "projection",
        "projection_class_embeddings_input_dim": pooled_dim, "resnet_time_scale_shift": "scale_shift",
        "dropout": u.dropout,
    }


def block_params(u, kwargs: dict, text_dim: int, pooled_dim: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Parameters in the ResNet blocks and in the transformer blocks, (ours, the diffusers UNet's)."""
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    from diffusion.models.unet import ResBlock, TransformerBlock, UNet

    def split(model, res, attn) -> tuple[int, int]:
        return tuple(sum(count_params(m) for m in model.modules() if isinstance(m, cls)) for cls in (res, attn))

    with torch.device("meta"):
        return (split(UNet(u, text_dim=text_dim, pooled_dim=pooled_dim, in_channels=3), ResBlock, TransformerBlock),
                split(UNet2DConditionModel(**kwargs), ResnetBlock2D, Transformer2DModel))


def search_monotone(lo: int, hi: int, step: int, ratio) -> int:
    """The multiple of ``step`` in [lo, hi] whose ratio(x) (increasing in x) is closest to 1 in log."""
    xs = list(range(lo, hi + 1, step))
    a, b = 0, len(xs) - 1
    cache: dict[int, float] = {}

    def r(i: int) -> float:
        if i not in cache:
            cache[i] = ratio(xs[i])
        return cache[i]

    while a < b:  # first index with ratio >= 1
        mid = (a + b) // 2
        if r(mid) >= 1.0:
            b = mid
        else:
            a = mid + 1
    cands = [i for i in (a - 1, a) if 0 <= i < len(xs)]
    return xs[min(cands, key=lambda i: abs(math.log(r(i))))]


def pick_heads(widths: list[int], ours_dims: list[int], ours_heads: int, need8: bool) -> tuple[int, float, bool]:
    """Heads for the diffusers UNet: dividing every attention width, head dims closest to ours
    (multiples of 8 where ``need8``), ties to the count nearest ours. Returns (heads, how far the
    head dims are from ours, whether the multiple-of-8 wish was met)."""
    def score(h: int) -> float:
        return sum(abs(math.log((w / h) / d)) for w, d in zip(widths, ours_dims))

    divisors = [h for h in range(1, max(widths) + 1) if all(w % h == 0 for w in widths)]
    ok = [h for h in divisors if not need8 or all((w // h) % 8 == 0 for w in widths)]
    met = bool(ok)
    h = min(ok or divisors, key=lambda h: (score(h), abs(h - ours_heads)))
    return h, score(h), met


def match_diffusers(u, ours_params: int, text_dim: int, pooled_dim: int, in_ch: int, cuda: bool) -> dict:
    """The diffusers UNet's base width and heads. Among the widths (multiples of 4) whose parameter
    count is within the tolerance of ours: the one whose head dims come closest to ours (on CUDA,
    first those that allow head dims in multiples of 8 where ours are), then the closest count."""
    from diffusers import UNet2DConditionModel

    def build(base: int, heads: int):
        return lambda: UNet2DConditionModel(**diffusers_kwargs(u, base, heads, text_dim, pooled_dim, in_ch))

    counts: dict[int, int] = {}

    def ratio(c: int) -> float:  # the head count changes no parameter count: one head
        if c not in counts:
            counts[c] = meta_params(build(c, 1))
        return counts[c] / ours_params

    best = search_monotone(4, 4 * u.channels, 4, ratio)
    cands = [best]
    for step in (-4, 4):  # the whole window within the tolerance (the count grows with the width)
        c = best + step
        while c >= 4 and abs(ratio(c) - 1) <= TOLERANCE:
            cands.append(c)
            c += step
    ours_dims = [w // u.heads for w in attn_widths(u)]
    need8 = cuda and all(d % 8 == 0 for d in ours_dims)

    def key(c: int):
        _, far, met = pick_heads(attn_widths(u, c), ours_dims, u.heads, need8)
        return (abs(ratio(c) - 1) > TOLERANCE, not met, round(far, 6), abs(math.log(ratio(c))))

    base = min(cands, key=key)
    heads = pick_heads(attn_widths(u, base), ours_dims, u.heads, need8)[0]
    n = meta_params(build(base, heads))
    kwargs = diffusers_kwargs(u, base, heads, text_dim, pooled_dim, in_ch)
    return {"base": base, "heads": heads, "params": n, "ratio": n / ours_params, "kwargs": kwargs,
            "head_dims": [w // heads for w in attn_widths(u, base)], "ours_head_dims": ours_dims,
            "widths_within_tolerance": sorted(c for c in cands if abs(ratio(c) - 1) <= TOLERANCE)}


def dit_overrides(dit_cfg, spec: str):
    """``dit_cfg`` with ``KEY=VALUE,...`` applied (each value read as its field's type)."""
    out, fields = {}, [f.name for f in dataclasses.fields(dit_cfg)]
    for item in filter(None, (s.strip() for s in spec.split(","))):
        key, eq, value = item.partition("=")
        if not eq or key not in fields:
            raise SystemExit(f"--dit {item!r}: expected KEY=VALUE with KEY one of {', '.join(fields)}")
        try:
            out[key] = float(value) if key == "mlp_ratio" else int(value)
        except ValueError:
            raise SystemExit(f"--dit {item!r}: {key} takes a number") from None
    return dataclasses.replace(dit_cfg, **out)


def match_dits(dit_cfg, specs: list[str], target: int, text_dim: int, pooled_dim: int, cuda: bool) -> dict:
    """One matched DiT per ``--dit`` spec, by model name: ``ours-dit`` when there is one, else
    ``ours-dit-p<patch>-w<width>-d<depth>``; name -> (spec, DiTConfig, params). Two specs that match
    the same network are refused."""
    out = {}
    for spec in specs:
        d, n = match_dit(dit_overrides(dit_cfg, spec), target, text_dim, pooled_dim, 3, cuda)
        name = "ours-dit" if len(specs) == 1 else f"ours-dit-p{d.patch}-w{d.width}-d{d.depth}"
        if name in out:
            raise SystemExit(f"--dit {spec!r}: matches the same DiT as --dit {out[name][0]!r} ({name})")
        out[name] = (spec, d, n)
    return out


def match_dit(dit_cfg, target: int, text_dim: int, pooled_dim: int, in_ch: int, cuda: bool):
    """A DiTConfig like ``dit_cfg`` (heads, patch, mlp ratio) whose parameter count matches ``target``:
    its width, and its depth only if no width gets within the tolerance."""
    from diffusion.models.dit import DiT

    def params(width: int, depth: int) -> int:
        return meta_params(lambda: DiT(dataclasses.replace(dit_cfg, width=width, depth=depth), text_dim=text_dim,
                                       pooled_dim=pooled_dim, in_channels=in_ch))

    steps = [math.lcm(8 * dit_cfg.heads, 4)] if cuda else []
    steps.append(math.lcm(dit_cfg.heads, 4))
    depths = sorted(range(1, 4 * dit_cfg.depth + 1), key=lambda d: (abs(d - dit_cfg.depth), d))
    for depth in depths:
        for step in steps:
            w = search_monotone(step, 64 * step, step, lambda x, d=depth: params(x, d) / target)
            n = params(w, depth)
            if abs(n / target - 1) <= TOLERANCE:
                return dataclasses.replace(dit_cfg, width=w, depth=depth), n
    raise SystemExit(f"no DiT width/depth within {TOLERANCE:.0%} of {target:,} parameters")


# --------------------------------------------------------------------------------------------
# Data for the timed steps


def synthetic_table(rows: int, tokens: int, text_dim: int, pooled_dim: int, seed: int, fingerprint: dict):
    """An EmbeddingTable of random caption states: row 0 the empty caption (2 tokens), the others
    between tokens/2 and tokens real tokens (some of them full), float16 like the real table."""
    import torch

    from diffusion.data.text import EMPTY_CAPTION, EmbeddingTable

    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(2, tokens // 2), tokens + 1, (rows,), generator=g)
    lengths[0] = min(2, tokens)
    lengths[1::8] = tokens  # rows 1, 9, 17, 25, ...: make_batches puts four of them in every batch
    mask = torch.arange(tokens)[None] < lengths[:, None]
    states = torch.randn(rows, tokens, text_dim, generator=g) * mask[..., None]
    pooled = torch.randn(rows, pooled_dim, generator=g)
    names = {EMPTY_CAPTION: 0, **{f"caption {i}": i for i in range(1, rows)}}
    return EmbeddingTable(states.half(), mask, pooled.half(), names, fingerprint)


def make_batches(n: int, batch: int, size: int, rows: int, seed: int, pin: bool) -> list:
    import torch

    from diffusion.training.train_data import Batch, DataPosition

    g = torch.Generator().manual_seed(seed + 1)
    out = []
    for _ in range(n):
        x0 = torch.rand(batch, 3, size, size, generator=g) * 2 - 1
        if pin:
            x0 = x0.pin_memory()
        r = torch.randint(1, rows, (batch,), generator=g)
        r[:4] = torch.arange(1, 33, 8)[: min(4, batch)]  # full-length captions: every batch is cut to --tokens
        out.append(Batch(x0=x0, rows=r, position=DataPosition()))
    return out


# --------------------------------------------------------------------------------------------
# Trainers: one training step each, and one eager loss for the FLOP count


class LoopTrainer:
    """Ours through the training loop's own pieces (``build_state``, ``train_step``)."""

    def __init__(self, cfg, table, size: int, device):
        from diffusion.training.distributed import Dist
        from diffusion.training.train import TextTable, build_state

        self.state = build_state(cfg, table, size, None, device, Dist())
        self.state.model.train()
        self.text = TextTable.of(table, device)
        self.net, self.opt = self.state.model.net, self.state.opt
        self.compiled = cfg.compile

    def step(self, batch):
        from diffusion.training.train import train_step

        return train_step(self.state, [batch], self.text, False)[0]

    def eager_loss(self, batch):
        from diffusion.training.train import micro_loss

        return micro_loss(dataclasses.replace(self.state, forward=self.state.model), batch, self.text, False)


class FoldedUNet:
    """diffusers' UNet2DConditionModel on the 2x2-folded input, with our Cond."""

    @staticmethod
    def build(kwargs: dict, patch: int):
        import torch.nn.functional as F
        from diffusers import UNet2DConditionModel
        from torch import nn

        class Folded(nn.Module):
            def __init__(self):
                super().__init__()
                self.unet = UNet2DConditionModel(**kwargs)
                self.patch = patch

            def forward(self, x, t, cond):
                h = F.pixel_unshuffle(x, self.patch) if self.patch > 1 else x
                out = self.unet(h, t, encoder_hidden_states=cond.tokens, encoder_attention_mask=cond.mask,
                                class_labels=cond.pooled, return_dict=False)[0]
                return F.pixel_shuffle(out, self.patch) if self.patch > 1 else out

        return Folded()


class DiffusersTrainer:
    """The diffusers UNet's step, written out as the loop does its own: caption dropout, cond (with
    train.unseen_words), autocast, diffusers' epsilon MSE, backward, clip, AdamW, schedule, EMA."""

    def __init__(self, match: dict, patch: int, cfg, table, device, opt_kwargs: dict, channels_last: bool,
                 compile_: bool):
        import torch
        from diffusers import DDPMScheduler

        from diffusion.training.train import TextTable, autocast_dtype, lr_factor

        torch.manual_seed(cfg.seed)
        self.model = FoldedUNet.build(match["kwargs"], patch).to(device)
        self.net = self.model.unet
        self.scheduler = DDPMScheduler(num_train_timesteps=cfg.timesteps, beta_start=cfg.beta_min,
                                       beta_end=cfg.beta_max, beta_schedule="linear")
        self.cfg, self.device, self.amp_dtype = cfg, device, autocast_dtype(cfg, device)
        self.channels_last = channels_last
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.model.train()
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        self.opt = torch.optim.AdamW(self.model.parameters(), **opt_kwargs)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: lr_factor(s, cfg))
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.text = TextTable.of(table, device)
        self.i = 0
        self.forward = torch.compile(self.model) if compile_ else self.model
        self.compiled = compile_

    def predict(self, batch, forward):
        """(x0, noise, t, prediction): the loop's conditioning and images, then diffusers'
        train_text_to_image.py draws and forward pass under the loop's autocast."""
        import torch

        from diffusion.models.loss import draw_timesteps

        cond = self.text.training_cond(batch.rows, self.cfg, self.gen)  # the loop's own
        x0 = batch.x0.to(self.device, non_blocking=True)
        if self.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        ac = torch.autocast(self.device.type, enabled=False) if self.amp_dtype is None else \
            torch.autocast(self.device.type, dtype=self.amp_dtype)
        with ac:
            g = self.gen if self.device.type == "cpu" else None
            # uniform: torch.randint as train_text_to_image.py; logit_normal: the recipe's draw (the
            # logit-normal density of diffusers' SD3 scripts), from the same generator as ours
            t = draw_timesteps(x0.shape[0], self.cfg.timesteps, x0.device, g, self.cfg.timestep_sampling,
                               self.cfg.timestep_loc, self.cfg.timestep_scale)
            noise = torch.randn(x0.shape, device=x0.device, generator=g)
            return x0, noise, t, forward(self.scheduler.add_noise(x0, noise, t), t, cond)

    def loss(self, batch, forward):
        import torch.nn.functional as F

        _, noise, _, pred = self.predict(batch, forward)  # epsilon prediction
        return F.mse_loss(pred.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3)).mean()

    def eager_loss(self, batch):
        return self.loss(batch, self.model)

    def step(self, batch):
        import torch

        from diffusion.training.train import ema_update

        self.opt.zero_grad(set_to_none=True)
        loss = self.loss(batch, self.forward)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.opt.step()
        self.sched.step()
        ema_update(self.ema, self.model, min(self.cfg.ema_decay, (1 + self.i) / (10 + self.i)))
        self.i += 1
        return loss.detach()


# --------------------------------------------------------------------------------------------
# Measuring


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


FLOP_BATCH = 8  # images the FLOPs are counted on (they are linear in the batch); >= the 4 full-length captions


def count_flops(trainer, batch, by_op: dict | None = None) -> int:
    """FLOPs of one eager forward+backward of ``batch`` (attention through the math backend, so it
    is counted), counted on its first FLOP_BATCH images and scaled to the whole batch: the math
    backend keeps every attention matrix for the backward pass, too much memory at full batch.
    ``by_op``: filled with the same count split by operator (convolution, mm, bmm, ...)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    n = batch.x0.shape[0]
    k = min(n, FLOP_BATCH)
    part = dataclasses.replace(batch, x0=batch.x0[:k], rows=batch.rows[:k])
    counter = FlopCounterMode(display=False)
    with sdpa_kernel([SDPBackend.MATH]), counter:
        loss = trainer.eager_loss(part)
        loss.backward()
    trainer.opt.zero_grad(set_to_none=True)
    if by_op is not None:
        for op, flops in counter.get_flop_counts().get("Global", {}).items():
            by_op[str(op).split(".")[-1]] = int(flops * n / k)  # aten.convolution -> convolution
    return int(counter.get_total_flops() * n / k)


def prepare(name: str, trainer, batches: list, args, device) -> dict:
    """Count one step's FLOPs and run the untimed warmup steps: a row without its timings yet."""
    flops = count_flops(trainer, batches[0])
    sync(device)
    t0 = time.perf_counter()
    for i in range(args.warmup):
        trainer.step(batches[i % len(batches)])
    sync(device)
    batch = batches[0].x0.shape[0]
    return {"model": name, "params": count_params(trainer.net), "batch": batch, "warmup_s": time.perf_counter() - t0,
            "flops_per_step": flops, "gflop_per_img": flops / batch / 1e9, "compiled": trainer.compiled,
            "rounds_img_per_s": []}


def time_round(row: dict, trainer, batches: list, args, device) -> float:
    """Time ``args.steps`` steps of one model (one round) and append its img/s to the row."""
    import torch

    sync(device)
    t0 = time.perf_counter()
    loss = None
    first = args.warmup + len(row["rounds_img_per_s"]) * args.steps  # steps this model has taken so far
    for i in range(first, first + args.steps):
        loss = trainer.step(batches[i % len(batches)])
    sync(device)
    dt = time.perf_counter() - t0
    row["rounds_img_per_s"].append(row["batch"] * args.steps / dt)
    row["loss_finite"] = bool(torch.isfinite(loss).item()) if loss is not None else None
    return row["rounds_img_per_s"][-1]


def finish(row: dict, device, peak: float | None) -> dict:
    """img/s = the median round (rounds alternate between the models, so a slow spell of the
    machine hits all of them, not whichever ran then); ms/step, TFLOP/s and MFU from it."""
    import torch

    ips = statistics.median(row["rounds_img_per_s"])
    row["img_per_s"] = ips
    row["ms_per_step"] = 1e3 * row["batch"] / ips
    row["tflop_per_s"] = row["flops_per_step"] * ips / row["batch"] / 1e12
    if peak:
        row["mfu"] = row["tflop_per_s"] / peak
    if device.type == "cuda":
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return row


def vs_reference(row: dict, ref: dict) -> float:
    """img/s against the reference's: with rounds, the median of the per-round ratios (both models
    timed within a minute of each other, so the machine's drift cancels), else the plain ratio."""
    a, b = row["rounds_img_per_s"], ref["rounds_img_per_s"]
    if len(a) > 1 and len(a) == len(b):
        return statistics.median(x / y for x, y in zip(a, b))
    return row["img_per_s"] / ref["img_per_s"]


def build_trainer(name: str, size: int, args, device, cfg, table, m: dict, unet, ours_params: int, text_dim: int,
                  pooled_dim: int, dits: dict, cuda: bool):
    """One model's trainer (network, optimizer, EMA) at ``size``; ``dits``: our DiTs' configs by name."""
    if name == "ours-unet" or name in dits:
        return LoopTrainer(cfg if name == "ours-unet" else dataclasses.replace(cfg, denoiser="dit", dit=dits[name]),
                           table, size, device)
    from diffusion.training.train import adamw_kwargs

    opt = adamw_kwargs(cfg, device)  # the settings the loop gives ours
    match = m if name == "diffusers-unet" else match_diffusers(unet, ours_params, text_dim, pooled_dim, 3, cuda)
    return DiffusersTrainer(match, unet.patch if name == "diffusers-unet" else 1, cfg, table, device, opt,
                            cuda and cfg.channels_last, args.compile_diffusers)


def bench_optimizer(unet, text_dim: int, pooled_dim: int, opt_kwargs: dict, device, steps: int = 20) -> dict:
    """One AdamW step on our UNet's parameters (random gradients): the loop's settings (fused)
    against PyTorch's default implementation on this device (the per-tensor loop on the CPU)."""
    import torch

    from diffusion.models.unet import UNet

    torch.manual_seed(0)
    params = list(UNet(unet, text_dim=text_dim, pooled_dim=pooled_dim).to(device).parameters())
    for q in params:
        q.grad = torch.randn_like(q)
    base = {k: v for k, v in opt_kwargs.items() if k not in ("fused", "foreach")}
    out = {"tensors": len(params)}
    for name, kw in (("loop_settings", opt_kwargs), ("torch_default", base)):
        opt = torch.optim.AdamW(params, **kw)
        for _ in range(3):
            opt.step()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            opt.step()
        sync(device)
        out[name + "_ms"] = 1e3 * (time.perf_counter() - t0) / steps
    out["settings"] = {k: v for k, v in opt_kwargs.items() if k in ("fused", "foreach")}
    return out


def free(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_tflops(device, override: float | None) -> tuple[float | None, str]:
    import torch

    if device.type != "cuda":
        return None, "cpu"
    name = torch.cuda.get_device_name(device)
    if override:
        return override, name
    for key, peak in PEAKS:
        if key in name:
            return peak, name
    return None, name


# --------------------------------------------------------------------------------------------
# The data loader


def bench_loader(args, size: int, batch: int, workers: int, seed: int, buffer: int, device, tmp: Path) -> dict:
    from diffusion import artifacts as art
    from diffusion.pipeline import stages
    from diffusion.config import load_params
    from diffusion.data.ingest import ingest
    from diffusion.data.text import EmbeddingTable
    from diffusion.training.train_data import DataPosition, DataSpec, batch_loader

    p = load_params(ROOT / "params.yaml", [f"dataset.image_size={size}", f"dataset.n_train={args.loader_samples}",
                                           "dataset.n_val=50", "ingest.samples_per_shard=1000"])
    shards, emb = tmp / f"shards-{size}", tmp / f"embeddings-{size}"
    log(f"loader: ingesting {args.loader_samples} built-in images at {size}px into {shards}")
    t0 = time.perf_counter()
    stats = ingest(p.ingest, p.dataset, shards, progress=False)
    t_ingest = time.perf_counter() - t0
    log("loader: embedding the captions (stages.embed)")
    t0 = time.perf_counter()
    stages.embed(p, shards, emb)
    t_embed = time.perf_counter() - t0
    table = EmbeddingTable.load(emb)
    urls = art.shard_urls(shards, "train")
    lengths = table.mask.sum(1).float()
    log(f"loader: {len(urls)} shards; batch_loader, batch {batch}, {workers} worker(s), buffer {buffer}")
    spec = DataSpec(urls, seed, buffer, batch, 0, 1, workers, None)  # as the loop builds it
    it = batch_loader(spec, table, [DataPosition() for _ in range(max(1, workers))], pin_memory=device.type == "cuda")
    t0 = time.perf_counter()
    first = next(it)
    t_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    n = 0
    for _ in range(args.loader_batches):
        b = next(it)
        n += b.x0.shape[0]
    dt = time.perf_counter() - t0
    del it  # shuts the worker down
    gc.collect()
    return {
        "size": size, "train_images": stats.get("splits", {}).get("train", {}).get("accepted", args.loader_samples),
        "shards": len(urls),
        "ingest_s": t_ingest, "embed_s": t_embed, "workers": workers, "batch": batch, "shuffle_buffer": buffer,
        "first_batch_s": t_first, "batches": args.loader_batches, "images": n, "seconds": dt,
        "img_per_s": n / dt, "batch_shape": list(first.x0.shape),
        "text": {"tokens": int(table.tokens.shape[1]), "text_dim": int(table.tokens.shape[-1]),
                 "pooled_dim": int(table.pooled.shape[-1]), "mean_caption_tokens": float(lengths[1:].mean()),
                 "layer": table.fingerprint.get("layer"), "model": table.fingerprint.get("model")},
        "pinned": device.type == "cuda" and bool(first.x0.is_pinned()),
    }


# --------------------------------------------------------------------------------------------
# Report


def fmt_table(rows: list[dict], cuda: bool) -> str:
    head = ["model", "size", "params", "img/s", "ms/step", "GFLOP/img", "TFLOP/s"]
    if cuda:
        head += ["MFU", "mem GiB"]
    head += ["vs diffusers"]
    lines = []
    for r in rows:
        cells = [r["model"] + (" (compiled)" if r["compiled"] else ""), f"{r['size']}px", f"{r['params'] / 1e6:.2f}M",
                 f"{r['img_per_s']:.1f}", f"{r['ms_per_step']:.1f}", f"{r['gflop_per_img']:.3g}",
                 f"{r['tflop_per_s']:.3g}"]
        if cuda:
            cells += [f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-", f"{r.get('peak_mem_gib', 0):.1f}"]
        cells += [f"{r['vs_diffusers']:.2f}x" if r.get("vs_diffusers") else "-"]
        lines.append(cells)
    widths = [max(len(h), *(len(c[i]) for c in lines)) if lines else len(h) for i, h in enumerate(head)]
    out = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(head, widths)))]
    out.append("  ".join("-" * w for w in widths))
    for c in lines:
        out.append("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(c, widths))))
    return "\n".join(out)


def shown(path: Path) -> str:
    """``path`` relative to the project where it lies inside it, else as it is (a params file in /tmp)."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="16,32", help="image sides in px, comma-separated (default: 16,32)")
    ap.add_argument("--batch", type=int, default=None, help="batch size (default: the preset's train.batch_size: 64; 100m: 128)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per model (default: 20)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps before them (default: 3)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="time every model this many times, in turn, each time --steps steps, and report the median "
                         "round: a slow spell of the machine then hits every model alike (default: 3 on the CPU; "
                         "1 on CUDA, where each model is built, timed and freed alone)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--arch", default="unet,dit", help="ours: unet, dit or both (default: both); diffusers: "
                    "the diffusers UNets without ours-unet (with --arch diffusers,dit: the DiT against them)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's default)")
    ap.add_argument("--preset", default="default", choices=sorted(PRESETS), help="default: params.yaml's UNet; "
                    "100m: params/photos-256.yaml's 116M UNet on 2x2-folded pixels")
    ap.add_argument("--params", default=None, help="params file for ours (default: the preset's)")
    ap.add_argument("--dit", action="append", default=None, metavar="KEY=VALUE,...",
                    help="changes to the preset's train.dit before its width is matched (e.g. patch=4,heads=12); "
                         "repeat it to time several DiTs in one run (ours-dit-p4-w768-d9, ...)")
    ap.add_argument("--tokens", type=int, default=16, help="caption token slots (default: 16; 77 = CLIP's context)")
    ap.add_argument("--compile", action="store_true", help="torch.compile ours (train.compile)")
    ap.add_argument("--compile-diffusers", action="store_true", help="torch.compile the diffusers UNet too")
    ap.add_argument("--diffusers-pixels", action="store_true",
                    help="also time the diffusers UNet on the raw pixels (no 2x2 fold: how it is usually configured; "
                         "the same levels, so its maps and attention run at twice our resolution)")
    ap.add_argument("--no-tf32", action="store_true", help="CUDA: leave TF32 off (default: on, as train.tf32)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak for MFU (default: by GPU name)")
    ap.add_argument("--match-only", action="store_true", help="print the matched configs and stop (no timing)")
    ap.add_argument("--no-loader", action="store_true", help="skip the data loader section")
    ap.add_argument("--loader-size", type=int, default=None, help="px of the loader's images (default: smallest size)")
    ap.add_argument("--loader-samples", type=int, default=4000, help="training images ingested (default: 4000)")
    ap.add_argument("--loader-batches", type=int, default=50, help="timed loader batches (default: 50)")
    ap.add_argument("--loader-workers", type=int, default=None, help="DataLoader workers (default: train.data_workers)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep the loader's temporary shards")
    ap.add_argument("--out", default=None, help="also write the JSON report here")
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is available")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    cuda = device.type == "cuda"
    rounds = args.rounds if args.rounds is not None else (1 if cuda else 3)
    if rounds < 1 or args.steps < 1:
        raise SystemExit("--rounds and --steps must be at least 1")
    if cuda and not args.no_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    import diffusers

    from diffusion.config import load_params
    from diffusion.training.train import autocast_dtype

    preset = PRESETS[args.preset]
    params_file = ROOT / (args.params or preset["params"])
    p = load_params(params_file)
    t = p.train
    unet = t.unet if preset["patch"] is None else dataclasses.replace(t.unet, patch=preset["patch"])
    over = {"unet": unet, "batch_size": args.batch or t.batch_size, "prediction": "eps", "loss_weighting": "none",
            "seed": args.seed, "compile": args.compile, "tf32": not args.no_tf32, "grad_accum": 1,
            "nproc_per_node": 1, "nnodes": 1, "denoiser": "unet"}
    cfg = dataclasses.replace(t, **over)
    batch = cfg.batch_size
    text_dim, pooled_dim, layer = text_dims(p.embed)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    arches = [a.strip() for a in args.arch.split(",") if a.strip()]
    if not arches or set(arches) - {"unet", "dit", "diffusers"}:
        raise SystemExit(f"--arch {args.arch!r}: expected one or more of unet, dit, diffusers")
    notes: list[str] = []

    load1 = os.getloadavg()[0]
    peak, dev_name = peak_tflops(device, args.peak_tflops)
    machine = {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__, "diffusers": diffusers.__version__,
               "threads": torch.get_num_threads(), "device": dev_name, "load_average_at_start": round(load1, 2),
               "peak_bf16_tflops": peak}
    print(f"machine: {machine['cpu']}, {machine['cores']} cores; torch {torch.__version__} ({machine['threads']} threads); "
          f"diffusers {diffusers.__version__}; load average at start {load1:.2f}")
    if cuda:
        print(f"device: {dev_name}; dense bf16 peak for MFU: {f'{peak:g} TFLOP/s' if peak else 'unknown (--peak-tflops)'}; "
              f"TF32 {'off' if args.no_tf32 else 'on'}; autocast {autocast_dtype(cfg, device)}")
    else:
        print("device: cpu (fp32, no MFU)")
    print(f"run: preset {args.preset} ({shown(params_file)}), batch {batch}, sizes {sizes}, "
          f"{args.warmup} warmup + {rounds} round(s) of {args.steps} timed steps per model (median round), seed {args.seed}, "
          "ours via diffusion.training.train.build_state/train_step")
    if os.cpu_count() and load1 > os.cpu_count() / 2 and not cuda:
        print(f"WARNING: load average {load1:.2f} on {os.cpu_count()} cores: other work shares the CPU, timings are low")

    # ---- matching
    in_ch = 3 * unet.patch**2
    with torch.device("meta"):
        from diffusion.models.unet import UNet

        ours_params = count_params(UNet(unet, text_dim=text_dim, pooled_dim=pooled_dim, in_channels=3))
    m = match_diffusers(unet, ours_params, text_dim, pooled_dim, in_ch, cuda)
    kw = m["kwargs"]
    print(f"text: {p.embed.model} ({layer}): tokens {args.tokens} x {text_dim} with a mask, pooled {pooled_dim} "
          f"(random, float16 table, 8-{args.tokens} real tokens a caption)")
    print(f"ours:      UNet channels {unet.channels} x {unet.channel_mult}, {unet.blocks_per_level} block(s) a level "
          f"({unet.blocks_up} up, upsample {unet.upsample}), attention at levels {unet.attn_levels} + mid, {unet.heads} heads (dims {m['ours_head_dims']}), "
          f"{'caption projected once to ' + str(unet.ctx_dim) + ', ' if unet.ctx_dim else ''}"
          f"patch {unet.patch}: {ours_params:,} params")
    print(f"diffusers: UNet2DConditionModel block_out_channels {kw['block_out_channels']}, layers_per_block "
          f"{kw['layers_per_block']}, down {kw['down_block_types']}, up {kw['up_block_types']}, {m['heads']} heads "
          f"(dims {m['head_dims']}), norm groups {kw['norm_num_groups']}, cross_attention_dim {kw['cross_attention_dim']}"
          f"{' (text_proj from ' + str(text_dim) + ')' if kw.get('encoder_hid_dim') else ''}, "
          f"class_embed_type projection ({pooled_dim}), scale_shift, linear projection, on the {unet.patch}x{unet.patch}-folded "
          f"input ({in_ch} channels): {m['params']:,} params")
    print(f"parameters diffusers / ours = {m['ratio']:.3f}")
    split_ours, split_diff = block_params(unet, kw, text_dim, pooled_dim)
    print(f"  in ResNet blocks / transformer blocks: ours {split_ours[0]:,} / {split_ours[1]:,}, diffusers "
          f"{split_diff[0]:,} / {split_diff[1]:,} (at a fixed count, heavier transformer blocks leave narrower "
          "convolutions, where most of a step's FLOPs go)")
    for s in sizes:
        if unet_fits(unet, s):
            print(f"  at {s}px both: {unet_maps(unet, s)}")
    if abs(m["ratio"] - 1) > TOLERANCE:
        print(f"ERROR: the parameter counts differ by more than {TOLERANCE:.0%}", file=sys.stderr)
        return 2
    matching = {"text": {"model": p.embed.model, "layer": layer, "text_dim": text_dim, "pooled_dim": pooled_dim,
                         "tokens": args.tokens},
                "ours_unet": {**dataclasses.asdict(unet), "params": ours_params},
                "diffusers_unet": {"kwargs": {k: (list(v) if isinstance(v, tuple) else v) for k, v in kw.items()},
                                   "params": m["params"], "ratio_to_ours": m["ratio"], "fold": unet.patch}}
    if unet.blocks_up != unet.blocks_per_level + 1 or unet.upsample != "nearest_conv":
        notes.append(f"ours has up_blocks {unet.up_blocks} and upsample {unet.upsample}; diffusers' up path always has "
                     f"layers_per_block + 1 = {unet.blocks_per_level + 1} blocks a level and upsamples nearest, then conv")
    if unet.text_layers:
        notes.append(f"ours refines the caption tokens with {unet.text_layers} transformer layer(s) (train.unet.text_layers, "
                     "counted in its parameters); diffusers' UNet reads them as given")
    dits = {}  # our DiTs' configs by model name
    if "dit" in arches:
        for name, (spec, d, n) in match_dits(t.dit, args.dit or [""], ours_params, text_dim, pooled_dim, cuda).items():
            dits[name] = d
            print(f"{name}: width {d.width}, depth {d.depth}, {d.heads} heads, patch {d.patch}, mlp {d.mlp_ratio:g} "
                  f"(--dit {spec!r} on params' train.dit: width {t.dit.width}, depth {t.dit.depth}): "
                  f"{n:,} params, {n / ours_params:.3f} x our UNet")
            matching.setdefault("ours_dits", {})[name] = {**dataclasses.asdict(d), "params": n,
                                                          "ratio_to_ours_unet": n / ours_params, "spec": spec}
    sys.stdout.flush()
    if args.match_only:
        return 0

    # ---- timed training
    table = synthetic_table(1024, args.tokens, text_dim, pooled_dim, args.seed,
                            {"model": p.embed.model, "layer": layer, "synthetic": True})
    rows: list[dict] = []
    for size in sizes:
        batches = make_batches(4, batch, size, 1024, args.seed, pin=cuda)
        plan = []
        if "unet" in arches or "diffusers" in arches:
            if unet_fits(unet, size):
                plan += (["ours-unet"] if "unet" in arches else []) + ["diffusers-unet"] \
                    + (["diffusers-unet-pixels"] if args.diffusers_pixels else [])
            else:
                notes.append(f"{size}px: the UNet (patch {unet.patch}, {len(unet.channel_mult)} levels) does not tile it")
        for name, d in dits.items():
            if size % d.patch == 0:
                plan.append(name)
            else:
                notes.append(f"{size}px: not a multiple of {name}'s patch {d.patch}")

        def failed(name: str, e: Exception, size: int = size) -> None:  # one model failing (a compile error, out of memory)
            log(f"{name} at {size}px FAILED: {type(e).__name__}: {e}")  # leaves the others' rows
            notes.append(f"{name} at {size}px failed: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")

        def start(name: str, size: int = size, batches: list = batches):
            log(f"{name} at {size}px: building, counting FLOPs, {args.warmup} warmup steps")
            try:
                tr = build_trainer(name, size, args, device, cfg, table, m, unet, ours_params, text_dim, pooled_dim,
                                   dits, cuda)
                return tr, {"size": size, **prepare(name, tr, batches, args, device)}
            except Exception as e:  # noqa: BLE001 (reported; the other models still run)
                failed(name, e)
                return None

        def done(row: dict, size: int = size) -> None:
            finish(row, device, peak)
            if not row["loss_finite"]:
                notes.append(f"{row['model']} at {size}px: the last loss was not finite")
            rows.append(row)
            spread = (f" (rounds {min(row['rounds_img_per_s']):.1f}-{max(row['rounds_img_per_s']):.1f})"
                      if len(row["rounds_img_per_s"]) > 1 else "")
            log(f"{row['model']} at {size}px: {row['img_per_s']:.1f} img/s{spread}, {row['ms_per_step']:.1f} ms/step, "
                f"{row['tflop_per_s']:.3g} TFLOP/s" + (f", MFU {100 * row['mfu']:.1f}%" if row.get("mfu") else ""))
            if args.out:  # what is timed so far survives a later crash or a time limit
                partial = Path(args.out).with_suffix(".partial.json")
                partial.parent.mkdir(parents=True, exist_ok=True)
                partial.write_text(json.dumps({"machine": machine, "rows": rows, "notes": notes}, indent=2) + "\n")

        # CUDA (1 round): one model at a time, each freed before the next (GPU memory); the CPU: every
        # model built first, then timed in turn, round after round
        for group in ([name] for name in plan) if rounds == 1 else [plan]:
            free(device)
            lives = [x for x in (start(name) for name in group) if x is not None]
            for r in range(rounds):
                for tr, row in list(lives):
                    try:
                        ips = time_round(row, tr, batches, args, device)
                    except Exception as e:  # noqa: BLE001 (reported; the other models still run)
                        failed(row["model"], e)
                        lives = [x for x in lives if x[1] is not row]  # its memory goes before the next model's
                        continue
                    if rounds > 1:
                        log(f"round {r + 1}/{rounds}: {row['model']} at {size}px {ips:.1f} img/s")
            for _, row in lives:
                done(row)
            lives = None
        ref = next((r for r in rows if r["size"] == size and r["model"] == "diffusers-unet"), None)
        for r in rows:
            if r["size"] == size and ref is not None:
                r["vs_diffusers"] = vs_reference(r, ref)
        del batches
    free(device)

    # ---- the data loader
    loader = None
    if not args.no_loader:
        size = args.loader_size or min(sizes)
        workers = t.data_workers if args.loader_workers is None else args.loader_workers
        tmp = Path(tempfile.mkdtemp(prefix="t2i-train-bench-"))
        try:
            loader = bench_loader(args, size, batch, workers, args.seed, t.shuffle_buffer, device, tmp)
        finally:
            if args.keep:
                log(f"kept {tmp}")
            else:
                shutil.rmtree(tmp, ignore_errors=True)
        ours = next((r for r in rows if r["size"] == size and r["model"] == "ours-unet"), None) or \
            next((r for r in rows if r["size"] == size and r["model"].startswith("ours")), None)
        if ours:
            loader["vs_model"] = ours["model"]
            loader["train_img_per_s"] = ours["img_per_s"]
            loader["ratio"] = loader["img_per_s"] / ours["img_per_s"]
            loader["meets_goal"] = loader["ratio"] >= LOADER_GOAL

    from diffusion.training.train import adamw_kwargs

    optim = bench_optimizer(unet, text_dim, pooled_dim, adamw_kwargs(cfg, device), device)

    # ---- report
    print()
    print(f"{machine['cpu']} | torch {torch.__version__} | {machine['threads']} threads | {dev_name}"
          + (f" (peak {peak:g} TFLOP/s bf16)" if peak else "") + f" | batch {batch} | median of {rounds} round(s) of {args.steps} "
          f"steps after {args.warmup} warmup | load avg {load1:.2f}")
    print(fmt_table(rows, cuda))
    if loader:
        tx = loader["text"]
        print(f"\nloader ({loader['size']}px, batch {loader['batch']}, {loader['workers']} worker(s), "
              f"{loader['shards']} shards of {loader['train_images']} images, buffer {loader['shuffle_buffer']}): "
              f"{loader['img_per_s']:.0f} img/s over {loader['batches']} batches "
              f"(first batch {loader['first_batch_s']:.2f} s; ingest {loader['ingest_s']:.1f} s, embed {loader['embed_s']:.1f} s)")
        print(f"  real caption table: {tx['model']} ({tx['layer']}), tokens {tx['tokens']} x {tx['text_dim']}, pooled "
              f"{tx['pooled_dim']}, {tx['mean_caption_tokens']:.1f} real tokens a caption on average")
        if "ratio" in loader:
            verdict = "meets" if loader["meets_goal"] else "BELOW"
            print(f"  loader / {loader['vs_model']} training at {loader['size']}px: {loader['img_per_s']:.0f} / "
                  f"{loader['train_img_per_s']:.1f} img/s = {loader['ratio']:.1f}x ({verdict} the {LOADER_GOAL:g}x goal)")
        else:
            print(f"  (no model of ours timed at {loader['size']}px: no ratio)")
    print(f"\nAdamW step on ours-unet's {optim['tensors']} tensors: {optim['loop_settings_ms']:.1f} ms with the loop's "
          f"settings {optim['settings'] or '(none)'}, {optim['torch_default_ms']:.1f} ms with PyTorch's default")
    for n in notes:
        print(f"note: {n}")
    report = {"machine": machine, "args": vars(args), "preset": args.preset, "params_file": shown(params_file),
              "batch": batch, "train": {"lr": cfg.lr, "weight_decay": cfg.weight_decay, "grad_clip": cfg.grad_clip,
                                        "ema_decay": cfg.ema_decay, "cond_dropout": cfg.cond_dropout,
                                        "timesteps": cfg.timesteps, "autocast": str(autocast_dtype(cfg, device))},
              "matching": matching, "rows": rows, "loader": loader, "optimizer": optim, "notes": notes}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
