"""Samplers: the reference DDIM tables and quirks, hand-computed steps, accuracy on a Gaussian
toy problem whose exact denoiser is known, guidance, per-image seeds and masked sampling."""
import functools
import math

import pytest
import torch

from ldm.diffusion.guidance import concat_conditions, guided_output
from ldm.diffusion.samplers import (
    SAMPLERS,
    DDIMSampler,
    DDPMSampler,
    DPMSolverPP2MSampler,
    PLMSSampler,
    get_sampler,
    noise_for_seeds,
    select_timesteps,
)
from ldm.diffusion.schedule import DiffusionSchedule


@functools.lru_cache
def _linear():
    return DiffusionSchedule.from_name("linear", 1000, 0.00085, 0.012)


class Recorder:
    """A denoiser f(x, t) that records every call (inputs cloned)."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, x, t, cond):
        self.calls.append((x.clone(), t.clone(), cond))
        return self.fn(x, t)


def _smooth(x, t):
    """A fixed nonlinear fake eps-predictor."""
    return torch.tanh(x) * (0.5 + t.to(x.dtype).view(-1, *([1] * (x.ndim - 1))) / 1000)


# ---------------------------------------------------------------- timesteps and DDIM tables

def test_ddim_tables_match_reference(reference_dir):
    tables = torch.load(reference_dir / "tables.pt", weights_only=True)["ddim_linear_0.00085_0.012"]
    assert len(tables) == 30
    for key, ref in tables.items():
        sampler = DDIMSampler(_linear(), ref["S"], eta=ref["eta"], discretize=ref["method"], compat=True)
        ours = sampler.table()
        assert torch.equal(ours["timesteps"], ref["timesteps"]), key
        for name in ("alphas", "alphas_prev", "sigmas"):
            torch.testing.assert_close(ours[name], ref[name], rtol=1e-10, atol=1e-14, msg=f"{key} {name}")


@pytest.mark.parametrize("steps, expected", [(30, 31), (400, 500), (10, 10), (1, 1), (500, 500)])
def test_compat_step_counts(steps, expected):
    assert DDIMSampler(_linear(), steps, compat=True).num_steps == expected


@pytest.mark.parametrize("steps", [3, 9, 27, 36, 37, 101, 105, 111, 501, 1000])
def test_compat_crashing_step_counts_raise(steps):
    with pytest.raises(ValueError, match="crashes"):
        DDIMSampler(_linear(), steps, compat=True)
    with pytest.raises(ValueError, match="crashes"):
        PLMSSampler(_linear(), steps, compat=True)


@pytest.mark.parametrize("steps", [1, 2, 27, 30, 36, 101, 400, 999, 1000])
@pytest.mark.parametrize("method", ["uniform", "quad"])
def test_default_timesteps_exact_count_distinct(steps, method):
    if method == "quad" and steps == 1000:  # its grid starts at 1: room for 999 only
        with pytest.raises(ValueError, match="quad"):
            select_timesteps(1000, steps, method)
        return
    ts = select_timesteps(1000, steps, method)
    assert ts.numel() == steps and ts.dtype == torch.long
    assert (ts[1:] > ts[:-1]).all() and ts.min() >= 0 and ts.max() <= 999
    if method == "uniform":
        assert ts.max() == 999 and (steps == 1 or ts.min() == 0)
    elif steps <= 10:  # no repeats to push: the reference's quad grid
        assert torch.equal(ts, select_timesteps(1000, steps, method, compat=True))


@pytest.mark.parametrize("steps", [27, 36, 101])
def test_default_mode_runs_exactly_s_steps(steps):
    den = Recorder(lambda x, t: 0.1 * x)
    DDIMSampler(_linear(), steps).sample(den, torch.randn(2, 1, 2, 2), progress=False)
    assert len(den.calls) == steps
    assert [int(c[1][0]) for c in den.calls] == select_timesteps(1000, steps).flip(0).tolist()


def test_bad_sampler_settings():
    with pytest.raises(ValueError, match="1..1000"):
        DDIMSampler(_linear(), 1001)
    with pytest.raises(ValueError, match="eta"):
        DDIMSampler(_linear(), 10, eta=1.5)
    with pytest.raises(ValueError, match="method"):
        DDIMSampler(_linear(), 10, discretize="cubic")
    with pytest.raises(ValueError, match="unknown sampler"):
        get_sampler("euler", schedule=_linear())
    with pytest.raises(ValueError, match="spacing"):
        DPMSolverPP2MSampler(_linear(), 10, spacing="karras")
    with pytest.raises(ValueError, match="parameterization"):
        DDPMSampler(_linear(), parameterization="score")


def test_registry_builds_every_sampler():
    assert set(SAMPLERS) == {"ddpm", "ddim", "plms", "dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "dpmpp_3m_sde", "heun"}
    for name, cls in SAMPLERS.items():
        sampler = get_sampler(name, schedule=_linear())
        assert isinstance(sampler, cls) and sampler.name == name


@pytest.mark.parametrize("name, kind", [("uncond_selfattn_f4", "ddim"), ("uncond_selfattn_f4", "plms"),
                                        ("txt_crossattn_f4", "ddim"), ("txt_crossattn_f4", "plms")])
def test_compat_sampling_reproduces_reference(reference_dir, name, kind):
    """The reference's 10-step DDIM / PLMS latents (EMA UNet, CFG 3 for the conditional model)."""
    from torch import nn

    from ldm.diffusion.ema import EMA
    from ldm.nets.unet import UNetModel
    from ldm.utils.checkpoint import load_strict, sub_state_dict

    io = torch.load(reference_dir / f"{name}_io.pt", weights_only=True)
    state = torch.load(reference_dir / f"{name}.ckpt", weights_only=True)["state_dict"]
    params = {k: v for k, v in io["config"]["unet_config"]["params"].items() if k != "image_size"}
    wrapper = nn.Module()  # the reference's DiffusionWrapper, whose parameters the EMA names
    wrapper.diffusion_model = UNetModel(**params)
    load_strict(wrapper, sub_state_dict(state, "model."))
    ema = EMA(wrapper)
    ema.load_state_dict(sub_state_dict(state, "model_ema."))
    ema.copy_to(wrapper)
    unet = wrapper.diffusion_model.eval()

    ref, cfg = io[kind], io["config"]
    cond = uncond = None
    if ref["class_label"] is not None:  # the reference's ClassEmbedder: one token per label
        table = state["cond_stage_model.embedding.weight"]
        cond, uncond = table[ref["class_label"]][:, None], table[ref["unconditional_class_label"]][:, None]
    schedule = DiffusionSchedule.from_name(cfg["beta_schedule"], cfg["timesteps"], cfg["linear_start"],
                                           cfg["linear_end"])
    extra = {"eta": ref["eta"]} if kind == "ddim" else {}
    sampler = get_sampler(kind, schedule=schedule, num_steps=ref["steps"], compat=True, **extra)
    out = sampler.sample(lambda x, t, c: unet(x, t, context=c), ref["x_T"], cond, uncond=uncond,
                         guidance_scale=ref["guidance_scale"], progress=False)
    torch.testing.assert_close(out, ref["latent"], rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------- hand-computed steps

def test_ddim_steps_by_hand():
    abar = _linear().alphas_cumprod
    sampler = DDIMSampler(_linear(), 2, eta=0.5, compat=True)
    assert sampler.timesteps.tolist() == [1, 501]
    x_T = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    den = Recorder(_smooth)
    out = sampler.sample(den, x_T, generator=torch.Generator().manual_seed(7), progress=False)

    gen = torch.Generator().manual_seed(7)
    x = x_T
    for t, t_prev in ((501, 1), (1, 0)):
        a, ap = abar[t].item(), abar[t_prev].item()
        sigma = 0.5 * math.sqrt((1 - ap) / (1 - a)) * math.sqrt(1 - a / ap)
        eps = _smooth(x, torch.full((3,), t))
        x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
        noise = torch.randn(x.shape, generator=gen).double()
        x = math.sqrt(ap) * x0 + math.sqrt(1 - ap - sigma**2) * eps + sigma * noise
    torch.testing.assert_close(out, x, rtol=1e-12, atol=1e-12)
    assert [c[1].tolist() for c in den.calls] == [[501] * 3, [1] * 3]
    assert den.calls[0][1].dtype == torch.long


def test_plms_steps_by_hand():
    abar = _linear().alphas_cumprod
    sampler = PLMSSampler(_linear(), 5, compat=True)
    tau = [801, 601, 401, 201, 1]
    assert sampler.timesteps.flip(0).tolist() == tau
    x_T = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    den = Recorder(_smooth)
    out = sampler.sample(den, x_T, progress=False)

    def f(x, t):
        return _smooth(x, torch.full((x.shape[0],), t))

    def step(x, e, t, t_prev):
        a, ap = abar[t].item(), abar[t_prev].item()
        x0 = (x - math.sqrt(1 - a) * e) / math.sqrt(a)
        return math.sqrt(ap) * x0 + math.sqrt(1 - ap) * e

    # First step: improved Euler with two calls, at 801 and at 601 on a DDIM step.
    e0 = f(x_T, 801)
    x_mid = step(x_T, e0, 801, 601)
    x1 = step(x_T, (e0 + f(x_mid, 601)) / 2, 801, 601)
    # Second step: (3 e_t - e_prev) / 2.
    e1 = f(x1, 601)
    x2 = step(x1, (3 * e1 - e0) / 2, 601, 401)
    # Third and fourth: the 3rd- and 4th-order Adams-Bashforth formulas; last step to abar[0].
    e2 = f(x2, 401)
    x3 = step(x2, (23 * e2 - 16 * e1 + 5 * e0) / 12, 401, 201)
    e3 = f(x3, 201)
    x4 = step(x3, (55 * e3 - 59 * e2 + 37 * e1 - 9 * e0) / 24, 201, 1)
    e4 = f(x4, 1)
    x5 = step(x4, (55 * e4 - 59 * e3 + 37 * e2 - 9 * e1) / 24, 1, 0)

    assert [int(c[1][0]) for c in den.calls] == [801, 601, 601, 401, 201, 1]
    for (x_in, _, _), expected in zip(den.calls, [x_T, x_mid, x1, x2, x3, x4]):
        torch.testing.assert_close(x_in, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, x5, rtol=1e-12, atol=1e-12)


def test_ddpm_step_by_hand():
    sched = DiffusionSchedule.from_name("linear", 3, 0.1, 0.3)
    x_T = torch.randn(2, 5, dtype=torch.float64)
    out = DDPMSampler(sched).sample(Recorder(_smooth), x_T, generator=torch.Generator().manual_seed(3),
                                    progress=False)
    gen, x = torch.Generator().manual_seed(3), x_T
    for t in (2, 1, 0):
        abar, beta = sched.alphas_cumprod[t].item(), sched.betas[t].item()
        abar_prev = sched.alphas_cumprod_prev[t].item()
        x0 = (x - math.sqrt(1 - abar) * _smooth(x, torch.full((2,), t))) / math.sqrt(abar)
        mean = (beta * math.sqrt(abar_prev) * x0 + (1 - abar_prev) * math.sqrt(1 - beta) * x) / (1 - abar)
        var = beta * (1 - abar_prev) / (1 - abar)
        x = mean + math.sqrt(var) * torch.randn(x.shape, generator=gen).double() if t > 0 else mean
    torch.testing.assert_close(out, x, rtol=1e-10, atol=1e-12)


def test_ddim_with_every_timestep_and_eta_one_is_ddpm():
    """Outside compat mode the last step lands on clean data, so DDIM over all T timesteps
    with eta = 1 is ancestral DDPM, noise draw for noise draw."""
    sched = DiffusionSchedule.from_name("linear", 200, 0.001, 0.03)
    x_T = torch.randn(2, 3, dtype=torch.float64)

    def den(x, t, cond):
        return _smooth(x, t)
    ddim = DDIMSampler(sched, 200, eta=1.0).sample(den, x_T, generator=torch.Generator().manual_seed(5),
                                                   progress=False)
    ddpm = DDPMSampler(sched).sample(den, x_T, generator=torch.Generator().manual_seed(5), progress=False)
    torch.testing.assert_close(ddim, ddpm, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name, kwargs, tol", [("ddpm", {}, 1e-5), ("ddim", {"num_steps": 5}, 1e-5),
                                             ("dpmpp_2m", {"num_steps": 5}, 0.3)])
