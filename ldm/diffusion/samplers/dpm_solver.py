"""DPM-Solver++ (Lu et al. 2022): multistep solvers in data-prediction form on the discrete
timesteps, with lambda = log(alpha / sigma): 2M and 3M for the probability-flow ODE, and their
SDE variants (the "SDE-DPM-Solver++" of the same paper), which add fresh noise every step."""
from __future__ import annotations

import math

import torch

from ldm.diffusion.samplers.base import Sampler, SamplingRun
from ldm.diffusion.schedule import DiffusionSchedule

SPACINGS = ("logsnr", "time")


def solver_timesteps(lambdas: torch.Tensor, num_steps: int, spacing: str = "logsnr") -> torch.Tensor:
    """num_steps + 1 distinct integer timesteps from 0 to T - 1, increasing (long tensor).

    `lambdas` holds log(alpha_t / sigma_t) for t = 0..T-1. spacing 'logsnr' picks the timesteps
    whose lambda is nearest to an even grid in lambda (steps crowded together where lambda moves
    fast, i.e. near t = 0, are pushed apart to stay distinct); 'time' spaces them evenly in t.
    'logsnr' suits the linear LDM schedules; the cosine schedule's clipped betas send lambda at
    T - 1 to about -10, where 'logsnr' would spend several steps: use 'time' there.
    """
    T = lambdas.numel()
    if not 1 <= num_steps <= T - 1:
        raise ValueError(f"DPM-Solver++ needs 1..{T - 1} steps on a schedule of {T} timesteps, "
                         f"got {num_steps}")
    if spacing == "time":
        return torch.linspace(0, T - 1, num_steps + 1, dtype=torch.float64).round().long()
    if spacing != "logsnr":
        raise ValueError(f"unknown spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")
    grid = torch.linspace(float(lambdas[-1]), float(lambdas[0]), num_steps + 1, dtype=torch.float64)
    steps = (lambdas.double()[None, :] - grid[:, None]).abs().argmin(dim=1)
    steps[0], steps[-1] = T - 1, 0
    # Two passes make them strictly decreasing: push up from t = 0, then clamp down from T - 1.
    for k in range(num_steps - 1, 0, -1):
        steps[k] = max(int(steps[k]), int(steps[k + 1]) + 1)
    for k in range(1, num_steps):
        steps[k] = min(int(steps[k]), int(steps[k - 1]) - 1)
    return steps.flip(0)


