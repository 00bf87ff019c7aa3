"""First-stage configuration: checks at build time and the paper's ddconfig for a given f.

A ddconfig is the reference's encoder/decoder description: ch, ch_mult, num_res_blocks,
attn_resolutions, in_channels, out_ch, resolution, z_channels, double_z, dropout, attn_type
("vanilla" or "none": no self-attention at all, as the released vq-f4-noattn).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from ldm.nets.autoencoder import GROUPS, downsampling_factor

ALLOWED_F = (1, 2, 4, 8, 16, 32)
REQUIRED_KEYS = ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "in_channels", "out_ch",
                 "resolution", "z_channels")
OPTIONAL_KEYS = ("double_z", "dropout", "attn_type")

# Channel multipliers of the released autoencoders (REFERENCE.md section 7); f = 1 and 2 extend the
# f = 4 pattern (one level per halving).
PAPER_CH_MULT = {1: (1,), 2: (1, 2), 4: (1, 2, 4), 8: (1, 2, 4, 4), 16: (1, 1, 2, 2, 4), 32: (1, 1, 2, 2, 4, 4)}
# z channels of the released KL autoencoders (kl-f4 3, kl-f8 4, kl-f16 16, kl-f32 64).
PAPER_KL_Z_CHANNELS = {1: 3, 2: 3, 4: 3, 8: 4, 16: 16, 32: 64}
# Attention resolutions (pixel sides at 256 px) of the released KL autoencoders.
PAPER_KL_ATTN = {1: (), 2: (), 4: (), 8: (), 16: (16,), 32: (16, 8)}


def plain_ddconfig(ddconfig: Mapping[str, Any]) -> dict[str, Any]:
    """A plain-dict copy (lists for sequences), e.g. of an OmegaConf node from Hydra."""
    out = dict(ddconfig)
    for key in ("ch_mult", "attn_resolutions"):
        if key in out:
            out[key] = [int(v) for v in out[key]]
    return out


def resolve_ddconfig(ddconfig: Mapping[str, Any] | None, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The ddconfig given either as one mapping or as keyword arguments (not both)."""
    if ddconfig is not None and kwargs:
        raise ValueError(f"give the encoder/decoder settings either as ddconfig or as keywords, "
                         f"not both (got ddconfig and {sorted(kwargs)})")
    if ddconfig is None and not kwargs:
        raise ValueError("no ddconfig: pass ddconfig={...} or its keys (ch, ch_mult, z_channels, ...) as keywords")
    return plain_ddconfig(kwargs if ddconfig is None else ddconfig)


def first_stage_ddconfig(f: int, *, ch: int = 128, z_channels: int | None = None, num_res_blocks: int = 2,
                         attn_resolutions: list[int] | None = None, resolution: int = 256,
                         in_channels: int = 3, out_ch: int = 3, double_z: bool = True,
                         dropout: float = 0.0, ch_mult: list[int] | None = None) -> dict[str, Any]:
    """The ddconfig of the paper's autoencoder with downsampling factor `f`.

    ch_mult, z_channels and attn_resolutions default to the released KL autoencoders for that f
    (pass z_channels for VQ models, e.g. 3 for vq-f4, and double_z=False). Meant as a Hydra
    `_target_` so that a sweep over f alone rebuilds a consistent first stage. A given ch_mult
    (width per level, e.g. [1, 1, 2] for a cheaper f = 4) must have log2(f) + 1 levels.
    """
    if f not in PAPER_CH_MULT:
        raise ValueError(f"f = {f} is not supported: choose f from {ALLOWED_F}")
    if ch_mult is not None and len(ch_mult) != len(PAPER_CH_MULT[f]):
        raise ValueError(f"ch_mult {list(ch_mult)} has {len(ch_mult)} levels, f = {f} needs {len(PAPER_CH_MULT[f])} "
                         f"(one per halving plus the full resolution), e.g. {list(PAPER_CH_MULT[f])}")
    return {
        "double_z": double_z,
        "z_channels": PAPER_KL_Z_CHANNELS[f] if z_channels is None else z_channels,
        "resolution": resolution,
        "in_channels": in_channels,
        "out_ch": out_ch,
        "ch": ch,
        "ch_mult": list(PAPER_CH_MULT[f] if ch_mult is None else ch_mult),
        "num_res_blocks": num_res_blocks,
        "attn_resolutions": list(PAPER_KL_ATTN[f] if attn_resolutions is None else attn_resolutions),
        "dropout": dropout,
    }


