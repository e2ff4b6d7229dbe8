"""Training loss over a denoiser D: the seed's DDPM objective and its min-SNR weighting.

For a timestep t drawn uniformly from 0..T-1 and x = x0 + sigma_t * eps, the network target
(eps or v) error equals (D(x) - x0) / c_out(sigma), so

    loss = w(sigma) * ||D(x, sigma) - x0||^2 / c_out(sigma)^2

is exactly the MSE on the predicted eps (or v), w = 1 being the seed's plain objective. Min-SNR-gamma
(Hang et al. 2023) sets w = min(SNR, gamma) / SNR for eps (/(SNR + 1) for v), SNR = 1 / sigma^2,
which stops the many low-noise steps from dominating the gradient.

The timesteps are drawn uniformly from 0..T-1 (``timesteps="uniform"``, the seed's), or from a
logit-normal (``"logit_normal"``, Esser et al. 2024, SD3): t = floor(T * sigmoid(loc + scale * z)),
z standard normal, which spends the steps on the middle noise levels, where the caption decides
what is drawn, and few on the nearly clean and the nearly pure-noise ends.

Offset noise (Guttenberg 2023) adds ``offset_noise`` times one normal draw per image and channel,
constant over its pixels, to the training noise: white noise barely moves an image's mean at
the noise levels a model sees, so without it the model never learns to draw images much darker
or brighter than average. Zero terminal SNR (``schedules.rescale_zero_terminal_snr``) is the other
cure; both are train.* options.
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffusion.models.unet import Cond
from diffusion.models.precond import Denoiser


def diffusion_loss(denoiser: Denoiser, x0: Tensor, cond: Cond, *, weighting: str = "none",
                   gamma: float = 5.0, generator: torch.Generator | None = None, forward=None,
                   t: Tensor | None = None, noise: Tensor | None = None, offset_noise: float = 0.0,
                   timesteps: str = "uniform", loc: float = 0.0, scale: float = 1.0) -> Tensor:
    """Per-sample loss, shape (B,). ``forward`` runs the denoiser when it is wrapped (DDP,
    torch.compile); the schedule and scalings are read from ``denoiser`` itself. ``t`` (B,) and
    ``noise`` (like x0), when given, replace the draws (a held-out loss at fixed noise).
    ``offset_noise`` > 0 adds offset noise to the drawn noise (not to a given ``noise``), from the
    same generator after the white noise; at 0 nothing more is drawn. ``timesteps``, ``loc`` and
    ``scale`` choose the draw of ``t`` (module docstring) when it is not given."""
    b = x0.shape[0]
    if t is None:
        t = draw_timesteps(b, len(denoiser.sigmas), x0.device, generator, timesteps, loc, scale)
    sigma = denoiser.sigmas[t].float()
    if noise is None:
        noise = torch.randn(x0.shape, device=x0.device, generator=generator)
        if offset_noise > 0:  # one shift per image and channel: (B, C, 1, 1), broadcast over pixels
            shift = torch.randn((b, x0.shape[1], 1, 1), device=x0.device, generator=generator)
            noise = noise + offset_noise * shift
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


def draw_timesteps(n: int, levels: int, device, generator: torch.Generator | None = None,
                   kind: str = "uniform", loc: float = 0.0, scale: float = 1.0) -> Tensor:
    """``n`` training timesteps in 0..levels-1: uniform, or logit-normal (module docstring)."""
    if kind == "uniform":
        return torch.randint(0, levels, (n,), device=device, generator=generator)
    if kind != "logit_normal":
        raise ValueError(f"unknown timestep sampling {kind!r}")
    z = torch.randn(n, device=device, generator=generator)
    return (torch.sigmoid(loc + scale * z) * levels).long().clamp_(0, levels - 1)


def objective_warning(cfg) -> str | None:
    """One line to print before training where the noise options pull against each other (a
    TrainConfig's ``zero_terminal_snr`` and ``prediction``), else None."""
    if cfg.zero_terminal_snr and cfg.prediction == "eps":
        return ("train.zero_terminal_snr with train.prediction eps: at the last level (SNR 0) the noise "
                "carries no trace of the image, so an eps network cannot give x0 there; set train.prediction v")
    return None
