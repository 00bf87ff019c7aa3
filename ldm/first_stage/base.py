"""The interface between a first stage (KL, VQ or identity) and the diffusion stage."""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, Protocol

import torch
from torch import nn

from ldm.first_stage.validate import resolve_ddconfig, validate_first_stage
from ldm.nets.autoencoder import Decoder, Encoder


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


class ConvAutoencoder(FirstStage):
    """The convolutional encoder/decoder pair both KL and VQ autoencoders are built on:
    validates the ddconfig, builds `encoder` and `decoder`, and knows f and the latent width."""

    def __init__(self, ddconfig: Mapping[str, Any] | None, ddconfig_kwargs: Mapping[str, Any], embed_dim: int,
                 kind: str):
        super().__init__()
        self.ddconfig = resolve_ddconfig(ddconfig, ddconfig_kwargs)
        self._f = validate_first_stage(self.ddconfig, embed_dim, kind=kind)
        self.embed_dim = embed_dim
        self.encoder = Encoder(**self.ddconfig)
        self.decoder = Decoder(**self.ddconfig)

    @property
    def downsampling_factor(self) -> int:
        return self._f

    @property
    def latent_channels(self) -> int:
        return self.embed_dim
