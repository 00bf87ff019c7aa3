"""Our (= the reference LDM) AutoencoderKL layout <-> diffusers' AutoencoderKL layout.

Pure functions on state dicts and configs; nothing here imports diffusers.

Correspondence (prefix P is `encoder` or `decoder`, n = number of levels):
    P.conv_in, P.conv_out                     same names
    P.norm_out                                P.conv_norm_out
    encoder.down.i.block.j                    encoder.down_blocks.i.resnets.j
    encoder.down.i.downsample.conv            encoder.down_blocks.i.downsamplers.0.conv
    decoder.up.i.block.j                      decoder.up_blocks.(n-1-i).resnets.j   (diffusers
    decoder.up.i.upsample.conv                decoder.up_blocks.(n-1-i).upsamplers.0.conv  counts
                                                                                     from the bottom)
    ResNet nin_shortcut                       conv_shortcut
    P.mid.block_1 / block_2                   P.mid_block.resnets.0 / 1
    P.mid.attn_1.{norm,q,k,v,proj_out}        P.mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}
    quant_conv, post_quant_conv               same names
Attention projections are 1x1 convs here, (C, C, 1, 1), and linear layers there, (C, C).
diffusers' VAE has attention only in the middle block, so attention at other levels
(non-empty attn_resolutions) cannot be exported.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import torch

_ATTN_OURS_TO_DIFFUSERS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_ATTN_DIFFUSERS_TO_OURS = {v: k for k, v in _ATTN_OURS_TO_DIFFUSERS.items()}

Rule = tuple[str, Callable[[re.Match[str], int], str]]


def _resnet_leaf(leaf: str, to_diffusers: bool) -> str:
    a, b = ("nin_shortcut", "conv_shortcut") if to_diffusers else ("conv_shortcut", "nin_shortcut")
    return b + leaf[len(a):] if leaf.startswith(a + ".") else leaf


_TO_DIFFUSERS: list[Rule] = [
    (r"(quant_conv|post_quant_conv)\.(weight|bias)", lambda m, n: m[0]),
    (r"(encoder|decoder)\.(conv_in|conv_out)\.(.+)", lambda m, n: m[0]),
    (r"(encoder|decoder)\.norm_out\.(.+)", lambda m, n: f"{m[1]}.conv_norm_out.{m[2]}"),
    (r"encoder\.down\.(\d+)\.block\.(\d+)\.(.+)",
     lambda m, n: f"encoder.down_blocks.{m[1]}.resnets.{m[2]}.{_resnet_leaf(m[3], True)}"),
    (r"encoder\.down\.(\d+)\.downsample\.conv\.(.+)", lambda m, n: f"encoder.down_blocks.{m[1]}.downsamplers.0.conv.{m[2]}"),
    (r"decoder\.up\.(\d+)\.block\.(\d+)\.(.+)",
     lambda m, n: f"decoder.up_blocks.{n - 1 - int(m[1])}.resnets.{m[2]}.{_resnet_leaf(m[3], True)}"),
    (r"decoder\.up\.(\d+)\.upsample\.conv\.(.+)",
     lambda m, n: f"decoder.up_blocks.{n - 1 - int(m[1])}.upsamplers.0.conv.{m[2]}"),
    (r"(encoder|decoder)\.mid\.block_([12])\.(.+)",
     lambda m, n: f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.{_resnet_leaf(m[3], True)}"),
    (r"(encoder|decoder)\.mid\.attn_1\.(norm|q|k|v|proj_out)\.(.+)",
     lambda m, n: f"{m[1]}.mid_block.attentions.0.{_ATTN_OURS_TO_DIFFUSERS[m[2]]}.{m[3]}"),
]

_TO_OURS: list[Rule] = [
    (r"(quant_conv|post_quant_conv)\.(weight|bias)", lambda m, n: m[0]),
    (r"(encoder|decoder)\.(conv_in|conv_out)\.(.+)", lambda m, n: m[0]),
    (r"(encoder|decoder)\.conv_norm_out\.(.+)", lambda m, n: f"{m[1]}.norm_out.{m[2]}"),
    (r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)",
     lambda m, n: f"encoder.down.{m[1]}.block.{m[2]}.{_resnet_leaf(m[3], False)}"),
    (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", lambda m, n: f"encoder.down.{m[1]}.downsample.conv.{m[2]}"),
    (r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)",
     lambda m, n: f"decoder.up.{n - 1 - int(m[1])}.block.{m[2]}.{_resnet_leaf(m[3], False)}"),
    (r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)",
     lambda m, n: f"decoder.up.{n - 1 - int(m[1])}.upsample.conv.{m[2]}"),
    (r"(encoder|decoder)\.mid_block\.resnets\.([01])\.(.+)",
     lambda m, n: f"{m[1]}.mid.block_{int(m[2]) + 1}.{_resnet_leaf(m[3], False)}"),
    (r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(.+)",
     lambda m, n: f"{m[1]}.mid.attn_1.{_ATTN_DIFFUSERS_TO_OURS[m[2]]}.{m[3]}"),
]


def _n_levels(keys: list[str], pattern: str) -> int:
    levels = {int(m[1]) for k in keys if (m := re.match(pattern, k))}
    if not levels:
        raise ValueError(f"no decoder level keys ({pattern}) in the state dict: is it an autoencoder's?")
    return max(levels) + 1


def _rename(keys: list[str], rules: list[Rule], n: int, layout: str) -> dict[str, str]:
    """old key -> new key for every key, or ValueError listing the keys no rule knows."""
    out: dict[str, str] = {}
    unknown = []
    for key in keys:
        for pattern, target in rules:
            if m := re.fullmatch(pattern, key):
                out[key] = target(m, n)
                break
        else:
            unknown.append(key)
    if unknown:
        hint = (" (attention outside the middle block has no diffusers counterpart: export needs "
                "attn_resolutions = [])" if any(".attn." in k for k in unknown) else "")
        raise ValueError(f"{len(unknown)} keys are not part of the {layout} AutoencoderKL layout{hint}: "
                         f"{unknown[:20]}")
    return out


def _is_projection_weight(key: str) -> bool:
    """Our attention q/k/v/proj_out weights: 1x1 convs that are linear layers in diffusers."""
    return bool(re.fullmatch(r"(encoder|decoder)\.mid\.attn_1\.(q|k|v|proj_out)\.weight", key))


def to_diffusers(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our AutoencoderKL state dict (no prefix) in diffusers' AutoencoderKL layout."""
    keys = list(state_dict)
    names = _rename(keys, _TO_DIFFUSERS, _n_levels(keys, r"decoder\.up\.(\d+)\."), "LDM")
    return {new: state_dict[old].flatten(1) if _is_projection_weight(old) else state_dict[old]
            for old, new in names.items()}


