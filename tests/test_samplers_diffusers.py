"""Numerical cross-checks of ``diffusion.models.schedules`` and ``diffusion.sampling.samplers`` against Hugging Face
diffusers' schedulers (public scheduler API only; diffusers is a test-only dependency).

Conventions. Our samplers live in the variance-exploding (VE) view x = x0 + sigma * eps; a DDPM
(VP) sample is x_vp = x / sqrt(1 + sigma^2) and alphabar = 1 / (1 + sigma^2). An eps-prediction
model's output ``eps`` becomes our denoiser's x0_hat = x - sigma * eps, which is exactly diffusers'
(x_vp - sqrt(1 - alphabar) eps) / sqrt(alphabar). Each test feeds both sides the same fixed
sequence of "model outputs" (one random eps per network evaluation) and compares the samples.

Precision. diffusers builds its tables in float32 (betas, alphas_cumprod, sigmas), so
 - the *tables* agree with ours only to float32 accuracy: alphabar to ~4e-7 relative, but
   sigma = sqrt((1 - alphabar) / alphabar) only to ~8e-5 relative at t = 0, where float32 keeps few
   digits of 1 - alphabar (tests 1 and 2 use tolerances sized for that);
 - the *update formulas* are checked on diffusers' own noise levels (its float32 table, read in
   float64), so what remains is rounding: DDIM, DDPM and Heun keep the float64 sample but compute
   their scalar coefficients in float32 (alphabar ** 0.5, sigma_next - sigma), and our samplers
   hand the denoiser sigma as a float32 tensor: tolerance F64 = 1e-6 relative to the largest
   |value| compared (measured <= 2e-7); Euler and DPM-Solver++ also cast the sample to float32
   inside ``step``: FP32 = 2e-6 (measured <= 3.7e-7). Stepping to a neighbouring level or with the
   wrong order instead is off by >= 2e-3 (asserted as controls, so the comparisons can fail).
"""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
)

from diffusion.sampling.samplers import (
    StepInfo,
    sample_ancestral,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_euler,
    sample_heun,
)
from diffusion.models.schedules import ddpm_sigmas, linear_betas, sampling_sigmas, sigma_to_t

T = 1000
BETAS = linear_betas(T, 1e-4, 0.02)
SIGMAS = ddpm_sigmas(BETAS)
TABLE = {"num_train_timesteps": T, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}
SHAPE = (2, 3, 4, 4)

F64 = 1e-6    # float64 samples, float32 coefficients in diffusers (measured <= 2e-7)
FP32 = 2e-6   # diffusers casts the sample to float32 inside step() (measured <= 3.7e-7)


# --------------------------------------------------------------------------------------- helpers

