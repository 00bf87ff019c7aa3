"""The BERT-like text transformer of the paper's text-to-image LDM, with the reference's key layout.

The reference (CompVis/latent-diffusion's BERTEmbedder) builds it from its vendored x-transformers:
a TransformerWrapper around an Encoder, called with return_embeddings=True. The parameter names
here are that module's, so the released text2img256 weights load strictly:

  token_emb.weight, pos_emb.emb.weight (learned absolute positions),
  attn_layers.layers.{2i}.0 (LayerNorm), .{2i}.1.{to_q, to_k, to_v (no bias), to_out},
  attn_layers.layers.{2i+1}.0 (LayerNorm), .{2i+1}.1.net.0.0 (Linear dim -> 4 dim, then GELU),
  .{2i+1}.1.net.2 (Linear back), norm (final LayerNorm), to_logits (optional, see below).

Every layer is pre-norm with a residual connection (x-transformers' Residual holds no weights,
so the third entry of each layer has no keys).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _Attention(nn.Module):
    """Multi-head self-attention: heads x dim_head wide, independent of the model width (as x-transformers)."""

    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.dropout = heads, dropout
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        def split(t: torch.Tensor) -> torch.Tensor:  # (B, L, H*d) -> (B, H, L, d)
            return t.reshape(t.shape[0], t.shape[1], self.heads, -1).transpose(1, 2)

        mask = None if keep is None else keep[:, None, None, :]  # True = attend to this key
        out = F.scaled_dot_product_attention(split(self.to_q(x)), split(self.to_k(x)), split(self.to_v(x)),
                                             attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.to_out(out.transpose(1, 2).flatten(2))


class _FeedForward(nn.Module):
    """dim -> 4 dim (GELU) -> dim; keys net.0.0 and net.2."""

    def __init__(self, dim: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU()), nn.Dropout(dropout),
                                 nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _PositionEmbedding(nn.Module):
    """Learned absolute positions (key `emb.weight`)."""

    def __init__(self, dim: int, max_seq_len: int):
        super().__init__()
        self.emb = nn.Embedding(max_seq_len, dim)

    def forward(self, length: int) -> torch.Tensor:
        return self.emb.weight[:length]


class _EncoderLayers(nn.Module):
    """`layers`: [LayerNorm, attention], [LayerNorm, feed-forward] per depth, each pre-norm and residual."""

    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, dropout: float):
        super().__init__()
        self.layers = nn.ModuleList()
        for _ in range(depth):
            self.layers.append(nn.ModuleList([nn.LayerNorm(dim), _Attention(dim, heads, dim_head, dropout)]))
            self.layers.append(nn.ModuleList([nn.LayerNorm(dim), _FeedForward(dim, dropout)]))

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        for i, (norm, block) in enumerate(self.layers):
            x = x + (block(norm(x), keep) if i % 2 == 0 else block(norm(x)))
        return x


class TextTransformer(nn.Module):
    """Token ids (B, L) -> hidden states (B, L, dim): token + position embeddings, `depth` pre-norm
    encoder layers, a final LayerNorm.

    heads, dim_head: the attention is heads * dim_head wide whatever `dim` is (the reference:
        8 heads of 64 for every width).
    to_logits: also hold the reference's language-model head (Linear dim -> num_tokens). The LDM
        never calls it (it takes the embeddings), but the released BERTEmbedder weights contain it,
        so a module that loads them strictly needs it; leave it off for training (an unused
        parameter makes DDP fail).
    """

    def __init__(self, num_tokens: int, max_seq_len: int, dim: int, depth: int, heads: int = 8, dim_head: int = 64,
                 dropout: float = 0.0, to_logits: bool = False):
        super().__init__()
        if min(num_tokens, max_seq_len, dim, heads, dim_head) < 1 or depth < 0:
            raise ValueError(f"num_tokens ({num_tokens}), max_seq_len ({max_seq_len}), dim ({dim}), heads ({heads}) "
                             f"and dim_head ({dim_head}) must be positive and depth ({depth}) >= 0")
        self.max_seq_len = max_seq_len
        self.token_emb = nn.Embedding(num_tokens, dim)
        self.pos_emb = _PositionEmbedding(dim, max_seq_len)
        nn.init.normal_(self.token_emb.weight, std=0.02)
        nn.init.normal_(self.pos_emb.emb.weight, std=0.02)
        self.attn_layers = _EncoderLayers(dim, depth, heads, dim_head, dropout)
        self.norm = nn.LayerNorm(dim)
        if to_logits:
            self.to_logits = nn.Linear(dim, num_tokens)

    def forward(self, ids: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """`keep` (B, L) bool, True = a real token: padding keys are masked out of the attention;
        None: every position attends to every other one, padding included (the reference)."""
        if ids.shape[1] > self.max_seq_len:
            raise ValueError(f"{ids.shape[1]} tokens exceed max_seq_len {self.max_seq_len}; "
                             "tokenize with the encoder's tokenize(), which truncates")
        x = self.token_emb(ids) + self.pos_emb(ids.shape[1])
        return self.norm(self.attn_layers(x, keep))
