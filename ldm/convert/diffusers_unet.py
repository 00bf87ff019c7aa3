"""Convert UNet weights between our (reference LDM) layout and diffusers' UNet2DConditionModel,
and (one way) to diffusers' UNet2DModel.

UNet2DConditionModel covers the cross-attention family (Stable Diffusion style): spatial
transformers wherever attention is used, with 1x1-conv `proj_in` / `proj_out` (SD 1.x; diffusers:
use_linear_projection=False) or Linear ones (SD 2.x's use_linear_in_transformer;
use_linear_projection=True), conv resampling, no ResBlock up/down. Levels with attention become
CrossAttnDownBlock2D / CrossAttnUpBlock2D, the others DownBlock2D / UpBlock2D; the middle block is
always UNetMidBlock2DCrossAttn. Class labels map to diffusers' `class_embedding`
(num_class_embeds), a vector y (adm_in_channels) to class_embed_type="projection".

UNet2DModel is the counterpart of an unconditional UNet with fused-qkv self-attention (e.g. the
paper's CelebA-HQ LDM-4): ResBlocks and resamplers map as above, each attention block's fused
qkv is split into to_q / to_k / to_v (diffusers_unet2d_config, unet_state_dict_to_diffusers_unet2d).

The module works on plain state dicts and config dicts; diffusers itself is not imported.
Tensors are passed through unchanged (same shapes in both layouts), except the split qkv.
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch

from ldm.nets.unet import UNetModel, attention_head_count, check_unet_config

_RESBLOCK = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
             "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}

# diffusers config entries whose values must be these for the layouts to mean the same network.
_DIFFUSERS_FIXED: dict[str, Any] = {
    "center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0,
    "mid_block_type": "UNetMidBlock2DCrossAttn", "only_cross_attention": False, "downsample_padding": 1,
    "mid_block_scale_factor": 1, "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5,
    "dual_cross_attention": False,
    "num_attention_heads": None, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
    "addition_embed_type": None, "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional", "time_embedding_dim": None, "time_embedding_act_fn": None,
    "timestep_post_act": None, "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "attention_type": "default", "class_embeddings_concat": False, "mid_block_only_cross_attention": None,
    "cross_attention_norm": None, "reverse_transformer_layers_per_block": None,
}


def full_unet_kwargs(unet_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """`unet_kwargs` completed with UNetModel's defaults and checked (unknown names are refused)."""
    params = inspect.signature(UNetModel.__init__).parameters
    unknown = sorted(set(unet_kwargs) - set(params))
    if unknown:
        raise ValueError(f"not UNetModel arguments: {unknown}")
    full = {name: p.default for name, p in params.items() if name != "self"}
    full.update(unet_kwargs)
    missing = sorted(k for k, v in full.items() if v is inspect.Parameter.empty)
    if missing:
        raise ValueError(f"UNet config lacks required arguments {missing}")
    if full["num_heads_upsample"] == -1:
        full["num_heads_upsample"] = full["num_heads"]
    full["channel_mult"] = [int(m) for m in full["channel_mult"]]
    full["attention_resolutions"] = [int(r) for r in full["attention_resolutions"]]
    check_unet_config(full)
    return full


def _check_convertible(cfg: Mapping[str, Any]) -> None:
    problems = []
    if not cfg["use_spatial_transformer"]:
        problems.append("use_spatial_transformer must be true (UNet2DConditionModel has no "
                        "fused-qkv self-attention blocks)")
    if cfg["resblock_updown"]:
        problems.append("resblock_updown must be false (diffusers resamples with Downsample2D/Upsample2D)")
    if not cfg["conv_resample"]:
        problems.append("conv_resample must be true (diffusers' resamplers always have a conv)")
    if problems:
        raise ValueError("this UNet has no UNet2DConditionModel equivalent: " + "; ".join(problems))


def _level_heads(cfg: Mapping[str, Any]) -> list[int]:
    """Heads of the transformers at each level (the last level's count also serves the middle)."""
    return [attention_head_count(cfg["model_channels"] * m, num_heads=cfg["num_heads"],
                                 num_head_channels=cfg["num_head_channels"],
                                 num_heads_upsample=cfg["num_heads_upsample"], legacy=cfg["legacy"],
                                 spatial_transformer=True, decoder=False)
            for m in cfg["channel_mult"]]