def test_clip_denoised_clamps_the_x0_prediction(name, kwargs, tol):
    sched = DiffusionSchedule.from_name("linear", 50, 0.001, 0.05)
    x_T = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))

    def far_out(x, t, cond):  # an x0-predictor saying "5" everywhere
        return torch.full_like(x, 5.0)
    runs = [get_sampler(name, schedule=sched, parameterization="x0", clip_denoised=clip, **kwargs).sample(
        far_out, x_T, generator=torch.Generator().manual_seed(1), progress=False) for clip in (False, True)]
    # DDPM and DDIM end on the x0 prediction; DPM-Solver++ ends at t = 0, near it.
    torch.testing.assert_close(runs[0], torch.full_like(x_T, 5.0), rtol=0, atol=tol)
    torch.testing.assert_close(runs[1], torch.ones_like(x_T), rtol=0, atol=tol)


# ---------------------------------------------------------------- Gaussian toy problem

MU, STD = 1.0, 0.5


def _exact(parameterization):
    """The exact denoiser for data N(MU, STD^2) under the linear 0.00085/0.012 schedule."""
    abar = _linear().alphas_cumprod

    def denoiser(x, t, cond):
        ab = abar[t].to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        a, s = ab.sqrt(), (1 - ab).sqrt()
        eps = s * (x - a * MU) / (a * a * STD**2 + s * s)
        x0 = (x - s * eps) / a
        return {"eps": eps, "x0": x0, "v": a * eps - s * x0}[parameterization]
    return denoiser


