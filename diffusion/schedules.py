"""Noise schedules as data: pure functions that return tensors of noise levels.

Everything is expressed in the variance-exploding view x = x0 + sigma * eps that k-diffusion and
EDM use. A discrete DDPM (Ho et al. 2020) with betas beta_1..beta_T is the list of noise levels
sigma_t = sqrt((1 - alphabar_t) / alphabar_t); its noisy image x_t^VP = x / sqrt(1 + sigma_t^2).
"""

from __future__ import annotations

import torch
from torch import Tensor


def linear_betas(timesteps: int, beta_min: float, beta_max: float) -> Tensor:
    """The seed's schedule: beta_t linear from beta_min to beta_max over T steps (float64)."""
    return torch.linspace(beta_min, beta_max, timesteps, dtype=torch.float64)


def ddpm_sigmas(betas: Tensor) -> Tensor:
    """sigma_t for t = 0..T-1 (increasing): sqrt((1 - alphabar_t) / alphabar_t)."""
    alphabar = torch.cumprod(1.0 - betas, dim=0)
    return ((1.0 - alphabar) / alphabar).sqrt()


def sampling_sigmas(train_sigmas: Tensor, steps: int) -> Tensor:
    """``steps`` noise levels of the discrete schedule, evenly spaced from t = T-1 down to t = 0,
    then a final 0. Returns steps+1 strictly decreasing values (float64).

    With steps == T this is every DDPM timestep (ancestral sampling then is exact DDPM).
    """
    T = len(train_sigmas)
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in 1..{T}, got {steps}")
    t = torch.linspace(T - 1, 0, steps, dtype=torch.float64).round().long()
    return torch.cat([train_sigmas[t], torch.zeros(1, dtype=torch.float64)])


def sigma_to_t(sigma: Tensor, train_sigmas: Tensor) -> Tensor:
    """Continuous timestep for a noise level: linear interpolation of log sigma over the table."""
    log_sigmas = train_sigmas.log().to(sigma.device)
    log_sigma = sigma.to(log_sigmas.dtype).clamp(min=train_sigmas[0].item()).log()
    idx = torch.searchsorted(log_sigmas, log_sigma).clamp(1, len(log_sigmas) - 1)
    lo, hi = log_sigmas[idx - 1], log_sigmas[idx]
    w = ((log_sigma - lo) / (hi - lo)).clamp(0, 1)
    return (idx - 1) + w
