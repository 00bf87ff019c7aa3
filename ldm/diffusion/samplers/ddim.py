"""DDIM (Song et al. 2021) on a subsequence of the discrete timesteps."""
from __future__ import annotations

import math

import torch

from ldm.diffusion.samplers.base import Sampler, SamplingRun, select_timesteps
from ldm.diffusion.schedule import DiffusionSchedule


def ddim_coefficients(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, eta: float,
                      final_alpha: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(alphas, alphas_prev, sigmas) per selected timestep, in the dtype of alphas_cumprod.

    alphas = abar[tau_i]; alphas_prev = [final_alpha, abar[tau_0], ..., abar[tau_{S-2}]];
    sigma = eta sqrt((1 - a_prev) / (1 - a)) sqrt(1 - a / a_prev).
    """
    alphas = alphas_cumprod[timesteps]
    alphas_prev = torch.cat([alphas.new_tensor([final_alpha]), alphas[:-1]])
    sigmas = eta * ((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev)).sqrt()
    return alphas, alphas_prev, sigmas


def ddim_step(x0: torch.Tensor, eps: torch.Tensor, alpha_prev: float, sigma: float,
              noise: torch.Tensor | None) -> torch.Tensor:
    """x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma noise."""
    x_prev = math.sqrt(alpha_prev) * x0 + math.sqrt(max(1.0 - alpha_prev - sigma**2, 0.0)) * eps
    if sigma > 0:
        x_prev = x_prev + sigma * noise
    return x_prev


class DDIMSampler(Sampler):
    """DDIM with `num_steps` steps and stochasticity eta (0: deterministic, 1: ancestral-like).

    compat=True reproduces the reference LDM sampler: its timesteps (see `select_timesteps`),
    a last step that lands on abar[0] instead of clean data, and no final paste of the known
    region in masked sampling. Otherwise the last step lands on abar = 1.
    """

    name = "ddim"

    def __init__(self, schedule: DiffusionSchedule, num_steps: int = 50, eta: float = 0.0,
                 discretize: str = "uniform", compat: bool = False, parameterization: str = "eps",
                 clip_denoised: bool = False):
        super().__init__(schedule, parameterization, clip_denoised)
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"DDIM eta must lie in [0, 1], got {eta}")
        self.eta, self.compat = eta, compat
        self.timesteps = select_timesteps(schedule.num_timesteps, num_steps, discretize, compat)
        final_alpha = float(schedule.alphas_cumprod[0]) if compat else 1.0
        self.alphas, self.alphas_prev, self.sigmas = ddim_coefficients(
            schedule.alphas_cumprod, self.timesteps, eta, final_alpha)

    @property
    def num_steps(self) -> int:
        return self.timesteps.numel()

    def table(self) -> dict[str, torch.Tensor]:
        """The step tables as the reference names them: timesteps, alphas, alphas_prev, sigmas."""
        return {"timesteps": self.timesteps, "alphas": self.alphas,
                "alphas_prev": self.alphas_prev, "sigmas": self.sigmas}

    def _sample(self, run: SamplingRun, x: torch.Tensor) -> torch.Tensor:
        for i in run.step_indices():
            t = int(self.timesteps[i])
            x = run.impose_known(x, t)
            eps, x0 = run.predict(x, t)
            sigma = float(self.sigmas[i])
            noise = run.noise_like(x) if sigma > 0 else None
            x = ddim_step(x0, eps, float(self.alphas_prev[i]), sigma, noise)
        return x