def _start(t, n, dtype=torch.float32, seed=0):
    """n draws of the exact marginal at timestep t, with standardised noise."""
    z = torch.randn(n, 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    z = (z - z.mean()) / z.std()
    abar = _linear().alphas_cumprod[t]
    return (abar.sqrt() * MU + (abar * STD**2 + 1 - abar).sqrt() * z).to(dtype)


@pytest.mark.parametrize("name, kwargs, n, mean_tol, std_tol", [
    ("ddpm", {}, 4000, 0.03, 0.02),
    ("ddim", {"num_steps": 200, "eta": 1.0}, 4000, 0.03, 0.03),
    ("ddim", {"num_steps": 50, "eta": 0.0}, 10000, 0.005, 0.03),
    ("plms", {"num_steps": 20}, 10000, 0.005, 0.015),
    ("dpmpp_2m", {"num_steps": 10}, 10000, 0.005, 0.015),
    ("dpmpp_3m", {"num_steps": 10}, 10000, 0.005, 0.015),
    ("dpmpp_2m_sde", {"num_steps": 50}, 10000, 0.03, 0.03),
    ("dpmpp_3m_sde", {"num_steps": 50}, 10000, 0.03, 0.03),
    ("heun", {"num_steps": 10}, 10000, 0.005, 0.03),  # time-uniform steps: coarse at low noise
])
def test_gaussian_toy_statistics(name, kwargs, n, mean_tol, std_tol):
    sampler = get_sampler(name, schedule=_linear(), **kwargs)
    x_T = _start(int(sampler.timesteps.max()), n)
    out = sampler.sample(_exact("eps"), x_T, generator=torch.Generator().manual_seed(1), progress=False)
    assert abs(out.mean().item() - MU) < mean_tol
    assert abs(out.std().item() - STD) < std_tol


@pytest.mark.parametrize("name, kwargs", [("ddim", {"num_steps": 10, "eta": 1.0}), ("plms", {"num_steps": 6}),
                                          ("dpmpp_2m", {"num_steps": 6}), ("dpmpp_3m_sde", {"num_steps": 6}),
                                          ("heun", {"num_steps": 4}), ("ddpm", {})])
@pytest.mark.parametrize("parameterization", ["x0", "v"])
def test_parameterisations_sample_alike(name, kwargs, parameterization):
    x_T = _start(999, 64, torch.float64)
    runs = [get_sampler(name, schedule=_linear(), parameterization=p, **kwargs).sample(
        _exact(p), x_T, generator=torch.Generator().manual_seed(2), progress=False)
        for p in ("eps", parameterization)]
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-7, atol=1e-7)


