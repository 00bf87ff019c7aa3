"""Original LDM checkpoints (CompVis/latent-diffusion, Stable Diffusion 1.x and 2.x) in and out.

Our LatentDiffusion keeps the reference's parameter names, so a reference checkpoint loads with
strict key checking once the module is built from the reference's model config (the
`model.params` block of its YAML: unet_config, first_stage_config, cond_stage_config, ...), and
our state dict is already a reference state dict. The one mapping is explicit: SD-1 files were
written with transformers 4, whose CLIP text model has a `text_model.` level and a
`position_ids` buffer that transformers 5 no longer has (map_text_model_keys); SD 2.x's OpenCLIP
text tower (`cond_stage_model.model.*`, open_clip's names) runs as a transformers CLIPTextModel,
its keys mapped by ldm.convert.openclip, in and out.

The condition encoders of the released models (REFERENCE.md section 12) become ours:
  ClassEmbedder -> ClassEmbedder; BERTEmbedder -> TransformerTextEncoder with the BERT tokenizer;
  FrozenCLIPEmbedder -> FrozenCLIPTextEncoder; FrozenOpenCLIPEmbedder -> FrozenOpenCLIPTextEncoder;
  torch.nn.Identity (super-resolution) -> LowResConcat;
  SpatialRescaler -> SpatialRescaler (semantic synthesis); __is_first_stage__ (inpainting) -> the
  first stage itself as cond stage, with an InpaintConcat in the reference's mask convention.
The batch keys are ours whatever the YAML names them (the YAML's cond_stage_key is the key of the
reference's data pipeline): captions under `caption`, the low-res image under `lowres`, so
prompts, sample.py and our data feed a released model as they feed ours.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldm.convert.openclip import openclip_to_ours, ours_to_openclip
from ldm.diffusion.ema import EMA
from ldm.first_stage.base import FirstStage
from ldm.modules.latent_diffusion import LatentDiffusion
from ldm.nets.concat import InpaintConcat, LowResConcat
from ldm.nets.embedders import (BertCaptionTokenizer, ClassEmbedder, FrozenCLIPTextEncoder,
                                FrozenOpenCLIPTextEncoder, SpatialRescaler, TransformerTextEncoder)
from ldm.nets.unet import UNetModel
from ldm.utils.checkpoint import load_state_dict_file, load_strict, sub_state_dict

# Reference UNet arguments that only concern its own code paths.
_UNET_IGNORED = ("image_size", "dims", "use_fp16", "n_embed")
# Reference LatentDiffusion arguments we take over as they are, with the reference's defaults
# where ours differ (a YAML that leaves them out means the reference's value).
_DIRECT = ("timesteps", "beta_schedule", "linear_start", "linear_end", "cosine_s", "parameterization", "loss_type",
           "learn_logvar", "logvar_init", "scale_factor", "scale_by_std", "cond_stage_trainable")
_REFERENCE_DEFAULTS = {"linear_start": 1e-4, "linear_end": 2e-2, "cond_stage_trainable": False}
_CLIP_HUB = "openai/clip-vit-large-patch14"  # FrozenCLIPEmbedder's default version
_BERT_HUB = "bert-base-uncased"  # the reference BERTTokenizer's hard-coded tokenizer
_SUPPORTED = ("__is_unconditional__", "__is_first_stage__", "ClassEmbedder", "BERTEmbedder", "FrozenCLIPEmbedder",
              "FrozenOpenCLIPEmbedder", "torch.nn.Identity", "SpatialRescaler")
# The text towers of open_clip archs (open_clip's model_configs/<arch>.json) released models use;
# FrozenOpenCLIPEmbedder builds them by name. embed_dim: the width of text_projection.
OPENCLIP_TEXT_TOWERS: dict[str, dict[str, int]] = {
    "ViT-H-14": {"width": 1024, "heads": 16, "layers": 24, "embed_dim": 1024, "vocab_size": 49408,
                 "context_length": 77},  # SD 2.x
}
# The reference FrozenOpenCLIPEmbedder tokenizes with open_clip's copy of CLIP's BPE; this hub
# model (the ViT-H-14 weights' own repository) holds the same vocabulary in transformers' format.
_OPENCLIP_TOKENIZER_HUB = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


def _target(node: Mapping[str, Any] | str | None) -> str | None:
    return node.get("target") if isinstance(node, Mapping) else node


def first_stage_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Our first stage's `_target_` config for a reference first_stage_config (what a latent
    diffusion checkpoint then stores to rebuild it)."""
    target, params = _target(config), dict(config.get("params", {}))
    if target.endswith("AutoencoderKL"):
        return {"_target_": "ldm.first_stage.kl.AutoencoderKL", "ddconfig": dict(params["ddconfig"]),
                "embed_dim": params["embed_dim"]}
    if target.endswith(("VQModelInterface", "VQModel")):
        # taming's VectorQuantizer2 with legacy=True, what the released VQ models were trained with
        return {"_target_": "ldm.first_stage.vq.AutoencoderVQ", "ddconfig": dict(params["ddconfig"]),
                "n_embed": params["n_embed"], "embed_dim": params["embed_dim"], "legacy": True}
    if target.endswith("IdentityFirstStage"):
        return {"_target_": "ldm.first_stage.identity.IdentityFirstStage"}
    raise ValueError(f"unsupported reference first stage {target!r}")


