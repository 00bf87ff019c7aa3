"""device= and precision= of the command lines (ldm.utils.device): what they resolve to, and the
errors for what this machine cannot do."""
from __future__ import annotations

import pytest
import torch

from ldm.utils.device import autocast, autocast_dtype, resolve_device

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusals of a machine without a GPU")


@no_gpu
def test_auto_is_the_cpu_without_a_gpu_and_a_missing_gpu_is_refused():
    assert resolve_device("auto") == resolve_device(None) == torch.device("cpu")
    assert resolve_device("cpu") == resolve_device(torch.device("cpu")) == torch.device("cpu")
    for name in ("cuda", "cuda:1"):
        with pytest.raises(ValueError, match=rf"device={name}: no CUDA device is visible; use device=cpu"):
            resolve_device(name)
    with pytest.raises(ValueError, match="'gpu0' is not a device name: pass auto, cpu, cuda or cuda:N"):
        resolve_device("gpu0")


@no_gpu
def test_precision_gives_the_autocast_dtype_and_reduced_precision_needs_a_gpu():
    cpu = torch.device("cpu")
    assert autocast_dtype("32", cpu) is None and autocast_dtype(32, cpu) is None
    for precision in ("bf16", "fp16"):
        with pytest.raises(ValueError, match=f"precision={precision} needs a GPU; use precision=32 on the CPU"):
            autocast_dtype(precision, cpu)
    with pytest.raises(ValueError, match="precision=fp8 is not one of 32, bf16, fp16"):
        autocast_dtype("fp8", cpu)
    with autocast(cpu, None):
        assert not torch.is_autocast_enabled("cpu")
    with autocast(cpu, torch.bfloat16):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
