"""Gaussian noise for sampling, optionally drawn per image from that image's own generator,
so that image i of a batch comes out the same whatever the batch size."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

# None (global RNG), one generator for the whole batch, or one generator per image.
NoiseGenerator = torch.Generator | Sequence[torch.Generator] | None


def draw_noise(shape: Sequence[int], generator: NoiseGenerator = None,
               device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise of the batch shape `shape` on `device`, cast to `dtype`.

    It is drawn in float32 whatever `dtype`, so a seed gives the same noise at any precision.
    With a list of generators, image b is drawn from generator[b] (on that generator's device,
    then moved), so it does not depend on the other images.
    """
    shape = tuple(shape)
    if generator is None:
        return torch.randn(shape, device=device).to(dtype=dtype)
    if isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, device=generator.device).to(device, dtype)
    if len(generator) != shape[0]:
        raise ValueError(f"{len(generator)} per-image generators for a batch of {shape[0]}: "
                         "give one generator per image")
    return torch.stack([torch.randn(shape[1:], generator=g, device=g.device).to(device, dtype)
                        for g in generator])


def draw_uniforms(n: int, k: int, generator: Sequence[torch.Generator] | None = None) -> torch.Tensor:
    """(n, k) float64 numbers uniform in [0, 1) on the CPU: row b from generator[b] (one per
    sample), or all from the global RNG when `generator` is None."""
    if generator is None:
        return torch.rand(n, k, dtype=torch.float64)
    if len(generator) != n:
        raise ValueError(f"{len(generator)} per-sample generators for {n} samples")
    return torch.stack([torch.rand(k, generator=g, dtype=torch.float64) for g in generator])


def generators_for_seeds(seeds: Sequence[int], device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One torch.Generator per seed, seeded with it."""
    return [torch.Generator(device=device).manual_seed(int(seed)) for seed in seeds]


def sample_seeds(seed: int, stream: int, first: int, n: int) -> list[int]:
    """Seeds of samples first .. first + n - 1 of a training stream: one 63-bit seed per
    (seed, stream, sample index), unrelated between neighbours."""
    return [int(np.random.SeedSequence([seed, stream, i]).generate_state(2, np.uint64)[0] >> np.uint64(1))
            for i in range(first, first + n)]


def noise_for_seeds(seeds: Sequence[int], shape: Sequence[int], device: torch.device | str | None = None,
                    dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, list[torch.Generator]]:
    """x_T for one image per seed, each of per-image `shape` (C, H, W), drawn from its own CPU
    generator; returns (x_T of shape (len(seeds), *shape), the generators).

    Pass the generators on to the sampler as `generator` so that every later noise draw is
    per-image as well.
    """
    generators = generators_for_seeds(seeds)
    return draw_noise((len(generators), *shape), generators, device, dtype), generators