def build_first_stage(config: Mapping[str, Any]) -> FirstStage:
    """Our first stage for a reference first_stage_config."""
    from hydra.utils import get_object

    kwargs = first_stage_config(config)
    return get_object(kwargs.pop("_target_"))(**kwargs)  # called directly: its errors stay as they are


def reference_conditioning_key(config: Mapping[str, Any]) -> str | None:
    """The conditioning key the reference derives from a model config: None for
    `__is_unconditional__`, else `conditioning_key`, else 'concat' when `concat_mode` (its default,
    what the released SR / inpainting / semantic YAMLs rely on), else 'crossattn'."""
    if _target(config.get("cond_stage_config")) in (None, "__is_unconditional__"):
        return None
    if config.get("conditioning_key") is not None:
        return config["conditioning_key"]
    return "concat" if config.get("concat_mode", True) else "crossattn"


def build_condition(config: Mapping[str, Any], first_stage: FirstStage,
                    text_encoder: str | None = None) -> dict[str, Any]:
    """Our condition modules for a reference model config: the LatentDiffusion arguments
    conditioning_key, cond_stage, concat_stage, cond_stage_key (and uncond_value "" for text).

    text_encoder: a local folder (or hub name) standing in for the hub model the YAML's text
    encoder names: the BERT tokenizer of a BERTEmbedder (default bert-base-uncased), the CLIP
    tokenizer and text model of a FrozenCLIPEmbedder (default its `version`, openai/clip-vit-large-patch14),
    the tokenizer of a FrozenOpenCLIPEmbedder (default laion/CLIP-ViT-H-14-laion2B-s32B-b79K; its
    text tower is built from `arch` and loaded from the checkpoint).
    """
    node = config.get("cond_stage_config")
    target, key = _target(node), reference_conditioning_key(config)
    params = dict(node.get("params", {})) if isinstance(node, Mapping) else {}
    yaml_key = config.get("cond_stage_key", "image")  # the reference's default
    out: dict[str, Any] = {"conditioning_key": key, "cond_stage": None, "concat_stage": None, "cond_stage_key": None}
    is_text = target is not None and target.endswith(("BERTEmbedder", "FrozenCLIPEmbedder", "FrozenOpenCLIPEmbedder"))
    if text_encoder is not None and not is_text:
        raise ValueError(f"text_encoder={text_encoder!r} given, but this model's condition ({target}) has no text "
                         "encoder: drop it")
    if key is None:
        return out
    wants = {"ClassEmbedder": "crossattn", "BERTEmbedder": "crossattn", "FrozenCLIPEmbedder": "crossattn",
             "FrozenOpenCLIPEmbedder": "crossattn", "torch.nn.Identity": "concat", "SpatialRescaler": "concat",
             "__is_first_stage__": "concat"}
    kind = next((name for name in wants if target == name or target.endswith("." + name)), None)
    if kind is None:
        raise ValueError(f"unsupported reference condition encoder {target!r}; supported: {list(_SUPPORTED)}")
    if key != wants[kind]:
        raise ValueError(f"the reference's {kind} is used with conditioning_key {wants[kind]!r}, this config "
                         f"gives {key!r}: check the YAML's conditioning_key / concat_mode")
    if kind == "ClassEmbedder":
        out.update(cond_stage_key=yaml_key, cond_stage=ClassEmbedder(
            embed_dim=params["embed_dim"], n_classes=params.get("n_classes", 1000), key=params.get("key", "class")))
    elif kind == "BERTEmbedder":
        if not params.get("use_tokenizer", True):
            raise ValueError("a BERTEmbedder without its tokenizer (use_tokenizer: false, the layout-to-image model "
                             "on coordinate tokens) is not supported yet")
        tokenizer = BertCaptionTokenizer(text_encoder or _BERT_HUB)
        # x-transformers' defaults in the reference: 8 heads of 64, no padding mask, a logits head
        out.update(cond_stage_key="caption", uncond_value="", cond_stage=TransformerTextEncoder(
            tokenizer, n_embed=params["n_embed"], n_layer=params["n_layer"], n_head=8, dim_head=64,
            max_seq_len=params.get("max_seq_len", 77), vocab_size=params.get("vocab_size", 30522),
            mask_padding=False, to_logits=True))
    elif kind == "FrozenCLIPEmbedder":
        if params.get("layer", "last") != "last":
            raise ValueError(f"FrozenCLIPEmbedder layer {params['layer']!r} is not supported (only 'last', SD 1.x's)")
        out.update(cond_stage_key="caption", uncond_value="", cond_stage=FrozenCLIPTextEncoder(
            text_encoder or params.get("version", _CLIP_HUB), max_length=params.get("max_length", 77)))
    elif kind == "FrozenOpenCLIPEmbedder":
        arch, layer = params.get("arch", "ViT-H-14"), params.get("layer", "last")
        if arch not in OPENCLIP_TEXT_TOWERS:
            raise ValueError(f"FrozenOpenCLIPEmbedder arch {arch!r} is not known here; known: "
                             f"{sorted(OPENCLIP_TEXT_TOWERS)} (add its text_cfg to OPENCLIP_TEXT_TOWERS)")
        out.update(cond_stage_key="caption", uncond_value="", cond_stage=FrozenOpenCLIPTextEncoder(
            **OPENCLIP_TEXT_TOWERS[arch], tokenizer=text_encoder or _OPENCLIP_TOKENIZER_HUB,
            max_length=params.get("max_length", 77), layer=layer))
    elif kind == "torch.nn.Identity":
        out.update(cond_stage_key="lowres", concat_stage=LowResConcat(key="lowres"))
    elif kind == "SpatialRescaler":
        out.update(cond_stage_key=yaml_key, cond_stage=SpatialRescaler(**params, key=yaml_key))
    else:  # __is_first_stage__: the condition is the first stage's encoding of the masked image
        out.update(cond_stage_key=yaml_key, cond_stage=first_stage, concat_stage=InpaintConcat(
            image_key=yaml_key, mask_key="mask", latent_channels=first_stage.latent_channels,
            hole_value=-1.0, mask_keep=-1.0, mask_fill=1.0))  # scripts/inpaint.py's convention
    return out


