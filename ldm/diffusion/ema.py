"""Exponential moving average of a model's trainable weights, state-compatible with the
reference LDM `LitEma` (so `model_ema.*` entries of its checkpoints load as they are).

State: `decay` (fp32), `num_updates` (int32; -1 when warm-up is off) and one shadow buffer per
trainable parameter, named after the parameter with its dots removed.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn


# Module names that wrappers insert into parameter names (FSDP units, activation checkpointing):
# the EMA matches parameters by their names without them, so it works inside and outside the wrappers.
_WRAPPER_NAMES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """`model`'s trainable parameters by name, without the names wrappers insert."""
    out = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            for wrapper in _WRAPPER_NAMES:
                name = name.replace(wrapper, "")
            out[name] = param
    return out


class EMA(nn.Module):
    """Shadow copies of `model`'s trainable parameters, updated by `update(model)`.

    Each update: n += 1; d = min(decay, (1 + n) / (10 + n)); shadow -= (1 - d)(shadow - p).
    With use_num_updates=False the warm-up is off and d = decay always.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, use_num_updates: bool = True):
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1], got {decay}")
        self.register_buffer("decay", torch.tensor(decay, dtype=torch.float32))
        self.register_buffer("num_updates", torch.tensor(0 if use_num_updates else -1, dtype=torch.int32))
        self._shadow_names: dict[str, str] = {}
        for name, param in trainable_parameters(model).items():
            shadow_name = name.replace(".", "")
            if shadow_name in self._shadow_names.values() or shadow_name in ("decay", "num_updates"):
                raise ValueError(f"parameter {name!r} maps to the EMA buffer name {shadow_name!r}, "
                                 "which is already taken; rename the parameter")
            self._shadow_names[name] = shadow_name
            self.register_buffer(shadow_name, param.detach().clone())
        self._stored: dict[str, torch.Tensor] = {}

    def shadows(self) -> dict[str, torch.Tensor]:
        """The shadow of each trainable parameter, by parameter name."""
        return {name: getattr(self, shadow) for name, shadow in self._shadow_names.items()}

    def replace_shadows(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Make `tensors` (by parameter name, every one) the shadows; their shapes may differ from the
        old ones (FSDP keeps on each rank the piece of every parameter that rank holds)."""
        if tensors.keys() != self._shadow_names.keys():
            raise KeyError(f"replace_shadows needs a tensor for each of the {len(self._shadow_names)} shadows; "
                           f"missing {sorted(self._shadow_names.keys() - tensors.keys())[:10]}, "
                           f"unknown {sorted(tensors.keys() - self._shadow_names.keys())[:10]}")
        for name, tensor in tensors.items():
            self._buffers[self._shadow_names[name]] = tensor

    def shadow_name(self, name: str) -> str:
        """The buffer (state-dict) name of the shadow of parameter `name`."""
        return self._shadow_names[name]

    def _pairs(self, model: nn.Module) -> Iterator[tuple[nn.Parameter, torch.Tensor]]:
        """(live parameter, shadow) for every trainable parameter of `model`."""
        trainable = trainable_parameters(model)
        if trainable.keys() != self._shadow_names.keys():
            missing = sorted(self._shadow_names.keys() - trainable.keys())
            extra = sorted(trainable.keys() - self._shadow_names.keys())
            raise KeyError("the model's trainable parameters differ from those the EMA was built "
                           f"for; without a shadow: {extra[:10]}, shadow without parameter: "
                           f"{missing[:10]}")
        for name, param in trainable.items():
            yield param, getattr(self, self._shadow_names[name])

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move every shadow towards the live weights (call after each optimiser step)."""
        # Tensor ops rather than Python branches, so no device sync; fp32 like the reference.
        warm_up = self.num_updates >= 0
        self.num_updates += warm_up.to(torch.int32)
        ratio = (1 + self.num_updates) / (10 + self.num_updates)
        decay = torch.where(warm_up, torch.minimum(self.decay, ratio), self.decay)
        one_minus_decay = 1.0 - decay
        for param, shadow in self._pairs(model):
            shadow.sub_(one_minus_decay.to(shadow.dtype) * (shadow - param.to(shadow.device, shadow.dtype)))

    def forward(self, model: nn.Module) -> None:
        """Same as `update(model)`; the reference calls its EMA module this way."""
        self.update(model)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite `model`'s trainable parameters with the EMA weights."""
        for param, shadow in self._pairs(model):
            param.copy_(shadow)

    @torch.no_grad()
    def store(self, model: nn.Module) -> None:
        """Keep a copy of `model`'s live trainable weights for `restore`."""
        if self._stored:
            raise RuntimeError("EMA.store called twice without restore: the stored live weights "
                               "would be overwritten")
        self._stored = {name: p.detach().clone() for name, p in trainable_parameters(model).items()}

    @torch.no_grad()
    def restore(self, model: nn.Module) -> None:
        """Put back the weights saved by `store` and forget them."""
        if not self._stored:
            raise RuntimeError("EMA.restore called without a preceding store")
        params = trainable_parameters(model)
        for name, saved in self._stored.items():
            params[name].copy_(saved)
        self._stored = {}

    def put_live_weights(self, state_dict: dict[str, torch.Tensor], prefix: str) -> None:
        """While the EMA weights are swapped in (between `store` and `restore`), overwrite the
        model's entries of `state_dict` (keys `prefix` + parameter name) with the stored live
        weights; otherwise leave it as it is. A checkpoint written at any moment, e.g. on a
        pre-emption signal during validation, then holds the training weights, and the EMA only
        in its own shadow entries."""
        for name, saved in self._stored.items():
            key = prefix + name
            if key not in state_dict:
                raise KeyError(f"{key!r} is not in the state dict: the model is not under the prefix {prefix!r}")
            state_dict[key] = saved

    @contextmanager
    def ema_scope(self, model: nn.Module) -> Iterator[nn.Module]:
        """Within the block `model` carries the EMA weights; its live weights come back after."""
        self.store(model)
        self.copy_to(model)
        try:
            yield model
        finally:
            self.restore(model)
