"""The raw denoising network F(x_in, c_noise, cond): a lean UNet with cross-attention to text.

It knows nothing about noise levels beyond the scalar ``c_noise`` it is given (the DDPM timestep);
``diffusion.models.precond.Denoiser`` turns it into a denoiser D(x, sigma, cond).

Design, chosen for speed on small images and CPUs:
- space-to-depth: the image is folded ``patch x patch`` into channels before the first conv
  (16x16x3 -> 8x8x12), so every conv runs at a quarter of the pixels; unfolded again at the end;
- ResBlocks with the timestep (plus the pooled text embedding) as a per-channel scale and shift;
- at the levels in ``attn_levels``: self-attention over positions and cross-attention to the
  per-token caption states (with their padding mask), then a small MLP; with ``ctx_dim`` the
  caption states are projected once, to that width, for every block's keys and values (at 16px
  those projections were a sixth of the forward FLOPs: 16 tokens x 256 wide, in each of 7 blocks);
- with ``text_layers`` N, N small transformer layers over the caption tokens (``TextLayer``) run
  once a forward, before any cross-attention reads them: the embed stage's word vectors are
  context-free, and these give each word a state that depends on the rest of its caption.

``set_grad_checkpointing(True)`` (``train.grad_checkpointing``) keeps, while gradients are being
recorded, only the inputs of each level block (a ResBlock and its TransformerBlock, the skip
concatenation included) and of each middle block, and recomputes their insides in the backward
pass: less activation memory for about one more forward. The outputs and gradients are the same;
under ``torch.no_grad`` (sampling, the held-out loss) nothing changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from diffusion.config import UNetConfig
from diffusion.errors import ConfigError


@dataclass
class Cond:
    """Text conditioning for a batch."""

    tokens: Tensor  # (B, L, D_text) per-token hidden states
    mask: Tensor  # (B, L) bool, True where a token is real
    pooled: Tensor  # (B, E) pooled caption embedding

    def padded(self, length: int) -> "Cond":
        """Pad the token axis to ``length`` with masked-out zeros."""
        pad = length - self.tokens.shape[1]
        if pad <= 0:
            return self
        return Cond(F.pad(self.tokens, (0, 0, 0, pad)), F.pad(self.mask, (0, pad)), self.pooled)

    def cat(self, other: "Cond") -> "Cond":
        """Stack two batches along the batch axis (token axes padded to the longer one)."""
        n = max(self.tokens.shape[1], other.tokens.shape[1])
        a, b = self.padded(n), other.padded(n)
        return Cond(torch.cat([a.tokens, b.tokens]), torch.cat([a.mask, b.mask]), torch.cat([a.pooled, b.pooled]))

    def select(self, rows) -> "Cond":
        """The rows ``rows`` (a slice or an index tensor) of the batch."""
        return Cond(self.tokens[rows], self.mask[rows], self.pooled[rows])

    def expand(self, n: int) -> "Cond":
        """A one-row batch repeated ``n`` times (a view, no copy)."""
        return Cond(self.tokens.expand(n, -1, -1), self.mask.expand(n, -1), self.pooled.expand(n, -1))

    def to(self, device, dtype=None) -> "Cond":
        return Cond(self.tokens.to(device, dtype), self.mask.to(device), self.pooled.to(device, dtype))


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps t: (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def group_norm(ch: int) -> nn.GroupNorm:
    """GroupNorm with gcd(32, ch) groups, or, where that would leave fewer than 3 channels a group
    (32 or 64 channels), the most groups that leave at least 3."""
    groups = math.gcd(32, ch)
    if ch // groups < 3:
        groups = max(g for g in range(1, ch // 3 + 1) if ch % g == 0)
    return nn.GroupNorm(groups, ch)


def zero_(layer: nn.Module, enabled: bool = True) -> None:
    """Zero ``layer``'s weight and bias (a residual branch's last layer: the branch starts as
    nothing, ADM's init); with ``enabled`` false keep PyTorch's default init (diffusers')."""
    if enabled:
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)