def module_from_reference_config(config: Mapping[str, Any], text_encoder: str | None = None,
                                 **overrides: Any) -> LatentDiffusion:
    """A LatentDiffusion equivalent to the reference model described by `config` (the
    `model.params` of a reference YAML). `text_encoder`: see build_condition. `overrides` set our
    extra options (uncond_value, ...)."""
    unet_params = {k: v for k, v in config["unet_config"]["params"].items() if k not in _UNET_IGNORED}
    kwargs = {k: config.get(k, _REFERENCE_DEFAULTS.get(k)) for k in _DIRECT if k in config or k in _REFERENCE_DEFAULTS}
    first_stage = build_first_stage(config["first_stage_config"])
    condition = build_condition(config, first_stage, text_encoder)
    if condition["conditioning_key"] == "crossattn" and condition["cond_stage"] is None:
        raise ValueError("a crossattn reference model needs its cond_stage_config")
    kwargs.update(
        condition,
        unet=UNetModel(**unet_params),
        first_stage=first_stage,
        ema_decay=0.9999 if config.get("use_ema", True) else None,
        # the reference's image_size is the latent side; ours is in pixels
        image_size=int(config.get("image_size", 64)) * first_stage.downsampling_factor,
    )
    kwargs.update(overrides)
    return LatentDiffusion(**kwargs)