def _attention_levels(cfg: Mapping[str, Any]) -> list[bool]:
    return [2 ** level in cfg["attention_resolutions"] for level in range(len(cfg["channel_mult"]))]


def diffusers_config_from_unet_kwargs(unet_kwargs: Mapping[str, Any], sample_size: int | None = None) -> dict[str, Any]:
    """The UNet2DConditionModel config (a plain dict for `UNet2DConditionModel(**config)` or
    `from_config`) of the network that UNetModel(**unet_kwargs) builds. `sample_size` is the
    latent side length, informational in diffusers."""
    cfg = full_unet_kwargs(unet_kwargs)
    _check_convertible(cfg)
    attn = _attention_levels(cfg)
    config = dict(_DIFFUSERS_FIXED)
    config.update(
        sample_size=sample_size,
        in_channels=cfg["in_channels"],
        out_channels=cfg["out_channels"],
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        block_out_channels=[cfg["model_channels"] * m for m in cfg["channel_mult"]],
        layers_per_block=cfg["num_res_blocks"],
        dropout=cfg["dropout"],
        cross_attention_dim=cfg["context_dim"],
        transformer_layers_per_block=cfg["transformer_depth"],
        # diffusers' `attention_head_dim` is, for this model, the number of heads per level.
        attention_head_dim=_level_heads(cfg),
        resnet_time_scale_shift="scale_shift" if cfg["use_scale_shift_norm"] else "default",
        num_class_embeds=cfg["num_classes"],
        class_embed_type="projection" if cfg["adm_in_channels"] is not None else None,
        projection_class_embeddings_input_dim=cfg["adm_in_channels"],
        use_linear_projection=cfg["use_linear_in_transformer"],
        upcast_attention=False,  # a precision setting only; accepted either way on import
    )
    return config


def _single(value: Any) -> Any:
    """A per-block diffusers entry that must hold one value: that value, or None when it varies."""
    if isinstance(value, (list, tuple)):
        return value[0] if len(set(value)) == 1 else None
    return value


