"""Training loss over a denoiser D: the seed's DDPM objective and its min-SNR weighting.

For a timestep t drawn uniformly from 0..T-1 and x = x0 + sigma_t * eps, the network target
(eps or v) error equals (D(x) - x0) / c_out(sigma), so

    loss = w(sigma) * ||D(x, sigma) - x0||^2 / c_out(sigma)^2

is exactly the MSE on the predicted eps (or v), w = 1 being the seed's plain objective. Min-SNR-gamma
(Hang et al. 2023) sets w = min(SNR, gamma) / SNR for eps (/(SNR + 1) for v), SNR = 1 / sigma^2,
which stops the many low-noise steps from dominating the gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffusion.models.unet import Cond
from diffusion.models.precond import Denoiser


def diffusion_loss(denoiser: Denoiser, x0: Tensor, cond: Cond, *, weighting: str = "none",
                   gamma: float = 5.0, generator: torch.Generator | None = None, forward=None,
                   t: Tensor | None = None, noise: Tensor | None = None) -> Tensor:
    """Per-sample loss, shape (B,). ``forward`` runs the denoiser when it is wrapped (DDP,
    torch.compile); the schedule and scalings are read from ``denoiser`` itself. ``t`` (B,) and
    ``noise`` (like x0), when given, replace the draws (a held-out loss at fixed noise)."""
    b = x0.shape[0]
    if t is None:
        t = torch.randint(0, len(denoiser.sigmas), (b,), device=x0.device, generator=generator)
    sigma = denoiser.sigmas[t].float()
    if noise is None:
        noise = torch.randn(x0.shape, device=x0.device, generator=generator)
    x = x0 + sigma[:, None, None, None] * noise
    d = (denoiser if forward is None else forward)(x, sigma, cond, t=t)
    _, c_out, _ = denoiser.scalings(sigma)
    mse = ((d - x0) ** 2).mean(dim=(1, 2, 3)) / c_out**2
    if weighting == "min_snr":
        snr = 1.0 / sigma**2
        w = snr.clamp(max=gamma) / (snr if denoiser.prediction == "eps" else snr + 1)
        return w * mse
    if weighting != "none":
        raise ValueError(f"unknown loss weighting {weighting!r}")
    return mse
