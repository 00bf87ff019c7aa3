"""Vector quantiser of the VQ first stage (van den Oord et al. 2017), as used by LDM.

Each latent vector is replaced by its nearest codebook entry; gradients pass straight through
to the encoder. Two ways to learn the codebook:
- gradient (default): loss = beta * ||sg(z_q) - z||^2 + ||z_q - sg(z)||^2 (means), i.e. the
  commitment term carries beta. `legacy=True` reproduces the reference code (taming's
  VectorQuantizer2, legacy=True, which LDM uses): beta sits on the codebook term instead.
  Both give the same loss value, (1 + beta) * mse; only the gradients differ.
- EMA (`ema_decay` set, VQ-VAE appendix / VQ-VAE-2): the codebook is a running average of the
  vectors assigned to each code, with Laplace-smoothed counts; the loss is the commitment
  term only and the codebook gets no gradient.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


@dataclass
class QuantizerInfo:
    """What the quantiser reports besides its output."""

    indices: torch.Tensor  # (B, H, W) long: the chosen code per position
    perplexity: torch.Tensor  # exp(entropy of the batch's code histogram); n_embed at best
    usage: torch.Tensor  # share of the codebook chosen at least once in the batch


def nearest_code(flat: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the closest codebook row (squared L2) for each row of `flat` (N, D)."""
    # Expanded ||a||^2 - 2ab + ||b||^2, in fp32: under bf16 autocast ties and misassignments appear.
    flat, codebook = flat.float(), codebook.float()
    d = flat.pow(2).sum(1, keepdim=True) - 2.0 * flat @ codebook.t() + codebook.pow(2).sum(1)
    return d.argmin(dim=1)


def code_statistics(indices: torch.Tensor, n_embed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(perplexity, usage) of a batch of code indices."""
    counts = torch.bincount(indices.flatten(), minlength=n_embed).float()
    probs = counts / counts.sum()
    perplexity = torch.exp(-(probs * torch.log(probs + 1e-10)).sum())
    return perplexity, (counts > 0).float().mean()


class VectorQuantizer(nn.Module):
    """Quantise (B, embed_dim, H, W) latents to the nearest of n_embed codes.

    forward returns (z_q with straight-through gradient, loss, QuantizerInfo).
    """

    def __init__(self, n_embed: int, embed_dim: int, beta: float = 0.25, legacy: bool = False,
                 ema_decay: float | None = None, eps: float = 1e-5):
        super().__init__()
        if n_embed < 1 or embed_dim < 1:
            raise ValueError(f"n_embed ({n_embed}) and embed_dim ({embed_dim}) must be positive")
        if ema_decay is not None and not 0.0 < ema_decay < 1.0:
            raise ValueError(f"ema_decay must lie in (0, 1) (0.99 is usual), got {ema_decay}")
        if eps < 0:
            raise ValueError(f"eps (count smoothing) must be >= 0, got {eps}")
        if ema_decay is not None and legacy:
            raise ValueError("legacy only reorders the codebook-loss weights of the gradient-trained "
                             "codebook; the EMA codebook has no codebook loss: drop legacy or ema_decay")
        self.n_embed, self.embed_dim, self.beta = n_embed, embed_dim, beta
        self.legacy, self.ema_decay, self.eps = legacy, ema_decay, eps
        self.embedding = nn.Embedding(n_embed, embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / n_embed, 1.0 / n_embed)
        if ema_decay is not None:
            self.embedding.weight.requires_grad_(False)
            # Counts start at one, as if each code had been assigned itself once: codes nobody picks
            # then stay where they are instead of being divided by a vanishing count.
            self.register_buffer("cluster_size", torch.ones(n_embed))

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, QuantizerInfo]:
        if z.dim() != 4 or z.shape[1] != self.embed_dim:
            raise ValueError(f"expected latents (B, {self.embed_dim}, H, W), got {tuple(z.shape)}")
        b, _, h, w = z.shape
        z_last = z.permute(0, 2, 3, 1)
        flat = z_last.reshape(-1, self.embed_dim)
        indices = nearest_code(flat, self.embedding.weight)
        codes = self.embedding(indices).view_as(z_last).to(z.dtype)

        commitment = F.mse_loss(z_last, codes.detach())
        if self.ema_decay is not None:
            loss = self.beta * commitment
            if self.training:
                self._ema_update(flat.detach(), indices)
        else:
            codebook = F.mse_loss(codes, z_last.detach())
            loss = commitment + self.beta * codebook if self.legacy else self.beta * commitment + codebook

        z_q = z_last + (codes - z_last).detach()  # straight-through estimator
        perplexity, usage = code_statistics(indices, self.n_embed)
        info = QuantizerInfo(indices=indices.view(b, h, w), perplexity=perplexity, usage=usage)
        return z_q.permute(0, 3, 1, 2).contiguous(), loss, info

    def _smoothed_counts(self) -> torch.Tensor:
        """Laplace-smoothed counts (VQ-VAE-2): kept away from zero, same total."""
        total = self.cluster_size.sum()
        return (self.cluster_size + self.eps) / (total + self.n_embed * self.eps) * total

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, indices: torch.Tensor) -> None:
        """Move each code towards the mean of the vectors assigned to it (summed over DDP ranks).

        The running sum of assigned vectors is not stored: it is the code times its smoothed count,
        so the codebook weight stays the single source of truth (e.g. when set from a checkpoint).
        """
        onehot = F.one_hot(indices, self.n_embed).float()
        counts = onehot.sum(0)
        sums = onehot.t() @ flat.float()
        if dist.is_available() and dist.is_initialized():
            # Every rank must apply the same update or the codebooks drift apart.
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        decay = self.ema_decay
        running_sum = self.embedding.weight.float() * self._smoothed_counts().unsqueeze(1)
        running_sum.mul_(decay).add_(sums, alpha=1.0 - decay)
        self.cluster_size.mul_(decay).add_(counts, alpha=1.0 - decay)
        self.embedding.weight.copy_(running_sum / self._smoothed_counts().unsqueeze(1))
