"""Attention building blocks of the LDM denoiser, with the reference parameter names.

Two kinds of attention sit in the UNet:
- `SelfAttentionBlock`: multi-head self-attention over the H*W positions of a feature map, with
  a fused Conv1d `qkv` projection (the unconditional / class-conditional models of the paper);
- `SpatialTransformer`: a 1x1 `proj_in`, `transformer_blocks` of self-attention, cross-attention
  to a context sequence and a GEGLU feed-forward, then a zero-initialised 1x1 `proj_out`
  (text / class models through cross-attention).

All attention runs through torch.nn.functional.scaled_dot_product_attention. Normalisation layers
compute in float32 and cast back by default (the reference's GroupNorm32), so the blocks work under
bf16 / fp16 autocast and in reduced precision without the statistics losing precision. With
`fp32 = False` (see `set_norm_precision`) a norm reads and writes its input's dtype instead; torch's
norm kernels still accumulate the statistics of bf16 / fp16 inputs in float32, and float32 inputs
are computed exactly as before.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

GROUPS = 32


def _normalise(norm, fp32: bool, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """norm(x, weight, bias) in float32, returned in x's dtype (`fp32`, or a float32 input); else in
    x's reduced dtype throughout.

    CUDA autocast runs group_norm and layer_norm in float32 and hands float32 on (so the next op
    reads and writes twice the bytes); switching it off keeps the activations in x's dtype, while
    the kernels still accumulate mean and variance in float32.
    """
    if fp32 or x.dtype == torch.float32:
        return norm(x.float(), weight.float(), bias.float()).to(x.dtype)
    with torch.autocast(x.device.type, enabled=False):
        return norm(x, weight.to(x.dtype), bias.to(x.dtype))


class GroupNorm32(nn.GroupNorm):
    """GroupNorm with 32 groups that computes in float32 and returns the input's dtype; with
    `fp32 = False` (set_norm_precision) a bf16 / fp16 input is normalised in its own dtype."""

    fp32 = True

    def __init__(self, channels: int, eps: float):
        if channels % GROUPS:
            raise ValueError(f"{channels} channels do not split into {GROUPS} GroupNorm groups: "
                             f"every block width must be a multiple of {GROUPS}")
        super().__init__(GROUPS, channels, eps=eps, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _normalise(lambda t, w, b: F.group_norm(t, self.num_groups, w, b, self.eps),
                          self.fp32, x, self.weight, self.bias)


class LayerNorm32(nn.LayerNorm):
    """LayerNorm over the last dimension that computes in float32 and returns the input's dtype;
    with `fp32 = False` (set_norm_precision) a bf16 / fp16 input is normalised in its own dtype."""

    fp32 = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _normalise(lambda t, w, b: F.layer_norm(t, self.normalized_shape, w, b, self.eps),
                          self.fp32, x, self.weight, self.bias)


def set_norm_precision(module: nn.Module, fp32: bool) -> None:
    """Make every GroupNorm32 / LayerNorm32 in `module` compute in float32 (`fp32`, the reference)
    or in the dtype of its input (float32 statistics either way)."""
    for m in module.modules():
        if isinstance(m, (GroupNorm32, LayerNorm32)):
            m.fp32 = fp32


def zero_init(module: nn.Module) -> nn.Module:
    """Zero every parameter of `module` (residual branches then start as the identity)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def _check_heads(channels: int, num_heads: int) -> None:
    if num_heads < 1 or channels % num_heads:
        raise ValueError(f"{channels} channels do not split into {num_heads} attention heads: "
                         f"choose num_heads (or num_head_channels) that divides every attention width")


class SelfAttentionBlock(nn.Module):
    """Residual multi-head self-attention over all spatial positions of a (B, C, ...) tensor.

    `qkv` is a Conv1d C -> 3C. The reference reads its output in one of two channel orders:
    the default ("legacy", QKVAttentionLegacy) groups channels per head as [q_h, k_h, v_h] for
    h = 0..H-1; `use_new_attention_order=True` (QKVAttention) groups them as [q, k, v], each split
    into heads. The checkpoints of the paper use the default.
    """

    def __init__(self, channels: int, num_heads: int = 1, use_new_attention_order: bool = False):
        super().__init__()
        _check_heads(channels, num_heads)
        self.num_heads = num_heads
        self.use_new_attention_order = use_new_attention_order
        self.norm = GroupNorm32(channels, eps=1e-5)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = zero_init(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        flat = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(flat))  # (B, 3C, T)
        heads, head_dim, length = self.num_heads, c // self.num_heads, flat.shape[-1]
        if self.use_new_attention_order:
            q, k, v = qkv.reshape(b, 3, heads, head_dim, length).unbind(1)
        else:
            q, k, v = qkv.reshape(b, heads, 3 * head_dim, length).split(head_dim, dim=2)
        # (B, H, d, T) -> (B, H, T, d); SDPA's default scale d**-0.5 equals the reference's
        # d**-0.25 applied to q and to k.
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        out = out.transpose(-1, -2).reshape(b, c, length)
        return (flat + self.proj_out(out)).reshape(b, c, *spatial)