def feed_forward(dim: int, zero_init: bool = True) -> nn.Sequential:
    """The transformer blocks' MLP: 2x wide, GELU; its last layer zeroed with ``zero_init``."""
    mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
    zero_(mlp[-1], zero_init)
    return mlp


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, emb_dim: int, dropout: float, zero_init: bool = True):
        super().__init__()
        self.norm1 = group_norm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * c_out)  # -> scale, shift
        self.norm2 = group_norm(c_out)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        zero_(self.conv2, zero_init)  # each block starts as the identity
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.drop(F.silu(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head attention from x (B, N, C) to ctx (B, M, C_ctx); self-attention when ctx is x.
    With ``qk_norm`` each head's queries and keys are LayerNormed before their dot product."""

    def __init__(self, dim: int, ctx_dim: int, heads: int, zero_init: bool = True, qk_norm: bool = False):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(ctx_dim, 2 * dim, bias=False)
        self.out = nn.Linear(dim, dim)
        zero_(self.out, zero_init)
        self.q_norm = nn.LayerNorm(dim // heads) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(dim // heads) if qk_norm else nn.Identity()

    def forward(self, x: Tensor, ctx: Tensor, mask: Tensor | None = None) -> Tensor:
        b, n, c = x.shape
        q = self.q(x).view(b, n, self.heads, -1).transpose(1, 2)  # (B, h, N, d)
        k, v = self.kv(ctx).view(b, ctx.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)  # (B, h, M, d) each
        attn_mask = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, M): True = attend
        y = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v, attn_mask=attn_mask)
        return self.out(y.transpose(1, 2).reshape(b, n, c))


class TransformerBlock(nn.Module):
    """Self-attention over positions, cross-attention to the caption tokens, MLP."""

    def __init__(self, dim: int, ctx_dim: int, heads: int, zero_init: bool = True, qk_norm: bool = False):
        super().__init__()
        self.norm_in = group_norm(dim)
        self.ln1, self.ln2, self.ln3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.self_attn = Attention(dim, dim, heads, zero_init, qk_norm)
        self.cross_attn = Attention(dim, ctx_dim, heads, zero_init, qk_norm)
        self.mlp = feed_forward(dim, zero_init)

    def forward(self, x: Tensor, cond: Cond) -> Tensor:
        b, c, h, w = x.shape
        t = self.norm_in(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        t_norm = self.ln1(t)
        t = t + self.self_attn(t_norm, t_norm)
        t = t + self.cross_attn(self.ln2(t), cond.tokens, cond.mask)
        t = t + self.mlp(self.ln3(t))
        return x + t.transpose(1, 2).reshape(b, c, h, w)


class TextLayer(nn.Module):
    """A pre-LN transformer layer over the caption tokens (B, L, D): self-attention under the
    padding mask (a padded token changes no real token's state), then an MLP."""

    def __init__(self, dim: int, heads: int, zero_init: bool = True, qk_norm: bool = False):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, dim, heads, zero_init, qk_norm)
        self.mlp = feed_forward(dim, zero_init)

    def forward(self, tokens: Tensor, mask: Tensor) -> Tensor:
        h = self.ln1(tokens)
        tokens = tokens + self.attn(h, h, mask)
        return tokens + self.mlp(self.ln2(tokens))


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig, text_dim: int, pooled_dim: int, in_channels: int = 3):
        super().__init__()
        self.cfg = cfg
        p = cfg.patch
        widths = [cfg.channels * m for m in cfg.channel_mult]
        emb_dim = 4 * cfg.channels
        self.time_mlp = nn.Sequential(nn.Linear(cfg.channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.pooled_proj = nn.Linear(pooled_dim, emb_dim)
        self.ctx_norm = nn.LayerNorm(text_dim)
        # one projection of the caption tokens for every block (cfg.ctx_dim), or none
        self.ctx_proj = nn.Linear(text_dim, cfg.ctx_dim) if cfg.ctx_dim else nn.Identity()
        text_dim = cfg.ctx_dim or text_dim
        z = cfg.zero_init  # zero each residual branch's last layer and the output (ADM) or not (diffusers)
        if text_dim % cfg.heads and cfg.text_layers:
            raise ConfigError(f"train.unet.text_layers: the caption width {text_dim} does not divide by "
                              f"train.unet.heads {cfg.heads}; set train.unet.ctx_dim to a multiple of it")
        self.text_layers = nn.ModuleList([TextLayer(text_dim, cfg.heads, z, cfg.qk_norm)
                                          for _ in range(cfg.text_layers)])
        self.stem = nn.Conv2d(in_channels * p * p, widths[0], 3, padding=1)

        def level_blocks(c_in: int, c_out: int, level: int) -> nn.ModuleList:
            mods = nn.ModuleList([ResBlock(c_in, c_out, emb_dim, cfg.dropout, z)])
            if level in cfg.attn_levels:
                mods.append(TransformerBlock(c_out, text_dim, cfg.heads, z, cfg.qk_norm))
            return mods

        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        # the skips of each level: what enters it (the stem's or the downsample's output), then the
        # output of each of its blocks; the way up takes the last cfg.blocks_up of them
        skips: list[list[int]] = []
        c = widths[0]
        for lvl, w in enumerate(widths):
            skips.append([c])
            for _ in range(cfg.blocks_per_level):
                self.down.append(level_blocks(c, w, lvl))
                c = w
                skips[-1].append(c)
            if lvl < len(widths) - 1:
                self.downsample.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
        self.mid = nn.ModuleList([ResBlock(c, c, emb_dim, cfg.dropout, z),
                                  TransformerBlock(c, text_dim, cfg.heads, z, cfg.qk_norm),
                                  ResBlock(c, c, emb_dim, cfg.dropout, z)])
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for lvl in reversed(range(len(widths))):
            for _ in range(self.cfg.blocks_up):
                self.up.append(level_blocks(c + skips[lvl].pop(), widths[lvl], lvl))
                c = widths[lvl]
            if lvl > 0:  # conv_nearest: the conv also narrows to the next level's width
                c_up = widths[lvl - 1] if cfg.upsample == "conv_nearest" else c
                self.upsample.append(nn.Conv2d(c, c_up, 3, padding=1))
                c = c_up
        self.levels = len(widths)
        self.out_norm = group_norm(c)
        self.out = nn.Conv2d(c, in_channels * p * p, 3, padding=1)
        zero_(self.out, z)
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enabled: bool) -> None:
        """Recompute each block's activations in the backward pass instead of keeping them."""
        self.grad_checkpointing = bool(enabled)

    def _block(self, fn, *args) -> Tensor:
        """``fn(*args)``, checkpointed when grad checkpointing is on and gradients are recorded."""
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def forward(self, x: Tensor, c_noise: Tensor, cond: Cond) -> Tensor:
        """x: (B, C, H, W); c_noise: (B,) timesteps; returns (B, C, H, W)."""
        tokens = self.ctx_proj(self.ctx_norm(cond.tokens))
        for layer in self.text_layers:
            tokens = layer(tokens, cond.mask)
        cond = Cond(tokens, cond.mask, cond.pooled)
        emb = self.time_mlp(timestep_embedding(c_noise, self.cfg.channels)) + self.pooled_proj(cond.pooled)
        h = self.stem(F.pixel_unshuffle(x, self.cfg.patch))  # (B, C*p*p, H/p, W/p) -> widths[0]
        hs: list[list[Tensor]] = []
        blocks = iter(self.down)
        for lvl in range(self.levels):
            hs.append([h])
            for _ in range(self.cfg.blocks_per_level):
                h = self._block(self._run, next(blocks), h, emb, cond)
                hs[-1].append(h)
            if lvl < self.levels - 1:
                h = self.downsample[lvl](h)
        h = self._block(self.mid[0], h, emb)
        h = self._block(self.mid[1], h, cond)
        h = self._block(self.mid[2], h, emb)
        blocks = iter(self.up)
        for i, lvl in enumerate(reversed(range(self.levels))):
            for _ in range(self.cfg.blocks_up):
                h = self._block(self._run, next(blocks), h, emb, cond, hs[lvl].pop())
            if lvl > 0:
                h = self._upsample(self.upsample[i], h)
        h = self.out(F.silu(self.out_norm(h)))
        return F.pixel_shuffle(h, self.cfg.patch)  # back to (B, C, H, W)

    def _upsample(self, conv: nn.Conv2d, h: Tensor) -> Tensor:
        if self.cfg.upsample == "conv_nearest":
            return F.interpolate(conv(h), scale_factor=2.0, mode="nearest")
        return conv(F.interpolate(h, scale_factor=2.0, mode="nearest"))

    @staticmethod
    def _run(mods: nn.ModuleList, h: Tensor, emb: Tensor, cond: Cond, skip: Tensor | None = None) -> Tensor:
        """One level block; on the way up ``skip`` is concatenated to ``h`` first."""
        if skip is not None:
            h = torch.cat([h, skip], dim=1)
        h = mods[0](h, emb)
        if len(mods) > 1:
            h = mods[1](h, cond)
        return h


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
