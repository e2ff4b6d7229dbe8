"""Can the model draw very dark and very bright images? Offset noise and zero terminal SNR against
the plain schedule, on the smallest data that asks for it.

    .venv/bin/python bench/noise_bench.py                  # CPU, one thread: a few minutes
    .venv/bin/python bench/noise_bench.py --steps 100 --n 8    # a smoke run

The data: solid black (-1) and solid white (+1) 8 px images, each with its caption (a fixed random
text vector per colour). A 16-wide UNet (diffusion.models.unet) trains ``--steps`` AdamW steps on
them through the project's own objective (``diffusion_loss``, the denoiser of ``train.*``'s noise
options), then draws ``--n`` images per colour with DDIM (``--sampler``) at ``--sample-steps``
levels, clipping x0_hat to [-1, 1] as generate does. The figure is each colour's mean pixel value
(the target is -1 and +1) and the gap, the mean |drawn - target| over all pixels.

Configurations (every other setting the same, the same seed):
- ``sd``: Stable Diffusion's scaled_linear betas (0.00085..0.012; alphabar_T = 0.0047, so the
  last level still holds 6.8% of the image), eps prediction, uniform spacing: the case Lin et al.
  2024 diagnose;
- ``sd+offset``: the same with train.offset_noise 0.1 (Guttenberg 2023);
- ``sd+ztsnr``: the same betas rescaled to zero terminal SNR, v prediction, trailing spacing (Lin et
  al.'s fix);
- ``seed``: the project's default linear betas (alphabar_T = 4e-5), eps, uniform, for reference;
- ``seed+ztsnr``: those betas rescaled, v, trailing (its table's top is ~31000, not 4096:
  diffusion.models.schedules.ZERO_SNR_ALPHABAR).

Measured (AMD EPYC, one thread, a shared machine: the seconds are wall time under load), 600 steps,
32 images per colour, DDIM 20:

    config      black mean white mean     gap  seconds
    seed             0.127      0.180   0.974    246.3
    sd               0.129      0.245   0.942    154.2
    sd+offset       -0.086      0.167   0.873    241.8
    sd+ztsnr        -0.821      0.819   0.180     97.0
    seed+ztsnr      -0.805      0.792   0.201    138.7

Without zero terminal SNR both captions come out mid-grey (a gap of 1 is grey for both); offset
noise 0.1 moves them a little in 600 steps; zero terminal SNR with v and trailing draws them near
-1 and +1 (tests/test_noise_options.py checks the same at 120 steps).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from diffusion.config import UNetConfig  # noqa: E402
from diffusion.models.loss import diffusion_loss  # noqa: E402
from diffusion.models.precond import Denoiser  # noqa: E402
from diffusion.models.schedules import sampling_sigmas  # noqa: E402
from diffusion.models.unet import Cond, UNet  # noqa: E402
from diffusion.sampling.samplers import clamped, initial_noise, per_image_noise, sampler_eta, sampler_fn  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from machine import cpu_name  # noqa: E402

SD = {"beta_min": 0.00085, "beta_max": 0.012, "beta_schedule": "scaled_linear"}
SEED = {"beta_min": 1e-4, "beta_max": 0.02, "beta_schedule": "linear"}
CONFIGS = {
    "seed": dict(SEED, prediction="eps", zero_terminal_snr=False, offset_noise=0.0, spacing="uniform"),
    "sd": dict(SD, prediction="eps", zero_terminal_snr=False, offset_noise=0.0, spacing="uniform"),
    "sd+offset": dict(SD, prediction="eps", zero_terminal_snr=False, offset_noise=0.1, spacing="uniform"),
    "sd+ztsnr": dict(SD, prediction="v", zero_terminal_snr=True, offset_noise=0.0, spacing="trailing"),
    "seed+ztsnr": dict(SEED, prediction="v", zero_terminal_snr=True, offset_noise=0.0, spacing="trailing"),
}
SIDE, DIM = 8, 8


def captions(colour: torch.Tensor) -> Cond:
    """One fixed random text vector per colour (0 black, 1 white), as a one-token caption."""
    table = torch.randn(2, DIM, generator=torch.Generator().manual_seed(123))
    vec = table[colour]
    return Cond(vec[:, None, :], torch.ones(len(colour), 1, dtype=torch.bool), vec)


def train(cfg: dict, steps: int, batch: int, lr: float, seed: int) -> Denoiser:
    torch.manual_seed(seed)
    net = UNet(UNetConfig(channels=16, channel_mult=[1, 2], attn_levels=[1], heads=2), text_dim=DIM, pooled_dim=DIM)
    den = Denoiser(net, 1000, cfg["beta_min"], cfg["beta_max"], cfg["prediction"],
                   beta_schedule=cfg["beta_schedule"], zero_terminal_snr=cfg["zero_terminal_snr"])
    opt = torch.optim.AdamW(den.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        colour = torch.randint(0, 2, (batch,), generator=gen)
        x0 = (colour.float() * 2 - 1)[:, None, None, None].expand(batch, 3, SIDE, SIDE)
        for g in opt.param_groups:  # linear warmup over the first tenth, then constant
            g["lr"] = lr * min(1.0, (step + 1) / max(1, steps // 10))
        loss = diffusion_loss(den, x0, captions(colour), generator=gen, offset_noise=cfg["offset_noise"]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(den.parameters(), 1.0)
        opt.step()
    return den.eval()


@torch.no_grad()
def draw(den: Denoiser, cfg: dict, n: int, sampler: str, sample_steps: int) -> dict[str, float]:
    out = {}
    for colour, name, target in ((0, "black", -1.0), (1, "white", 1.0)):
        c = captions(torch.full((n,), colour))
        gens = [torch.Generator().manual_seed(10_000 + i) for i in range(n)]
        shape = (3, SIDE, SIDE)
        x = initial_noise(gens, shape, den.sigma_max, torch.device("cpu"))
        levels = sampling_sigmas(den.sigmas, sample_steps, cfg["spacing"])
        d = clamped(lambda x, s: den(x, s, c), 1.0)
        img = sampler_fn(sampler)(d, x, levels, eta=sampler_eta(sampler, None),
                                  noise_fn=per_image_noise(gens, shape, torch.device("cpu")))
        img = img.clamp(-1, 1)
        out[f"{name}_mean"] = img.mean().item()
        out[f"{name}_gap"] = (img - target).abs().mean().item()
    out["gap"] = (out["black_gap"] + out["white_gap"]) / 2
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--n", type=int, default=32, help="images drawn per colour")
    ap.add_argument("--sampler", default="ddim")
    ap.add_argument("--sample-steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    print(f"{cpu_name()}, torch {torch.__version__}, {a.threads} thread(s)")
    print(f"{a.steps} steps, batch {a.batch}, lr {a.lr:g}; {a.n} images per colour, {a.sampler} {a.sample_steps}")
    print(f"{'config':<11} {'black mean':>10} {'white mean':>10} {'gap':>7} {'seconds':>8}")
    for name in a.configs.split(","):
        cfg = CONFIGS[name]
        t0 = time.perf_counter()
        den = train(cfg, a.steps, a.batch, a.lr, a.seed)
        r = draw(den, cfg, a.n, a.sampler, a.sample_steps)
        print(f"{name:<11} {r['black_mean']:>10.3f} {r['white_mean']:>10.3f} {r['gap']:>7.3f} "
              f"{time.perf_counter() - t0:>8.1f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