def map_text_model_keys(state: Mapping[str, torch.Tensor], module: nn.Module, source: str) -> dict[str, torch.Tensor]:
    """An SD-1 file's CLIP text encoder keys in the installed transformers' names: files written
    with transformers 4 have `...transformer.text_model.<name>` where transformers 5 has
    `...transformer.<name>`, and a `position_ids` buffer (0 .. n-1, checked) that transformers 5
    computes instead of storing. Every other key is left as it is (load_strict judges it)."""
    own = module.state_dict()
    prefix = "cond_stage_model.transformer."
    out: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        if name.startswith(prefix + "text_model.") and name not in own:
            mapped = prefix + name[len(prefix + "text_model."):]
            if mapped.endswith("embeddings.position_ids") and mapped not in own:
                ids = value.flatten().double()
                if not torch.equal(ids, torch.arange(len(ids), dtype=torch.float64)):
                    raise ValueError(f"{source}: {name} is not 0 .. {len(ids) - 1} (some merged SD-1 files carry "
                                     "damaged position ids); this text encoder cannot be reproduced, refusing")
                continue
            name = mapped
        out[name] = value
    return out


def _check_first_stage_copy(state: Mapping[str, torch.Tensor], source: str) -> None:
    # `__is_first_stage__` saves one autoencoder twice; both copies load into the same module,
    # so they must be equal or one would silently win.
    differ = [k for k, v in state.items() if k.startswith("first_stage_model.")
              and (("cond_stage_model." + k[len("first_stage_model."):]) in state)
              and not torch.equal(v, state["cond_stage_model." + k[len("first_stage_model."):]])]
    if differ:
        raise ValueError(f"{source}: the config says __is_first_stage__ (one autoencoder saved as first_stage_model.* "
                         f"and cond_stage_model.*), but {len(differ)} tensors differ between the copies, e.g. "
                         f"{differ[:3]}: this file does not match its config")


def load_reference_checkpoint(path: str | Path, config: Mapping[str, Any], text_encoder: str | None = None,
                              **overrides: Any) -> LatentDiffusion:
    """Build from `config` and load the reference checkpoint at `path` strictly (schedule buffers
    and scale_factor included); a mismatch is refused with the list of keys. `text_encoder` and
    `overrides` as in module_from_reference_config."""
    module = module_from_reference_config(config, text_encoder=text_encoder, **overrides)
    state = load_state_dict_file(path)
    if isinstance(module.cond_stage_model, FrozenOpenCLIPTextEncoder):
        state = openclip_to_ours(state)
    elif isinstance(module.cond_stage_model, FrozenCLIPTextEncoder):
        state = map_text_model_keys(state, module, str(path))
    if module.cond_stage_model is module.first_stage_model:
        _check_first_stage_copy(state, str(path))
    load_strict(module, state, str(path))
    return module.eval()


