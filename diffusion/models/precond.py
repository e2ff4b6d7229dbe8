"""Denoiser: D(x, sigma, cond) = c_skip * x + c_out * F(c_in * x, c_noise, cond).

The raw network F predicts epsilon (the seed's DDPM) or v; either is one preconditioning of the
same contract, so samplers and losses only ever see D. c_noise is the (fractional) DDPM timestep
of sigma, which is what the network was trained to read.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from diffusion.models.unet import Cond
from diffusion.models.schedules import ddpm_table, sigma_to_t


class Denoiser(nn.Module):
    def __init__(self, net: nn.Module, timesteps: int = 1000, beta_min: float = 1e-4, beta_max: float = 0.02,
                 prediction: str = "eps", beta_schedule: str = "linear", zero_terminal_snr: bool = False):
        """``timesteps``, ``beta_min``, ``beta_max``, ``beta_schedule`` and ``zero_terminal_snr`` name the
        training table (``schedules.ddpm_table``); with zero terminal SNR its top level is a finite
        stand-in for sigma = infinity (4096 or more: ``schedules.ZERO_SNR_ALPHABAR``), where v prediction
        is the sensible pairing: there c_skip ~ 0 and c_out ~ -1, so x0_hat ~ -v, while an eps network's
        x0_hat = x - sigma * eps is the difference of two numbers thousands of times the image's size
        (at SNR 0 the noise carries no trace of x0)."""
        super().__init__()
        if prediction not in ("eps", "v"):
            raise ValueError(f"prediction must be eps or v, got {prediction!r}")
        self.net = net
        self.prediction = prediction
        # a latent model's decoder (diffusion.data.latents.LatentCodec), set by artifacts.load_model;
        # None: the network works in pixel space
        self.codec = None
        self.register_buffer("sigmas", ddpm_table(timesteps, beta_min, beta_max, beta_schedule, zero_terminal_snr),
                             persistent=False)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(c_skip, c_out, c_in) for noise levels sigma (B,)."""
        c_in = 1.0 / (sigma**2 + 1).sqrt()
        if self.prediction == "eps":  # x0 = x - sigma * eps
            return torch.ones_like(sigma), -sigma, c_in
        return 1.0 / (sigma**2 + 1), -sigma * c_in, c_in  # v: x0 = c_in^2 x - sigma c_in v

    def forward(self, x: Tensor, sigma: Tensor, cond: Cond, t: Tensor | None = None) -> Tensor:
        """x: (B, C, H, W) in the VE view (x0 + sigma * eps); sigma: (B,) or scalar; returns x0_hat.

        ``t`` may give the exact timestep for sigma (training), skipping the table lookup.
        """
        sigma = sigma.to(torch.float32).reshape(-1).expand(x.shape[0])
        c_skip, c_out, c_in = (s[:, None, None, None] for s in self.scalings(sigma))
        c_noise = sigma_to_t(sigma, self.sigmas) if t is None else t
        f = self.net(x * c_in, c_noise.float(), cond)
        return c_skip * x + c_out * f.float()


class GuidedDenoiser(nn.Module):
    """Classifier-free guidance: D_u + s * (D_c - D_u), both halves in one batched forward.

    ``interval`` = (sigma_lo, sigma_hi) applies guidance only at noise levels inside it and the
    plain conditional denoiser elsewhere (Kynkaanniemi et al. 2024): guidance at high noise
    costs diversity, at low noise it only sharpens noise into artefacts. Outside it, one forward
    of the conditional half alone.
    """

    def __init__(self, denoiser: Denoiser, cond: Cond, uncond: Cond, scale: float,
                 interval: tuple[float, float] | None = None):
        super().__init__()
        self.denoiser, self.scale, self.interval = denoiser, scale, interval
        self.cond = cond
        self.both = uncond.cat(cond)

    def forward(self, x: Tensor, sigma: Tensor, cond: Cond | None = None) -> Tensor:
        if self.scale == 1.0 or (self.interval is not None and not self.interval[0] <= float(sigma) <= self.interval[1]):
            return self.denoiser(x, sigma, self.cond)
        d_u, d_c = self.denoiser(torch.cat([x, x]), sigma, self.both).chunk(2)
        return d_u + self.scale * (d_c - d_u)
