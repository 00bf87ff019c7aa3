"""Samplers of the reverse diffusion process behind one interface (`Sampler.sample`), and a
registry to build them by name: ddpm, ddim, plms, dpmpp_2m / dpmpp_3m (and _sde), heun."""
from __future__ import annotations

from typing import Any

from ldm.diffusion.samplers.base import Sampler, select_timesteps
from ldm.diffusion.samplers.ddim import DDIMSampler
from ldm.diffusion.samplers.ddpm import DDPMSampler
from ldm.diffusion.samplers.dpm_solver import (
    DPMSolverPP2MSampler,
    DPMSolverPP2MSDESampler,
    DPMSolverPP3MSampler,
    DPMSolverPP3MSDESampler,
)
from ldm.diffusion.samplers.heun import HeunSampler
from ldm.diffusion.samplers.noise import draw_noise, generators_for_seeds, noise_for_seeds
from ldm.diffusion.samplers.plms import PLMSSampler

SAMPLERS: dict[str, type[Sampler]] = {
    "ddpm": DDPMSampler,
    "ddim": DDIMSampler,
    "plms": PLMSSampler,
    "dpmpp_2m": DPMSolverPP2MSampler,
    "dpmpp_3m": DPMSolverPP3MSampler,
    "dpmpp_2m_sde": DPMSolverPP2MSDESampler,
    "dpmpp_3m_sde": DPMSolverPP3MSDESampler,
    "heun": HeunSampler,
}


def get_sampler(name: str, **kwargs: Any) -> Sampler:
    """The sampler registered as `name`, built with `kwargs` (schedule, num_steps, eta, ...)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name](**kwargs)


__all__ = [
    "SAMPLERS", "DDIMSampler", "DDPMSampler", "DPMSolverPP2MSampler", "DPMSolverPP2MSDESampler",
    "DPMSolverPP3MSampler", "DPMSolverPP3MSDESampler", "HeunSampler", "PLMSSampler", "Sampler",
    "draw_noise", "generators_for_seeds", "get_sampler", "noise_for_seeds", "select_timesteps",
]
