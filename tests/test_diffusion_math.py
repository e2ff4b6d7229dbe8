"""Schedules, preconditioning, loss and samplers, checked against analytic oracles."""

import math

import pytest
import torch

from diffusion.config import UNetConfig
from diffusion.errors import ConfigError
from diffusion.models.loss import diffusion_loss
from diffusion.models.unet import Cond, UNet, count_params
from diffusion.models.precond import Denoiser, GuidedDenoiser
from diffusion.sampling.samplers import SAMPLERS, ancestral_step, initial_noise, network_evals, sample_ancestral, sampler_fn
from diffusion.models.schedules import SPACINGS, ddpm_sigmas, linear_betas, sampling_sigmas, sigma_to_t

BETAS = linear_betas(1000, 1e-4, 0.02)
SIGMAS = ddpm_sigmas(BETAS)


def test_ddpm_sigmas_match_alphabar():
    alphabar = torch.cumprod(1 - BETAS, 0)
    assert torch.allclose(1 / (1 + SIGMAS**2), alphabar)
    assert (SIGMAS[1:] > SIGMAS[:-1]).all()
    assert SIGMAS[0] == pytest.approx(math.sqrt(1e-4 / (1 - 1e-4)))
    assert 150 < SIGMAS[-1] < 160  # alphabar_T ~ 4e-5 for the seed's schedule


@pytest.mark.parametrize("steps", [1, 2, 20, 50, 1000])
def test_sampling_sigmas_properties(steps):
    s = sampling_sigmas(SIGMAS, steps)
    assert len(s) == steps + 1
    assert s[0] == SIGMAS[-1] and s[-1] == 0
    assert (s[1:] < s[:-1]).all()
    if steps > 1:
        assert s[-2] == SIGMAS[0]
    if steps == 1000:
        assert torch.equal(s[:-1], SIGMAS.flip(0))


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("steps", [1, 2, 5, 20, 100])
def test_every_spacing_runs_from_sigma_max_to_zero(spacing, steps):
    s = sampling_sigmas(SIGMAS, steps, spacing)
    assert len(s) == steps + 1 and s[0] == SIGMAS[-1] and s[-1] == 0
    assert (s[1:] < s[:-1]).all() and (s[:-1] >= SIGMAS[0] - 1e-12).all()


def test_spacings_differ_where_they_should():
    uniform, trailing, karras = (sampling_sigmas(SIGMAS, 10, sp) for sp in SPACINGS)
    assert uniform[-2] == SIGMAS[0]                    # uniform ends on t = 0
    assert trailing[-2] == SIGMAS[99]                  # trailing's last level is t = T/steps - 1
    assert karras[-2] == pytest.approx(SIGMAS[0].item())
    assert karras[-3] < uniform[-3] / 4                # karras steps more finely near sigma_min
    with pytest.raises(ValueError, match="unknown spacing"):
        sampling_sigmas(SIGMAS, 10, "leading")


def test_sigma_to_t_inverts_the_table():
    t = torch.tensor([0, 1, 10, 500, 999])
    assert torch.allclose(sigma_to_t(SIGMAS[t], SIGMAS), t.double(), atol=1e-6)
    mid = (SIGMAS[10].log() + SIGMAS[11].log()).div(2).exp()
    assert sigma_to_t(mid[None], SIGMAS).item() == pytest.approx(10.5, abs=1e-3)


def test_eta_one_step_is_the_ddpm_posterior():
    """sigma_up / sigma_down at eta=1 reproduce the DDPM posterior q(x_{t-1} | x_t, x0)."""
    for t in (1, 10, 500, 999):
        sigma, sigma_next = SIGMAS[t].item(), SIGMAS[t - 1].item()
        down, up = ancestral_step(sigma, sigma_next, 1.0)
        ab, ab_prev = 1 / (1 + sigma**2), 1 / (1 + sigma_next**2)
        beta = BETAS[t].item()
        beta_tilde = (1 - ab_prev) / (1 - ab) * beta  # Ho et al. eq. 7
        # VE noise scale -> VP: multiply by sqrt(alphabar_{t-1})
        assert up * math.sqrt(ab_prev) == pytest.approx(math.sqrt(beta_tilde), rel=1e-6)
        # posterior mean coefficient on eps: sqrt(1 - ab_prev - beta_tilde) in VP units
        assert down * math.sqrt(ab_prev) == pytest.approx(math.sqrt(1 - ab_prev - beta_tilde), rel=1e-6)
    assert ancestral_step(2.0, 1.0, 0.0) == (1.0, 0.0)


