"""The DiT denoiser network (diffusion.models.dit): the UNet's contract, adaLN-Zero, the caption mask, training."""

from __future__ import annotations

import pytest
import torch

from diffusion.config import DiTConfig
from diffusion.models.dit import DiT
from diffusion.models.loss import diffusion_loss
from diffusion.models.unet import Cond
from diffusion.models.precond import Denoiser

TINY = DiTConfig(width=32, depth=2, heads=2, patch=2)
TEXT_DIM, POOLED_DIM, L = 16, 8, 6


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny networks run fastest on one thread, and do not stall when the CPU cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_cond(b: int, real: list[int], seed: int = 0) -> Cond:
    """A batch whose row i has ``real[i]`` real tokens followed by padding."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(L)[None] < torch.tensor(real)[:, None]
    return Cond(torch.randn(b, L, TEXT_DIM, generator=g), mask, torch.randn(b, POOLED_DIM, generator=g))


def perturb_zero_init(net: DiT, std: float = 0.1) -> DiT:
    """Give the zero-initialised (adaLN-Zero) layers random weights, so the output depends on everything."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for lin in [b.ada[-1] for b in net.blocks] + [net.final.ada[-1], net.final.linear]:
            for p in (lin.weight, lin.bias):
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return net


def tiny(in_channels: int = 3, seed: int = 0) -> DiT:
    torch.manual_seed(seed)
    return DiT(TINY, TEXT_DIM, POOLED_DIM, in_channels=in_channels)


@pytest.mark.parametrize("in_channels,h,w", [(3, 16, 16), (4, 16, 16), (3, 16, 24)])
def test_shape_zero_init_and_gradients(in_channels, h, w):
    net = tiny(in_channels)
    x = torch.randn(2, in_channels, h, w)
    t = torch.tensor([10.0, 750.5])
    cond = make_cond(2, [3, 1])
    out = net(x, t, cond)
    assert out.shape == x.shape
    assert torch.equal(out, torch.zeros_like(out))  # adaLN-Zero: exactly zero at init

    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    ((net(x, t, cond) - torch.randn_like(x)) ** 2).mean().backward()
    opt.step()
    assert net(x, t, cond).abs().max() > 0

    net = perturb_zero_init(tiny(in_channels))
    ((net(x, t, cond) - torch.randn_like(x)) ** 2).mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert sum(p.grad.abs().sum() for p in net.parameters()) > 0


def test_image_size_must_be_a_multiple_of_the_patch():
    with pytest.raises(ValueError, match="multiple of the patch"):
        tiny()(torch.randn(1, 3, 15, 16), torch.tensor([1.0]), make_cond(1, [2]))


def test_caption_mask_is_honoured():
    net = perturb_zero_init(tiny()).eval()
    x = torch.randn(3, 3, 16, 16)
    t = torch.tensor([100.0, 500.0, 900.0])
    cond = make_cond(3, [3, 1, 0])  # the last row has no real token at all
    with torch.no_grad():
        out = net(x, t, cond)
        assert torch.isfinite(out).all()

        noisy_padding = cond.tokens.clone()
        noisy_padding[~cond.mask] = torch.randn(int((~cond.mask).sum()), TEXT_DIM) * 10
        out_pad = net(x, t, Cond(noisy_padding, cond.mask, cond.pooled))
        torch.testing.assert_close(out_pad, out, rtol=0, atol=1e-6)

        changed_real = cond.tokens.clone()
        changed_real[0, 1] = torch.randn(TEXT_DIM)
        changed_real[1, 0] = torch.randn(TEXT_DIM)
        out_real = net(x, t, Cond(changed_real, cond.mask, cond.pooled))
        assert (out_real[0] - out[0]).abs().max() > 1e-3
        assert (out_real[1] - out[1]).abs().max() > 1e-3
        torch.testing.assert_close(out_real[2], out[2], rtol=0, atol=1e-6)


def test_timestep_and_pooled_embedding_change_the_output():
    net = perturb_zero_init(tiny()).eval()
    x = torch.randn(2, 3, 16, 16)
    t = torch.tensor([100.0, 500.0])
    cond = make_cond(2, [3, 2])
    with torch.no_grad():
        out = net(x, t, cond)
        assert (net(x, t + 0.5, cond) - out).abs().max() > 1e-4  # fractional timesteps matter
        assert (net(x, torch.tensor([900.0, 20.0]), cond) - out).abs().max() > 1e-2
        other_pooled = Cond(cond.tokens, cond.mask, cond.pooled + 1.0)
        assert (net(x, t, other_pooled) - out).abs().max() > 1e-2


def test_runs_under_bf16_autocast():
    """No float32 assumption: bf16 autocast (CPU here, CUDA in training) runs forward and backward
    and stays close to the float32 output."""
    net = perturb_zero_init(tiny())
    x = torch.randn(2, 3, 16, 24)
    t = torch.tensor([10.0, 750.5])
    cond = make_cond(2, [3, 0])
    ref = net(x, t, cond)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x, t, cond)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max()
    out.float().square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def test_short_training_run_halves_the_loss():
    """60 AdamW steps on 16 fixed solid-colour images drive the DDPM loss, measured on fixed
    timesteps and noise, below half its value at init (a network blind to its input cannot go
    below ~1, the variance of the noise it must predict)."""
    torch.manual_seed(0)
    x0 = torch.rand(16, 3, 1, 1).expand(16, 3, 16, 16) * 2 - 1
    cond = make_cond(16, [4] * 16)
    denoiser = Denoiser(tiny(), timesteps=1000)
    opt = torch.optim.AdamW(denoiser.parameters(), lr=1e-3)

    def eval_loss() -> float:
        with torch.no_grad():
            batch = Cond(cond.tokens.repeat(4, 1, 1), cond.mask.repeat(4, 1), cond.pooled.repeat(4, 1))
            return float(diffusion_loss(denoiser, x0.repeat(4, 1, 1, 1), batch,
                                        generator=torch.Generator().manual_seed(1)).mean())

    first = eval_loss()
    assert 0.8 < first < 1.2  # the network outputs zero: the loss is the mean squared noise
    g = torch.Generator().manual_seed(2)
    for _ in range(60):
        loss = diffusion_loss(denoiser, x0, cond, generator=g).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert eval_loss() < 0.5 * first


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_drop_in_for_the_unet_under_the_denoiser(prediction):
    denoiser = Denoiser(tiny(in_channels=4), timesteps=1000, prediction=prediction)
    x = torch.randn(3, 4, 16, 16)
    sigmas = torch.tensor([0.01, 1.0, 80.0])
    cond = make_cond(3, [1, 3, 6])
    with torch.no_grad():
        x0_hat = denoiser(x, sigmas, cond)
        assert x0_hat.shape == x.shape and x0_hat.dtype == torch.float32
        c_skip, _, _ = denoiser.scalings(sigmas)
        torch.testing.assert_close(x0_hat, c_skip[:, None, None, None] * x)  # F is zero at init
        perturb_zero_init(denoiser.net)
        x0_hat = denoiser(x, sigmas, cond)
        assert x0_hat.shape == x.shape and torch.isfinite(x0_hat).all()
        assert denoiser(x, torch.tensor(2.0), cond).shape == x.shape  # a scalar sigma, as samplers pass
