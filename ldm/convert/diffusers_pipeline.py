"""A diffusers Stable-Diffusion-style pipeline folder (unet/, vae/, text_encoder/, tokenizer/,
scheduler/) as one of our LatentDiffusion checkpoints, which sample.py and evaluate.py take:

    python -m ldm.convert.diffusers_pipeline <pipeline folder> --out model.ckpt
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate

from ldm.convert.diffusers_unet import diffusers_state_dict_to_unet, unet_kwargs_from_diffusers_config
from ldm.convert.diffusers_vae import ddconfig_from_diffusers, from_diffusers
from ldm.modules.latent_diffusion import LatentDiffusion
from ldm.utils.checkpoint import load_state_dict_file, load_strict

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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m ldm.convert.diffusers_pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="a diffusers pipeline folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/)")
    p.add_argument("--out", required=True, help="checkpoint to write (.ckpt)")
    args = p.parse_args(argv)
    print(f"wrote {convert(args.folder, args.out)}")


if __name__ == "__main__":
    main()
