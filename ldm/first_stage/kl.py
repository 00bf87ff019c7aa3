"""KL-regularised autoencoder (the reference's AutoencoderKL): a Gaussian latent per position."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ldm.first_stage.base import ConvAutoencoder
from ldm.first_stage.distributions import DiagonalGaussian


class AutoencoderKL(ConvAutoencoder):
    """Encoder -> quant_conv (2z -> 2 embed_dim moments) -> DiagonalGaussian; post_quant_conv -> Decoder.

    Submodule names match the reference, so its `first_stage_model.*` weights load with
    ldm.utils.checkpoint.load_strict after stripping the prefix.
    """

    def __init__(self, ddconfig: Mapping[str, Any] | None = None, *, embed_dim: int, **ddconfig_kwargs: Any):
        super().__init__(ddconfig, ddconfig_kwargs, embed_dim, kind="kl")
        z = self.ddconfig["z_channels"]
        self.quant_conv = nn.Conv2d(2 * z, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z, 1)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor, sample_posterior: bool = True,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, DiagonalGaussian]:
        """(reconstruction, posterior); decodes a posterior sample, or its mean if not sample_posterior."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior
