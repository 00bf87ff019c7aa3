"""diffusers Stable-Diffusion pipeline folders (unet/, vae/, text_encoder/, tokenizer/, scheduler/,
model_index.json) <-> our LatentDiffusion: `load_diffusers_pipeline` / `convert` read one,
`export_diffusers` writes one that diffusers' StableDiffusionPipeline.from_pretrained loads and
samples as we do (`ldm-convert`, ldm/cli/convert.py, is the command line).

The export covers what that pipeline can represent: a KL first stage, a UNet conditioned by
cross-attention only, on a frozen CLIP text encoder's last layer (SD 1.x, our CLIP models) or an
OpenCLIP tower's penultimate layer (SD 2.x: written, as diffusers' own SD-2 folders are, as a
CLIPTextModel without its last block, whose final LayerNorm output is then that condition).
diffusers itself is not imported: the folder is written with transformers and safetensors.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate

from ldm.convert.diffusers_unet import (diffusers_config_from_unet_kwargs, diffusers_state_dict_to_unet,
                                        unet_kwargs_from_diffusers_config, unet_state_dict_to_diffusers)
from ldm.convert.diffusers_vae import ddconfig_from_diffusers, diffusers_vae_config, from_diffusers, to_diffusers
from ldm.first_stage.kl import AutoencoderKL
from ldm.modules.latent_diffusion import LatentDiffusion
from ldm.nets.embedders import FrozenCLIPTextEncoder, FrozenOpenCLIPTextEncoder
from ldm.utils.checkpoint import load_state_dict_file, load_strict, sub_state_dict

# diffusers scheduler names -> ours (REFERENCE.md section 1: diffusers swaps linear and scaled_linear)
BETA_SCHEDULES = {"scaled_linear": "linear", "linear": "sqrt_linear", "squaredcos_cap_v2": "cosine"}
PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}


def _config(folder: Path, name: str) -> dict[str, Any]:
    path = folder / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: pass a diffusers pipeline folder (save_pretrained output)")
    return json.loads(path.read_text())


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
        if (folder / name).is_file():
            return load_state_dict_file(folder / name)
    raise FileNotFoundError(f"no diffusion_pytorch_model.safetensors or .bin in {folder}")


def pipeline_build_config(folder: str | Path) -> dict[str, Any]:
    """Our model config (a `_target_` tree, as train.py stores it) for a diffusers pipeline folder."""
    folder = Path(folder).resolve()
    unet_cfg, vae_cfg = _config(folder, "unet/config.json"), _config(folder, "vae/config.json")
    sched = _config(folder, "scheduler/scheduler_config.json")
    if sched.get("beta_schedule", "linear") not in BETA_SCHEDULES:
        raise ValueError(f"unsupported scheduler beta_schedule {sched.get('beta_schedule')!r}; known: {sorted(BETA_SCHEDULES)}")
    ddconfig, embed_dim = ddconfig_from_diffusers(vae_cfg)
    f = 2 ** (len(ddconfig["ch_mult"]) - 1)
    return {
        "_target_": "ldm.modules.latent_diffusion.LatentDiffusion",
        "unet": {"_target_": "ldm.nets.unet.UNetModel", **unet_kwargs_from_diffusers_config(unet_cfg)},
        "first_stage": {"_target_": "ldm.first_stage.kl.AutoencoderKL", "ddconfig": ddconfig, "embed_dim": embed_dim},
        "cond_stage": {"_target_": "ldm.nets.embedders.FrozenCLIPTextEncoder", "version": str(folder / "text_encoder"),
                       "tokenizer": str(folder / "tokenizer")},
        "conditioning_key": "crossattn", "cond_stage_key": "caption", "cond_stage_trainable": False,
        "uncond_value": "",
        "timesteps": int(sched.get("num_train_timesteps", 1000)),
        "beta_schedule": BETA_SCHEDULES[sched.get("beta_schedule", "linear")],
        "linear_start": float(sched.get("beta_start", 0.00085)), "linear_end": float(sched.get("beta_end", 0.012)),
        "parameterization": PREDICTION_TYPES[sched.get("prediction_type", "epsilon")],
        "scale_factor": float(vae_cfg.get("scaling_factor", 0.18215)), "scale_by_std": False, "ema_decay": None,
        "image_size": int(unet_cfg.get("sample_size", 64)) * f,
    }


def load_diffusers_pipeline(folder: str | Path) -> LatentDiffusion:
    """A LatentDiffusion with the pipeline's UNet, VAE and CLIP text encoder (strict key checks)."""
    folder = Path(folder)
    config = pipeline_build_config(folder)
    module = instantiate(config, _convert_="all")
    unet_kwargs = {k: v for k, v in config["unet"].items() if k != "_target_"}
    load_strict(module.model.diffusion_model, diffusers_state_dict_to_unet(_weights(folder / "unet"), unet_kwargs),
                str(folder / "unet"))
    load_strict(module.first_stage_model, from_diffusers(_weights(folder / "vae")), str(folder / "vae"))
    module.build_config = config
    return module.eval()


