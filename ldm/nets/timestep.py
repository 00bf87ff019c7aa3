"""Sinusoidal timestep embedding of the LDM denoiser (cosine half first, then sine)."""
from __future__ import annotations

import math

import torch


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000) -> torch.Tensor:
    """Embed a 1-D batch of (possibly fractional) timesteps into `dim` features.

    With half = dim // 2 and freqs_i = exp(-ln(max_period) * i / half), the result is
    cat([cos(t * freqs), sin(t * freqs)]) in float32, shape (N, dim); an odd `dim` gets a trailing
    zero column. This is the reference LDM layout (diffusers: flip_sin_to_cos=True, freq_shift=0).
    """
    if t.ndim != 1:
        raise ValueError(f"timesteps must be a 1-D tensor of shape (N,), got shape {tuple(t.shape)}")
    if dim < 2:
        raise ValueError(f"the embedding needs dim >= 2 (one cosine and one sine), got {dim}")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb
