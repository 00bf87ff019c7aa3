"""The interface between a first stage (KL, VQ or identity) and the diffusion stage."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Protocol

import torch
from torch import nn


class Posterior(Protocol):
    """What encode() returns: a distribution over latents the diffusion stage can sample."""

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor: ...

    def mode(self) -> torch.Tensor: ...


class FirstStage(nn.Module, ABC):
    """Maps images (B, C, H, W) in [-1, 1] to latents (B, latent_channels, H/f, W/f) and back.

    Latents here are unscaled; the diffusion stage applies its scale_factor.
    """

    @abstractmethod
    def encode(self, x: torch.Tensor) -> Posterior:
        """The latent distribution of images `x`."""

    @abstractmethod
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images from latents `z`."""

    @property
    @abstractmethod
    def downsampling_factor(self) -> int:
        """f: the latent side is the image side divided by f."""

    @property
    @abstractmethod
    def latent_channels(self) -> int:
        """Channels of the latents encode() produces and decode() takes."""
