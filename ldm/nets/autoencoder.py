"""Convolutional encoder and decoder of the first-stage autoencoders (KL and VQ).

Layout and numerics follow the reference LDM autoencoder, so its `first_stage_model.encoder.*` /
`decoder.*` weights load unchanged: GroupNorm(32, eps 1e-6), swish, ResNet blocks without a
time embedding, single-head spatial self-attention built from 1x1 convolutions, a downsample
that pads (0, 1, 0, 1) before a stride-2 convolution, and a nearest-x2 upsample followed by a
convolution. Each resolution level i holds `ch * ch_mult[i]` channels; f = 2 ** (len(ch_mult) - 1).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

GROUPS = 32
NORM_EPS = 1e-6


def group_norm(channels: int) -> nn.GroupNorm:
    """The autoencoder's normalisation: 32 groups, eps 1e-6, affine."""
    if channels % GROUPS:
        raise ValueError(f"{channels} channels do not split into {GROUPS} GroupNorm groups: "
                         f"choose ch and ch_mult so that every ch * ch_mult[i] is a multiple of {GROUPS}")
    return nn.GroupNorm(GROUPS, channels, eps=NORM_EPS, affine=True)


def downsampling_factor(ch_mult: Sequence[int]) -> int:
    """f of an encoder with these channel multipliers: one halving between consecutive levels."""
    return 2 ** (len(ch_mult) - 1)


class ResnetBlock(nn.Module):
    """norm-swish-conv twice, with a 1x1 `nin_shortcut` when the width changes."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, residual; q, k, v, proj_out are 1x1 convs."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)

        def tokens(t: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, 1, HW, C)
            return t.reshape(b, 1, c, h * w).transpose(-1, -2)

        # Default SDPA scale is C ** -0.5, the reference's scale for one head of width C.
        out = F.scaled_dot_product_attention(tokens(self.q(n)), tokens(self.k(n)), tokens(self.v(n)))
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Halve H and W: zero-pad right and bottom by one, then a 3x3 stride-2 conv without padding."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: ResNet blocks, optional attention after each, optional resampler.

    The resampler attribute is `downsample` in the encoder and `upsample` in the decoder, as in
    the reference layout; it is set by the owner."""

    def __init__(self, channels_in: int, channels_out: int, n_blocks: int, attention: bool, dropout: float):
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()
        for _ in range(n_blocks):
            self.block.append(ResnetBlock(channels_in, channels_out, dropout))
            channels_in = channels_out
            if attention:
                self.attn.append(AttnBlock(channels_out))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        return h


class _Mid(nn.Module):
    """ResNet block, self-attention (an identity without attention), ResNet block at the lowest resolution."""

    def __init__(self, channels: int, dropout: float, attention: bool = True):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels) if attention else nn.Identity()
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


ATTN_TYPES = ("vanilla", "none")


def _check_common(ch: int, ch_mult: Sequence[int], num_res_blocks: int, resolution: int, attn_type: str) -> None:
    if attn_type not in ATTN_TYPES:
        raise ValueError(f"attn_type must be one of {ATTN_TYPES} (the reference's 'linear' is not supported), "
                         f"got {attn_type!r}")
    if not len(ch_mult):
        raise ValueError("ch_mult is empty: give one multiplier per resolution level, e.g. [1, 2, 4, 4] for f = 8")
    if ch <= 0 or num_res_blocks < 1 or min(ch_mult) < 1:
        raise ValueError(f"ch ({ch}), num_res_blocks ({num_res_blocks}) and every ch_mult entry "
                         f"({list(ch_mult)}) must be positive")
    f = downsampling_factor(ch_mult)
    if resolution % f:
        raise ValueError(f"resolution {resolution} is not divisible by f = {f} (len(ch_mult) = {len(ch_mult)}): "
                         "change ddconfig.resolution or ddconfig.ch_mult")


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> features (B, z_channels * (2 if double_z else 1), H/f, W/f).

    `resolution` is the nominal image size; it only decides at which levels attention sits
    (a level of side `resolution / 2**i` gets attention when that side is in attn_resolutions).
    `attn_type="none"` leaves out every self-attention, the middle one included (the reference's
    option, used by the first stage of the released inpainting model, vq-f4-noattn).
    """

    def __init__(self, *, ch: int, ch_mult: Sequence[int], num_res_blocks: int,
                 attn_resolutions: Sequence[int], in_channels: int, resolution: int, z_channels: int,
                 double_z: bool = True, dropout: float = 0.0, out_ch: int | None = None, attn_type: str = "vanilla"):
        # out_ch belongs to the decoder; accepted so that one ddconfig builds both halves.
        super().__init__()
        _check_common(ch, ch_mult, num_res_blocks, resolution, attn_type)
        attention = attn_type != "none"
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        channels, side = ch, resolution
        for i, mult in enumerate(ch_mult):
            level = _Level(channels, ch * mult, num_res_blocks, attention and side in attn_resolutions, dropout)
            channels = ch * mult
            if i != len(ch_mult) - 1:
                level.downsample = Downsample(channels)
                side //= 2
            self.down.append(level)
        self.mid = _Mid(channels, dropout, attention)
        self.norm_out = group_norm(channels)
        self.conv_out = nn.Conv2d(channels, 2 * z_channels if double_z else z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for i, level in enumerate(self.down):
            h = level(h)
            if i != len(self.down) - 1:
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent (B, z_channels, h, w) -> image (B, out_ch, h*f, w*f).

    `up[i]` is the level at resolution `resolution / 2**i` (so it mirrors `encoder.down[i]`) and
    holds num_res_blocks + 1 ResNet blocks; levels run from the last to the first.
    `attn_type` as in the Encoder.
    """

    def __init__(self, *, ch: int, out_ch: int, ch_mult: Sequence[int], num_res_blocks: int,
                 attn_resolutions: Sequence[int], resolution: int, z_channels: int,
                 dropout: float = 0.0, in_channels: int | None = None, double_z: bool | None = None,
                 attn_type: str = "vanilla"):
        # in_channels and double_z belong to the encoder; accepted so one ddconfig builds both.
        super().__init__()
        _check_common(ch, ch_mult, num_res_blocks, resolution, attn_type)
        attention = attn_type != "none"
        channels = ch * ch_mult[-1]
        side = resolution // downsampling_factor(ch_mult)
        self.conv_in = nn.Conv2d(z_channels, channels, 3, padding=1)
        self.mid = _Mid(channels, dropout, attention)
        levels: list[_Level] = []
        for i in reversed(range(len(ch_mult))):
            level = _Level(channels, ch * ch_mult[i], num_res_blocks + 1, attention and side in attn_resolutions,
                           dropout)
            channels = ch * ch_mult[i]
            if i != 0:
                level.upsample = Upsample(channels)
                side *= 2
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(channels)
        self.conv_out = nn.Conv2d(channels, out_ch, 3, padding=1)

    @property
    def last_layer(self) -> nn.Parameter:
        """Weight of the final conv: where the adaptive GAN weight compares gradient norms."""
        return self.conv_out.weight

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for i in reversed(range(len(self.up))):
            h = self.up[i](h)
            if i != 0:
                h = self.up[i].upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))
