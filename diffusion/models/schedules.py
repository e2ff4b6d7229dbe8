"""Noise schedules as data: pure functions that return tensors of noise levels.

Everything is expressed in the variance-exploding view x = x0 + sigma * eps that k-diffusion and
EDM use. A discrete DDPM (Ho et al. 2020) with betas beta_1..beta_T is the list of noise levels
sigma_t = sqrt((1 - alphabar_t) / alphabar_t); its noisy image x_t^VP = x / sqrt(1 + sigma_t^2).

``ddpm_table`` is the training table that params names (``train.beta_schedule``,
``train.zero_terminal_snr``); the denoiser holds it and samplers read their levels from it.
"""

from __future__ import annotations

import torch
from torch import Tensor


def linear_betas(timesteps: int, beta_min: float, beta_max: float) -> Tensor:
    """The seed's schedule: beta_t linear from beta_min to beta_max over T steps (float64, on the CPU
    whatever the default device: a table is built from its values, even under torch.device("meta"))."""
    return torch.linspace(beta_min, beta_max, timesteps, dtype=torch.float64, device="cpu")


def scaled_linear_betas(timesteps: int, beta_min: float, beta_max: float) -> Tensor:
    """Stable Diffusion's schedule (diffusers' "scaled_linear"): sqrt(beta_t) linear from
    sqrt(beta_min) to sqrt(beta_max), squared (float64). SD uses beta_min 0.00085, beta_max 0.012."""
    return torch.linspace(beta_min**0.5, beta_max**0.5, timesteps, dtype=torch.float64, device="cpu") ** 2


BETA_SCHEDULES = ("linear", "scaled_linear")


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Lin et al. 2024, Algorithm 1 (diffusers' ``rescale_zero_terminal_snr``): shift sqrt(alphabar_t)
    so the last is 0 and scale it so the first is unchanged. The last beta becomes 1: at t = T-1 the
    image is pure noise (SNR 0), as it is at the start of sampling, which is what lets a model draw
    images whose mean is far from the data's (very dark, very bright)."""
    root = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    alphabar = root**2
    alphas = torch.cat([alphabar[:1], alphabar[1:] / alphabar[:-1]])
    return 1.0 - alphas


# Zero terminal SNR is alphabar_T = 0, sigma_T = infinity in the VE view, where x_T = x0 + sigma_T eps
# has no finite form. The table takes diffusers' Euler scheduler's stand-in (rescale_betas_zero_snr):
# alphabar_T = 2**-24, the smallest float16 subnormal, so sigma_T = sqrt(2**24 - 1) ~ 4096. There x0
# is 1/4096 of x: sampling starts from pure noise to within float32, and every scaling (c_in =
# 1/sqrt(1 + sigma^2), c_skip, c_out) and the min-SNR weight stay finite. Unlike diffusers, which
# reads its table by timestep, the denoiser reads c_noise by inverting this table (sigma_to_t), so it
# must rise: where the rescaled alphabar_{T-2} is already below 2**-24 (the seed's linear betas at
# T = 1000 give 4.2e-9, sigma ~ 15400), sigma_T is one more of the table's last strides in log sigma
# above sigma_{T-2} (~ 31000 there). Stable Diffusion's scaled_linear betas keep 4096, as diffusers.
ZERO_SNR_ALPHABAR = 2.0**-24


def ddpm_sigmas(betas: Tensor) -> Tensor:
    """sigma_t for t = 0..T-1 (increasing): sqrt((1 - alphabar_t) / alphabar_t). A zero-terminal-SNR
    schedule's last level (alphabar 0, beta 1) becomes a finite stand-in (ZERO_SNR_ALPHABAR)."""
    alphabar = torch.cumprod(1.0 - betas, dim=0)
    if alphabar[-1] > 0:
        return ((1.0 - alphabar) / alphabar).sqrt()
    sigmas = ((1.0 - alphabar[:-1]) / alphabar[:-1]).sqrt()
    top = ((1.0 - ZERO_SNR_ALPHABAR) / ZERO_SNR_ALPHABAR) ** 0.5
    if top <= sigmas[-1]:  # the table must rise: one more of its last strides in log sigma
        top = float(sigmas[-1] ** 2 / sigmas[-2])
    return torch.cat([sigmas, sigmas.new_full((1,), top)])


def ddpm_betas(timesteps: int, beta_min: float, beta_max: float, beta_schedule: str = "linear",
               zero_terminal_snr: bool = False) -> Tensor:
    """The betas params names: ``beta_schedule`` (linear | scaled_linear) from beta_min to beta_max,
    rescaled to zero terminal SNR if asked (float64)."""
    if beta_schedule == "linear":
        betas = linear_betas(timesteps, beta_min, beta_max)
    elif beta_schedule == "scaled_linear":
        betas = scaled_linear_betas(timesteps, beta_min, beta_max)
    else:
        raise ValueError(f"unknown beta schedule {beta_schedule!r} (known: {', '.join(BETA_SCHEDULES)})")
    return rescale_zero_terminal_snr(betas) if zero_terminal_snr else betas


def ddpm_table(timesteps: int, beta_min: float, beta_max: float, beta_schedule: str = "linear",
               zero_terminal_snr: bool = False) -> Tensor:
    """The training table: sigma_t of ``ddpm_betas`` for t = 0..T-1 (the denoiser's ``sigmas``)."""
    return ddpm_sigmas(ddpm_betas(timesteps, beta_min, beta_max, beta_schedule, zero_terminal_snr))


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
