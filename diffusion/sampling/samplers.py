"""Samplers: small pure functions over a denoiser D(x, sigma, cond) and a list of noise levels.

Everything is in the variance-exploding view x = x0 + sigma * eps of k-diffusion and EDM, where the
probability-flow ODE is dx/dsigma = (x - D(x, sigma)) / sigma. Every sampler takes the same
arguments (``denoiser, x, sigmas, *, eta, noise_fn, callback``), starts from x scaled by sigmas[0]
and ends at sigmas[-1] = 0, so any of them runs on any spacing from ``schedules.sampling_sigmas``.

``sample_ancestral`` is DDIM (Song et al. 2021). With eta = 0 it is deterministic DDIM, which in
this view is exactly the Euler step of the ODE; with eta = 1 each step draws from the DDPM
posterior q(x_{t-1} | x_t, x0_hat), so running it over every timestep of the training schedule is
exactly the seed's DDPM ancestral sampler. DDIM's sigma_t(eta) rescaled by 1/sqrt(alphabar_{t-1}):

    sigma_up   = eta * sqrt(sigma_next^2 * (sigma^2 - sigma_next^2) / sigma^2)
    sigma_down = sqrt(sigma_next^2 - sigma_up^2)
    x_next     = x0_hat + sigma_down * eps_hat + sigma_up * z,   eps_hat = (x - x0_hat) / sigma.

``sample_euler`` is the same function under k-diffusion's name (the Euler step of the ODE is the
DDIM move; with eta > 0 it is Euler-ancestral). ``sample_heun`` is EDM's second-order Heun (Karras et al. 2022,
Algorithm 1 without churn): 2 * steps - 1 network evaluations. ``sample_dpmpp_2m`` is
DPM-Solver++(2M) (Lu et al. 2022), multistep second order in log-sigma, one evaluation per step;
``sample_dpmpp_2m_sde`` its SDE variant (midpoint form, eta = 1 by default).

Noise comes from one generator per image (``noise_fn``), so the image for a seed does not depend
on the other images in its batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

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


def _levels(sigmas: Tensor) -> list[tuple[int, float, float]]:
    s = sigmas.tolist()  # python floats: float64 step arithmetic
    return list(enumerate(zip(s[:-1], s[1:])))


def _noise(x: Tensor, noise_fn: NoiseFn | None) -> NoiseFn:
    return noise_fn or (lambda: torch.randn_like(x))


def _d(denoiser: Callable, x: Tensor, sigma: float) -> Tensor:
    return denoiser(x, torch.tensor(sigma, device=x.device))


@torch.no_grad()
def sample_ancestral(denoiser: Callable, x: Tensor, sigmas: Tensor, *, eta: float = 0.0,
                     noise_fn: NoiseFn | None = None, callback: Callable[[StepInfo], None] | None = None) -> Tensor:
    """DDIM (eta=0) / DDPM-posterior (eta=1) sampling."""
    noise_fn = _noise(x, noise_fn)
    for i, (sigma, sigma_next) in _levels(sigmas):
        x0 = _d(denoiser, x, sigma)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        x = x0 + sigma_down * (x - x0) / sigma          # deterministic DDIM move
        if sigma_up > 0:
            x = x + sigma_up * noise_fn()               # fresh posterior noise
        if callback:
            callback(StepInfo(i, sigma, x, x0))
    return x


@torch.no_grad()
def sample_ddpm(denoiser: Callable, x: Tensor, sigmas: Tensor, *, eta: float = 1.0,
                noise_fn: NoiseFn | None = None, callback: Callable[[StepInfo], None] | None = None) -> Tensor:
    """DDPM ancestral sampling: ``sample_ancestral`` at eta = 1 (over every training timestep it is
    Ho et al.'s sampler)."""
    return sample_ancestral(denoiser, x, sigmas, eta=1.0, noise_fn=noise_fn, callback=callback)


# Euler on the probability-flow ODE, x += (x - x0)/sigma * (sigma_down - sigma), is algebraically
# the DDIM move x0 + sigma_down (x - x0)/sigma; with eta > 0 it is Euler-ancestral (the ODE step to
# sigma_down, then fresh noise up to sigma_next). One function serves both names.
sample_euler = sample_ancestral


@torch.no_grad()
def sample_heun(denoiser: Callable, x: Tensor, sigmas: Tensor, *, eta: float = 0.0,
                noise_fn: NoiseFn | None = None, callback: Callable[[StepInfo], None] | None = None) -> Tensor:
    """EDM's Heun: an Euler step, then the trapezoidal correction with the slope at its end point
    (skipped on the last step to sigma = 0). Deterministic; ``eta`` and ``noise_fn`` are unused."""
    for i, (sigma, sigma_next) in _levels(sigmas):
        x0 = _d(denoiser, x, sigma)
        d = (x - x0) / sigma
        x_euler = x + d * (sigma_next - sigma)
        if sigma_next == 0:
            x = x_euler
        else:
            d_next = (x_euler - _d(denoiser, x_euler, sigma_next)) / sigma_next
            x = x + (d + d_next) / 2 * (sigma_next - sigma)
        if callback:
            callback(StepInfo(i, sigma, x, x0))
    return x


@torch.no_grad()
def sample_dpmpp_2m(denoiser: Callable, x: Tensor, sigmas: Tensor, *, eta: float = 0.0,
                    noise_fn: NoiseFn | None = None, callback: Callable[[StepInfo], None] | None = None) -> Tensor:
    """DPM-Solver++(2M): with lambda = -log(sigma) and h = lambda_next - lambda,

        x_next = (sigma_next / sigma) x - expm1(-h) * D',
        D' = (1 + 1/(2r)) D_i - 1/(2r) D_{i-1},  r = h_{i-1} / h_i  (D' = D_i on the first step),

    and the last step to sigma = 0 returns the denoised estimate. Deterministic."""
    old, h_last = None, None
    for i, (sigma, sigma_next) in _levels(sigmas):
        x0 = _d(denoiser, x, sigma)
        if sigma_next == 0:
            x = x0
        else:
            h = math.log(sigma / sigma_next)
            d = x0 if old is None else x0 + (x0 - old) * (h / h_last) / 2  # 1 + 1/(2r), -1/(2r)
            x = (sigma_next / sigma) * x - math.expm1(-h) * d
            h_last = h
        old = x0
        if callback:
            callback(StepInfo(i, sigma, x, x0))
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(denoiser: Callable, x: Tensor, sigmas: Tensor, *, eta: float = 1.0,
                        noise_fn: NoiseFn | None = None,
                        callback: Callable[[StepInfo], None] | None = None) -> Tensor:
    """DPM-Solver++(2M) SDE, midpoint form (k-diffusion's ``sample_dpmpp_2m_sde``): each step
    shrinks x by exp(-(1 + eta) h), moves toward the data prediction and adds fresh noise of
    scale sigma_next * sqrt(1 - exp(-2 eta h)). eta = 0 is a first-order-corrected ODE solver."""
    noise_fn = _noise(x, noise_fn)
    old, h_last = None, None
    for i, (sigma, sigma_next) in _levels(sigmas):
        x0 = _d(denoiser, x, sigma)
        if sigma_next == 0:
            x = x0
        else:
            h = math.log(sigma / sigma_next)
            eta_h = eta * h
            keep = -math.expm1(-h - eta_h)  # 1 - exp(-(1 + eta) h)
            x = (sigma_next / sigma) * math.exp(-eta_h) * x + keep * x0
            if old is not None:
                x = x + 0.5 * keep * (h / h_last) * (x0 - old)
            if eta > 0:
                x = x + noise_fn() * sigma_next * math.sqrt(-math.expm1(-2 * eta_h))
            h_last = h
        old = x0
        if callback:
            callback(StepInfo(i, sigma, x, x0))
    return x


SamplerFn = Callable[..., Tensor]

# name -> (function, network evaluations for n levels (steps), default eta, whether eta is settable):
# ddpm is always eta 1; heun and dpmpp_2m are deterministic and ignore it
SAMPLERS: dict[str, tuple[SamplerFn, Callable[[int], int], float, bool]] = {
    "ddim": (sample_ancestral, lambda n: n, 0.0, True),
    "ddpm": (sample_ddpm, lambda n: n, 1.0, False),
    "euler": (sample_euler, lambda n: n, 0.0, True),
    "heun": (sample_heun, lambda n: 2 * n - 1, 0.0, False),
    "dpmpp_2m": (sample_dpmpp_2m, lambda n: n, 0.0, False),
    "dpmpp_2m_sde": (sample_dpmpp_2m_sde, lambda n: n, 1.0, True),
}


def sampler_fn(name: str) -> SamplerFn:
    try:
        return SAMPLERS[name][0]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r} (known: {', '.join(SAMPLERS)})") from None


def sampler_eta(name: str, eta: float | None) -> float:
    """The noise amount sampler ``name`` really uses for a requested ``eta`` (None: its default)."""
    _, _, default, settable = SAMPLERS[name]
    return float(eta) if settable and eta is not None else default


def network_evals(name: str, steps: int) -> int:
    """Denoiser evaluations (each one batched forward, both guidance halves together) per image."""
    return SAMPLERS[name][1](steps)


def clamped(denoiser: Callable, limit: float | None) -> Callable:
    """D with x0_hat clamped to [-limit, limit] at every evaluation (Ho et al.'s sampler clips to
    the data range [-1, 1]); every sampler then works from the clamped estimate."""
    if limit is None:
        return denoiser
    return lambda x, sigma: denoiser(x, sigma).clamp(-limit, limit)


def initial_noise(generators: list[torch.Generator], shape: tuple[int, ...], sigma_max: float,
                  device: torch.device) -> Tensor:
    """x_T for a batch: one generator (seed) per image, scaled to the VE view of N(0, 1) at t = T."""
    x = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)
    return x * (1 + sigma_max**2) ** 0.5


def per_image_noise(generators: list[torch.Generator], shape: tuple[int, ...], device: torch.device) -> NoiseFn:
    return lambda: torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)
