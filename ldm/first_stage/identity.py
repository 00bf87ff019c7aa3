"""Pixel space as a first stage (f = 1): the diffusion model works on the images themselves."""
from __future__ import annotations

import torch

from ldm.first_stage.base import FirstStage
from ldm.first_stage.distributions import DeterministicLatent


class IdentityFirstStage(FirstStage):
    """encode(x) is x (as a point mass), decode(z) is z; latent_channels is the image's channels."""

    def __init__(self, in_channels: int = 3):
        super().__init__()
        if in_channels < 1:
            raise ValueError(f"in_channels must be positive (3 for RGB), got {in_channels}")
        self.in_channels = in_channels

    @property
    def downsampling_factor(self) -> int:
        return 1

    @property
    def latent_channels(self) -> int:
        return self.in_channels

    def _check(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected (B, {self.in_channels}, H, W), got {tuple(x.shape)}: "
                             "set the identity first stage's in_channels to the images' channels")
        return x

    def encode(self, x: torch.Tensor) -> DeterministicLatent:
        return DeterministicLatent(self._check(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self._check(z)