class DPMSolverPPSampler(Sampler):
    """DPM-Solver++ of order `order` (2 or 3) with `num_steps` network calls, from t = T - 1 to
    t = 0, at timesteps spaced by `spacing` (see `solver_timesteps`); the first steps use the
    orders the history allows (1, then 2). `stochastic`: the SDE variant.

    Step t -> t_next with h = lambda_next - lambda_t and data predictions m0 (now), m1, m2 (the
    previous steps, at lambda gaps h_0 = r0 h, h_1 = r1 h): D1 = (m0 - m1) / r0 at second order;
    at third order D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1) and D2 = (D1_0 - D1_1) / (r0 + r1), with
    D1_0 = (m0 - m1) / r0, D1_1 = (m1 - m2) / r1. Then, with a = alpha_next, s = sigma_next, E = expm1(-h):
    ODE: x_next = (s / sigma_t) x - a E m0 - a E D1 / 2 (2M) or + a (E / h + 1) D1 - a ((E + h) / h^2 - 1/2) D2 (3M).
    SDE: with F = -expm1(-2h): x_next = (s / sigma_t) e^-h x + a F m0 + a F D1 / 2 (2M)
    or + a (F / (-2h) + 1) D1 + a ((F - 2h) / (2h)^2 + 1/2) D2 (3M), + s sqrt(F) noise.
    """

    order = 2
    stochastic = False

    def __init__(self, schedule: DiffusionSchedule, num_steps: int = 20, spacing: str = "logsnr",
                 parameterization: str = "eps", clip_denoised: bool = False):
        super().__init__(schedule, parameterization, clip_denoised)
        abar = schedule.alphas_cumprod
        lambdas = 0.5 * (abar.log() - torch.log1p(-abar))
        self.timesteps = solver_timesteps(lambdas, num_steps, spacing)
        self.alpha = abar.sqrt().tolist()
        self.sigma = (1 - abar).sqrt().tolist()
        self.lambdas = lambdas.tolist()

    @property
    def num_steps(self) -> int:
        return self.timesteps.numel() - 1

    def start_timestep(self, steps: int) -> int:
        """Step i goes from timesteps[i + 1] to timesteps[i] (the grid includes its end, t = 0)."""
        self._check_steps(steps)
        return int(self.timesteps[steps])

    def _sample(self, run: SamplingRun, x: torch.Tensor) -> torch.Tensor:
        history: list[tuple[torch.Tensor, float]] = []  # (data prediction, its lambda), newest last
        for i in run.step_indices():
            t, t_next = int(self.timesteps[i + 1]), int(self.timesteps[i])
            x = run.impose_known(x, t)
            _, m0 = run.predict(x, t)
            lam = self.lambdas[t]
            h = self.lambdas[t_next] - lam
            order = min(self.order, len(history) + 1)
            d1 = d2 = None
            if order >= 2:
                m1, lam1 = history[-1]
                r0 = (lam - lam1) / h
                d1_0 = (m0 - m1) / r0
                d1 = d1_0
                if order == 3:
                    m2, lam2 = history[-2]
                    r1 = (lam1 - lam2) / h
                    d1_1 = (m1 - m2) / r1
                    d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
                    d2 = (d1_0 - d1_1) / (r0 + r1)
            x = self._update(run, x, t, t_next, h, m0, d1, d2)
            history = [*history[-1:], (m0, lam)]
        return x

    def _update(self, run: SamplingRun, x: torch.Tensor, t: int, t_next: int, h: float, m0: torch.Tensor,
                d1: torch.Tensor | None, d2: torch.Tensor | None) -> torch.Tensor:
        """x at t_next from x at t and the differences (None where the order is lower)."""
        a, s = self.alpha[t_next], self.sigma[t_next]
        if not self.stochastic:
            e = math.expm1(-h)
            x = (s / self.sigma[t]) * x - a * e * m0
            if d2 is not None:
                return x + a * (e / h + 1) * d1 - a * ((e + h) / h**2 - 0.5) * d2
            return x if d1 is None else x - 0.5 * a * e * d1
        f = -math.expm1(-2 * h)
        x = (s / self.sigma[t] * math.exp(-h)) * x + a * f * m0 + s * math.sqrt(f) * run.noise_like(x)
        if d2 is not None:
            # The ODE's coefficients at step 2h (the SDE's weight is 2 e^(-2(h - tau))). diffusers 0.42
            # has -0.5 in the last one, which diverges on the Gaussian test problem.
            return x + a * (f / (-2 * h) + 1) * d1 + a * ((f - 2 * h) / (2 * h) ** 2 + 0.5) * d2
        return x if d1 is None else x + 0.5 * a * f * d1


class DPMSolverPP2MSampler(DPMSolverPPSampler):
    """DPM-Solver++(2M): second order, deterministic (the probability-flow ODE)."""

    name = "dpmpp_2m"


class DPMSolverPP3MSampler(DPMSolverPPSampler):
    """DPM-Solver++(3M): third order, deterministic."""

    name = "dpmpp_3m"
    order = 3


class DPMSolverPP2MSDESampler(DPMSolverPPSampler):
    """SDE-DPM-Solver++(2M): second order, fresh noise every step (the `generator`'s)."""

    name = "dpmpp_2m_sde"
    stochastic = True


class DPMSolverPP3MSDESampler(DPMSolverPPSampler):
    """SDE-DPM-Solver++(3M): third order, fresh noise every step."""

    name = "dpmpp_3m_sde"
    order = 3
    stochastic = True