def _ode_error(sampler) -> float:
    """Largest error against the exact probability-flow map of the Gaussian: (x_t - a mu) /
    sqrt(a^2 s^2 + sigma^2) is constant along the ODE, so x_T maps to a known x_0."""
    x_T = _start(999, 256, torch.float64)
    abar = _linear().alphas_cumprod
    z = (x_T - abar[999].sqrt() * MU) / (abar[999] * STD**2 + 1 - abar[999]).sqrt()
    exact = abar[0].sqrt() * MU + (abar[0] * STD**2 + 1 - abar[0]).sqrt() * z
    out = sampler.sample(_exact("eps"), x_T, progress=False)
    if sampler.name == "heun":  # it ends at sigma = 0, one step past t = 0
        out = (out - MU) * (abar[0] * STD**2 + 1 - abar[0]).sqrt() / STD + MU
    return (out - exact).abs().max().item()


@pytest.mark.parametrize("name, steps, first, ratio", [("dpmpp_2m", (10, 20), 0.06, 0.4),
                                                       ("dpmpp_3m", (10, 20), 0.03, 0.25),
                                                       ("heun", (10, 20), 0.08, 0.4)])
def test_ode_solvers_converge_at_their_order(name, steps, first, ratio):
    """Halving the step size cuts the error by about 2^order (2M, Heun: 4; 3M: 8, less where its
    lower-order first steps still count)."""
    errors = [_ode_error(get_sampler(name, schedule=_linear(), num_steps=n)) for n in steps]
    assert errors[0] < first and errors[1] < ratio * errors[0], errors


