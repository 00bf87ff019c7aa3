"""PLMS (pseudo linear multi-step, Liu et al. 2022) as in the reference LDM: deterministic DDIM
steps driven by an Adams-Bashforth combination of the last network outputs."""
from __future__ import annotations

import torch

from ldm.diffusion.objective import eps_x0_from_output
from ldm.diffusion.samplers.base import Sampler, SamplingRun, select_timesteps
from ldm.diffusion.samplers.ddim import ddim_coefficients, ddim_step
from ldm.diffusion.schedule import DiffusionSchedule


def plms_eps(eps: torch.Tensor, history: list[torch.Tensor]) -> torch.Tensor:
    """Adams-Bashforth combination of the current output with up to three earlier ones
    (history is oldest first; it must not be empty: the first step is the improved-Euler one)."""
    if len(history) == 1:
        return (3 * eps - history[-1]) / 2
    if len(history) == 2:
        return (23 * eps - 16 * history[-1] + 5 * history[-2]) / 12
    return (55 * eps - 59 * history[-1] + 37 * history[-2] - 9 * history[-3]) / 24


class PLMSSampler(Sampler):
    """PLMS with `num_steps` steps (eta is 0). The first step averages the outputs at x_t and at
    a DDIM step from it (two network calls); later steps use the multistep formula.

    The timesteps, the final target and compat mode are those of `DDIMSampler`.
    """

    name = "plms"

    def __init__(self, schedule: DiffusionSchedule, num_steps: int = 50, discretize: str = "uniform",
                 compat: bool = False, parameterization: str = "eps", clip_denoised: bool = False):
        super().__init__(schedule, parameterization, clip_denoised)
        self.compat = compat
        self.timesteps = select_timesteps(schedule.num_timesteps, num_steps, discretize, compat)
        final_alpha = float(schedule.alphas_cumprod[0]) if compat else 1.0
        self.alphas, self.alphas_prev, _ = ddim_coefficients(
            schedule.alphas_cumprod, self.timesteps, 0.0, final_alpha)

    @property
    def num_steps(self) -> int:
        return self.timesteps.numel()

    def _sample(self, run: SamplingRun, x: torch.Tensor) -> torch.Tensor:
        history: list[torch.Tensor] = []
        for i in run.step_indices():
            t = int(self.timesteps[i])
            t_next = int(self.timesteps[max(i - 1, 0)])
            alpha_prev = float(self.alphas_prev[i])
            x = run.impose_known(x, t)
            eps, x0 = run.predict(x, t)
            if history:
                eps_prime = plms_eps(eps, history)
            else:
                eps_next, _ = run.predict(ddim_step(x0, eps, alpha_prev, 0.0, None), t_next)
                eps_prime = (eps + eps_next) / 2
            _, x0_prime = eps_x0_from_output("eps", eps_prime, x, *run.coefficients(t))
            x = ddim_step(x0_prime, eps_prime, alpha_prev, 0.0, None)
            history = (history + [eps])[-3:]
        return x