class GaussianOracle(torch.nn.Module):
    """Ideal denoiser for data ~ N(0, s^2): D(x, sigma) = x s^2 / (s^2 + sigma^2)."""

    def __init__(self, s):
        super().__init__()
        self.s = s

    def forward(self, x, sigma, cond=None):
        return x * self.s**2 / (self.s**2 + sigma.double() ** 2)


def _oracle_samples(s, steps, eta):
    sigmas = sampling_sigmas(SIGMAS, steps)
    gens = [torch.Generator().manual_seed(i) for i in range(4000)]
    x = initial_noise(gens, (1,), float(sigmas[0]), torch.device("cpu")).double()
    g = torch.Generator().manual_seed(0)
    out = sample_ancestral(GaussianOracle(s), x, sigmas, eta=eta,
                           noise_fn=lambda: torch.randn(x.shape, generator=g, dtype=x.dtype))
    return out, sigmas


def test_ddim_step_matches_its_closed_form_on_gaussian_data():
    """For N(0, s^2) data each DDIM step scales x by (s^2 + sigma sigma') / (s^2 + sigma^2)."""
    s = 0.5
    out, sigmas = _oracle_samples(s, 50, 0.0)
    sig = sigmas.tolist()
    expected = (1 + sig[0] ** 2) ** 0.5
    for a, b in zip(sig[:-1], sig[1:]):
        expected *= (s**2 + a * b) / (s**2 + a**2)
    assert out.std().item() == pytest.approx(expected, rel=0.03)


@pytest.mark.parametrize("eta, steps", [(0.0, 1000), (1.0, 1000), (1.0, 100)])
def test_samplers_turn_noise_into_the_data_distribution(eta, steps):
    s = 0.5
    out, _ = _oracle_samples(s, steps, eta)
    assert out.std().item() == pytest.approx(s, rel=0.05)
    assert abs(out.mean().item()) < 0.05


def _run(name, s, steps, spacing, n=4000):
    sigmas = sampling_sigmas(SIGMAS, steps, spacing)
    gens = [torch.Generator().manual_seed(i) for i in range(n)]
    x = initial_noise(gens, (1,), float(sigmas[0]), torch.device("cpu")).double()
    g = torch.Generator().manual_seed(0)
    calls = []

    def oracle(x, sigma):
        calls.append(float(sigma))
        return GaussianOracle(s)(x, sigma)

    out = sampler_fn(name)(oracle, x, sigmas, eta=1.0 if name == "dpmpp_2m_sde" else 0.0,
                           noise_fn=lambda: torch.randn(x.shape, generator=g, dtype=x.dtype))
    return out, calls


@pytest.mark.parametrize("name, steps, spacing", [
    ("euler", 200, "uniform"), ("heun", 40, "karras"), ("dpmpp_2m", 40, "karras"), ("dpmpp_2m", 100, "uniform"),
    ("dpmpp_2m_sde", 100, "karras"), ("ddpm", 1000, "uniform"),
])
def test_every_sampler_reaches_the_data_distribution(name, steps, spacing):
    """With the ideal denoiser for N(0, s^2) data every sampler must end at N(0, s^2)."""
    s = 0.5
    out, calls = _run(name, s, steps, spacing)
    assert out.std().item() == pytest.approx(s, rel=0.05)
    assert abs(out.mean().item()) < 0.05
    assert len(calls) == network_evals(name, steps)


def test_convergence_order_of_each_solver():
    """The deterministic ODE solution for N(0, s^2) data maps x_T to x_T * sqrt((s^2 + sigma^2) / (1 + ...)):
    doubling the steps halves Euler's error (first order) and quarters Heun's and
    DPM-Solver++(2M)'s (second order)."""
    s, sigma_max = 0.5, SIGMAS[-1].item()
    x_t = initial_noise([torch.Generator().manual_seed(i) for i in range(64)], (1,), 0.0, torch.device("cpu")).double()
    exact = x_t * s / math.sqrt(s**2 + sigma_max**2) * math.sqrt(1 + sigma_max**2)

    def error(name, steps):
        return (_run(name, s, steps, "karras", n=64)[0] - exact).abs().max().item()

    ratio = {name: error(name, 32) / error(name, 64) for name in ("euler", "heun", "dpmpp_2m")}
    assert 1.7 < ratio["euler"] < 2.5, ratio
    assert ratio["heun"] > 3.5 and ratio["dpmpp_2m"] > 3.5, ratio
    assert error("heun", 64) < error("euler", 64) / 5


def test_unknown_samplers_are_refused():
    assert set(SAMPLERS) == {"ddim", "ddpm", "euler", "heun", "dpmpp_2m", "dpmpp_2m_sde"}
    with pytest.raises(ValueError, match="unknown sampler"):
        sampler_fn("plms")