# Not (3, True): diffusers' third-order SDE update has -1/2 where the ODE's coefficient taken at
# step 2h gives +1/2 (ours), and it diverges on the Gaussian problem (std 2.4 for 0.5 at 50 steps).
@pytest.mark.parametrize("order, sde", [(2, False), (3, False), (2, True)])
def test_dpm_solvers_match_diffusers(order, sde):
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        solver_order=order, algorithm_type="sde-dpmsolver++" if sde else "dpmsolver++", lower_order_final=False,
        final_sigmas_type="sigma_min", timestep_spacing="linspace")
    scheduler.set_timesteps(8)
    x_T = _start(999, 32)
    x, den = x_T.clone(), _exact("eps")
    noise = torch.Generator().manual_seed(7)  # the same stream for both: one draw per step
    for t in scheduler.timesteps:
        extra = {"variance_noise": torch.randn(x.shape, generator=noise)} if sde else {}
        x = scheduler.step(den(x, torch.full((x.shape[0],), int(t)), None), t, x, **extra).prev_sample
    name = f"dpmpp_{order}m" + ("_sde" if sde else "")
    ours = get_sampler(name, schedule=_linear(), num_steps=8, spacing="time")
    assert ours.timesteps.flip(0)[:-1].tolist() == scheduler.timesteps.tolist()
    out = ours.sample(den, x_T, generator=torch.Generator().manual_seed(7), progress=False)
    torch.testing.assert_close(out, x, rtol=1e-5, atol=1e-5)


