"""Condition encoders of the latent diffusion stage (the reference's `cond_stage_model`).

Each encoder maps the batch values under its `key` to what the UNet consumes:
- ClassEmbedder: integer labels (B,) -> (B, 1, D), one cross-attention token per sample.
- TransformerTextEncoder: captions -> (B, L, D), the paper's trainable BERT-like text model.
- FrozenCLIPTextEncoder: captions -> (B, L, D) from a frozen Hugging Face CLIP text model.
`null_condition(batch_size, device)` gives the batch values of the unconditional input for
classifier-free guidance: the null class, or the empty caption "".
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ldm.data.tokenizer import CaptionTokenizer


class ClassEmbedder(nn.Module):
    """Learned class embeddings; state dict key `embedding.weight` as in the reference.

    With `null_class=True` the table has one extra row, index `n_classes`, for the
    unconditional input of classifier-free guidance (the cin256-v2 convention: 1000 classes + 1).
    """

    def __init__(self, embed_dim: int, n_classes: int, key: str = "class_label", null_class: bool = False):
        super().__init__()
        if n_classes < 1 or embed_dim < 1:
            raise ValueError(f"n_classes and embed_dim must be >= 1, got {n_classes} and {embed_dim}")
        self.key = key  # the batch entry whose values this encoder takes
        self.n_classes, self.null_class = n_classes, null_class
        self.embedding = nn.Embedding(n_classes + int(null_class), embed_dim)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        """Class ids (B,) -> embeddings (B, 1, embed_dim)."""
        if labels.dtype == torch.bool or labels.dtype.is_floating_point or labels.dtype.is_complex:
            raise TypeError(f"class labels must be an integer tensor, got {labels.dtype}")
        if labels.dim() != 1:
            raise ValueError(f"class labels must have shape (batch,), got {tuple(labels.shape)}")
        rows = self.embedding.num_embeddings
        bad = labels[(labels < 0) | (labels >= rows)]
        if bad.numel():
            value = int(bad[0])
            hint = " (-1 marks a sample without a .cls member)" if value == -1 else ""
            null = f"; {self.n_classes} is the null class" if self.null_class else ""
            raise ValueError(f"class id {value} out of range [0, {rows}){null}{hint}: "
                             "check the data's labels against the configured n_classes")
        return self.embedding(labels)[:, None]

    def null_condition(self, batch_size: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Labels of the unconditional input: `n_classes` for every sample."""
        if not self.null_class:
            raise ValueError("this ClassEmbedder has no null class; build it with null_class=True "
                             "to train or sample with classifier-free guidance")
        return torch.full((batch_size,), self.n_classes, dtype=torch.long, device=device)


def _check_captions(captions: Sequence[str]) -> list[str]:
    if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
        raise TypeError("captions must be a list of strings (one per sample)")
    return list(captions)


