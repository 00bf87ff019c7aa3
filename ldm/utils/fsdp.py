"""FSDP on the CPU as on GPUs, for tests and debugging without a GPU (`trainer=fsdp trainer.accelerator=cpu`).

torch's FSDP trains on the CPU over gloo when it is given the CPU as its device. Lightning 2.6
stops it twice: its accelerator check refuses `FSDPStrategy` on anything but CUDA ("The strategy
`fsdp` requires a GPU accelerator"), comparing the strategy's exact type, and it wraps the model
with `device_id=None` on the CPU, which torch reads as "use the accelerator" and refuses ("FSDP
needs a non-CPU accelerator device"). This subclass passes the first check by being a subclass
and wraps with the CPU device; on GPUs it is Lightning's strategy unchanged.
"""
from __future__ import annotations

from pytorch_lightning.strategies import FSDPStrategy as LightningFSDPStrategy
from pytorch_lightning.strategies.fsdp import _setup_activation_checkpointing
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel


class FSDPStrategy(LightningFSDPStrategy):
    """Lightning's FSDPStrategy that also runs on the CPU (gloo)."""

    def _setup_model(self, model: nn.Module) -> nn.Module:
        if self.root_device.type != "cpu":
            return super()._setup_model(model)
        wrapped = FullyShardedDataParallel(module=model, cpu_offload=self.cpu_offload,
                                           mixed_precision=self.mixed_precision_config,
                                           sharding_strategy=self.sharding_strategy, device_id=self.root_device,
                                           **self.kwargs)
        _setup_activation_checkpointing(wrapped, self._activation_checkpointing_kwargs)
        return wrapped
