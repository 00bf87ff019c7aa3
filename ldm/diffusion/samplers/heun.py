"""Heun's second-order method for the probability-flow ODE in the sigma parameterisation of
Karras et al. 2022 (EDM, Algorithm 1 without churn), on the discrete timesteps of the schedule.

With sigma_t = sqrt((1 - abar_t) / abar_t) and y = x / sqrt(abar_t), the ODE is dy/dsigma = eps;
the network is called at integer timesteps only. Euler's method in the same variables is DDIM
with eta = 0 (tests/test_samplers.py checks both against diffusers), so it has no sampler of its own.
"""
from __future__ import annotations

import torch

from ldm.diffusion.samplers.base import Sampler, SamplingRun, select_timesteps
from ldm.diffusion.schedule import DiffusionSchedule


class HeunSampler(Sampler):
    """EDM Heun on `num_steps` timesteps spread evenly over 0..T-1, then down to sigma = 0: an
    Euler step to the next noise level corrected by the slope there (the last step, to sigma = 0,
    stays Euler), i.e. 2 num_steps - 1 network calls.

    From sigma_i to sigma_next: d = eps(y_i); y' = y_i + (sigma_next - sigma_i) d; if sigma_next > 0,
    y_next = y_i + (sigma_next - sigma_i) (d + eps(y')) / 2.
    """

    name = "heun"

    def __init__(self, schedule: DiffusionSchedule, num_steps: int = 20, parameterization: str = "eps",
                 clip_denoised: bool = False):
        super().__init__(schedule, parameterization, clip_denoised)
        self.timesteps = select_timesteps(schedule.num_timesteps, num_steps)
        abar = schedule.alphas_cumprod.double()
        self.scale = abar.sqrt().tolist()               # sqrt(abar_t): x = scale * y
        self.sigmas = ((1 - abar) / abar).sqrt().tolist()

    @property
    def num_steps(self) -> int:
        return self.timesteps.numel()

    def _slope(self, run: SamplingRun, y: torch.Tensor, t: int) -> torch.Tensor:
        eps, _ = run.predict(y * self.scale[t], t)
        return eps

    def _sample(self, run: SamplingRun, x: torch.Tensor) -> torch.Tensor:
        y = x / self.scale[int(self.timesteps[run.steps - 1])]
        for i in run.step_indices():
            t = int(self.timesteps[i])
            y = run.impose_known(y * self.scale[t], t) / self.scale[t]
            d = self._slope(run, y, t)
            if i == 0:
                y = y - self.sigmas[t] * d  # Euler to sigma = 0: the data prediction
            else:
                t_next = int(self.timesteps[i - 1])
                dt = self.sigmas[t_next] - self.sigmas[t]
                y = y + dt * 0.5 * (d + self._slope(run, y + dt * d, t_next))
        return y
