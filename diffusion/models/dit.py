"""The raw denoising network F(x_in, c_noise, cond) as a DiT: a transformer over image patches.

A drop-in for ``diffusion.models.unet.UNet`` (same constructor arguments, same ``forward(x, c_noise,
cond) -> same shape as x``), so ``diffusion.models.precond.Denoiser``, the samplers and the loss are
unchanged. After DiT (Peebles & Xie 2023), with cross-attention to the caption added:

- patchify: a ``patch x patch``-strided conv turns (B, C, H, W) into (H/p * W/p) tokens of
  ``width``; a fixed 2D sin-cos positional embedding is computed for the actual (H/p, W/p) grid
  (cached per grid size, device and dtype), so any H, W that are multiples of ``patch`` work;
- conditioning vector c = MLP(sinusoidal embedding of the timestep c_noise) + Linear(pooled text);
- each block, with shift/scale/gate regressed from c (adaLN-Zero):
  ``x += gate_sa * SelfAttn(modulate(LN(x)))``, ``x += gate_ca * CrossAttn(LN(x), caption)``,
  ``x += gate_mlp * MLP(modulate(LN(x)))``; the cross-attention honours ``cond.mask`` (padding
  keys are masked out; a row with no real token gets no cross-attention contribution, not NaN);
- final layer: adaLN (shift, scale) + LayerNorm + Linear to ``patch*patch*C`` per token,
  folded back to (B, C, H, W).

The adaLN modulation outputs and the final linear start at zero, so the network outputs exactly
zero at initialisation, as DiT does; every other linear is xavier-uniform, the timestep MLP
normal(0, 0.02), as in DiT's ``initialize_weights``. Attention runs through
``F.scaled_dot_product_attention``; nothing assumes float32, so it runs under bf16 autocast.

``set_grad_checkpointing(True)`` (``train.grad_checkpointing``) keeps only each block's inputs
while gradients are being recorded and recomputes the block in the backward pass: the same
outputs and gradients for about one more forward; under ``torch.no_grad`` nothing changes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from diffusion.config import DiTConfig
from diffusion.models.unet import Cond, timestep_embedding

FREQ_DIM = 256  # size of the sinusoidal timestep embedding fed to the timestep MLP (DiT's value)


def sincos_pos_embed_2d(gh: int, gw: int, dim: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Fixed 2D sin-cos positional embedding of a (gh, gw) grid: (gh * gw, dim), row-major.

    The first half of the channels encodes the row index, the second half the column index,
    each as [sin, cos] over ``dim // 4`` frequencies (``dim`` must be a multiple of 4).
    """
    q = dim // 4
    omega = 1.0 / 10000.0 ** (torch.arange(q, device=device, dtype=torch.float64) / q)

    def axis(n: int) -> Tensor:  # (n, dim // 2)
        a = torch.arange(n, device=device, dtype=torch.float64)[:, None] * omega[None]
        return torch.cat([a.sin(), a.cos()], dim=1)

    rows = axis(gh)[:, None].expand(gh, gw, 2 * q)
    cols = axis(gw)[None].expand(gh, gw, 2 * q)
    return torch.cat([rows, cols], dim=-1).reshape(gh * gw, dim).to(dtype)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """x: (B, N, D); shift, scale: (B, D)."""
    return x * (1 + scale[:, None]) + shift[:, None]


def split_heads(t: Tensor, heads: int) -> Tensor:
    """(B, N, D) -> (B, heads, N, D / heads)."""
    b, n, _ = t.shape
    return t.view(b, n, heads, -1).transpose(1, 2)


def merge_heads(t: Tensor) -> Tensor:
    """(B, heads, N, d) -> (B, N, heads * d)."""
    b, _, n, _ = t.shape
    return t.transpose(1, 2).reshape(b, n, -1)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = (split_heads(t, self.heads) for t in self.qkv(x).chunk(3, dim=-1))
        return self.out(merge_heads(F.scaled_dot_product_attention(q, k, v)))


class CrossAttention(nn.Module):
    """Attention from the patch tokens (B, N, dim) to the caption tokens (B, L, ctx_dim)."""

    def __init__(self, dim: int, ctx_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(ctx_dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor, ctx: Tensor, attend: Tensor, has_tokens: Tensor) -> Tensor:
        """``attend``: (B, 1, 1, L) bool, True = attend (never all False in a row);
        ``has_tokens``: (B, 1, 1) bool, False where the caption has no real token."""
        q = split_heads(self.q(x), self.heads)
        k, v = (split_heads(t, self.heads) for t in self.kv(ctx).chunk(2, dim=-1))
        y = self.out(merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=attend)))
        return y * has_tokens


