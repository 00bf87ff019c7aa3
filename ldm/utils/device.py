"""Devices and reduced precision for the command lines: `device=` and `precision=` values to
torch objects, with errors that say what to pass instead."""
from __future__ import annotations

import torch

# precision= of sample.py / evaluate.py -> the autocast dtype (None: float32, no autocast)
AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """The device `name` stands for: 'auto' (or None) is the GPU when there is one, else the CPU;
    anything else (a torch.device too) is given to torch.device. A CUDA device that is not visible is refused."""
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"device={name!r} is not a device name: pass auto, cpu, cuda or cuda:N") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={name}: no CUDA device is visible; use device=cpu (or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            count = torch.cuda.device_count()
            raise ValueError(f"device={name}: only {count} CUDA device(s) are visible; pass cuda:0 .. cuda:{count - 1}")
    return device


def autocast_dtype(precision: str | int, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of `precision` (32 | bf16 | fp16) on `device`; None means float32.
    Reduced precision is refused off the GPU."""
    key = str(precision)
    if key not in AUTOCAST_DTYPES:
        raise ValueError(f"precision={precision} is not one of {', '.join(AUTOCAST_DTYPES)}")
    dtype = AUTOCAST_DTYPES[key]
    if dtype is not None and device.type != "cuda":
        raise ValueError(f"precision={precision} needs a GPU; use precision=32 on the CPU")
    return dtype


def autocast(device: torch.device, dtype: torch.dtype | None) -> torch.autocast:
    """torch.autocast on `device` in `dtype` (autocast_dtype), off when `dtype` is None."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
