"""Build first stages from the downsampling factor f, so a Hydra sweep over f alone gives a
consistent model (ch_mult, z channels and attention follow the paper's autoencoder zoo)."""
from __future__ import annotations

from ldm.first_stage.identity import IdentityFirstStage
from ldm.first_stage.kl import AutoencoderKL
from ldm.first_stage.validate import first_stage_ddconfig
from ldm.first_stage.vq import AutoencoderVQ


def autoencoder_kl(f: int, ch: int = 128, num_res_blocks: int = 2, z_channels: int | None = None,
                   attn_resolutions: list[int] | None = None, resolution: int = 256, dropout: float = 0.0,
                   in_channels: int = 3, ch_mult: list[int] | None = None) -> AutoencoderKL:
    """A KL autoencoder with downsampling factor f (ch_mult, z channels and attention as the
    paper's kl-f<f> unless given; embed_dim = z_channels as in every released model)."""
    dd = first_stage_ddconfig(f, ch=ch, z_channels=z_channels, num_res_blocks=num_res_blocks,
                              attn_resolutions=attn_resolutions, resolution=resolution, in_channels=in_channels,
                              out_ch=in_channels, double_z=True, dropout=dropout, ch_mult=ch_mult)
    return AutoencoderKL(dd, embed_dim=dd["z_channels"])


def autoencoder_vq(f: int, n_embed: int, z_channels: int, ch: int = 128, num_res_blocks: int = 2,
                   attn_resolutions: list[int] | None = None, resolution: int = 256, dropout: float = 0.0,
                   in_channels: int = 3, beta: float = 0.25, legacy: bool = True,
                   ema_decay: float | None = None, ch_mult: list[int] | None = None) -> AutoencoderVQ:
    """A VQ autoencoder with downsampling factor f and an n_embed x z_channels codebook.
    legacy=True is the reference quantiser's loss weighting (see ldm.nets.quantize)."""
    dd = first_stage_ddconfig(f, ch=ch, z_channels=z_channels, num_res_blocks=num_res_blocks,
                              attn_resolutions=attn_resolutions, resolution=resolution, in_channels=in_channels,
                              out_ch=in_channels, double_z=False, dropout=dropout, ch_mult=ch_mult)
    return AutoencoderVQ(dd, n_embed=n_embed, embed_dim=z_channels, beta=beta, legacy=legacy, ema_decay=ema_decay)


def identity(f: int = 1, in_channels: int = 3) -> IdentityFirstStage:
    """Pixel space (f = 1): the LDM-1 baseline of the paper's f sweep."""
    if f != 1:
        raise ValueError(f"the identity first stage has f = 1, got first_stage.f={f}; use kl or vq for f > 1")
    return IdentityFirstStage(in_channels)