class DiTBlock(nn.Module):
    """adaLN-Zero self-attention, gated cross-attention to the caption, adaLN-Zero MLP."""

    def __init__(self, dim: int, ctx_dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm_sa = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.self_attn = SelfAttention(dim, heads)
        self.norm_ca = nn.LayerNorm(dim, eps=1e-6)
        self.cross_attn = CrossAttention(dim, ctx_dim, heads)
        self.norm_mlp = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        # shift/scale/gate for self-attention and MLP, a gate for cross-attention
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 7 * dim))

    def forward(self, x: Tensor, c: Tensor, ctx: Tensor, attend: Tensor, has_tokens: Tensor) -> Tensor:
        shift_sa, scale_sa, gate_sa, gate_ca, shift_mlp, scale_mlp, gate_mlp = self.ada(c).chunk(7, dim=1)
        x = x + gate_sa[:, None] * self.self_attn(modulate(self.norm_sa(x), shift_sa, scale_sa))
        x = x + gate_ca[:, None] * self.cross_attn(self.norm_ca(x), ctx, attend, has_tokens)
        return x + gate_mlp[:, None] * self.mlp(modulate(self.norm_mlp(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, out_dim)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.ada(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    def __init__(self, cfg: DiTConfig, text_dim: int, pooled_dim: int, in_channels: int = 3):
        super().__init__()
        if cfg.width % cfg.heads or cfg.width % 4:
            raise ValueError(f"DiT width {cfg.width} must be a multiple of heads ({cfg.heads}) and of 4")
        self.cfg = cfg
        w, p = cfg.width, cfg.patch
        self.patch_embed = nn.Conv2d(in_channels, w, p, stride=p)
        self.time_mlp = nn.Sequential(nn.Linear(FREQ_DIM, w), nn.SiLU(), nn.Linear(w, w))
        self.pooled_proj = nn.Linear(pooled_dim, w)
        self.ctx_norm = nn.LayerNorm(text_dim)
        self.blocks = nn.ModuleList([DiTBlock(w, text_dim, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth)])
        self.final = FinalLayer(w, p * p * in_channels)
        self._pos_cache: dict[tuple, Tensor] = {}  # (gh, gw, device, dtype) -> (gh * gw, width)
        self.grad_checkpointing = False
        self._init_weights()

    def set_grad_checkpointing(self, enabled: bool) -> None:
        """Recompute each block's activations in the backward pass instead of keeping them."""
        self.grad_checkpointing = bool(enabled)

    def _init_weights(self) -> None:
        """DiT's initialisation: xavier-uniform linears, zero biases, adaLN-Zero."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embed.weight.view(self.cfg.width, -1))
        nn.init.zeros_(self.patch_embed.bias)
        for lin in (self.time_mlp[0], self.time_mlp[2]):
            nn.init.normal_(lin.weight, std=0.02)
        for lin in [b.ada[-1] for b in self.blocks] + [self.final.ada[-1], self.final.linear]:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def pos_embed(self, gh: int, gw: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        key = (gh, gw, device, dtype)
        if key not in self._pos_cache:
            self._pos_cache[key] = sincos_pos_embed_2d(gh, gw, self.cfg.width, device, dtype)
        return self._pos_cache[key]

    def forward(self, x: Tensor, c_noise: Tensor, cond: Cond) -> Tensor:
        """x: (B, C, H, W), H and W multiples of ``cfg.patch``; c_noise: (B,) timesteps; returns (B, C, H, W)."""
        b, _, h, w = x.shape
        p = self.cfg.patch
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
        gh, gw = h // p, w // p
        tok = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, gh * gw, width)
        tok = tok + self.pos_embed(gh, gw, tok.device, tok.dtype)
        c = self.time_mlp(timestep_embedding(c_noise, FREQ_DIM)) + self.pooled_proj(cond.pooled)
        ctx = self.ctx_norm(cond.tokens)
        has_tokens = cond.mask.any(dim=1)  # (B,)
        attend = (cond.mask | ~has_tokens[:, None])[:, None, None, :]  # an empty row attends to all, then is zeroed
        has_tokens = has_tokens[:, None, None]
        recompute = self.grad_checkpointing and torch.is_grad_enabled()
        for block in self.blocks:
            if recompute:
                tok = checkpoint(block, tok, c, ctx, attend, has_tokens, use_reentrant=False)
            else:
                tok = block(tok, c, ctx, attend, has_tokens)
        out = self.final(tok, c)  # (B, gh * gw, C * p * p), channels ordered (C, p, p)
        return F.pixel_shuffle(out.transpose(1, 2).reshape(b, -1, gh, gw), p)