def _diffusers_karras_run(scheduler, den, x_T):
    """diffusers' Euler / Heun loop on the VP-space denoiser `den`: the sample is x / sqrt(abar),
    so it starts at x_T sqrt(sigma_max^2 + 1) (diffusers' init_noise_sigma is sigma_max with
    linspace spacing, a start slightly off the noised data's scale)."""
    x = x_T * (scheduler.sigmas[0] ** 2 + 1).sqrt()
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(x, t)
        x = scheduler.step(den(inp, torch.full((x.shape[0],), int(t)), None), t, x).prev_sample
    return x


def test_heun_and_euler_match_diffusers():
    """Heun against diffusers' HeunDiscreteScheduler; Euler (EulerDiscreteScheduler) is DDIM with
    eta = 0 on the same timesteps. 10 steps put linspace(0, 999) on integers."""
    diffusers = pytest.importorskip("diffusers")
    common = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  timestep_spacing="linspace")
    x_T, den = _start(999, 32, torch.float64).float(), _exact("eps")
    heun = diffusers.HeunDiscreteScheduler(**common)
    heun.set_timesteps(10)
    ours = get_sampler("heun", schedule=_linear(), num_steps=10)
    assert sorted(set(heun.timesteps.long().tolist())) == ours.timesteps.tolist()
    torch.testing.assert_close(ours.sample(den, x_T, progress=False), _diffusers_karras_run(heun, den, x_T),
                               rtol=1e-5, atol=1e-5)
    euler = diffusers.EulerDiscreteScheduler(**common)
    euler.set_timesteps(10)
    ddim = DDIMSampler(_linear(), 10, eta=0.0)
    assert ddim.timesteps.flip(0).tolist() == euler.timesteps.long().tolist()
    torch.testing.assert_close(ddim.sample(den, x_T, progress=False), _diffusers_karras_run(euler, den, x_T),
                               rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- guidance

def _conditional(x, t, cond):
    """A fake denoiser reading a dict condition."""
    return x * cond["crossattn"].mean(dim=(1, 2)).view(-1, 1, 1, 1) + cond["concat"]


def test_guidance_scale_one_is_the_conditional_call():
    x, t = torch.randn(2, 1, 3, 3), torch.tensor([5, 5])
    cond = {"crossattn": torch.randn(2, 4, 8), "concat": torch.randn(2, 1, 3, 3)}
    uncond = {"crossattn": torch.zeros(2, 4, 8), "concat": torch.zeros(2, 1, 3, 3)}
    calls = []

    def recording(x_, t_, c_):
        calls.append(x_.shape[0])
        return _conditional(x_, t_, c_)
    assert torch.equal(guided_output(recording, x, t, cond, uncond, 1.0), _conditional(x, t, cond))
    assert calls == [2]


def test_guidance_combines_doubled_batch_with_dict_condition():
    x, t = torch.randn(2, 1, 3, 3), torch.tensor([5, 5])
    cond = {"crossattn": torch.randn(2, 4, 8), "concat": torch.randn(2, 1, 3, 3)}
    uncond = {"crossattn": torch.randn(2, 4, 8), "concat": torch.zeros(2, 1, 3, 3)}
    seen = []

    def recording(x_, t_, c_):
        seen.append(c_)
        return _conditional(x_, t_, c_)
    out = guided_output(recording, x, t, cond, uncond, 3.0)
    out_u, out_c = _conditional(x, t, uncond), _conditional(x, t, cond)
    torch.testing.assert_close(out, out_u + 3.0 * (out_c - out_u))
    assert len(seen) == 1 and torch.equal(seen[0]["crossattn"][:2], uncond["crossattn"])
    assert torch.equal(seen[0]["crossattn"][2:], cond["crossattn"])


def test_condition_batching_rules():
    a, b = torch.zeros(1, 2), torch.ones(1, 2)
    assert concat_conditions(None, None) is None
    assert torch.equal(concat_conditions([a], [b])[0], torch.cat([a, b]))
    with pytest.raises(ValueError, match="keys"):
        concat_conditions({"c": a}, {"d": b})
    with pytest.raises(TypeError, match="same structure"):
        concat_conditions(a, {"c": b})
    with pytest.raises(ValueError, match="uncond"):
        guided_output(lambda x, t, c: x, a, torch.zeros(1), b, None, 2.0)


def test_sampler_with_guidance():
    x_T = torch.randn(2, 1, 3, 3, generator=torch.Generator().manual_seed(0))
    cond = {"crossattn": torch.rand(2, 4, 8), "concat": 0.1 * torch.randn(2, 1, 3, 3)}
    uncond = {"crossattn": torch.rand(2, 4, 8), "concat": torch.zeros(2, 1, 3, 3)}
    sampler = DDIMSampler(_linear(), 5)
    plain = sampler.sample(_conditional, x_T, cond, progress=False)
    same = sampler.sample(_conditional, x_T, cond, uncond=uncond, guidance_scale=1.0, progress=False)
    assert torch.equal(same, plain)
    guided = sampler.sample(_conditional, x_T, cond, uncond=uncond, guidance_scale=4.0, progress=False)
    assert not torch.allclose(guided, plain)
    # Guidance s on a denoiser linear in its condition's concat part equals the conditional
    # call with concat_u + s (concat_c - concat_u) when crossattn is shared.
    shared = {"crossattn": cond["crossattn"], "concat": uncond["concat"]}
    mixed = {"crossattn": cond["crossattn"], "concat": 4.0 * cond["concat"]}
    torch.testing.assert_close(
        sampler.sample(_conditional, x_T, cond, uncond=shared, guidance_scale=4.0, progress=False),
        sampler.sample(_conditional, x_T, mixed, progress=False), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- seeds and masks

def test_noise_for_seeds_is_per_image():
    x, gens = noise_for_seeds([5, 9], (3, 4, 4))
    assert x.shape == (2, 3, 4, 4) and len(gens) == 2
    assert torch.equal(x[1], torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(9)))


@pytest.mark.parametrize("name, kwargs", [("ddim", {"num_steps": 8, "eta": 1.0}), ("ddpm", {})])
def test_per_image_seeds_do_not_depend_on_batch_size(name, kwargs):
    sched = DiffusionSchedule.from_name("linear", 100, 0.001, 0.02)
    sampler = get_sampler(name, schedule=sched, **kwargs)
    seeds = [11, 12, 13, 14]
    mask = torch.zeros(1, 2, 4, 4)
    mask[..., :2] = 1
    known = torch.randn(1, 2, 4, 4)

    def run(batch_seeds):
        x_T, gens = noise_for_seeds(batch_seeds, (2, 4, 4))
        return sampler.sample(lambda x, t, c: _smooth(x, t), x_T, mask=mask, x0=known, generator=gens,
                              progress=False)
    batch = run(seeds)
    for i, seed in enumerate(seeds):
        torch.testing.assert_close(run([seed])[0], batch[i], rtol=0, atol=1e-6)
    assert not torch.allclose(batch[0], batch[1])


def test_masked_sampling_keeps_the_known_region():
    x0 = torch.randn(2, 3, 6, 6)
    mask = torch.zeros(2, 1, 6, 6)
    mask[..., :3] = 1  # left half known
    x_T = torch.randn(2, 3, 6, 6)
    den = Recorder(lambda x, t: 0.2 * torch.tanh(x))
    out = DDIMSampler(_linear(), 10).sample(den, x_T, mask=mask, x0=x0,
                                            generator=torch.Generator().manual_seed(4), progress=False)
    known = mask.expand_as(x0).bool()
    assert torch.equal(out[known], x0[known])
    assert not torch.allclose(out[~known], x0[~known], atol=0.1)
    # Before the first step the known region is x0 noised to level 999 with the first draw.
    abar = _linear().alphas_cumprod[999].item()
    first_noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(4))
    first = math.sqrt(abar) * x0 + math.sqrt(1 - abar) * first_noise
    torch.testing.assert_close(den.calls[0][0][known], first[known])
    torch.testing.assert_close(den.calls[0][0][~known], x_T[~known])
    with pytest.raises(ValueError, match="both mask and x0"):
        DDIMSampler(_linear(), 10).sample(den, x_T, mask=mask, progress=False)


