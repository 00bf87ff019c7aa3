"""Rebuild a trained module from its checkpoint alone (the config travels inside it)."""
from __future__ import annotations

from pathlib import Path

import torch
from hydra.utils import instantiate

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
