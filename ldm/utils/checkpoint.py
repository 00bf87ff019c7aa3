"""Reading and writing weight files: Lightning .ckpt, plain torch state dicts, safetensors.

One loader for the whole project, so every place that takes weights refuses a mismatching file
the same way: with the list of missing, unexpected and wrongly shaped keys.
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn


class CheckpointMismatchError(RuntimeError):
    """A state dict does not fit the module it is loaded into."""

    def __init__(self, source: str, missing: list[str], unexpected: list[str], shapes: list[str]):
        self.missing, self.unexpected, self.shapes = missing, unexpected, shapes
        lines = [f"checkpoint {source} does not match the configured model."]
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if keys:
                shown = "\n    ".join(keys[:50])
                more = f"\n    ... and {len(keys) - 50} more" if len(keys) > 50 else ""
                lines.append(f"  {title} ({len(keys)}):\n    {shown}{more}")
        lines.append("Check that the config (channels, ch_mult, attention, f, ...) is the one the "
                     "checkpoint was trained with.")
        super().__init__("\n".join(lines))


def find_checkpoint(path: str | Path) -> Path:
    """A .ckpt file, or a run folder's checkpoints/last.ckpt."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoints" / "last.ckpt"
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: pass a .ckpt file or a run folder with checkpoints/last.ckpt")
    return path


def checkpoint_sha256(path: str | Path) -> str:
    """SHA-256 of the checkpoint of a run folder or .ckpt file (identifies its weights exactly)."""
    with open(find_checkpoint(path), "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Load the weights in `path`: a Lightning checkpoint (its `state_dict`), a plain state
    dict saved with torch.save, or a .safetensors file. Tensors land on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weight file at {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict or checkpoint")
    return dict(obj)


def save_safetensors(state_dict: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """Write `state_dict` as safetensors (contiguous CPU copies; shared storage is split)."""
    from safetensors.torch import save_file

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}, str(path))


def sub_state_dict(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under `prefix` (e.g. 'first_stage_model.'), with the prefix removed."""
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def load_strict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "state dict") -> None:
    """Load `state_dict` into `module`, refusing any missing, unexpected or mis-shaped key.

    Raises CheckpointMismatchError listing every offending key; nothing is loaded then.
    """
    own = module.state_dict()
    missing = sorted(k for k in own if k not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in own)
    shapes = sorted(
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state_dict.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    )
    if missing or unexpected or shapes:
        raise CheckpointMismatchError(source, missing, unexpected, shapes)
    module.load_state_dict(state_dict, strict=True)