def test_compat_masked_sampling_does_not_paste_at_the_end():
    x0 = torch.randn(1, 1, 4, 4)
    mask = torch.ones(1, 1, 4, 4)
    out = DDIMSampler(_linear(), 10, compat=True).sample(lambda x, t, c: torch.zeros_like(x), torch.randn(1, 1, 4, 4),
                                                         mask=mask, x0=x0, progress=False)
    # The last step leaves x0 noised to level 1 and rescaled to abar[0]: close, not equal.
    assert not torch.equal(out, x0)
    torch.testing.assert_close(out, x0, rtol=0, atol=0.25)


# ---------------------------------------------------------------- partial runs (img2img)

@pytest.mark.parametrize("name, kwargs, calls", [
    ("ddim", {"num_steps": 10}, lambda k: k), ("plms", {"num_steps": 10}, lambda k: k + 1),
    ("dpmpp_3m", {"num_steps": 10}, lambda k: k), ("dpmpp_2m_sde", {"num_steps": 10}, lambda k: k),
    ("heun", {"num_steps": 10}, lambda k: 2 * k - 1), ("ddpm", {}, lambda k: k)])
def test_a_partial_run_takes_the_last_steps_of_the_grid(name, kwargs, calls):
    sampler = get_sampler(name, schedule=_linear(), **kwargs)
    k = 4
    den = Recorder(_smooth)
    sampler.sample(den, torch.randn(2, 3), generator=torch.Generator().manual_seed(0), progress=False, steps=k)
    assert len(den.calls) == calls(k)
    assert int(den.calls[0][1][0]) == sampler.start_timestep(k)
    # down to the grid's last network call (DPM-Solver's grid ends at t = 0, which it never calls)
    assert int(den.calls[-1][1][0]) == int(sampler.timesteps[1 if name.startswith("dpmpp") else 0])
    for bad in (0, sampler.num_steps + 1):
        with pytest.raises(ValueError, match="steps must lie in"):
            sampler.sample(den, torch.randn(2, 3), progress=False, steps=bad)


@pytest.mark.parametrize("name", ["ddim", "heun"])
def test_a_partial_run_from_the_full_runs_state_ends_where_the_full_run_ends(name):
    """Samplers without history: starting the last k steps from the full run's state there gives
    the full run's result."""
    sampler = get_sampler(name, schedule=_linear(), num_steps=10)
    den = Recorder(_smooth)
    x_T = torch.randn(3, 2, generator=torch.Generator().manual_seed(4))
    full = sampler.sample(den, x_T, progress=False)
    k = 4
    start = sampler.start_timestep(k)
    state = [x for x, t, _ in den.calls if int(t[0]) == start][-1]  # Heun: after the corrector call there
    torch.testing.assert_close(sampler.sample(den, state, progress=False, steps=k), full, rtol=1e-6, atol=1e-6)
