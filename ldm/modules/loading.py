"""Rebuild a trained module from its checkpoint alone (the config travels inside it)."""
from __future__ import annotations

from pathlib import Path

import torch
from hydra.utils import instantiate

from ldm.first_stage.base import FirstStage
from ldm.modules.base import BuildableModule
from ldm.utils.checkpoint import load_strict


def find_checkpoint(path: str | Path) -> Path:
    """A .ckpt file, or a run folder's checkpoints/last.ckpt."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoints" / "last.ckpt"
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: pass a .ckpt file or a run folder with checkpoints/last.ckpt")
    return path


def load_module(path: str | Path, map_location: str | torch.device = "cpu") -> BuildableModule:
    """The LightningModule saved at `path` (file or run folder), rebuilt from the model config
    stored in the checkpoint and loaded with strict key checking, in eval mode."""
    ckpt_path = find_checkpoint(path)
    ckpt = torch.load(ckpt_path, map_location=map_location, weights_only=True)
    if "build_config" not in ckpt:
        raise ValueError(f"{ckpt_path} holds no build_config: it was not written by this project's train.py. "
                         "Original LDM checkpoints load with ldm.convert.reference")
    module = instantiate(ckpt["build_config"], _convert_="all")
    load_strict(module, ckpt["state_dict"], str(ckpt_path))
    module.on_load_checkpoint(ckpt)
    return module.eval()


def load_first_stage(path: str | Path) -> FirstStage:
    """The trained first stage of a first-stage run (folder or .ckpt), frozen, for the
    latent diffusion stage. Its EMA weights are used when the run kept an EMA."""
    module = load_module(path)
    first_stage = getattr(module, "first_stage", None)
    if not isinstance(first_stage, FirstStage):
        raise ValueError(f"{path} is not a first-stage run (it holds a {type(module).__name__})")
    if getattr(module, "ema", None) is not None:
        module.ema.copy_to(first_stage)
    # The architecture, so a latent diffusion checkpoint can rebuild it without this run folder.
    first_stage.build_config = module.build_config["first_stage"]
    return first_stage.eval().requires_grad_(False)
