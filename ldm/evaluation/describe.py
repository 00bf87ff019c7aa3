"""What evaluation records say about the model they scored (the tables command groups runs by it)."""
from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch

from ldm.first_stage.identity import IdentityFirstStage
from ldm.first_stage.kl import AutoencoderKL
from ldm.first_stage.vq import AutoencoderVQ
from ldm.modules.latent_diffusion import LatentDiffusion


def first_stage_kind(first_stage: torch.nn.Module) -> str:
    """'kl', 'vq' or 'identity' (the paper's first-stage families), else the class name."""
    kinds = {AutoencoderKL: "kl", AutoencoderVQ: "vq", IdentityFirstStage: "identity"}
    return next((name for cls, name in kinds.items() if isinstance(first_stage, cls)), type(first_stage).__name__)


def describe_model(module: pl.LightningModule) -> dict[str, Any]:
    """What the tables group runs by: downsampling factor f, first-stage kind and, for latent
    diffusion, the conditioning (key and batch entry)."""
    if isinstance(module, LatentDiffusion):
        first_stage = module.first_stage_model
        key = module.model.conditioning_key
        return {"f": first_stage.downsampling_factor, "first_stage": first_stage_kind(first_stage),
                "conditioning": key, "cond_key": module.hparams.cond_stage_key if key else None}
    first_stage = module.first_stage
    return {"f": first_stage.downsampling_factor, "first_stage": first_stage_kind(first_stage)}