def rel_err(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """max |ours - theirs| over max |theirs| (scale-free, so one tolerance fits VE and VP values)."""
    return ((ours.double() - theirs.double()).abs().max() / theirs.double().abs().max()).item()


def table_sigmas(scheduler) -> torch.Tensor:
    """sigma_t of a diffusers scheduler's own (float32) alphas_cumprod, in float64."""
    ab = scheduler.alphas_cumprod.double()
    return ((1 - ab) / ab).sqrt()


def to_vp(x_ve: torch.Tensor, sigma: float) -> torch.Tensor:
    return x_ve / (1 + sigma**2) ** 0.5


def to_ve(x_vp: torch.Tensor, sigma: float) -> torch.Tensor:
    return x_vp * (1 + sigma**2) ** 0.5


def randn(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(SHAPE, generator=g, dtype=torch.float64) for _ in range(n)]


class EpsDenoiser:
    """Our denoiser for a model whose k-th evaluation outputs ``eps[k]``: x0_hat = x - sigma * eps."""

    def __init__(self, eps: list[torch.Tensor]):
        self.eps, self.calls = eps, []

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        eps = self.eps[len(self.calls)]
        self.calls.append((x.clone(), float(sigma)))
        return x - sigma * eps


class Noise:
    """noise_fn handing out a fixed list in order (the same z diffusers gets as variance_noise)."""

    def __init__(self, zs: list[torch.Tensor]):
        self.zs, self.n = zs, 0

    def __call__(self) -> torch.Tensor:
        self.n += 1
        return self.zs[self.n - 1]


def run_ours(sampler, eps, levels, x_ve, **kw) -> tuple[torch.Tensor, list[StepInfo], EpsDenoiser]:
    den, steps = EpsDenoiser(eps), []
    out = sampler(den, x_ve, torch.as_tensor(levels, dtype=torch.float64), callback=steps.append, **kw)
    return out, steps, den


# ------------------------------------------------------------------------ 1. the training table

def test_linear_schedule_alphabar_matches_ddpm_scheduler():
    sched = DDPMScheduler(**TABLE)
    ours = 1 / (1 + SIGMAS**2)
    theirs = sched.alphas_cumprod.double()
    # float32 cumprod over 1000 factors: measured max relative difference 3.6e-7
    assert torch.allclose(ours, theirs, rtol=1e-6, atol=0)
    assert torch.allclose(BETAS, sched.betas.double(), rtol=1e-6, atol=0)
    # In sigma units the float32 table loses digits where alphabar ~ 1 (1 - alphabar_0 = 1e-4 has
    # only ~3 significant float32 digits left): measured 8.3e-5 relative at t = 0, 2.3e-7 from t = 200 on.
    sig = table_sigmas(sched)
    assert torch.allclose(SIGMAS, sig, rtol=2e-4, atol=0)
    assert torch.allclose(SIGMAS[200:], sig[200:], rtol=1e-6, atol=0)


# ----------------------------------------------------------------------- 2. timestep spacings

@pytest.mark.parametrize("n", [5, 10, 20, 50])
@pytest.mark.parametrize("ours_spacing, theirs_spacing", [("uniform", "linspace"), ("trailing", "trailing")])
def test_spacing_timesteps_match_ddim(n, ours_spacing, theirs_spacing):
    levels = sampling_sigmas(SIGMAS, n, ours_spacing)
    assert len(levels) == n + 1 and levels[-1] == 0
    t = sigma_to_t(levels[:-1], SIGMAS)
    assert (t - t.round()).abs().max() < 1e-9  # our levels are table entries
    ddim = DDIMScheduler(**TABLE, timestep_spacing=theirs_spacing)
    ddim.set_timesteps(n)
    assert t.round().long().tolist() == ddim.timesteps.tolist()
    # DDPMScheduler shares the spacing code; DPM-Solver shares "trailing" (its "linspace" does not:
    # it is round(linspace(0, T-1, n+1))[::-1][:-1], e.g. 999, 799, 599, 400, 200 for n = 5).
    ddpm = DDPMScheduler(**TABLE, timestep_spacing=theirs_spacing)
    ddpm.set_timesteps(n)
    assert ddpm.timesteps.tolist() == ddim.timesteps.tolist()
    if theirs_spacing == "trailing":
        dpm = DPMSolverMultistepScheduler(**TABLE, timestep_spacing="trailing")
        dpm.set_timesteps(n)
        assert dpm.timesteps.tolist() == ddim.timesteps.tolist()
        # Euler reads the same (integer) timesteps off its float32 sigma table
        euler = EulerDiscreteScheduler(**TABLE, timestep_spacing="trailing")
        euler.set_timesteps(n)
        assert euler.sigmas[-1] == 0
        assert torch.allclose(levels, euler.sigmas.double(), rtol=2e-4, atol=0)


def _exact_t(spacing: str, n: int, k: int) -> Fraction:
    """The spacing's k-th timestep in exact arithmetic, before rounding."""
    if spacing == "uniform":
        return Fraction((T - 1) * (n - 1 - k), n - 1)
    return T - Fraction(k * T, n) - 1


@pytest.mark.parametrize("ours_spacing, theirs_spacing", [("uniform", "linspace"), ("trailing", "trailing")])
def test_spacing_sweep_differs_only_at_exact_half_ties(ours_spacing, theirs_spacing):
    """Every n in 2..1000: our timesteps equal diffusers' except where the exact value is k + 1/2.

    There both sides round half to even, but of differently rounded floats (torch.linspace(T-1, 0)
    vs numpy's reversed linspace(0, T-1); torch.arange vs numpy.arange), so the tie goes either way:
    e.g. n = 103 uniform, exact 832.5: ours 832.5 -> 832, diffusers 832.5000000000001 -> 833.
    Measured: 25 (uniform) and 327 (trailing) such timesteps among the ~500k of all n together.
    (n = 1 is a plain convention difference: diffusers' linspace gives t = 0, ours t = T-1.)"""
    ddim = DDIMScheduler(**TABLE, timestep_spacing=theirs_spacing)
    ns = range(2, T + 1)
    levels = torch.cat([sampling_sigmas(SIGMAS, n, ours_spacing)[:n] for n in ns])
    all_ours = sigma_to_t(levels, SIGMAS).round().long().split(list(ns))  # one call: fast
    ties = 0
    for n, ours in zip(ns, all_ours):
        ddim.set_timesteps(n)
        theirs = ddim.timesteps[:n]
        for k in (ours != theirs).nonzero().flatten().tolist():
            a, b, exact = ours[k].item(), theirs[k].item(), _exact_t(ours_spacing, n, k)
            assert abs(a - b) == 1 and exact.denominator == 2, (n, k, a, b, exact)
            ties += 1
    assert ties < 1000  # rare: a systematic difference would hit thousands


# A regression test: torch.arange(T, 0, -T/steps) once made steps+1 levels for 62 step counts
# (e.g. 61: the last entry ~1e-13 rounds to t = -1, i.e. sigma_max before the final 0); diffusers'
# trailing spacing has that artefact (its timesteps end in -1), ours computes each t directly.
def test_trailing_spacing_has_steps_plus_one_levels_for_every_n():
    bad = [n for n in range(1, T + 1) if len(sampling_sigmas(SIGMAS, n, "trailing")) != n + 1]
    assert bad == [], f"{len(bad)} step counts give extra levels, first: {bad[:8]}"


@pytest.mark.parametrize("n", [5, 10, 20, 50])
def test_karras_sigmas_match_euler_and_dpm(n):
    ours = sampling_sigmas(SIGMAS, n, "karras")
    euler = EulerDiscreteScheduler(**TABLE, use_karras_sigmas=True)  # timestep_spacing "linspace"
    euler.set_timesteps(n)
    theirs = euler.sigmas.double()
    assert theirs[-1] == 0 == ours[-1]
    # Same ends: sigma_max = table[T-1], sigma_min = table[0]. diffusers takes them from its float32
    # table, whose sigma_0 is off by 8.3e-5 relative (test 1): that is the largest difference, in the
    # last nonzero level, and it carries into the low-noise levels (e.g. 3e-5..7e-5 for the 3 before).
    assert torch.allclose(ours, theirs, rtol=2e-4, atol=0)
    assert (ours[-2] - theirs[-2]).abs() / ours[-2] > 1e-5  # the documented table difference is real
    # Built on diffusers' own table, our formula reproduces its levels to float32 rounding.
    assert torch.allclose(sampling_sigmas(table_sigmas(euler), n, "karras"), theirs, rtol=1e-6, atol=0)
    # Fractional timesteps: our sigma_to_t (log-linear interpolation) vs diffusers' _sigma_to_t.
    t_theirs = euler.timesteps.double()
    assert (sigma_to_t(ours[:-1], SIGMAS) - t_theirs).abs().max() < 1e-2  # float32 table: 5.6e-3
    assert (sigma_to_t(theirs[:-1], table_sigmas(euler)) - t_theirs).abs().max() < 2e-4  # 3.7e-5
    # DPM-Solver's karras levels are the same (it always uses the whole table, any spacing; its
    # timesteps are rounded to integers). Note Euler/Heun take sigma_min from the *spaced* levels,
    # so with timestep_spacing="trailing" their karras sigma_min is sigma(T/n - 1), not sigma_0.
    dpm = DPMSolverMultistepScheduler(**TABLE, use_karras_sigmas=True)
    dpm.set_timesteps(n)
    assert torch.allclose(dpm.sigmas.double(), theirs, rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------------- 3. DDIM

def _ddim(spacing: str, n: int, set_alpha_to_one: bool = True) -> DDIMScheduler:
    s = DDIMScheduler(**TABLE, timestep_spacing=spacing, clip_sample=False, set_alpha_to_one=set_alpha_to_one)
    s.set_timesteps(n)
    return s


@pytest.mark.parametrize("i", [0, 4, 8])
def test_ddim_interior_step_matches(i):
    """Trailing spacing with n | T: diffusers' prev_timestep = t - T//n is its next timestep."""
    ddim = _ddim("trailing", 10)
    tab = table_sigmas(ddim)
    t, t_prev = int(ddim.timesteps[i]), int(ddim.timesteps[i + 1])
    assert t - t_prev == T // 10
    x_vp, (eps,) = randn(1, 1)[0], randn(1, 2)
    theirs = ddim.step(eps, t, x_vp).prev_sample
    s, s_prev = tab[t].item(), tab[t_prev].item()
    ours, _, _ = run_ours(sample_ancestral, [eps], [s, s_prev], to_ve(x_vp, s))
    assert rel_err(to_vp(ours, s_prev), theirs) < F64
    # can fail: the neighbouring table level gives a visibly different sample
    off, _, _ = run_ours(sample_ancestral, [eps], [s, tab[t_prev + 1].item()], to_ve(x_vp, s))
    assert rel_err(to_vp(off, tab[t_prev + 1].item()), theirs) > 1e-3


@pytest.mark.parametrize("set_alpha_to_one", [True, False])
def test_ddim_full_trailing_run_and_final_step(set_alpha_to_one):
    """Whole 10-step run. diffusers' last step (t = 99 -> prev -1) goes to final_alpha_cumprod:
    1 with set_alpha_to_one=True, i.e. sigma = 0 = our last level (x0_hat returned); with False it
    goes to alphabar_0, i.e. ours would need a last level sigma_0 ~ 0.01 instead of 0."""
    n = 10
    ddim = _ddim("trailing", n, set_alpha_to_one)
    tab = table_sigmas(ddim)
    ts = ddim.timesteps.tolist()
    eps, x_vp = randn(n, 3), randn(1, 4)[0]
    levels = [tab[t].item() for t in ts] + [0.0 if set_alpha_to_one else tab[0].item()]
    ours, steps, _ = run_ours(sample_ancestral, eps, levels, to_ve(x_vp, levels[0]))
    x = x_vp
    for k, t in enumerate(ts):
        x = ddim.step(eps[k], t, x).prev_sample
        assert rel_err(to_vp(steps[k].x, levels[k + 1]), x) < F64, k
    assert rel_err(to_vp(ours, levels[-1]), x) < F64


def test_ddim_linspace_steps_by_T_over_n_not_to_its_next_timestep():
    """Convention difference (diffusers' DDIMScheduler): whatever the spacing, step() goes from t to
    t - T // n. With "linspace" (n = 10: 999, 888, 777, ...) that is 888 -> 788, not 888 -> 777, so
    diffusers' DDIM + linspace is not our uniform DDIM; DDPMScheduler (next test) steps correctly."""
    ddim = _ddim("linspace", 10)
    tab = table_sigmas(ddim)
    t, t_next = ddim.timesteps[1:3].tolist()
    assert (t, t_next) == (888, 777)
    x_vp, (eps,) = randn(1, 5)[0], randn(1, 6)
    theirs = ddim.step(eps, t, x_vp).prev_sample
    s = tab[t].item()
    ours, _, _ = run_ours(sample_ancestral, [eps], [s, tab[t - T // 10].item()], to_ve(x_vp, s))
    assert rel_err(to_vp(ours, tab[t - T // 10].item()), theirs) < F64
    uniform, _, _ = run_ours(sample_ancestral, [eps], [s, tab[t_next].item()], to_ve(x_vp, s))
    assert rel_err(to_vp(uniform, tab[t_next].item()), theirs) > 1e-3


@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_ddim_eta_step_matches_with_same_noise(eta):
    """DDIM's sigma_t(eta) in VP units is our sigma_up / sqrt(1 + sigma_next^2): same z, same sample."""
    ddim = _ddim("trailing", 10)
    tab = table_sigmas(ddim)
    t, t_prev = ddim.timesteps[3:5].tolist()
    x_vp, (eps, z) = randn(1, 7)[0], randn(2, 8)
    theirs = ddim.step(eps, t, x_vp, eta=eta, variance_noise=z).prev_sample
    s, s_prev = tab[t].item(), tab[t_prev].item()
    ours, _, _ = run_ours(sample_ancestral, [eps], [s, s_prev], to_ve(x_vp, s), eta=eta, noise_fn=Noise([z]))
    assert rel_err(to_vp(ours, s_prev), theirs) < F64


def test_ddpm_linspace_run_matches_uniform_ddpm():
    """DDPMScheduler (fixed_small variance = the DDPM posterior) over "linspace" steps = our
    sample_ddpm over "uniform" levels; both take the last step t = 0 -> x0_hat without noise.
    The noise: diffusers draws torch.randn(shape, generator=g, dtype=float64) per step with t > 0;
    we replay the same stream from a second generator with the same seed."""
    n = 10
    ddpm = DDPMScheduler(**TABLE, timestep_spacing="linspace", clip_sample=False, variance_type="fixed_small")
    ddpm.set_timesteps(n)
    tab = table_sigmas(ddpm)
    ts = ddpm.timesteps.tolist()
    assert ts == sigma_to_t(sampling_sigmas(SIGMAS, n, "uniform")[:-1], SIGMAS).round().long().tolist()
    levels = [tab[t].item() for t in ts] + [0.0]
    eps, x_vp = randn(n, 9), randn(1, 10)[0]
    g_ours = torch.Generator().manual_seed(11)
    ours, steps, _ = run_ours(sample_ddpm, eps, levels, to_ve(x_vp, levels[0]),
                              noise_fn=lambda: torch.randn(SHAPE, generator=g_ours, dtype=torch.float64))
    g, x = torch.Generator().manual_seed(11), x_vp
    for k, t in enumerate(ts):
        x = ddpm.step(eps[k], t, x, generator=g).prev_sample
        assert rel_err(to_vp(steps[k].x, levels[k + 1]), x) < F64, k
    assert rel_err(ours, x) < F64


# ---------------------------------------------------------------------------------- 4. Euler

def test_euler_step_and_run_match():
    n = 10
    euler = EulerDiscreteScheduler(**TABLE, timestep_spacing="trailing")
    euler.set_timesteps(n)
    levels = euler.sigmas.double().tolist()
    eps, x0 = randn(n, 12), randn(1, 13)[0] * levels[0]  # diffusers' Euler works on the VE sample
    ours, steps, den = run_ours(sample_euler, eps, levels, x0)
    x = x0
    for k, t in enumerate(euler.timesteps):
        model_in = euler.scale_model_input(x, t)  # what the network sees: the VP sample
        assert rel_err(model_in, to_vp(den.calls[k][0], levels[k])) < FP32, k
        x = euler.step(eps[k], t, x).prev_sample
        assert rel_err(steps[k].x, x) < FP32, k
    assert rel_err(ours, x) < FP32
    # can fail: one step on the wrong pair of levels
    off, _, _ = run_ours(sample_euler, eps[:1], [levels[0], levels[2]], x0)
    assert rel_err(off, steps[0].x) > 1e-3


def test_euler_ancestral_run_matches_with_same_noise():
    """Our sample_euler at eta = 1 is EulerAncestralDiscreteScheduler (same sigma_up / sigma_down).
    diffusers draws torch.randn(shape, generator=g, dtype=float64) every step (on the last one it
    is multiplied by sigma_up = 0); ours draws none there, so replaying the stream still lines up."""
    n = 10
    euler = EulerAncestralDiscreteScheduler(**TABLE, timestep_spacing="trailing")
    euler.set_timesteps(n)
    levels = euler.sigmas.double().tolist()
    eps, x0 = randn(n, 23), randn(1, 24)[0] * levels[0]
    g_ours = torch.Generator().manual_seed(25)
    ours, steps, _ = run_ours(sample_euler, eps, levels, x0, eta=1.0,
                              noise_fn=lambda: torch.randn(SHAPE, generator=g_ours, dtype=torch.float64))
    g, x = torch.Generator().manual_seed(25), x0
    for k, t in enumerate(euler.timesteps):
        euler.scale_model_input(x, t)
        x = euler.step(eps[k], t, x, generator=g).prev_sample
        assert rel_err(steps[k].x, x) < FP32, k
    assert rel_err(ours, x) < FP32


# ---------------------------------------------------------------------------------- 5. DPM-Solver++(2M)

def _dpm(n: int, **kw) -> DPMSolverMultistepScheduler:
    s = DPMSolverMultistepScheduler(**TABLE, solver_order=2, solver_type="midpoint", timestep_spacing="trailing",
                                    final_sigmas_type="zero", lower_order_final=True, **kw)
    s.set_timesteps(n)
    return s


@pytest.mark.parametrize("start", [0, 4])
def test_dpmpp_2m_two_steps_match(start):
    """Two consecutive steps from level ``start``: diffusers' first is first order (no history),
    the second the 2M multistep update; our sample_dpmpp_2m on the same three levels. diffusers
    turns eps into x0 = (x_vp - sigma_vp eps) / alpha itself; our denoiser gives x - sigma eps."""
    dpm = _dpm(10, algorithm_type="dpmsolver++")
    levels = dpm.sigmas.double()[start:start + 3].tolist()
    assert levels[-1] > 0  # an interior pair of steps: the final step to 0 is tested below
    eps, x_vp = randn(2, 14), randn(1, 15)[0]
    ours, steps, den = run_ours(sample_dpmpp_2m, eps, levels, to_ve(x_vp, levels[0]))
    x = x_vp
    for k, t in enumerate(dpm.timesteps[start:start + 2]):
        assert rel_err(to_vp(den.calls[k][0], levels[k]), x) < FP32, k
        x = dpm.step(eps[k], t, x).prev_sample
        assert rel_err(to_vp(steps[k].x, levels[k + 1]), x) < FP32, k
    assert rel_err(to_vp(ours, levels[2]), x) < FP32
    # can fail: the first-order update for the second step is visibly different
    first_order, _, _ = run_ours(sample_dpmpp_2m, eps[1:], levels[1:], steps[0].x)
    assert rel_err(to_vp(first_order, levels[2]), x) > 1e-3


@pytest.mark.parametrize("n", [10, 20])
def test_dpmpp_2m_full_run_matches(n):
    """Whole run incl. the last step: with final_sigmas_type="zero" diffusers forces a first-order
    step to sigma = 0, which returns x0_hat, as ours does (n = 20 >= 15: no lower-order-second)."""
    dpm = _dpm(n, algorithm_type="dpmsolver++")
    levels = dpm.sigmas.double().tolist()
    eps, x_vp = randn(n, 16), randn(1, 17)[0]
    ours, steps, _ = run_ours(sample_dpmpp_2m, eps, levels, to_ve(x_vp, levels[0]))
    x = x_vp
    for k, t in enumerate(dpm.timesteps):
        x = dpm.step(eps[k], t, x).prev_sample
        assert rel_err(to_vp(steps[k].x, levels[k + 1]), x) < FP32, k
    assert rel_err(ours, x) < FP32


def test_dpmpp_2m_sde_run_matches_with_same_noise():
    """sde-dpmsolver++ (midpoint) = our sample_dpmpp_2m_sde at eta = 1, same z per step (ours draws
    none on the last step to 0, where diffusers' noise term is multiplied by sigma_t = 0)."""
    n = 10
    dpm = _dpm(n, algorithm_type="sde-dpmsolver++")
    levels = dpm.sigmas.double().tolist()
    eps, zs, x_vp = randn(n, 18), randn(n, 19), randn(1, 20)[0]
    noise = Noise(zs)
    ours, steps, _ = run_ours(sample_dpmpp_2m_sde, eps, levels, to_ve(x_vp, levels[0]), eta=1.0, noise_fn=noise)
    assert noise.n == n - 1
    x = x_vp
    for k, t in enumerate(dpm.timesteps):
        x = dpm.step(eps[k], t, x, variance_noise=zs[k]).prev_sample
        assert rel_err(to_vp(steps[k].x, levels[k + 1]), x) < FP32, k
    assert rel_err(ours, x) < FP32


# ---------------------------------------------------------------------------------- 6. Heun

def test_heun_run_matches():
    """HeunDiscreteScheduler takes two step() calls per level (its sigmas are s0, s1, s1, s2, s2, ...,
    0): an Euler predictor, then the trapezoidal corrector with the model evaluated at the predictor
    at sigma_next; the last level is a lone Euler step to 0. 2n - 1 evaluations, as ours."""
    n = 10
    heun = HeunDiscreteScheduler(**TABLE, timestep_spacing="trailing")
    heun.set_timesteps(n)
    levels = heun.sigmas.double()[::2].tolist() + [0.0]  # s0, s1, ..., s_{n-1}, 0
    assert len(levels) == n + 1 and len(heun.timesteps) == 2 * n - 1
    eps, x0 = randn(2 * n - 1, 21), randn(1, 22)[0] * levels[0]
    ours, steps, den = run_ours(sample_heun, eps, levels, x0)
    assert len(den.calls) == 2 * n - 1
    x = x0
    for k, t in enumerate(heun.timesteps):
        x = heun.step(eps[k], t, x).prev_sample
        if k % 2 == 1 or k == 2 * n - 2:  # a level is complete after its corrector (or final Euler)
            assert rel_err(steps[k // 2].x, x) < F64, k
        else:  # the predictor is where our denoiser was evaluated next
            assert rel_err(den.calls[k + 1][0], x) < F64, k
    assert rel_err(ours, x) < F64