def tiny_denoiser(prediction="eps"):
    torch.manual_seed(0)
    net = UNet(UNetConfig(channels=16, channel_mult=[1, 2], attn_levels=[1], heads=2), text_dim=8, pooled_dim=8)
    return Denoiser(net, prediction=prediction)


def cond(b, length=3):
    return Cond(torch.randn(b, length, 8), torch.ones(b, length, dtype=torch.bool), torch.randn(b, 8))


def forward_backward_flops(net, x, t, c):
    """The UNet's output and forward FLOPs, with its zero-initialised layers made random (a
    non-trivial output), checked finite, and every parameter reached by the backward."""
    from torch.utils.flop_counter import FlopCounterMode

    for m in net.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and not m.weight.any():
            torch.nn.init.normal_(m.weight, std=0.1)
    counter = FlopCounterMode(display=False)
    with counter:
        out = net(x, t, c)
    assert out.shape == x.shape and torch.isfinite(out).all() and out.abs().mean() > 0
    out.square().mean().backward()
    assert all(p.grad is not None for p in net.parameters()), "a module the forward never uses"
    return out, counter.get_total_flops()


def test_unet_up_path_options_keep_the_shapes_and_cut_the_flops():
    """up_blocks and a conv_nearest upsampler change the cost, not the contract (B, C, H, W) in and
    out; each option counts fewer FLOPs than ADM's layout and the unused skips are not built."""
    from diffusion.models.unet import group_norm

    x, t, c = torch.randn(2, 3, 16, 16), torch.tensor([3.0, 700.0]), cond(2)
    flops = {}
    for up_blocks, upsample in [(None, "nearest_conv"), (1, "nearest_conv"), (None, "conv_nearest"), (1, "conv_nearest")]:
        torch.manual_seed(0)
        net = UNet(UNetConfig(channels=16, channel_mult=[1, 2, 2], attn_levels=[1], heads=2, up_blocks=up_blocks,
                              upsample=upsample), text_dim=8, pooled_dim=8)
        assert len(net.up) == 3 * (2 if up_blocks is None else up_blocks)
        flops[up_blocks, upsample] = forward_backward_flops(net, x, t, c)[1]
    base = flops[None, "nearest_conv"]
    assert flops[1, "nearest_conv"] < base and flops[None, "conv_nearest"] < base
    assert flops[1, "conv_nearest"] < min(flops[1, "nearest_conv"], flops[None, "conv_nearest"])
    # GroupNorm keeps >= 3 channels a group where gcd(32, ch) would not (32 -> 8 groups, not 32)
    assert [group_norm(ch).num_groups for ch in (12, 32, 48, 64, 96, 256)] == [4, 8, 16, 16, 32, 32]


def test_unet_zero_init_starts_as_identity_or_reads_the_caption_from_step_zero():
    """unet.zero_init true (ADM, the default): every residual branch's last layer and the output conv
    are zero, so the untrained network outputs zero whatever the caption; false (diffusers' init):
    those layers keep PyTorch's default draws and the caption moves the output from the first step.
    Every other weight is the same draw either way (the option changes those layers only)."""
    from diffusion.models.unet import Attention, ResBlock, TransformerBlock

    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3.0, 700.0])
    c = Cond(torch.randn(2, 6, 32), torch.ones(2, 6, dtype=torch.bool), torch.randn(2, 8))
    other = Cond(torch.randn(2, 6, 32), c.mask, c.pooled)  # other words, the same pooled vector
    nets = {}
    for zero_init in (True, False):
        torch.manual_seed(0)
        nets[zero_init] = net = UNet(UNetConfig(channels=16, channel_mult=[1, 2, 2], attn_levels=[1, 2], heads=2,
                                                zero_init=zero_init), text_dim=32, pooled_dim=8)
        last = [m.conv2 for m in net.modules() if isinstance(m, ResBlock)] + \
               [m.out for m in net.modules() if isinstance(m, Attention)] + \
               [m.mlp[-1] for m in net.modules() if isinstance(m, TransformerBlock)] + [net.out]
        assert len(last) == 11 + 14 + 7 + 1  # ResNet blocks, attentions, MLPs, the output conv
        assert all(bool((m.weight == 0).all()) == zero_init for m in last)
        with torch.no_grad():
            out, out_other = net(x, t, c), net(x, t, other)
        assert bool((out == 0).all()) == zero_init
        assert (not torch.allclose(out, out_other)) == (not zero_init)
    zeroed = {n for n, m in nets[True].named_modules() if hasattr(m, "weight") and m.weight is not None
              and bool((m.weight == 0).all())}
    for name, w in nets[True].state_dict().items():
        if name.rsplit(".", 1)[0] not in zeroed:
            assert torch.equal(w, nets[False].state_dict()[name]), name