def validate_first_stage(ddconfig: Mapping[str, Any], embed_dim: int, kind: Literal["kl", "vq"],
                         image_size: int | None = None) -> int:
    """Check a KL or VQ first-stage config; return its f.

    Raises ValueError naming the keys to change when: keys are missing or unknown, f is not in
    {1, 2, 4, 8, 16, 32}, resolution or image_size is not divisible by f, a level's width is not
    a multiple of 32 (GroupNorm), an attention resolution matches no level (it would be silently
    ignored), double_z does not suit the kind (KL needs mean and log-variance, VQ one vector), or
    embed_dim differs from z_channels (every released LDM autoencoder has them equal; a mismatch
    is usually a half-done override).
    """
    if kind not in ("kl", "vq"):
        raise ValueError(f"kind must be 'kl' or 'vq', got {kind!r}")
    missing = [k for k in REQUIRED_KEYS if k not in ddconfig]
    unknown = [k for k in ddconfig if k not in REQUIRED_KEYS + OPTIONAL_KEYS]
    if missing or unknown:
        raise ValueError(f"ddconfig: missing keys {missing}, unknown keys {unknown}; "
                         f"expected {list(REQUIRED_KEYS)} and optionally {list(OPTIONAL_KEYS)}")
    cfg = plain_ddconfig(ddconfig)
    ch_mult = cfg["ch_mult"]
    f = downsampling_factor(ch_mult) if ch_mult else 0
    if f not in ALLOWED_F:
        raise ValueError(f"ddconfig.ch_mult {ch_mult} gives f = {f}; f must be one of {ALLOWED_F}: "
                         "use one entry per resolution level, len(ch_mult) = log2(f) + 1")
    bad_width = [cfg["ch"] * m for m in ch_mult if (cfg["ch"] * m) % GROUPS]
    if bad_width:
        raise ValueError(f"ddconfig.ch {cfg['ch']} x ddconfig.ch_mult {ch_mult} gives widths {bad_width} that "
                         f"are not multiples of {GROUPS} (GroupNorm groups): change ch or ch_mult")
    if cfg["resolution"] % f:
        raise ValueError(f"ddconfig.resolution {cfg['resolution']} is not divisible by f = {f}: "
                         "set it to the training image size")
    if image_size is not None and image_size % f:
        raise ValueError(f"image_size {image_size} is not divisible by the first stage's f = {f}: "
                         "change the data's image_size or ddconfig.ch_mult")
    sides = [cfg["resolution"] // 2**i for i in range(len(ch_mult))]
    stray = [r for r in cfg["attn_resolutions"] if r not in sides]
    if stray:
        raise ValueError(f"ddconfig.attn_resolutions {stray} match no level (sides {sides} for "
                         f"resolution {cfg['resolution']}); attention there would be silently skipped")
    double_z = cfg.get("double_z", True)
    if kind == "kl" and not double_z:
        raise ValueError("a KL first stage needs ddconfig.double_z = true (the encoder outputs mean and log-variance)")
    if kind == "vq" and double_z:
        raise ValueError("a VQ first stage needs ddconfig.double_z = false (the encoder outputs one vector per position)")
    if cfg["z_channels"] < 1 or embed_dim < 1:
        raise ValueError(f"ddconfig.z_channels ({cfg['z_channels']}) and embed_dim ({embed_dim}) must be positive")
    if embed_dim != cfg["z_channels"]:
        raise ValueError(f"embed_dim {embed_dim} differs from ddconfig.z_channels {cfg['z_channels']}: "
                         "set both to the same value (as in every released LDM autoencoder)")
    return f

