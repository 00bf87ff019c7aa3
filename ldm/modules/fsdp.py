"""What the latent diffusion module needs under FSDP: its root parameters gathered for work done
outside the training step, and a sharded EMA.

FSDP gathers a unit's parameters only inside that unit's forward. The denoiser and its UNet
blocks are units of their own (configs/trainer/fsdp.yaml) and gather themselves when called; the
rest (the first stage, the condition encoder) sits in the root unit, which gathers only in the
forward of the whole module, i.e. in the training and validation steps. Sampling (the validation
grid, the evaluation and denoising callbacks) and the scale_by_std encode run outside it, so they
run inside `root_params_gathered`, which gathers the root unit alone
(`summon_full_params(recurse=False)`).

The EMA: each rank keeps the moving average of the pieces of the parameters it holds, and
checkpoints hold the whole EMA, as without FSDP. Validation swaps the EMA pieces into the
weights and back (in place, into the shards). FSDP keeps the root unit gathered after a forward
(it expects the backward next) and reuses that copy in the next forward without gathering
again, so after a validation it would train one step with the EMA weights of any parameter in
the root unit; the same holds for every unit under SHARD_GRAD_OP. Hence the EMA-covered
denoiser is its own unit (configs/trainer/fsdp.yaml), which FULL_SHARD and HYBRID_SHARD reshard
after each forward, and shard_ema refuses the other cases.

With `use_orig_params` (configs/trainer/fsdp.yaml), outside forward and backward each parameter of
an FSDP-wrapped model is this rank's piece of it (possibly empty), and the optimiser steps those
pieces. An EMA whose shadows are cut the same way updates with no communication and costs
1/N of a full fp32 copy per rank. The cuts are FSDP's own: a full tensor laid out like a parameter
becomes this rank's piece by writing it into the gathered parameter and letting FSDP shard it back
(`summon_full_params(writeback=True)`), and the pieces become full tensors again by the reverse
(`summon_full_params(rank0_only=True)`). The live weights are put back after each.

Costs: once, at the EMA's first use in a fit, every rank gathers the full parameters;
each checkpoint gathers them once more, to rank 0's CPU memory (a full fp32 copy of the trainable
weights, as Lightning's own full state dict needs for the weights).
"""
from __future__ import annotations

from collections.abc import Mapping
from contextlib import nullcontext

import pytorch_lightning as pl
import torch
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy

from ldm.diffusion.ema import EMA, trainable_parameters


def fsdp_root(trainer: pl.Trainer | None) -> FullyShardedDataParallel | None:
    """The FSDP unit that wraps the whole LightningModule, or None when not training under FSDP."""
    wrapped = getattr(getattr(trainer, "strategy", None), "model", None)
    return wrapped if isinstance(wrapped, FullyShardedDataParallel) else None


def root_params_gathered(trainer: pl.Trainer | None):
    """A context in which the root FSDP unit's parameters are whole (no-op without FSDP)."""
    root = fsdp_root(trainer)
    if root is None:
        return nullcontext()
    return FullyShardedDataParallel.summon_full_params(root, recurse=False, writeback=False)


@torch.no_grad()
def pieces_of(full: Mapping[str, torch.Tensor], model: nn.Module,
              root: FullyShardedDataParallel) -> dict[str, torch.Tensor]:
    """This rank's pieces of `full` (one tensor per trainable parameter of `model`, by name, in the
    parameters' full shapes), cut as FSDP cuts the parameters. Every rank must call it."""
    live = {name: p.detach().clone() for name, p in trainable_parameters(model).items()}
    with FullyShardedDataParallel.summon_full_params(root, writeback=True):
        for name, param in trainable_parameters(model).items():
            param.copy_(full[name])
    pieces = {}
    for name, param in trainable_parameters(model).items():
        pieces[name] = param.detach().clone()
        param.copy_(live[name])
    return pieces


@torch.no_grad()
def full_of(pieces: Mapping[str, torch.Tensor], model: nn.Module,
            root: FullyShardedDataParallel) -> dict[str, torch.Tensor]:
    """The full tensors (on rank 0, in CPU memory) whose pieces are `pieces` (laid out like the
    trainable parameters of `model`). Every rank must call it; other ranks get their own pieces."""
    params = trainable_parameters(model)
    live = {name: p.detach().clone() for name, p in params.items()}
    for name, param in params.items():
        param.copy_(pieces[name])
    with FullyShardedDataParallel.summon_full_params(root, writeback=False, rank0_only=True, offload_to_cpu=True):
        full = {name: p.detach().cpu().clone() for name, p in trainable_parameters(model).items()}
    for name, param in trainable_parameters(model).items():
        param.copy_(live[name])
    return full


def shard_ema(ema: EMA, model: nn.Module, root: FullyShardedDataParallel) -> bool:
    """Cut `ema`'s full shadows down to this rank's pieces (at its first use in a fit, after
    wrapping); whether it did: under NO_SHARD (which FSDP also picks for one process) every rank
    holds whole parameters, so the shadows stay whole. Refuses the layouts where weights swapped in
    for validation would stay in use (above)."""
    if root.sharding_strategy == ShardingStrategy.NO_SHARD:
        return False
    kept = (ShardingStrategy.SHARD_GRAD_OP, ShardingStrategy._HYBRID_SHARD_ZERO2)
    if root.sharding_strategy in kept:
        raise ValueError(f"the EMA under FSDP's {root.sharding_strategy.name} would leak into training: that strategy "
                         "keeps the weights gathered after the validation forward, in which they are the EMA weights. "
                         "Use trainer.strategy.sharding_strategy=FULL_SHARD (or HYBRID_SHARD), or model.ema_decay=null")
    in_root = [name for name, p in model.named_parameters() if p.requires_grad and "_fsdp_wrapped_module." not in name]
    if in_root:
        raise ValueError(f"the EMA under FSDP needs the denoiser in an FSDP unit of its own, but {in_root[:3]} sit in "
                         "the root unit, which stays gathered after a forward: add ldm.nets.wrapper.DiffusionWrapper to "
                         "trainer.strategy.auto_wrap_policy (configs/trainer/fsdp.yaml has it)")
    ema.replace_shadows(pieces_of(ema.shadows(), model, root))
    return True


def ema_to_checkpoint(ema: EMA, model: nn.Module, root: FullyShardedDataParallel, state_dict: dict,
                      prefix: str) -> None:
    """Put the full EMA into a full checkpoint `state_dict` (whose EMA entries FSDP filled with
    rank 0's pieces), under `prefix` + shadow name."""
    for name, tensor in full_of(ema.shadows(), model, root).items():
        state_dict[prefix + ema.shadow_name(name)] = tensor