def test_unet_qk_norm_makes_attention_blind_to_the_scale_of_queries_and_keys():
    """unet.qk_norm: each head's queries and keys are LayerNormed, so scaling the query and key
    projections (what lets attention logits grow in training) changes nothing; without it the
    same scaling sharpens the attention and moves the output. Off, the network is the one it was:
    the same weights, draw for draw, and no extra parameters."""
    from diffusion.models.unet import Attention

    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3.0, 700.0])
    c = Cond(torch.randn(2, 6, 32), torch.tensor([[True] * 6, [True] * 3 + [False] * 3]), torch.randn(2, 8))
    nets = {}
    for qk_norm in (False, True):
        torch.manual_seed(0)
        nets[qk_norm] = net = UNet(UNetConfig(channels=16, channel_mult=[1, 2, 2], attn_levels=[1, 2], heads=2,
                                              zero_init=False, qk_norm=qk_norm), text_dim=32, pooled_dim=8)
        with torch.no_grad():
            before = net(x, t, c)
            for m in net.modules():
                if isinstance(m, Attention):
                    m.q.weight.mul_(8.0)
                    m.kv.weight[: m.kv.weight.shape[0] // 2].mul_(8.0)  # the keys' half (k, v are stacked)
            after = net(x, t, c)
        assert torch.allclose(before, after, atol=1e-4) == qk_norm
    off, on = nets[False].state_dict(), nets[True].state_dict()
    extra = set(on) - set(off)
    assert set(off) <= set(on) and extra and all(".q_norm." in k or ".k_norm." in k for k in extra)
    assert len(extra) == 4 * 14  # a weight and a bias for each of q and k, in each of the 14 attentions
    for name, w in off.items():  # every other weight the same draw (both nets' q and k were scaled alike)
        assert torch.equal(w, on[name]), name


def test_unet_text_layers_give_each_word_its_captions_context_and_ignore_padding():
    """unet.text_layers: transformer layers over the caption tokens before the cross-attentions.
    Without them a word's state is its word vector alone (what the other words are does not reach
    its keys and values); with them it is; a padded token changes nothing either way; the layers
    add only their own parameters, and a caption width the heads do not divide is refused."""
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3.0, 700.0])
    mask = torch.tensor([[True] * 4 + [False] * 2] * 2)
    c = Cond(torch.randn(2, 6, 32), mask, torch.randn(2, 8))
    nets, states = {}, {}
    for n in (0, 1):
        torch.manual_seed(0)
        nets[n] = net = UNet(UNetConfig(channels=16, channel_mult=[1, 2, 2], attn_levels=[1, 2], heads=2,
                                        zero_init=False, text_layers=n), text_dim=32, pooled_dim=8)
        seen = []  # what the first cross-attention reads: the refined caption tokens
        first = next(m for m in net.modules() if hasattr(m, "cross_attn")).cross_attn
        hook = first.register_forward_hook(lambda m, args, out: seen.append(args[1]))
        with torch.no_grad():
            base = net(x, t, c)
            other = c.tokens.clone()
            other[:, 1] = torch.randn(2, 32)  # another second word
            word0 = net(x, t, Cond(other, mask, c.pooled))
            pad = c.tokens.clone()
            pad[:, 4:] = torch.randn(2, 2, 32) * 10  # other values under the padding
            padded = net(x, t, Cond(pad, mask, c.pooled))
        hook.remove()
        states[n] = seen
        assert torch.allclose(base, padded, atol=1e-5)  # padding is ignored, refiner or not
        assert not torch.allclose(base, word0)  # a different caption: a different output
    # the first word's state: its word vector alone without the refiner, its caption's with it
    assert torch.allclose(states[0][0][:, 0], states[0][1][:, 0])
    assert not torch.allclose(states[1][0][:, 0], states[1][1][:, 0], atol=1e-3)
    assert torch.allclose(states[1][0][:, :4], states[1][2][:, :4], atol=1e-5)  # padding: no real word moves
    off, on = nets[0].state_dict(), nets[1].state_dict()
    assert set(off) <= set(on) and all(k.startswith("text_layers.0.") for k in set(on) - set(off))
    with pytest.raises(ConfigError, match="text_layers"):
        UNet(UNetConfig(channels=16, heads=3, channel_mult=[1], attn_levels=[], text_layers=1), text_dim=32, pooled_dim=8)


