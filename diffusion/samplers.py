"""Samplers: small pure functions over a denoiser D(x, sigma, cond) and a list of noise levels.

``sample_ancestral`` is DDIM (Song et al. 2021) in the variance-exploding view. With eta = 0 it
is deterministic DDIM; with eta = 1 each step draws from the DDPM posterior q(x_{t-1} | x_t, x0_hat),
so running it over every timestep of the training schedule is exactly the seed's DDPM ancestral
sampler. The derivation: DDIM's sigma_t(eta) rescaled by 1/sqrt(alphabar_{t-1}) is

    sigma_up   = eta * sqrt(sigma_next^2 * (sigma^2 - sigma_next^2) / sigma^2)
    sigma_down = sqrt(sigma_next^2 - sigma_up^2)
    x_next     = x0_hat + sigma_down * eps_hat + sigma_up * z,   eps_hat = (x - x0_hat) / sigma.

Noise comes from one generator per image (``noise_fn``), so the image for a seed does not depend
on the batch it was drawn in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from diffusion.model import Cond

NoiseFn = Callable[[], Tensor]


@dataclass
class StepInfo:
    i: int
    sigma: float
    x: Tensor
    denoised: Tensor


def ancestral_step(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """(sigma_down, sigma_up) of one DDIM/DDPM step from sigma to sigma_next."""
    if sigma_next == 0 or eta == 0:
        return sigma_next, 0.0
    sigma_up = min(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
    return (sigma_next**2 - sigma_up**2) ** 0.5, sigma_up


@torch.no_grad()
def sample_ancestral(denoiser: Callable, x: Tensor, sigmas: Tensor, cond: Cond | None = None, *,
                     eta: float = 0.0, noise_fn: NoiseFn | None = None, clip_denoised: float | None = None,
                     callback: Callable[[StepInfo], None] | None = None) -> Tensor:
    """DDIM (eta=0) / DDPM-posterior (eta=1) sampling. x arrives scaled by sigmas[0].

    ``clip_denoised``: clamp x0_hat to [-c, c] at every step (as Ho et al.'s sampler does with
    c = 1 for data in [-1, 1]); eps_hat is recomputed from the clamped x0_hat.
    """
    if eta > 0 and noise_fn is None:
        noise_fn = lambda: torch.randn_like(x)  # noqa: E731
    s = sigmas.tolist()  # python floats: float64 step arithmetic
    for i, (sigma, sigma_next) in enumerate(zip(s[:-1], s[1:])):
        x0 = denoiser(x, torch.tensor(sigma, device=x.device), cond)
        if clip_denoised is not None:
            x0 = x0.clamp(-clip_denoised, clip_denoised)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        eps = (x - x0) / sigma
        x = x0 + sigma_down * eps                       # deterministic DDIM move
        if sigma_up > 0:
            x = x + sigma_up * noise_fn()               # fresh posterior noise
        if callback:
            callback(StepInfo(i, sigma, x, x0))
    return x


def initial_noise(generators: list[torch.Generator], shape: tuple[int, ...], sigma_max: float,
                  device: torch.device) -> Tensor:
    """x_T for a batch: one generator (seed) per image, scaled to the VE view of N(0, 1) at t = T."""
    x = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)
    return x * (1 + sigma_max**2) ** 0.5


def per_image_noise(generators: list[torch.Generator], shape: tuple[int, ...], device: torch.device) -> NoiseFn:
    return lambda: torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)
