"""OpenCLIP's text-tower layout (SD 2.x's `cond_stage_model.model.*`) <-> our FrozenOpenCLIPTextEncoder
(a transformers CLIPTextModel under `cond_stage_model.transformer.*`).

Pure functions on state dicts; open_clip itself is not imported. Correspondence (N = block):
    token_embedding.weight                  transformer.embeddings.token_embedding.weight
    positional_embedding                    transformer.embeddings.position_embedding.weight
    transformer.resblocks.N.ln_1 / ln_2     transformer.encoder.layers.N.layer_norm1 / layer_norm2
    transformer.resblocks.N.attn.in_proj_{weight,bias}   ...self_attn.{q,k,v}_proj (split in three, q k v)
    transformer.resblocks.N.attn.out_proj   ...self_attn.out_proj
    transformer.resblocks.N.mlp.c_fc / c_proj            ...mlp.fc1 / fc2
    ln_final                                transformer.final_layer_norm
    text_projection, logit_scale            text_projection, logit_scale (kept, unused by the condition)
Keys under the prefix that are not part of the text tower (a `visual.*` tower, say) are left as
they are, so a strict load lists them.
"""
from __future__ import annotations

import re
from collections.abc import Mapping

import torch

REFERENCE_PREFIX = "cond_stage_model.model."
OURS_PREFIX = "cond_stage_model."

_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
          "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_PLAIN = {"token_embedding.weight": "transformer.embeddings.token_embedding.weight",
          "positional_embedding": "transformer.embeddings.position_embedding.weight",
          "ln_final.weight": "transformer.final_layer_norm.weight", "ln_final.bias": "transformer.final_layer_norm.bias",
          "text_projection": "text_projection", "logit_scale": "logit_scale"}
_RESBLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)[._](weight|bias)")  # attn.in_proj_weight too
_LAYER = re.compile(r"transformer\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")


def openclip_to_ours(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A checkpoint state dict with the text tower under `cond_stage_model.model.*` (open_clip's
    names) renamed to FrozenOpenCLIPTextEncoder's `cond_stage_model.*` keys; other keys unchanged."""
    out: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        if not name.startswith(REFERENCE_PREFIX):
            out[name] = value
            continue
        key = name[len(REFERENCE_PREFIX):]
        block = _RESBLOCK.fullmatch(key)
        if key in _PLAIN:
            out[OURS_PREFIX + _PLAIN[key]] = value
        elif block and block[2] == "attn.in_proj":
            for part, chunk in zip("qkv", value.chunk(3, dim=0)):
                out[f"{OURS_PREFIX}transformer.encoder.layers.{block[1]}.self_attn.{part}_proj.{block[3]}"] = chunk
        elif block and block[2] in _BLOCK:
            out[f"{OURS_PREFIX}transformer.encoder.layers.{block[1]}.{_BLOCK[block[2]]}.{block[3]}"] = value
        else:
            out[name] = value  # not a text-tower tensor: load_strict names it
    return out


def ours_to_openclip(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of openclip_to_ours: FrozenOpenCLIPTextEncoder's keys back in the SD 2.x layout."""
    plain = {v: k for k, v in _PLAIN.items()}
    block_names = {v: k for k, v in _BLOCK.items()}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for name, value in state.items():
        key = name[len(OURS_PREFIX):] if name.startswith(OURS_PREFIX) else None
        layer = _LAYER.fullmatch(key) if key is not None else None
        if key in plain:
            out[REFERENCE_PREFIX + plain[key]] = value
        elif layer and layer[2] in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            qkv.setdefault((layer[1], layer[3]), {})[layer[2][10]] = value
        elif layer and layer[2] in block_names:
            out[f"{REFERENCE_PREFIX}transformer.resblocks.{layer[1]}.{block_names[layer[2]]}.{layer[3]}"] = value
        else:
            out[name] = value
    for (n, kind), parts in qkv.items():
        if set(parts) != set("qkv"):
            raise ValueError(f"text block {n}: {kind} of {sorted(parts)} only; q, k and v are needed to write "
                             "open_clip's in_proj")
        out[f"{REFERENCE_PREFIX}transformer.resblocks.{n}.attn.in_proj_{kind}"] = torch.cat(
            [parts["q"], parts["k"], parts["v"]])
    return out