def test_unet_ctx_dim_projects_the_caption_once_for_every_block():
    """ctx_dim: one projection of the caption tokens, every block's keys and values read its width;
    fewer FLOPs and parameters, the same contract, and padding still ignored (a masked-out token's
    values change nothing)."""
    from diffusion.models.unet import Attention

    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3.0, 700.0])
    c = Cond(torch.randn(2, 6, 32), torch.tensor([[True] * 6, [True] * 3 + [False] * 3]), torch.randn(2, 8))
    flops, params = {}, {}
    for ctx_dim in (None, 8):
        torch.manual_seed(0)
        net = UNet(UNetConfig(channels=16, channel_mult=[1, 2, 2], attn_levels=[1, 2], heads=2, ctx_dim=ctx_dim),
                   text_dim=32, pooled_dim=8)
        cross = [b.cross_attn for b in net.modules() if hasattr(b, "cross_attn")]
        assert len(cross) == 7 and all(isinstance(a, Attention) for a in cross)
        assert {a.kv.in_features for a in cross} == {ctx_dim or 32}
        assert isinstance(net.ctx_proj, torch.nn.Linear) == (ctx_dim is not None)
        out, flops[ctx_dim] = forward_backward_flops(net, x, t, c)
        padded = Cond(c.tokens.clone(), c.mask, c.pooled)
        padded.tokens[1, 3:] = 100.0  # the masked-out tail of the second caption
        with torch.no_grad():
            assert torch.allclose(net(x, t, padded), out.detach(), atol=1e-5)
        params[ctx_dim] = count_params(net)
    assert flops[8] < flops[None] and params[8] < params[None]


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_precond_identities(prediction):
    d = tiny_denoiser(prediction)
    x = torch.randn(2, 3, 16, 16)
    c_skip, c_out, c_in = d.scalings(torch.tensor([1e-4]))
    assert c_skip.item() == pytest.approx(1, abs=1e-6) and abs(c_out.item()) < 1e-3  # D(x, sigma->0) -> x
    # a randomly initialised net with a zero output layer predicts eps = 0 / v = 0
    out = d(x, torch.tensor(3.0), cond(2))
    expected = x if prediction == "eps" else x / 10
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("weighting", ["none", "min_snr"])
def test_loss_shape_and_it_goes_down_on_a_fixed_batch(weighting):
    d = tiny_denoiser()
    x0 = torch.rand(8, 3, 16, 16) * 2 - 1
    c = cond(8)
    gen = torch.Generator().manual_seed(0)
    first = diffusion_loss(d, x0, c, weighting=weighting, generator=gen)
    assert first.shape == (8,) and torch.isfinite(first).all()
    opt = torch.optim.Adam(d.parameters(), lr=2e-3)

    def eval_loss():
        g = torch.Generator().manual_seed(1)
        return torch.stack([diffusion_loss(d, x0, c, weighting=weighting, generator=g).mean() for _ in range(8)]).mean()

    with torch.no_grad():
        before = eval_loss()
    for _ in range(50):
        loss = diffusion_loss(d, x0, c, weighting=weighting, generator=gen).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        assert eval_loss() < 0.8 * before


def test_loss_equals_epsilon_mse():
    """The denoiser-space loss is exactly the seed's ||eps_hat - eps||^2 objective."""
    d = tiny_denoiser()
    torch.nn.init.normal_(d.net.out.weight, std=0.1)  # a non-trivial eps prediction
    x0 = torch.rand(4, 3, 16, 16)
    c = cond(4)
    loss = diffusion_loss(d, x0, c, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    t = torch.randint(0, 1000, (4,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    sigma = d.sigmas[t].float()
    x_vp = (x0 + sigma[:, None, None, None] * eps) / (1 + sigma[:, None, None, None] ** 2).sqrt()
    eps_hat = d.net(x_vp, t.float(), c)
    torch.testing.assert_close(loss, ((eps_hat - eps) ** 2).mean(dim=(1, 2, 3)), rtol=1e-4, atol=1e-5)


def test_guidance_scale_one_is_the_conditional_denoiser_and_zero_the_unconditional():
    d = tiny_denoiser()
    torch.nn.init.normal_(d.net.out.weight, std=0.1)
    x = torch.randn(2, 3, 16, 16)
    c, u = cond(2), cond(2)
    sigma = torch.tensor(2.0)
    torch.testing.assert_close(GuidedDenoiser(d, c, u, 1.0)(x, sigma), d(x, sigma, c))
    torch.testing.assert_close(GuidedDenoiser(d, c, u, 0.0)(x, sigma), d(x, sigma, u), rtol=1e-5, atol=1e-5)