def _heads_rule(widths: list[int], heads: list[int]) -> tuple[int, int] | None:
    """(num_heads, num_head_channels) giving `heads` at `widths`: a fixed count or a fixed width."""
    if len(set(heads)) == 1:
        return heads[0], -1
    head_widths = {w // h for w, h in zip(widths, heads)}
    if len(head_widths) == 1 and all(w % h == 0 for w, h in zip(widths, heads)):
        return -1, head_widths.pop()
    return None


def unet_kwargs_from_diffusers_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """UNetModel arguments for the network a UNet2DConditionModel `config` describes; refuses
    configurations outside the SD-style cross-attention family, naming the offending entries."""
    wrong = {k: config[k] for k, v in _DIFFUSERS_FIXED.items() if k in config and config[k] != v}
    down = list(config["down_block_types"])
    attn = [t == "CrossAttnDownBlock2D" for t in down]
    if any(t not in ("CrossAttnDownBlock2D", "DownBlock2D") for t in down):
        wrong["down_block_types"] = down
    if list(config["up_block_types"]) != ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)]:
        wrong["up_block_types"] = list(config["up_block_types"])
    class_type = config.get("class_embed_type")
    if class_type not in (None, "projection"):
        wrong["class_embed_type"] = class_type
    time_shift = config.get("resnet_time_scale_shift", "default")
    if time_shift not in ("default", "scale_shift"):
        wrong["resnet_time_scale_shift"] = time_shift
    single = {k: _single(config.get(k, d)) for k, d in
              (("transformer_layers_per_block", 1), ("layers_per_block", None), ("cross_attention_dim", None))}
    wrong.update({k: config.get(k) for k, v in single.items() if v is None})
    widths = [int(w) for w in config["block_out_channels"]]
    if any(w % widths[0] for w in widths):
        wrong["block_out_channels"] = widths
    heads = config["attention_head_dim"]
    heads = [int(h) for h in heads] if isinstance(heads, (list, tuple)) else [int(heads)] * len(widths)
    rule = _heads_rule(widths, heads)
    if rule is None:
        wrong["attention_head_dim"] = heads
    if wrong:
        raise ValueError(f"diffusers UNet config entries without a UNetModel equivalent: {wrong}")
    return dict(
        in_channels=config["in_channels"],
        out_channels=config["out_channels"],
        model_channels=widths[0],
        num_res_blocks=single["layers_per_block"],
        attention_resolutions=[2 ** level for level, a in enumerate(attn) if a],
        dropout=config.get("dropout", 0.0),
        channel_mult=[w // widths[0] for w in widths],
        num_classes=config.get("num_class_embeds"),
        adm_in_channels=config.get("projection_class_embeddings_input_dim") if class_type == "projection" else None,
        num_heads=rule[0],
        num_head_channels=rule[1],
        use_scale_shift_norm=time_shift == "scale_shift",
        use_spatial_transformer=True,
        transformer_depth=single["transformer_layers_per_block"],
        context_dim=single["cross_attention_dim"],
        use_linear_in_transformer=bool(config.get("use_linear_projection", False)),
    )


def _module_map(cfg: Mapping[str, Any]) -> dict[str, str]:
    """Our module path -> diffusers module path, for every module that holds parameters."""
    mapping = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
               "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}
    if cfg["num_classes"] is not None:
        mapping["label_emb"] = "class_embedding"
    elif cfg["adm_in_channels"] is not None:
        mapping.update({"label_emb.0.0": "class_embedding.linear_1", "label_emb.0.2": "class_embedding.linear_2"})

    def resblock(ours: str, theirs: str) -> None:
        mapping.update({f"{ours}.{a}": f"{theirs}.{b}" for a, b in _RESBLOCK.items()})

    attn, n_res, levels = _attention_levels(cfg), cfg["num_res_blocks"], len(cfg["channel_mult"])
    for level in range(levels):
        for j in range(n_res):
            n = 1 + level * (n_res + 1) + j
            resblock(f"input_blocks.{n}.0", f"down_blocks.{level}.resnets.{j}")
            if attn[level]:
                mapping[f"input_blocks.{n}.1"] = f"down_blocks.{level}.attentions.{j}"
        if level < levels - 1:
            mapping[f"input_blocks.{(level + 1) * (n_res + 1)}.0.op"] = f"down_blocks.{level}.downsamplers.0.conv"
    resblock("middle_block.0", "mid_block.resnets.0")
    mapping["middle_block.1"] = "mid_block.attentions.0"
    resblock("middle_block.2", "mid_block.resnets.1")
    for k in range(levels):
        level = levels - 1 - k
        for j in range(n_res + 1):
            n = k * (n_res + 1) + j
            resblock(f"output_blocks.{n}.0", f"up_blocks.{k}.resnets.{j}")
            if attn[level]:
                mapping[f"output_blocks.{n}.1"] = f"up_blocks.{k}.attentions.{j}"
            if level > 0 and j == n_res:
                mapping[f"output_blocks.{n}.{2 if attn[level] else 1}.conv"] = f"up_blocks.{k}.upsamplers.0.conv"
    return mapping


def _split(key: str, modules: Mapping[str, str]) -> tuple[str, list[str]] | None:
    """(the module `key`'s longest module prefix maps to in `modules`, the rest of the key's
    parts), or None when no prefix is in `modules`."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in modules:
            return modules[prefix], parts[cut:]
    return None


def _refuse_unmapped(unmapped: list[str], direction: str) -> None:
    if unmapped:
        raise ValueError(f"{len(unmapped)} keys have no {direction} counterpart for this UNet config "
                         f"(does the config match the weights?): {unmapped[:20]}")


def _rename(state_dict: Mapping[str, torch.Tensor], modules: Mapping[str, str],
            direction: str) -> dict[str, torch.Tensor]:
    """Rename keys by their longest module prefix found in `modules`; refuse keys without one."""
    out, unmapped = {}, []
    for key, value in state_dict.items():
        found = _split(key, modules)
        if found is None:
            unmapped.append(key)
        else:
            out[".".join([found[0], *found[1]])] = value
    _refuse_unmapped(unmapped, direction)
    return out


def unet_state_dict_to_diffusers(state_dict: Mapping[str, torch.Tensor],
                                 unet_kwargs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Our UNet weights (keys as in `UNetModel(**unet_kwargs).state_dict()`) in diffusers' layout."""
    cfg = full_unet_kwargs(unet_kwargs)
    _check_convertible(cfg)
    return _rename(state_dict, _module_map(cfg), "diffusers")


def diffusers_state_dict_to_unet(state_dict: Mapping[str, torch.Tensor],
                                 unet_kwargs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """diffusers UNet2DConditionModel weights in our layout, for `UNetModel(**unet_kwargs)`
    (e.g. the kwargs from `unet_kwargs_from_diffusers_config`)."""
    cfg = full_unet_kwargs(unet_kwargs)
    _check_convertible(cfg)
    return _rename(state_dict, {v: k for k, v in _module_map(cfg).items()}, "UNetModel")


# --- UNet2DModel (unconditional, fused-qkv self-attention) ----------------------------------------

def _unet2d_problems(cfg: Mapping[str, Any]) -> list[str]:
    checks = {
        "use_spatial_transformer is set (UNet2DConditionModel is the counterpart)": cfg["use_spatial_transformer"],
        "class or vector conditioning": cfg["num_classes"] is not None or cfg["adm_in_channels"] is not None,
        "use_scale_shift_norm": cfg["use_scale_shift_norm"],
        "resblock_updown": cfg["resblock_updown"],
        "conv_resample is false": not cfg["conv_resample"],
        "a fixed head count (UNet2DModel fixes the head width: set num_head_channels)": cfg["num_head_channels"] == -1,
    }
    return [what for what, bad in checks.items() if bad]


def _check_unet2d(unet_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    cfg = full_unet_kwargs(unet_kwargs)
    problems = _unet2d_problems(cfg)
    if problems:
        raise ValueError("no diffusers UNet2DModel mapping for " + "; ".join(problems))
    return cfg


def diffusers_unet2d_config(unet_kwargs: Mapping[str, Any], sample_size: int | None = None) -> dict[str, Any]:
    """The diffusers UNet2DModel config of the unconditional self-attention network that
    UNetModel(**unet_kwargs) builds; refuses the settings UNet2DModel cannot express."""
    cfg = _check_unet2d(unet_kwargs)
    attn = _attention_levels(cfg)
    return dict(sample_size=sample_size, in_channels=cfg["in_channels"], out_channels=cfg["out_channels"],
                layers_per_block=cfg["num_res_blocks"],
                block_out_channels=[cfg["model_channels"] * m for m in cfg["channel_mult"]],
                down_block_types=["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
                up_block_types=["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
                attention_head_dim=cfg["num_head_channels"], norm_num_groups=32, norm_eps=1e-5,
                flip_sin_to_cos=True, freq_shift=0, dropout=cfg["dropout"], downsample_padding=1,
                act_fn="silu", mid_block_scale_factor=1, add_attention=True)


def _split_qkv(value: torch.Tensor, head_dim: int, new_order: bool) -> tuple[torch.Tensor, ...]:
    """Our fused Conv1d qkv weight (3C, C, 1) or bias (3C,) as separate q, k, v (C, C) / (C,)."""
    fused = value.squeeze(-1) if value.ndim == 3 else value
    c = fused.shape[0] // 3
    rest = fused.shape[1:]
    if new_order:  # [q, k, v], each split into heads
        return tuple(fused.reshape(3, c, *rest).unbind(0))
    # legacy: per head [q_h, k_h, v_h]
    per_head = fused.reshape(c // head_dim, 3, head_dim, *rest)
    return tuple(per_head[:, i].reshape(c, *rest) for i in range(3))


def unet_state_dict_to_diffusers_unet2d(state_dict: Mapping[str, torch.Tensor],
                                        unet_kwargs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Our weights of an unconditional self-attention UNet in diffusers UNet2DModel's layout:
    ResBlocks and resamplers as for UNet2DConditionModel; attention norm -> group_norm, fused qkv
    -> to_q / to_k / to_v, proj_out (Conv1d) -> to_out.0 (Linear)."""
    cfg = _check_unet2d(unet_kwargs)
    modules = _module_map(cfg)
    out: dict[str, torch.Tensor] = {}
    unmapped = []
    for key, value in state_dict.items():
        found = _split(key, modules)
        if found is None:
            unmapped.append(key)
            continue
        target, (layer, *leaf) = found
        if ".attentions." not in target:
            out[".".join([target, layer, *leaf])] = value
        elif layer == "norm":
            out[".".join([target, "group_norm", *leaf])] = value
        elif layer == "qkv":
            for name, part in zip(("to_q", "to_k", "to_v"),
                                  _split_qkv(value, cfg["num_head_channels"], cfg["use_new_attention_order"])):
                out[".".join([target, name, *leaf])] = part
        elif layer == "proj_out":
            out[".".join([target, "to_out", "0", *leaf])] = value.squeeze(-1) if value.ndim == 3 else value
        else:
            raise ValueError(f"unexpected attention parameter {key}")
    _refuse_unmapped(unmapped, "diffusers")
    return out