def convert(folder: str | Path, out: str | Path) -> Path:
    """Write the pipeline as our checkpoint ({state_dict, build_config}) at `out`."""
    module = load_diffusers_pipeline(folder)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": module.state_dict(), "build_config": module.build_config}, out)
    return out


# The oldest diffusers release whose StableDiffusionPipeline reads the folders written here
# (the `_diffusers_version` entries; diffusers warns only when a folder is newer than itself).
DIFFUSERS_FORMAT_VERSION = "0.30.0"
_UNET_OURS_ONLY = ("use_checkpoint", "channels_last", "fp32_norms")  # execution options, not architecture


def export_problems(module: LatentDiffusion) -> list[str]:
    """Why StableDiffusionPipeline cannot represent `module` (empty when it can)."""
    problems = []
    enc, unet = module.cond_stage_model, module.model.diffusion_model
    if module.model.conditioning_key != "crossattn" or module.concat_stage is not None:
        problems.append(f"its condition is {module.model.conditioning_key!r} (the pipeline feeds the UNet a text "
                        "encoder's tokens by cross-attention only, no concat channels and no class input)")
    if not isinstance(enc, FrozenCLIPTextEncoder):
        problems.append(f"its condition encoder is {type(enc).__name__} (the pipeline's text encoder is a frozen "
                        "CLIPTextModel; the paper's BERT-like model, class embedders and the rest have no "
                        "counterpart there)")
    elif not isinstance(enc, FrozenOpenCLIPTextEncoder) and enc.layer != "last":
        problems.append(f"its CLIP encoder reads layer {enc.layer!r} without the final LayerNorm (the pipeline "
                        "uses the last layer, or with clip_skip a layer through that LayerNorm)")
    if getattr(unet, "num_classes", None) is not None or getattr(unet, "adm_in_channels", None) is not None:
        problems.append("its UNet takes a class / vector input y")
    if not isinstance(module.first_stage_model, AutoencoderKL):
        problems.append(f"its first stage is {type(module.first_stage_model).__name__} (the pipeline's VAE is an "
                        "AutoencoderKL)")
    if module.hparams.beta_schedule not in {v: k for k, v in BETA_SCHEDULES.items()} or (
            module.hparams.beta_schedule == "cosine" and module.hparams.cosine_s != 8e-3):
        problems.append(f"its beta schedule {module.hparams.beta_schedule!r} has no diffusers name")
    return problems


def _save_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def _save_weights(folder: Path, state: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, folder / "diffusion_pytorch_model.safetensors")


