"""Original LDM checkpoints (CompVis/latent-diffusion) in and out.

Our LatentDiffusion keeps the reference's parameter names, so a reference checkpoint loads with
strict key checking once the module is built from the reference's model config (the
`model.params` block of its YAML: unet_config, first_stage_config, cond_stage_config, ...), and
our state dict is already a reference state dict.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldm.diffusion.ema import EMA
from ldm.first_stage.identity import IdentityFirstStage
from ldm.first_stage.kl import AutoencoderKL
from ldm.first_stage.vq import AutoencoderVQ
from ldm.modules.latent_diffusion import LatentDiffusion
from ldm.nets.unet import UNetModel
from ldm.utils.checkpoint import load_state_dict_file, load_strict, sub_state_dict

# Reference UNet arguments that only concern its own code paths.
_UNET_IGNORED = ("image_size", "dims", "use_fp16", "n_embed")
# Reference LatentDiffusion arguments we take over as they are.
_DIRECT = ("conditioning_key", "cond_stage_key", "cond_stage_trainable", "timesteps", "beta_schedule",
           "linear_start", "linear_end", "cosine_s", "parameterization", "loss_type", "learn_logvar",
           "logvar_init", "scale_factor", "scale_by_std")


def _target(node: Mapping[str, Any] | str | None) -> str | None:
    return node.get("target") if isinstance(node, Mapping) else node


def build_first_stage(config: Mapping[str, Any]):
    """Our first stage for a reference first_stage_config."""
    target, params = _target(config), dict(config.get("params", {}))
    params.pop("lossconfig", None)
    params.pop("ckpt_path", None)
    params.pop("monitor", None)
    if target.endswith("AutoencoderKL"):
        return AutoencoderKL(params["ddconfig"], embed_dim=params["embed_dim"])
    if target.endswith(("VQModelInterface", "VQModel")):
        return AutoencoderVQ(params["ddconfig"], n_embed=params["n_embed"], embed_dim=params["embed_dim"], legacy=True)
    if target.endswith("IdentityFirstStage"):
        return IdentityFirstStage()
    raise ValueError(f"unsupported reference first stage {target!r}")


def build_cond_stage(config: Mapping[str, Any] | str | None):
    """Our condition encoder for a reference cond_stage_config (None when unconditional)."""
    target = _target(config)
    if target in (None, "__is_unconditional__", "__is_first_stage__"):
        return None
    params = dict(config.get("params", {}))
    if target.endswith("ClassEmbedder"):
        from ldm.nets.embedders import ClassEmbedder

        return ClassEmbedder(embed_dim=params["embed_dim"], n_classes=params.get("n_classes", 1000),
                             key=params.get("key", "class"))
    raise ValueError(f"unsupported reference condition encoder {target!r}: build the module from our configs "
                     "and load the weights with ldm.utils.checkpoint.load_strict")


def module_from_reference_config(config: Mapping[str, Any], **overrides: Any) -> LatentDiffusion:
    """A LatentDiffusion equivalent to the reference model described by `config` (the
    `model.params` of a reference YAML). `overrides` set our extra options (uncond_value, ...)."""
    unet_params = {k: v for k, v in config["unet_config"]["params"].items() if k not in _UNET_IGNORED}
    kwargs = {k: config[k] for k in _DIRECT if k in config}
    if kwargs.get("conditioning_key") == "crossattn" and _target(config.get("cond_stage_config")) is None:
        raise ValueError("a crossattn reference model needs its cond_stage_config")
    first_stage = build_first_stage(config["first_stage_config"])
    kwargs.update(
        unet=UNetModel(**unet_params),
        first_stage=first_stage,
        cond_stage=build_cond_stage(config.get("cond_stage_config")),
        ema_decay=0.9999 if config.get("use_ema", True) else None,
        # the reference's image_size is the latent side; ours is in pixels
        image_size=int(config.get("image_size", 64)) * first_stage.downsampling_factor,
    )
    kwargs.update(overrides)
    return LatentDiffusion(**kwargs)


def load_reference_checkpoint(path: str | Path, config: Mapping[str, Any], **overrides: Any) -> LatentDiffusion:
    """Build from `config` and load the reference checkpoint at `path` strictly (schedule buffers
    and scale_factor included); a mismatch is refused with the list of keys."""
    module = module_from_reference_config(config, **overrides)
    load_strict(module, load_state_dict_file(path), str(path))
    return module.eval()


def export_reference_checkpoint(module: LatentDiffusion, path: str | Path) -> Path:
    """Write `module` as a reference-style Lightning checkpoint ({'state_dict': ...})."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()}}, path)
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
