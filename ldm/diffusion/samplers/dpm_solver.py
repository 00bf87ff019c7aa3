"""DPM-Solver++(2M) (Lu et al. 2022): a second-order multistep solver of the probability-flow
ODE in data-prediction form, on the discrete timesteps, with lambda = log(alpha / sigma)."""
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


class DPMSolverPP2MSampler(Sampler):
    """DPM-Solver++(2M) with `num_steps` network calls, from t = T - 1 to t = 0, at timesteps
    spaced by `spacing` (see `solver_timesteps`).

    Step i (t -> t_next, h = lambda_next - lambda_t) with data predictions D_i:
    x_next = (sigma_next / sigma_t) x - alpha_next (exp(-h) - 1) D, where D = D_i on the first
    step and (1 + 1/(2r)) D_i - 1/(2r) D_{i-1} with r = h_{i-1} / h afterwards.
    """

    name = "dpmpp_2m"

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

    def _sample(self, run: SamplingRun, x: torch.Tensor) -> torch.Tensor:
        previous: tuple[torch.Tensor, float] | None = None
        for i in run.progress(reversed(range(self.num_steps)), self.num_steps):
            t, t_next = int(self.timesteps[i + 1]), int(self.timesteps[i])
            x = run.impose_known(x, t)
            _, data = run.predict(x, t)
            h = self.lambdas[t_next] - self.lambdas[t]
            if previous is None:
                d = data
            else:
                data_prev, h_prev = previous
                half_inv_r = h / (2 * h_prev)
                d = (1 + half_inv_r) * data - half_inv_r * data_prev
            x = (self.sigma[t_next] / self.sigma[t]) * x - self.alpha[t_next] * math.expm1(-h) * d
            previous = (data, h)
        return x
