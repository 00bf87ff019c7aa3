"""Classifier-free guidance: out = out_u + s (out_c - out_u), and the condition dropout that
trains the unconditional branch it needs.

The unconditional and conditional predictions come from one call on a doubled batch
[uncond, cond], as in the reference samplers. The combination is linear, so it applies to the
raw network output whatever its parameterisation (eps, x0 or v).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

# A condition: None, a tensor, a list/tuple of conditions, or a dict of them
# (e.g. {'concat': ..., 'crossattn': ...}); tensors have the batch as their first dim.
Condition = Any
Denoiser = Callable[[torch.Tensor, torch.Tensor, Condition], torch.Tensor]


def concat_conditions(uncond: Condition, cond: Condition) -> Condition:
    """Stack two conditions of the same structure along the batch: [uncond, cond]."""
    if uncond is None and cond is None:
        return None
    if isinstance(cond, torch.Tensor) and isinstance(uncond, torch.Tensor):
        if uncond.shape[1:] != cond.shape[1:]:
            raise ValueError(f"unconditional condition of shape {tuple(uncond.shape)} does not match "
                             f"the condition's {tuple(cond.shape)} beyond the batch dim")
        return torch.cat([uncond, cond.to(uncond.device)])
    if isinstance(cond, Mapping) and isinstance(uncond, Mapping):
        if set(cond) != set(uncond):
            raise ValueError(f"condition keys {sorted(cond)} differ from the unconditional "
                             f"condition's {sorted(uncond)}")
        return {key: concat_conditions(uncond[key], cond[key]) for key in cond}
    if (isinstance(cond, Sequence) and isinstance(uncond, Sequence)
            and not isinstance(cond, str) and not isinstance(uncond, str)):
        if len(cond) != len(uncond):
            raise ValueError(f"condition list of length {len(cond)} differs from the unconditional "
                             f"one of length {len(uncond)}")
        return type(cond)(concat_conditions(u, c) for u, c in zip(uncond, cond))
    raise TypeError(f"cannot batch an unconditional condition of type {type(uncond).__name__} with "
                    f"a condition of type {type(cond).__name__}: give both the same structure of "
                    "tensors, lists and dicts")


def guided_output(denoiser: Denoiser, x: torch.Tensor, t: torch.Tensor, cond: Condition,
                  uncond: Condition = None, scale: float = 1.0) -> torch.Tensor:
    """The denoiser output at (x, t) under guidance `scale`.

    scale == 1 is the plain conditional call (no doubled batch). Any other scale needs `uncond`,
    the null condition with the structure of `cond`.
    """
    if scale == 1.0:
        return denoiser(x, t, cond)
    if uncond is None:
        raise ValueError(f"guidance scale {scale} needs an unconditional condition (uncond); "
                         "pass one or use guidance_scale=1")
    out_u, out_c = denoiser(torch.cat([x, x]), torch.cat([t, t]), concat_conditions(uncond, cond)).chunk(2)
    return out_u + scale * (out_c - out_u)


def dropout_mask(uniforms: torch.Tensor, p_uncond: float) -> torch.Tensor | None:
    """Which samples of a training batch get the null condition: uniforms[b] < p_uncond, with
    `uniforms` (B,) in [0, 1) drawn by the caller (e.g. one per sample from its own generator);
    None when p_uncond is 0 (nothing dropped)."""
    return uniforms < p_uncond if p_uncond > 0 else None


def drop_conditions(values, drop: torch.Tensor, null):
    """Replace the entries where `drop` is True by `null` (classifier-free guidance training).
    values: a list of strings or a tensor with the batch first."""
    if isinstance(values, torch.Tensor):
        null_t = torch.as_tensor(null, dtype=values.dtype, device=values.device)
        return torch.where(drop.view(-1, *([1] * (values.ndim - 1))).to(values.device), null_t, values)
    return [null if d else v for v, d in zip(values, drop.tolist())]
