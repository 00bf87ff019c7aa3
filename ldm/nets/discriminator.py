"""PatchGAN discriminator for first-stage (autoencoder) training.

The parameter layout (`main.N`) matches the reference taming-transformers / LDM
`NLayerDiscriminator`, so the `loss.discriminator.*` weights of reference autoencoder
checkpoints load into the 'batch' variant unchanged.
"""
from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

NormName = Literal["batch", "group", "sync_batch"]
NORMS: tuple[str, ...] = ("batch", "group", "sync_batch")
GROUP_NORM_GROUPS = 32

_NORM_TYPES = (nn.BatchNorm2d, nn.SyncBatchNorm, nn.GroupNorm)


def _norm_layer(norm: str, channels: int) -> nn.Module:
    """The normalisation layer named `norm` over `channels` feature maps."""
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "sync_batch":
        return nn.SyncBatchNorm(channels)
    if channels % GROUP_NORM_GROUPS:
        raise ValueError(
            f"group norm uses {GROUP_NORM_GROUPS} groups but a layer has {channels} channels; "
            f"choose ndf as a multiple of {GROUP_NORM_GROUPS // 2}"
        )
    return nn.GroupNorm(GROUP_NORM_GROUPS, channels)


def weights_init(module: nn.Module) -> None:
    """The reference initialisation, for use with `nn.Module.apply`: conv weights ~ N(0, 0.02)
    (biases keep PyTorch's default), norm weights ~ N(1, 0.02) and norm biases 0."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, _NORM_TYPES):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator (Isola et al. 2017) as used by taming-transformers and LDM.

    conv(4, stride 2) + LeakyReLU(0.2), then `n_layers` blocks of conv(4) + norm + LeakyReLU(0.2)
    (stride 2, except stride 1 in the last block; channels ndf * min(2^k, 8)), then conv(4,
    stride 1) to one channel. Input (B, input_nc, H, W) gives a (B, 1, H', W') map of patch
    logits, e.g. 256 px -> 30x30, 64 px -> 6x6, 32 px -> 2x2 for n_layers = 3.

    norm: 'batch' is the reference. Its statistics are per process, so under DDP every rank
    normalises differently; 'sync_batch' shares them across ranks (CUDA-only when a process
    group is active) and 'group' has no batch statistics at all (works everywhere, but cannot
    load a reference checkpoint's BatchNorm running statistics). Convolutions followed by a norm
    have no bias, as in the reference (the norm's shift replaces it).
    Weights are initialised with `weights_init`.
    """

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3, norm: NormName = "batch"):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"unknown discriminator norm {norm!r}; choose one of {NORMS}")
        if n_layers < 1:
            raise ValueError(f"n_layers must be at least 1, got {n_layers}")
        layers: list[nn.Module] = [
            nn.Conv2d(input_nc, ndf, kernel_size=4, stride=2, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        channels = ndf
        for k in range(1, n_layers + 1):
            out_channels = ndf * min(2**k, 8)
            stride = 1 if k == n_layers else 2
            layers += [
                nn.Conv2d(channels, out_channels, kernel_size=4, stride=stride, padding=1, bias=False),
                _norm_layer(norm, out_channels),
                nn.LeakyReLU(0.2, inplace=True),
            ]
            channels = out_channels
        layers.append(nn.Conv2d(channels, 1, kernel_size=4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(weights_init)

    def forward(self, x: Tensor) -> Tensor:
        """Patch logits (B, 1, H', W') for images x (B, input_nc, H, W)."""
        return self.main(x)