class TransformerTextEncoder(nn.Module):
    """Trainable text encoder: token + learned position embeddings, pre-norm transformer
    encoder layers (GELU) and a final LayerNorm, as the paper's BERT-like text model.

    Captions are padded to `max_seq_len`; padding tokens are masked as attention keys, so a
    caption's encoding does not depend on its padding. The output keeps all `max_seq_len`
    positions (the UNet's cross-attention takes a fixed-length context).
    """

    def __init__(self, tokenizer: CaptionTokenizer | str | Path, n_embed: int, n_layer: int,
                 n_head: int | None = None, max_seq_len: int = 77, vocab_size: int | None = None,
                 dropout: float = 0.0, key: str = "caption"):
        """`tokenizer`: a CaptionTokenizer or the path of its tokenizer.json.
        `vocab_size`: rows of the token table, default the tokenizer's size (never fewer).
        `n_head`: default n_embed // 64 (at least 1)."""
        super().__init__()
        self.tokenizer = tokenizer if isinstance(tokenizer, CaptionTokenizer) else CaptionTokenizer.load(tokenizer)
        vocab_size = self.tokenizer.vocab_size if vocab_size is None else vocab_size
        if vocab_size < self.tokenizer.vocab_size:
            raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer's {self.tokenizer.vocab_size} "
                             "tokens; leave vocab_size unset to take the tokenizer's")
        n_head = max(1, n_embed // 64) if n_head is None else n_head
        if n_embed % n_head:
            raise ValueError(f"n_embed {n_embed} is not divisible by n_head {n_head}")
        self.key, self.max_seq_len = key, max_seq_len
        self.token_embedding = nn.Embedding(vocab_size, n_embed)
        self.position_embedding = nn.Parameter(torch.empty(max_seq_len, n_embed))
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding, std=0.02)
        # Separate layers rather than nn.TransformerEncoder, which deep-copies one layer and so
        # starts every layer from the same weights.
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(n_embed, n_head, dim_feedforward=4 * n_embed, dropout=dropout,
                                       activation="gelu", batch_first=True, norm_first=True)
            for _ in range(n_layer))
        self.final_norm = nn.LayerNorm(n_embed)

    def tokenize(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask (True = real token), (B, max_seq_len), on this module's device."""
        ids, mask = self.tokenizer.encode_batch(_check_captions(captions), self.max_seq_len)
        device = self.token_embedding.weight.device
        return ids.to(device), mask.to(device)

    def truncations(self, captions: Sequence[str]) -> list[str | None]:
        """Per caption: None when it fits max_seq_len tokens, else the (normalised) text of the
        tokens kept, which is all the model sees of it."""
        captions = _check_captions(captions)
        ids, _ = self.tokenizer.encode_batch(captions, self.max_seq_len)
        return [self.tokenizer.decode(row) if n > self.max_seq_len else None
                for row, n in zip(ids, self.tokenizer.lengths(captions))]

    def encode(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Ids and attention mask (B, L) with L <= max_seq_len -> hidden states (B, L, n_embed)."""
        if ids.shape[1] > self.max_seq_len:
            raise ValueError(f"{ids.shape[1]} tokens exceed max_seq_len {self.max_seq_len}; "
                             "tokenize with tokenize(), which truncates")
        x = self.token_embedding(ids) + self.position_embedding[:ids.shape[1]]
        padding = ~mask  # PyTorch's key_padding_mask: True = ignore this key
        for layer in self.layers:
            x = layer(x, src_key_padding_mask=padding)
        return self.final_norm(x)

    def forward(self, captions: Sequence[str]) -> torch.Tensor:
        """Captions -> cross-attention context (B, max_seq_len, n_embed)."""
        return self.encode(*self.tokenize(captions))

    def null_condition(self, batch_size: int, device: torch.device | str | None = None) -> list[str]:
        """The empty caption for every sample (`device` is unused: captions are host strings;
        it is accepted so every encoder's null_condition is called the same way)."""
        return [""] * batch_size


class FrozenCLIPTextEncoder(nn.Module):
    """Frozen Hugging Face CLIP text model (Stable Diffusion's text encoder).

    `version`: a local folder holding both the tokenizer and the text model (save_pretrained
    output) or a hub name such as "openai/clip-vit-large-patch14" (needs network access);
    `tokenizer`: the tokenizer's own folder when it is elsewhere (a diffusers pipeline's tokenizer/).
    Captions are padded with the end token to `max_length` and no attention mask is passed,
    as in Stable Diffusion (CLIP's causal attention keeps padding from reaching earlier tokens).
    `layer='last'`: the final hidden states after CLIP's final LayerNorm (SD 1.x);
    `'penultimate'`: the hidden states of the second-to-last layer, without that LayerNorm
    (the SDXL convention, as in diffusers).
    The weights live under `transformer.` as in Stable Diffusion 1.x checkpoints; transformers
    5 names them `transformer.{embeddings,encoder,final_layer_norm}.*`, where SD 1.x files (saved
    with transformers 4) have `transformer.text_model.*`: drop `text_model.` to load those.
    """

    LAYERS = ("last", "penultimate")

    def __init__(self, version: str = "openai/clip-vit-large-patch14", max_length: int = 77,
                 layer: str = "last", key: str = "caption", tokenizer: str | None = None):
        super().__init__()
        from transformers import CLIPTextModel, CLIPTokenizer

        if layer not in self.LAYERS:
            raise ValueError(f"layer must be one of {self.LAYERS}, got {layer!r}")
        try:
            self.tokenizer = CLIPTokenizer.from_pretrained(tokenizer or version)
            self.transformer = CLIPTextModel.from_pretrained(version)
        except OSError as exc:
            offline = " (HF_HUB_OFFLINE is set, so hub names cannot be downloaded)" if os.environ.get("HF_HUB_OFFLINE") else ""
            raise OSError(f"cannot load a CLIP tokenizer and text model from {version!r}{offline}: pass a "
                          f"folder written by save_pretrained, or a hub name with network access. ({exc})") from exc
        positions = self.transformer.config.max_position_embeddings
        if max_length > positions:
            raise ValueError(f"max_length {max_length} exceeds the model's {positions} positions")
        self.key, self.max_length, self.layer = key, max_length, layer
        self.transformer.eval()
        self.transformer.requires_grad_(False)

    def train(self, mode: bool = True) -> FrozenCLIPTextEncoder:
        """The CLIP model stays in eval mode whatever the parent module's mode (it is frozen)."""
        super().train(mode)
        self.transformer.eval()
        return self

    def tokenize(self, captions: Sequence[str]) -> torch.Tensor:
        """Token ids (B, max_length): start token, caption, end token, padding; on the model's device."""
        batch = self.tokenizer(_check_captions(captions), padding="max_length", max_length=self.max_length,
                               truncation=True, return_tensors="pt")
        return batch["input_ids"].to(self.transformer.device)

    def truncations(self, captions: Sequence[str]) -> list[str | None]:
        """Per caption: None when it fits max_length tokens, else the text of the tokens kept,
        which is all the model sees of it."""
        captions = _check_captions(captions)
        full = self.tokenizer(captions, truncation=False)["input_ids"]
        kept = self.tokenizer(captions, truncation=True, max_length=self.max_length)["input_ids"]
        return [self.tokenizer.decode(k, skip_special_tokens=True).strip() if len(f) > self.max_length else None
                for f, k in zip(full, kept)]

    @torch.no_grad()
    def forward(self, captions: Sequence[str]) -> torch.Tensor:
        """Captions -> cross-attention context (B, max_length, hidden size)."""
        out = self.transformer(input_ids=self.tokenize(captions), output_hidden_states=self.layer == "penultimate")
        return out.last_hidden_state if self.layer == "last" else out.hidden_states[-2]

    def null_condition(self, batch_size: int, device: torch.device | str | None = None) -> list[str]:
        """The empty caption for every sample (`device` is unused: captions are host strings;
        it is accepted so every encoder's null_condition is called the same way)."""
        return [""] * batch_size
