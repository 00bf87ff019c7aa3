"""Gaussian noise for sampling, optionally drawn per image from that image's own generator,
so that image i of a batch comes out the same whatever the batch size."""
from __future__ import annotations

from collections.abc import Sequence

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


def generators_for_seeds(seeds: Sequence[int], device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One torch.Generator per seed, seeded with it."""
    return [torch.Generator(device=device).manual_seed(int(seed)) for seed in seeds]


def noise_for_seeds(seeds: Sequence[int], shape: Sequence[int], device: torch.device | str | None = None,
                    dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, list[torch.Generator]]:
    """x_T for one image per seed, each of per-image `shape` (C, H, W), drawn from its own CPU
    generator; returns (x_T of shape (len(seeds), *shape), the generators).

    Pass the generators on to the sampler as `generator` so that every later noise draw is
    per-image as well.
    """
    generators = generators_for_seeds(seeds)
    return draw_noise((len(generators), *shape), generators, device, dtype), generators
