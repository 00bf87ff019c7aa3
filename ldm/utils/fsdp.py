"""FSDP on the CPU as on GPUs, for tests and debugging without a GPU (`trainer=fsdp trainer.accelerator=cpu`).

torch's FSDP trains on the CPU over gloo when it is given the CPU as its device. Lightning 2.6
stops it twice: its accelerator check refuses `FSDPStrategy` on anything but CUDA ("The strategy
`fsdp` requires a GPU accelerator"), comparing the strategy's exact type, and it wraps the model
with `device_id=None` on the CPU, which torch reads as "use the accelerator" and refuses ("FSDP
needs a non-CPU accelerator device"). This subclass passes the first check by being a subclass
and wraps with the CPU device; on GPUs it is Lightning's strategy unchanged.

One more CPU-only difference: the full optimizer state. torch's FSDP (2.14) gathers the states of
a unit (exp_avg, then exp_avg_sq) through one reused buffer and, with `offload_to_cpu` (which
Lightning asks for), relies on `.cpu()` to copy each out of it. On the CPU `.cpu()` returns the
same tensor, so every checkpoint held exp_avg_sq in place of exp_avg and a resumed run drifted
from an uninterrupted one. On the CPU the state is gathered without the offload (a copy each).
"""
from __future__ import annotations

from typing import Any

from pytorch_lightning.core.optimizer import LightningOptimizer
from pytorch_lightning.strategies import FSDPStrategy as LightningFSDPStrategy
from pytorch_lightning.strategies.fsdp import _setup_activation_checkpointing
from torch import nn
from torch.distributed.fsdp import (FullOptimStateDictConfig, FullStateDictConfig, FullyShardedDataParallel,
                                    OptimStateKeyType, StateDictType)
from torch.optim import Optimizer


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

    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        if self.root_device.type != "cpu" or self._state_dict_type != "full":
            return super().optimizer_state(optimizer)
        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        with FullyShardedDataParallel.state_dict_type(self.model, StateDictType.FULL_STATE_DICT,
                                                      FullStateDictConfig(offload_to_cpu=False, rank0_only=True),
                                                      FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=True)):
            state = FullyShardedDataParallel.optim_state_dict(self.model, optimizer)
        if self.global_rank == 0:  # keyed by parameter index, as Lightning stores it
            state = FullyShardedDataParallel.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_ID, self.model)
        return state
