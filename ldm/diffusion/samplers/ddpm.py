"""Ancestral DDPM sampling (Ho et al. 2020) through all T timesteps with the true posterior."""
from __future__ import annotations

import torch

from ldm.diffusion.samplers.base import Sampler, SamplingRun
from ldm.diffusion.schedule import DiffusionSchedule


class DDPMSampler(Sampler):
    """x_{t-1} = coef1_t x0_hat + coef2_t x_t + exp(log_var_t / 2) z for t = T-1 .. 0, with no
    noise at t = 0 (the posterior q(x_{t-1} | x_t, x0_hat) of the schedule)."""

    name = "ddpm"

    def __init__(self, schedule: DiffusionSchedule, parameterization: str = "eps",
                 clip_denoised: bool = False):
        super().__init__(schedule, parameterization, clip_denoised)
        self.timesteps = torch.arange(schedule.num_timesteps)
        self.coef1 = schedule.posterior_mean_coef1.tolist()
        self.coef2 = schedule.posterior_mean_coef2.tolist()
        self.std = (0.5 * schedule.posterior_log_variance_clipped).exp().tolist()

    @property
    def num_steps(self) -> int:
        return self.schedule.num_timesteps

    def _sample(self, run: SamplingRun, x: torch.Tensor) -> torch.Tensor:
        for t in run.step_indices():
            x = run.impose_known(x, t)
            _, x0 = run.predict(x, t)
            x = self.coef1[t] * x0 + self.coef2[t] * x
            if t > 0:
                x = x + self.std[t] * run.noise_like(x)
        return x