def _export_text_encoder(enc: FrozenCLIPTextEncoder, folder: Path) -> None:
    """text_encoder/ and tokenizer/: the CLIPTextModel whose last_hidden_state is enc's condition."""
    from transformers import CLIPTextModel

    model = enc.transformer
    if isinstance(enc, FrozenOpenCLIPTextEncoder) and enc.layer == "penultimate":
        # the final LayerNorm of the block before the last: the model without its last block
        config = model.config.to_dict()
        config["num_hidden_layers"] -= 1
        drop = f"encoder.layers.{model.config.num_hidden_layers - 1}."
        model = CLIPTextModel(type(model.config).from_dict(config))
        load_strict(model, {k: v for k, v in enc.transformer.state_dict().items() if not k.startswith(drop)},
                    "the OpenCLIP text tower")
    model.save_pretrained(folder / "text_encoder")
    # The pipeline pads to model_max_length with the pad token; open_clip's padding is id 0 ("!").
    pad = {"pad_token": "!"} if isinstance(enc, FrozenOpenCLIPTextEncoder) else {}
    tokenizer = type(enc.tokenizer).from_pretrained(enc.tokenizer.name_or_path, model_max_length=enc.max_length, **pad)
    tokenizer.save_pretrained(folder / "tokenizer")


def sampling_state_dict(module: LatentDiffusion) -> dict[str, torch.Tensor]:
    """`module`'s state dict with the EMA weights in `model.*` when it has an EMA (the weights
    sample.py samples with by default), copied; `model_ema.*` left out."""
    ema = module.model_ema
    if ema is None:
        return {k: v.detach().clone() for k, v in module.state_dict().items()}
    ema.store(module.model)
    try:
        ema.copy_to(module.model)
        return {k: v.detach().clone() for k, v in module.state_dict().items() if not k.startswith("model_ema.")}
    finally:
        ema.restore(module.model)


def export_diffusers(module: LatentDiffusion, folder: str | Path) -> Path:
    """Write `module` as a diffusers StableDiffusionPipeline folder. The UNet's EMA weights are
    written when the module has an EMA (what sample.py samples with by default). The scheduler is
    a DDIMScheduler with the reference's timestep grid (leading spacing, steps_offset 1, final
    alpha = alphas_cumprod[0]), so its steps are our compat=True DDIM's. Models the pipeline cannot
    represent are refused with the reason."""
    problems = export_problems(module)
    if problems:
        raise ValueError("this model has no diffusers StableDiffusionPipeline equivalent: " + "; ".join(problems))
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise FileExistsError(f"{folder} exists and is not empty: pass a new folder")
    state = sampling_state_dict(module)
    unet = module.model.diffusion_model
    unet_kwargs = {k: v for k, v in unet.config.items() if k not in _UNET_OURS_ONLY}
    f = module.first_stage_model.downsampling_factor
    unet_config = diffusers_config_from_unet_kwargs(unet_kwargs, sample_size=module.hparams.image_size // f)
    _save_json(folder / "unet" / "config.json", {"_class_name": "UNet2DConditionModel",
                                                 "_diffusers_version": DIFFUSERS_FORMAT_VERSION, **unet_config})
    _save_weights(folder / "unet", unet_state_dict_to_diffusers(sub_state_dict(state, "model.diffusion_model."),
                                                                unet_kwargs))
    vae = module.first_stage_model
    _save_json(folder / "vae" / "config.json", {"_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_FORMAT_VERSION,
                                                **diffusers_vae_config(vae.ddconfig, vae.embed_dim, float(module.scale_factor))})
    _save_weights(folder / "vae", to_diffusers(sub_state_dict(state, "first_stage_model.")))
    _export_text_encoder(module.cond_stage_model, folder)
    hp = module.hparams
    _save_json(folder / "scheduler" / "scheduler_config.json", {
        "_class_name": "DDIMScheduler", "_diffusers_version": DIFFUSERS_FORMAT_VERSION,
        "num_train_timesteps": hp.timesteps, "beta_start": hp.linear_start, "beta_end": hp.linear_end,
        "beta_schedule": {v: k for k, v in BETA_SCHEDULES.items()}[hp.beta_schedule],
        "prediction_type": {v: k for k, v in PREDICTION_TYPES.items()}[module.parameterization],
        "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1, "timestep_spacing": "leading"})
    _save_json(folder / "model_index.json", {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": DIFFUSERS_FORMAT_VERSION,
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDIMScheduler"], "safety_checker": [None, None],
        "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False})
    return folder