def load_reference(ckpt: str | Path, config_path: str | Path, **overrides: Any) -> LatentDiffusion | FirstStage:
    """A released checkpoint with its YAML, as the zoo ships them (models/ldm/<name>/config.yaml,
    models/first_stage_models/<name>/config.yaml, SD's v1-inference.yaml): a latent diffusion
    model (load_reference_checkpoint, `overrides` passed on) or a first-stage autoencoder
    (first_stage_from_checkpoint, frozen)."""
    from omegaconf import OmegaConf

    yaml = OmegaConf.to_container(OmegaConf.load(config_path), resolve=True)
    node = yaml.get("model", yaml)
    params = node.get("params", node)
    if "unet_config" in params:
        target = node.get("target", "ldm.models.diffusion.ddpm.LatentDiffusion")
        if target.rsplit(".", 1)[-1] != "LatentDiffusion":
            raise ValueError(f"{config_path} describes a {target}: only the reference's LatentDiffusion loads here "
                             "(not SD's upscaling, inpainting or depth variants; docs/checkpoints.md)")
        return load_reference_checkpoint(ckpt, params, **overrides)
    if "ddconfig" in params:
        if overrides:
            raise ValueError(f"{config_path} describes an autoencoder; {sorted(overrides)} are latent diffusion "
                             "options: drop them")
        return first_stage_from_checkpoint(first_stage_config(node), ckpt)
    raise ValueError(f"{config_path} has neither a unet_config (a latent diffusion model) nor a ddconfig (an "
                     "autoencoder) under model.params: pass the YAML that came with the checkpoint")


def reference_state_dict(module: LatentDiffusion) -> dict[str, torch.Tensor]:
    """`module`'s state dict in the reference layout: ours, with an OpenCLIP text tower in open_clip's names."""
    state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    return ours_to_openclip(state) if isinstance(module.cond_stage_model, FrozenOpenCLIPTextEncoder) else state


def export_reference_checkpoint(module: LatentDiffusion, path: str | Path) -> Path:
    """Write `module` as a reference-style Lightning checkpoint ({'state_dict': ...})."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": reference_state_dict(module)}, path)
    return path


def first_stage_from_checkpoint(model: Mapping[str, Any], path: str | Path) -> nn.Module:
    """The first stage built from the config `model` (a `_target_` node, passed unbuilt:
    configs/first_stage/from_checkpoint.yaml sets `_recursive_: false`) with the weights at `path`:
    - an original LDM autoencoder checkpoint (e.g. the released vq-f4 / kl-f8 model.ckpt), its
      training-only `loss.*` entries (LPIPS, discriminator) left out;
    - a full LDM checkpoint (its `first_stage_model.*`);
    - our autoencoder run's .ckpt (its `first_stage.*`; the EMA weights when the run kept an EMA,
      as ldm.modules.loading.load_first_stage takes them).
    Loaded strictly and frozen. `build_config` is set to `model`, so a latent diffusion checkpoint
    stores the architecture and rebuilds without `path`."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    config = OmegaConf.to_container(OmegaConf.create(model), resolve=True)
    first_stage = instantiate(config, _convert_="all")
    state = load_state_dict_file(path)
    ema: dict[str, torch.Tensor] = {}
    if any(k.startswith("first_stage_model.") for k in state):
        state = sub_state_dict(state, "first_stage_model.")
    elif any(k.startswith("first_stage.") for k in state):  # ldm.modules.autoencoder.AutoencoderModule
        ema, state = sub_state_dict(state, "ema."), sub_state_dict(state, "first_stage.")
    state = {k: v for k, v in state.items() if not k.startswith("loss.")}
    load_strict(first_stage, state, str(path))
    if ema:
        shadow = EMA(first_stage)
        load_strict(shadow, ema, f"{path} (ema.*)")
        shadow.copy_to(first_stage)
    first_stage.build_config = config
    return first_stage.eval().requires_grad_(False)