class CrossAttention(nn.Module):
    """Multi-head attention of a token sequence x (B, N, query_dim) to a context (B, M, context_dim).

    Without `context_dim` it is self-attention (context defaults to x). Projections `to_q`,
    `to_k`, `to_v` have no bias; `to_out.0` is the output projection, `to_out.1` its dropout.
    """

    def __init__(self, query_dim: int, context_dim: int | None = None, heads: int = 8, dim_head: int = 64,
                 dropout: float = 0.0):
        super().__init__()
        inner = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        if context.shape[-1] != self.to_k.in_features:
            raise ValueError(f"attention context has {context.shape[-1]} features, this layer expects "
                             f"{self.to_k.in_features} (the model's context_dim)")

        def split_heads(t: torch.Tensor) -> torch.Tensor:  # (B, L, H*d) -> (B, H, L, d)
            return t.reshape(t.shape[0], t.shape[1], self.heads, -1).transpose(1, 2)

        out = F.scaled_dot_product_attention(split_heads(self.to_q(x)), split_heads(self.to_k(context)),
                                             split_heads(self.to_v(context)))
        return self.to_out(out.transpose(1, 2).flatten(2))


class GEGLU(nn.Module):
    """Gated GELU: `proj` to 2 * dim_out, then value * gelu(gate) (value half first)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU feed-forward dim -> mult * dim -> dim; keys `net.0.proj` and `net.2`."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, mult * dim), nn.Dropout(dropout), nn.Linear(mult * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm transformer block: self-attention, cross-attention, GEGLU feed-forward, each residual."""

    def __init__(self, dim: int, n_heads: int, d_head: int, context_dim: int | None = None, dropout: float = 0.0):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads=n_heads, dim_head=d_head, dropout=dropout)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, context_dim=context_dim, heads=n_heads, dim_head=d_head, dropout=dropout)
        self.norm1 = LayerNorm32(dim)
        self.norm2 = LayerNorm32(dim)
        self.norm3 = LayerNorm32(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer over the H*W positions of a feature map, with cross-attention to a context.

    norm (GroupNorm eps 1e-6) -> 1x1 `proj_in` to n_heads * d_head -> `transformer_blocks` ->
    zero-initialised 1x1 `proj_out`, added to the input. With `use_linear` (SD 2.x's
    use_linear_in_transformer) `proj_in` / `proj_out` are Linear layers on the token view instead
    of 1x1 convs: the same map, weights (out, in) instead of (out, in, 1, 1).
    """

    def __init__(self, in_channels: int, n_heads: int, d_head: int, depth: int = 1, dropout: float = 0.0,
                 context_dim: int | None = None, use_linear: bool = False):
        super().__init__()
        if depth < 1:
            raise ValueError(f"transformer depth must be >= 1, got {depth}")
        inner = n_heads * d_head
        self.norm = GroupNorm32(in_channels, eps=1e-6)
        self.use_linear = use_linear
        self.proj_in = nn.Linear(in_channels, inner) if use_linear else nn.Conv2d(in_channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, n_heads, d_head, context_dim=context_dim, dropout=dropout)
            for _ in range(depth))
        self.proj_out = zero_init(nn.Linear(inner, in_channels) if use_linear else nn.Conv2d(inner, in_channels, 1))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        b, _, h, w = x.shape
        if self.use_linear:
            tokens = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))  # (B, HW, inner)
        else:
            tokens = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        if self.use_linear:
            return x + self.proj_out(tokens).transpose(1, 2).reshape(b, -1, h, w)
        return x + self.proj_out(tokens.transpose(1, 2).reshape(b, -1, h, w))
