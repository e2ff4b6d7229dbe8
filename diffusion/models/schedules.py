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


SPACINGS = ("uniform", "trailing", "karras")


def sampling_sigmas(train_sigmas: Tensor, steps: int, spacing: str = "uniform", rho: float = 7.0) -> Tensor:
    """``steps`` decreasing noise levels for a sampler, then a final 0 (steps+1 values, float64).

    - ``uniform``: timesteps evenly spaced from t = T-1 down to t = 0, rounded (diffusers'
      "linspace"); with steps == T this is every DDPM timestep (ancestral sampling is then DDPM).
    - ``trailing``: t = round(T - k T/steps) - 1 for k = 0..steps-1 (diffusers' "trailing", Lin et
      al. 2024): starts at t = T-1, and the last level is T/steps - 1 rather than 0.
    - ``karras``: sigma_k = (sigma_max^(1/rho) + k/(steps-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho
      between the table's ends (Karras et al. 2022): dense at low noise, where the fine detail is
      decided; these levels fall between timesteps (the denoiser reads fractional t).
    """
    T = len(train_sigmas)
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in 1..{T}, got {steps}")
    if spacing == "uniform":
        t = torch.linspace(T - 1, 0, steps, dtype=torch.float64).round().long()
        levels = train_sigmas[t]
    elif spacing == "trailing":
        t = ((T - torch.arange(steps, dtype=torch.float64) * T / steps).round() - 1).long()
        levels = train_sigmas[t]
    elif spacing == "karras":
        lo, hi = train_sigmas[0].double() ** (1 / rho), train_sigmas[-1].double() ** (1 / rho)
        ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
        levels = (hi + ramp * (lo - hi)) ** rho
        levels[0] = train_sigmas[-1]  # the ends exactly, not through a round trip of powers
        if steps > 1:
            levels[-1] = train_sigmas[0]
    else:
        raise ValueError(f"unknown spacing {spacing!r} (known: {', '.join(SPACINGS)})")
    return torch.cat([levels.double(), torch.zeros(1, dtype=torch.float64)])


def sigma_to_t(sigma: Tensor, train_sigmas: Tensor) -> Tensor:
    """Continuous timestep for a noise level: linear interpolation of log sigma over the table."""
    log_sigmas = train_sigmas.log().to(sigma.device)
    log_sigma = sigma.to(log_sigmas.dtype).clamp(min=train_sigmas[0].item()).log()
    idx = torch.searchsorted(log_sigmas, log_sigma).clamp(1, len(log_sigmas) - 1)
    lo, hi = log_sigmas[idx - 1], log_sigmas[idx]
    w = ((log_sigma - lo) / (hi - lo)).clamp(0, 1)
    return (idx - 1) + w