def from_diffusers(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL state dict in our (= the reference LDM's) layout."""
    keys = list(state_dict)
    names = _rename(keys, _TO_OURS, _n_levels(keys, r"decoder\.up_blocks\.(\d+)\."), "diffusers")
    return {new: state_dict[old][:, :, None, None] if _is_projection_weight(new) else state_dict[old]
            for old, new in names.items()}


def diffusers_vae_config(ddconfig: Mapping[str, Any], embed_dim: int, scaling_factor: float) -> dict[str, Any]:
    """Constructor arguments of a diffusers AutoencoderKL with our model's architecture.

    `scaling_factor` is the diffusion stage's scale_factor (0.18215 for the SD kl-f8 family).
    Raises ValueError for what diffusers' VAE cannot express.
    """
    ch, mult = ddconfig["ch"], list(ddconfig["ch_mult"])
    problems = []
    if list(ddconfig["attn_resolutions"]):
        problems.append("attn_resolutions must be [] (diffusers has attention only in the middle block)")
    if mult[0] != 1:
        problems.append("ch_mult[0] must be 1 (diffusers' first level has the width of conv_in)")
    if embed_dim != ddconfig["z_channels"]:
        problems.append("embed_dim must equal z_channels (diffusers has one latent_channels)")
    if not ddconfig.get("double_z", True):
        problems.append("double_z must be true (a KL autoencoder)")
    if problems:
        raise ValueError("this autoencoder cannot be expressed as a diffusers AutoencoderKL: " + "; ".join(problems))
    return {
        "in_channels": ddconfig["in_channels"],
        "out_channels": ddconfig["out_ch"],
        "down_block_types": ["DownEncoderBlock2D"] * len(mult),
        "up_block_types": ["UpDecoderBlock2D"] * len(mult),
        "block_out_channels": [ch * m for m in mult],
        "layers_per_block": ddconfig["num_res_blocks"],
        "act_fn": "silu",
        "latent_channels": embed_dim,
        "norm_num_groups": 32,
        "sample_size": ddconfig["resolution"],
        "scaling_factor": scaling_factor,
        "mid_block_add_attention": True,
        "use_quant_conv": True,
        "use_post_quant_conv": True,
    }


def ddconfig_from_diffusers(config: Mapping[str, Any]) -> tuple[dict[str, Any], int]:
    """(ddconfig, embed_dim) of our AutoencoderKL matching a diffusers AutoencoderKL config."""
    expected = {"act_fn": "silu", "norm_num_groups": 32, "mid_block_add_attention": True,
                "use_quant_conv": True, "use_post_quant_conv": True, "shift_factor": None}
    problems = [f"{k} = {config[k]!r} (needs {v!r})" for k, v in expected.items() if k in config and config[k] != v]
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    if set(down) != {"DownEncoderBlock2D"} or set(up) != {"UpDecoderBlock2D"}:
        problems.append(f"block types {down} / {up} (needs DownEncoderBlock2D / UpDecoderBlock2D)")
    channels = list(config["block_out_channels"])
    ch = channels[0]
    if any(c % ch for c in channels):
        problems.append(f"block_out_channels {channels} are not multiples of the first")
    if problems:
        raise ValueError("this diffusers AutoencoderKL has no LDM counterpart: " + "; ".join(problems))
    latent = config["latent_channels"]
    ddconfig = {
        "double_z": True,
        "z_channels": latent,
        "resolution": config["sample_size"],
        "in_channels": config["in_channels"],
        "out_ch": config["out_channels"],
        "ch": ch,
        "ch_mult": [c // ch for c in channels],
        "num_res_blocks": config["layers_per_block"],
        "attn_resolutions": [],
        "dropout": 0.0,
    }
    return ddconfig, latent
