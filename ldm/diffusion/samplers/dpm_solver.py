"""DPM-Solver++(2M) (Lu et al. 2022): a second-order multistep solver of the probability-flow
ODE in data-prediction form, on the discrete timesteps, with lambda = log(alpha / sigma)."""
from __future__ import annotations

import math

import torch

from ldm.diffusion.samplers.base import Sampler, SamplingRun
from ldm.diffusion.schedule import DiffusionSchedule


def solver_timesteps(num_timesteps: int, num_steps: int) -> torch.Tensor:
    """num_steps + 1 distinct integer timesteps evenly spaced from T - 1 down to 0."""
    if not 1 <= num_steps <= num_timesteps - 1:
        raise ValueError(f"DPM-Solver++ needs 1..{num_timesteps - 1} steps on a schedule of "
                         f"{num_timesteps} timesteps, got {num_steps}")
    return torch.linspace(num_timesteps - 1, 0, num_steps + 1, dtype=torch.float64).round().long()


class DPMSolverPP2MSampler(Sampler):
    """DPM-Solver++(2M) with `num_steps` network calls, from t = T - 1 to t = 0.

    Step i (t -> t_next, h = lambda_next - lambda_t) with data predictions D_i:
    x_next = (sigma_next / sigma_t) x - alpha_next (exp(-h) - 1) D, where D = D_i on the first
    step and (1 + 1/(2r)) D_i - 1/(2r) D_{i-1} with r = h_{i-1} / h afterwards.
    """

    name = "dpmpp_2m"

    def __init__(self, schedule: DiffusionSchedule, num_steps: int = 20, parameterization: str = "eps",
                 clip_denoised: bool = False):
        super().__init__(schedule, parameterization, clip_denoised)
        self.timesteps = solver_timesteps(schedule.num_timesteps, num_steps)
        abar = schedule.alphas_cumprod
        self.alpha = abar.sqrt().tolist()
        self.sigma = (1 - abar).sqrt().tolist()
        self.lambdas = (0.5 * (abar.log() - torch.log1p(-abar))).tolist()

    @property
    def num_steps(self) -> int:
        return self.timesteps.numel() - 1

    def _sample(self, run: SamplingRun, x: torch.Tensor) -> torch.Tensor:
        previous: tuple[torch.Tensor, float] | None = None
        for i in run.progress(range(self.num_steps), self.num_steps):
            t, t_next = int(self.timesteps[i]), int(self.timesteps[i + 1])
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
