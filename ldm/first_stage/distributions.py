"""Latent "posteriors" returned by first-stage encoders.

Both classes offer `sample(generator=None)` and `mode()`, which is all the diffusion stage uses.
"""
from __future__ import annotations

import math

import torch

from ldm.diffusion.samplers.noise import NoiseGenerator, draw_noise

# The reference clamps the log-variance to this range before exponentiating (overflow guard).
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


class DiagonalGaussian:
    """N(mean, diag(exp(logvar))) over latents of shape (B, C, H, W).

    Built from encoder moments (B, 2C, H, W): the first C channels are the mean, the last C the
    log-variance (clamped to [-30, 20] as in the reference).
    """

    def __init__(self, moments: torch.Tensor):
        if moments.dim() != 4 or moments.shape[1] % 2:
            raise ValueError(f"moments must be (B, 2C, H, W), got shape {tuple(moments.shape)}")
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    @property
    def var(self) -> torch.Tensor:
        return self.logvar.exp()

    @property
    def std(self) -> torch.Tensor:
        return (0.5 * self.logvar).exp()

    def sample(self, generator: NoiseGenerator = None) -> torch.Tensor:
        """mean + std * eps with eps ~ N(0, I) drawn from `generator`: the global RNG (None), one
        generator, or one per image (ldm.diffusion.samplers.noise.draw_noise)."""
        if generator is None or isinstance(generator, torch.Generator):
            eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        else:
            eps = draw_noise(self.mean.shape, generator, self.mean.device, self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sample, summed over C, H, W: shape (B,)."""
        return 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar).sum(dim=(1, 2, 3))

    def nll(self, sample: torch.Tensor) -> torch.Tensor:
        """-log q(sample) per sample, summed over C, H, W: shape (B,)."""
        per_element = math.log(2.0 * math.pi) + self.logvar + (sample - self.mean).pow(2) / self.var
        return 0.5 * per_element.sum(dim=(1, 2, 3))


class DeterministicLatent:
    """A point mass: what VQ (pre-quantisation) and identity first stages return from encode()."""

    def __init__(self, latent: torch.Tensor):
        self.latent = latent

    def sample(self, generator: NoiseGenerator = None) -> torch.Tensor:
        """The latent itself; `generator` is accepted so callers need not know the first-stage kind."""
        return self.latent

    def mode(self) -> torch.Tensor:
        return self.latent
