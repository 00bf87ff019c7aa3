"""VQ-regularised autoencoder (the reference's VQModel / VQModelInterface)."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ldm.first_stage.base import ConvAutoencoder
from ldm.first_stage.distributions import DeterministicLatent
from ldm.nets.quantize import QuantizerInfo, VectorQuantizer


class AutoencoderVQ(ConvAutoencoder):
    """Encoder -> quant_conv -> VectorQuantizer -> post_quant_conv -> Decoder.

    As in the LDM code, the diffusion stage works on the *pre-quantisation* latents: encode()
    returns them (a point mass) and decode() quantises before decoding.
    `beta`, `legacy`, `ema_decay` and `eps` configure the quantiser (see ldm.nets.quantize).
    """

    def __init__(self, ddconfig: Mapping[str, Any] | None = None, *, n_embed: int, embed_dim: int,
                 beta: float = 0.25, legacy: bool = False, ema_decay: float | None = None, eps: float = 1e-5,
                 **ddconfig_kwargs: Any):
        super().__init__(ddconfig, ddconfig_kwargs, embed_dim, kind="vq")
        z = self.ddconfig["z_channels"]
        self.quant_conv = nn.Conv2d(z, embed_dim, 1)
        self.quantize = VectorQuantizer(n_embed, embed_dim, beta=beta, legacy=legacy, ema_decay=ema_decay, eps=eps)
        self.post_quant_conv = nn.Conv2d(embed_dim, z, 1)

    def encode(self, x: torch.Tensor) -> DeterministicLatent:
        return DeterministicLatent(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        quantised, _, _ = self.quantize(z)
        return self.decoder(self.post_quant_conv(quantised))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, QuantizerInfo]:
        """(reconstruction, codebook loss, quantiser info)."""
        quantised, loss, info = self.quantize(self.quant_conv(self.encoder(x)))
        return self.decoder(self.post_quant_conv(quantised)), loss, info
