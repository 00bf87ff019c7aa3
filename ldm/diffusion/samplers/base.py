"""One interface for every sampler, and the choice of timesteps for the skipping samplers.

A sampler is built from a schedule and its own settings (steps, eta, ...); `sample` takes a
`denoiser(x, t, cond) -> model output` where t is a long tensor of integer timesteps (B,), the
starting noise x_T, and optionally a condition with classifier-free guidance, a mask with known
content (inpainting) and per-image noise generators.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from ldm.diffusion.guidance import Condition, Denoiser, guided_output
from ldm.diffusion.objective import check_parameterization, eps_x0_from_output
from ldm.diffusion.samplers.noise import NoiseGenerator, draw_noise
from ldm.diffusion.schedule import DiffusionSchedule

TIMESTEP_METHODS = ("uniform", "quad")


def select_timesteps(num_timesteps: int, num_steps: int, method: str = "uniform",
                     compat: bool = False) -> torch.Tensor:
    """Increasing integer timesteps (long tensor) at which a skipping sampler calls the network.

    compat=True reproduces the reference LDM exactly: uniform takes c = T // S and
    arange(0, T, c) + 1, which has ceil(T / c) entries (not always S); quad takes
    floor(linspace(0, sqrt(0.8 T), S)^2) + 1, repeats included. Step counts for which the
    reference would pick timestep T (and crash) raise a ValueError.
    Otherwise exactly S distinct timesteps: uniform spreads them evenly over 0..T-1, both ends
    included (a single step sits at T - 1); quad is the reference's quad spacing with repeats
    pushed up.
    """
    T, S = num_timesteps, num_steps
    if method not in TIMESTEP_METHODS:
        raise ValueError(f"unknown timestep method {method!r}; choose one of {', '.join(TIMESTEP_METHODS)}")
    if not 1 <= S <= T:
        raise ValueError(f"the number of sampling steps must lie in 1..{T} (the number of diffusion "
                         f"timesteps), got {S}")
    if method == "quad":
        # numpy as in the reference: floor() of the squares must agree to the last bit.
        steps = torch.from_numpy((np.linspace(0, np.sqrt(T * 0.8), S) ** 2).astype(np.int64) + 1)
    elif compat:
        c = T // S
        steps = torch.arange(0, T, c) + 1
    elif S == 1:
        return torch.tensor([T - 1])
    else:
        return torch.linspace(0, T - 1, S, dtype=torch.float64).round().long()
    if compat:
        if int(steps.max()) > T - 1:
            raise ValueError(f"the reference {method} DDIM schedule with {S} steps selects timestep "
                             f"{int(steps.max())}, beyond the last one ({T - 1}), and crashes; choose "
                             "another number of steps or set compat=False")
        return steps
    for i in range(1, S):
        steps[i] = max(int(steps[i]), int(steps[i - 1]) + 1)
    if int(steps[-1]) > T - 1:
        raise ValueError(f"quad spacing cannot place {S} distinct timesteps below {T}; use fewer steps "
                         "or the uniform method")
    return steps


class SamplingRun:
    """The per-call state of `Sampler.sample`: guided, parameterisation-aware predictions,
    noise draws and the re-imposition of known content."""

    def __init__(self, sampler: Sampler, denoiser: Denoiser, cond: Condition, uncond: Condition,
                 guidance_scale: float, mask: torch.Tensor | None, x0: torch.Tensor | None,
                 generator: NoiseGenerator, progress: bool, steps: int):
        self.sampler, self.denoiser, self.steps = sampler, denoiser, steps
        self.cond, self.uncond, self.guidance_scale = cond, uncond, guidance_scale
        self.mask, self.x0, self.generator, self.progress_enabled = mask, x0, generator, progress

    def coefficients(self, t: int) -> tuple[float, float]:
        """(sqrt(abar_t), sqrt(1 - abar_t))."""
        abar = self.sampler.alphas_cumprod[t]
        return math.sqrt(abar), math.sqrt(1.0 - abar)

    def predict(self, x: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps, x0) predicted at (x, t), guided; with clip_denoised x0 is clamped to [-1, 1]
        and eps re-derived from it."""
        t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        out = guided_output(self.denoiser, x, t_batch, self.cond, self.uncond, self.guidance_scale)
        a, s = self.coefficients(t)
        eps, x0 = eps_x0_from_output(self.sampler.parameterization, out.to(x.dtype), x, a, s)
        if self.sampler.clip_denoised:
            x0 = x0.clamp(-1, 1)
            eps = (x - a * x0) / s
        return eps, x0

    def noise_like(self, x: torch.Tensor) -> torch.Tensor:
        """Fresh standard normal noise shaped like x, from the run's generator(s)."""
        return draw_noise(x.shape, self.generator, x.device, x.dtype)

    def impose_known(self, x: torch.Tensor, t: int) -> torch.Tensor:
        """Where mask is 1, replace x by the known x0 noised to level t (no-op without a mask)."""
        if self.mask is None:
            return x
        a, s = self.coefficients(t)
        known = a * self.x0 + s * self.noise_like(x)
        return known * self.mask + (1.0 - self.mask) * x

    def step_indices(self) -> Iterator[int]:
        """The grid indices this run walks, from the highest down to 0: the last `steps` steps of
        the sampler's grid, with a tqdm bar unless progress is disabled."""
        return iter(tqdm(reversed(range(self.steps)), total=self.steps, desc=f"{self.sampler.name} sampling",
                         leave=False, disable=not self.progress_enabled))


class Sampler(ABC):
    """Base of all samplers. Subclasses set `timesteps` (increasing long tensor: the grid the
    sampler walks down; DPM-Solver++ includes its end point t = 0) and implement
    `_sample(run, x_T) -> x`.

    parameterization: what the denoiser outputs ('eps', 'x0' or 'v').
    clip_denoised: clamp each x0 prediction to [-1, 1]; for pixel-space models only (the
    reference never clips latents).
    """

    name: str = ""
    timesteps: torch.Tensor
    # Reference mode: keeps the reference's quirks, including not pasting the known region
    # back after the last step of masked sampling.
    compat: bool = False

    def __init__(self, schedule: DiffusionSchedule, parameterization: str = "eps",
                 clip_denoised: bool = False):
        self.schedule = schedule
        self.parameterization = check_parameterization(parameterization)
        self.clip_denoised = clip_denoised
        self.alphas_cumprod: list[float] = schedule.alphas_cumprod.tolist()

    @property
    @abstractmethod
    def num_steps(self) -> int:
        """How many denoising steps one `sample` call takes."""

    def start_timestep(self, steps: int) -> int:
        """The timestep whose noise level a run of only the last `steps` steps starts from
        (img2img / SDEdit: the image is noised to it)."""
        self._check_steps(steps)
        return int(self.timesteps[steps - 1])

    def _check_steps(self, steps: int) -> None:
        if not 1 <= steps <= self.num_steps:
            raise ValueError(f"steps must lie in 1..{self.num_steps} (this sampler's grid), got {steps}")

    @abstractmethod
    def _sample(self, run: SamplingRun, x: torch.Tensor) -> torch.Tensor:
        """Run the reverse process from x_T with `run`'s predictions and noise, over the grid
        indices `run.step_indices()`."""

    @torch.no_grad()
    def sample(self, denoiser: Denoiser, x_T: torch.Tensor, cond: Condition = None, *,
               uncond: Condition = None, guidance_scale: float = 1.0,
               mask: torch.Tensor | None = None, x0: torch.Tensor | None = None,
               generator: NoiseGenerator = None, progress: bool = True, steps: int | None = None) -> torch.Tensor:
        """Denoise x_T into a sample.

        cond/uncond: conditions passed to the denoiser (tensor, dict or list of tensors, or None);
        with guidance_scale != 1 the denoiser is called on [x, x] with [uncond, cond].
        mask, x0: known content x0 where mask == 1 (mask broadcasts against x_T); before every
        step those positions are reset to x0 noised to the step's level, and (outside compat
        mode) to x0 itself at the end.
        generator: None, one torch.Generator, or one per image (see `noise_for_seeds`).
        steps: run only the last `steps` steps of the grid (default: all); x_T is then the sample
        at `start_timestep(steps)`.
        """
        if steps is None:
            steps = self.num_steps
        self._check_steps(steps)
        if (mask is None) != (x0 is None):
            raise ValueError("masked sampling needs both mask and x0 (the known content)")
        if mask is not None:
            mask = mask.to(x_T.device, x_T.dtype)
            x0 = x0.to(x_T.device, x_T.dtype)
            if torch.broadcast_shapes(mask.shape, x0.shape, x_T.shape) != x_T.shape:
                raise ValueError(f"mask {tuple(mask.shape)} and x0 {tuple(x0.shape)} must broadcast "
                                 f"to x_T's shape {tuple(x_T.shape)}")
        run = SamplingRun(self, denoiser, cond, uncond, guidance_scale, mask, x0, generator, progress, steps)
        x = self._sample(run, x_T)
        if mask is not None and not self.compat:
            x = x0 * mask + (1.0 - mask) * x
        return x
