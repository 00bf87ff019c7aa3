"""Condition encoders of the latent diffusion stage (the reference's `cond_stage_model`).

Each encoder maps the batch values under its `key` to what the UNet consumes:
- ClassEmbedder: integer labels (B,) -> (B, 1, D), one cross-attention token per sample.
- TransformerTextEncoder: captions -> (B, L, D), the paper's trainable BERT-like text model.
- FrozenCLIPTextEncoder: captions -> (B, L, D) from a frozen Hugging Face CLIP text model.
- FrozenOpenCLIPTextEncoder: captions -> (B, L, D) from a frozen OpenCLIP text tower (SD 2.x), run
  as a transformers CLIPTextModel.
- SpatialRescaler: semantic label maps (B, H, W) -> (B, C, h, w) channels for the concat condition.
`null_condition(batch_size, device)` gives the batch values of the unconditional input for
classifier-free guidance: the null class, or the empty caption "".
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ldm.nets.tokenizer import CaptionTokenizer
from ldm.nets.text_transformer import TextTransformer


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


def _from_pretrained(loader, name: str, what: str, probe: str, **kwargs):
    """`loader.from_pretrained(name, **kwargs)` for a local folder or a hub name, refused with what to do when
    `name` is neither a folder nor a hub model available here (checked through its file `probe`
    first: transformers 5 builds an empty tokenizer from a name it cannot find instead of failing)."""
    from transformers.utils import cached_file

    try:
        cached_file(str(name), probe)
        return loader.from_pretrained(str(name), **kwargs)
    except OSError as exc:
        offline = " (HF_HUB_OFFLINE is set, so hub names cannot be downloaded)" if os.environ.get("HF_HUB_OFFLINE") else ""
        raise OSError(f"cannot load {what} from {str(name)!r}{offline}: pass a folder written by save_pretrained, "
                      f"or a hub name with network access. ({exc})") from exc


class BertCaptionTokenizer:
    """BERT's WordPiece tokenizer (transformers' BertTokenizerFast) with CaptionTokenizer's interface:
    the tokenizer of the paper's text-to-image model (the reference BERTEmbedder hard-codes the
    hub's bert-base-uncased). Captions read `[CLS] tokens... [SEP] [PAD]...`, truncated to max_len.

    `name_or_path`: a folder written by save_pretrained or a hub name (needs network access once).
    """

    def __init__(self, name_or_path: str | Path = "bert-base-uncased"):
        from transformers import BertTokenizerFast

        self.name_or_path = str(name_or_path)
        self.backend = _from_pretrained(BertTokenizerFast, self.name_or_path, "a BERT tokenizer", "tokenizer_config.json")

    @property
    def vocab_size(self) -> int:
        """Number of token ids, special tokens included."""
        return len(self.backend)

    def encode_batch(self, captions: Sequence[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (B, max_len) int64 and attention mask (B, max_len) bool (True = real token)."""
        batch = self.backend(_check_captions(captions), truncation=True, max_length=max_len, padding="max_length",
                             return_tensors="pt")
        return batch["input_ids"], batch["attention_mask"].bool()

    def lengths(self, captions: Sequence[str]) -> list[int]:
        """Tokens each caption encodes to, `[CLS]` and `[SEP]` included, before any truncation."""
        return [len(ids) for ids in self.backend(_check_captions(captions), truncation=False)["input_ids"]]

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of one row of ids, special tokens dropped."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return self.backend.decode(ids, skip_special_tokens=True).strip()


class TransformerTextEncoder(nn.Module):
    """Trainable text encoder, the paper's BERT-like text model: token + learned position
    embeddings, pre-norm transformer layers (GELU) and a final LayerNorm (ldm.nets.text_transformer,
    under `transformer.*` with the reference BERTEmbedder's key layout).

    Captions are padded to `max_seq_len`. With `mask_padding` padding tokens are masked as
    attention keys, so a caption's encoding does not depend on its padding; the reference attends
    to them (mask_padding=False reproduces it). The output keeps all `max_seq_len` positions (the
    UNet's cross-attention takes a fixed-length context).
    """

    def __init__(self, tokenizer: CaptionTokenizer | BertCaptionTokenizer | str | Path, n_embed: int, n_layer: int,
                 n_head: int | None = None, dim_head: int | None = None, max_seq_len: int = 77,
                 vocab_size: int | None = None, dropout: float = 0.0, mask_padding: bool = True,
                 to_logits: bool = False, key: str = "caption"):
        """`tokenizer`: a CaptionTokenizer or BertCaptionTokenizer, or the path of a tokenizer.json
        (CaptionTokenizer.save). `vocab_size`: rows of the token table, default the tokenizer's
        size (never fewer). `n_head`: default n_embed // 64 (at least 1); `dim_head`: default
        n_embed // n_head (the reference: 8 heads of 64 whatever n_embed). `to_logits`: keep the
        reference's unused language-model head so its weights load (TextTransformer)."""
        super().__init__()
        self.tokenizer = tokenizer if isinstance(tokenizer, (CaptionTokenizer, BertCaptionTokenizer)) \
            else CaptionTokenizer.load(tokenizer)
        vocab_size = self.tokenizer.vocab_size if vocab_size is None else vocab_size
        if vocab_size < self.tokenizer.vocab_size:
            raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer's {self.tokenizer.vocab_size} "
                             "tokens; leave vocab_size unset to take the tokenizer's")
        n_head = max(1, n_embed // 64) if n_head is None else n_head
        if dim_head is None:
            if n_embed % n_head:
                raise ValueError(f"n_embed {n_embed} is not divisible by n_head {n_head}; set dim_head for "
                                 "attention wider or narrower than n_embed")
            dim_head = n_embed // n_head
        self.key, self.max_seq_len, self.mask_padding = key, max_seq_len, mask_padding
        self.transformer = TextTransformer(vocab_size, max_seq_len, n_embed, n_layer, heads=n_head, dim_head=dim_head,
                                           dropout=dropout, to_logits=to_logits)

    def tokenize(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask (True = real token), (B, max_seq_len), on this module's device."""
        ids, mask = self.tokenizer.encode_batch(_check_captions(captions), self.max_seq_len)
        device = self.transformer.token_emb.weight.device
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
        return self.transformer(ids, mask if self.mask_padding else None)

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
    with transformers 4) have `transformer.text_model.*` and a `position_ids` buffer:
    ldm.convert.reference.map_text_model_keys maps those.
    """

    LAYERS = ("last", "penultimate")

    def __init__(self, version: str = "openai/clip-vit-large-patch14", max_length: int = 77,
                 layer: str = "last", key: str = "caption", tokenizer: str | None = None):
        super().__init__()
        from transformers import CLIPTextModel, CLIPTokenizer

        self._setup(_from_pretrained(CLIPTokenizer, tokenizer or version, "a CLIP tokenizer", "tokenizer_config.json"),
                    _from_pretrained(CLIPTextModel, version, "a CLIP text model", "config.json"), max_length, layer, key)

    def _setup(self, tokenizer, transformer: nn.Module, max_length: int, layer: str, key: str) -> None:
        if layer not in self.LAYERS:
            raise ValueError(f"layer must be one of {self.LAYERS}, got {layer!r}")
        self.tokenizer, self.transformer = tokenizer, transformer
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

    def encode(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (B, L) -> the hidden states of `layer` (B, L, hidden size)."""
        out = self.transformer(input_ids=ids, output_hidden_states=self.layer == "penultimate")
        return out.last_hidden_state if self.layer == "last" else out.hidden_states[-2]

    @torch.no_grad()
    def forward(self, captions: Sequence[str]) -> torch.Tensor:
        """Captions -> cross-attention context (B, max_length, hidden size)."""
        return self.encode(self.tokenize(captions))

    def null_condition(self, batch_size: int, device: torch.device | str | None = None) -> list[str]:
        """The empty caption for every sample (`device` is unused: captions are host strings;
        it is accepted so every encoder's null_condition is called the same way)."""
        return [""] * batch_size


class FrozenOpenCLIPTextEncoder(FrozenCLIPTextEncoder):
    """Frozen OpenCLIP text tower (SD 2.x's FrozenOpenCLIPEmbedder, open_clip ViT-H-14), run as a
    transformers CLIPTextModel of the tower's dimensions (pre-norm, exact GELU, causal attention,
    LayerNorm eps 1e-5: the same network). The weights come from the checkpoint: SD 2.x files
    store open_clip's layout under `cond_stage_model.model.*`, which
    ldm.convert.openclip maps onto this module's keys and back.

    `layer='penultimate'` (SD 2.x): every block but the last, then the final LayerNorm (what
    diffusers' `clip_skip=1` computes); `'last'`: all blocks, then the final LayerNorm.
    Tokenized as open_clip.tokenize does: CLIP's BPE, start token, caption, end token, then
    padding with id 0 ("!") to `max_length` (SD-1's CLIP pads with the end token), no attention
    mask. `tokenizer`: a folder written by save_pretrained or a hub name holding CLIP's BPE
    (open_clip's vocabulary is OpenAI CLIP's). The padding is written here rather than by making
    "!" the tokenizer's pad token (diffusers' SD-2 tokenizer does), which would also split a "!"
    inside a caption off as that special token, unlike open_clip.
    `text_projection` and `logit_scale` are kept as buffers only so that a checkpoint converts
    back to the reference layout unchanged; the condition does not use them.
    """

    def __init__(self, width: int, heads: int, layers: int, embed_dim: int,
                 tokenizer: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", vocab_size: int = 49408,
                 context_length: int = 77, max_length: int = 77, layer: str = "penultimate", key: str = "caption"):
        nn.Module.__init__(self)
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

        if width % heads:
            raise ValueError(f"width {width} does not split into {heads} heads")
        config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=width, intermediate_size=4 * width,
                                num_hidden_layers=layers, num_attention_heads=heads,
                                max_position_embeddings=context_length, hidden_act="gelu", layer_norm_eps=1e-5,
                                projection_dim=embed_dim, pad_token_id=0, bos_token_id=vocab_size - 2,
                                eos_token_id=vocab_size - 1)
        backend = _from_pretrained(CLIPTokenizer, tokenizer, "a CLIP BPE tokenizer (OpenCLIP's vocabulary)",
                                   "tokenizer_config.json")
        if backend.convert_tokens_to_ids("!") != 0 or len(backend) != vocab_size:
            raise ValueError(f"the tokenizer at {tokenizer!r} is not CLIP's BPE vocabulary ('!' = id 0, {vocab_size} "
                             "tokens), which OpenCLIP's text towers are trained with")
        self._setup(backend, CLIPTextModel(config), max_length, layer, key)
        self.register_buffer("text_projection", torch.zeros(width, embed_dim))
        self.register_buffer("logit_scale", torch.zeros(()))

    def tokenize(self, captions: Sequence[str]) -> torch.Tensor:
        """Token ids (B, max_length) as open_clip.tokenize gives them, on the model's device."""
        rows = self.tokenizer(_check_captions(captions), truncation=True, max_length=self.max_length)["input_ids"]
        ids = torch.zeros(len(rows), self.max_length, dtype=torch.long)  # open_clip's padding: id 0
        for i, row in enumerate(rows):
            ids[i, :len(row)] = torch.tensor(row)
        return ids.to(self.transformer.device)

    def encode(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (B, L) -> the hidden states after `layer`, through the final LayerNorm (B, L, width)."""
        if self.layer == "last":
            return self.transformer(input_ids=ids).last_hidden_state
        hidden = self.transformer(input_ids=ids, output_hidden_states=True).hidden_states[-2]
        return self.transformer.final_layer_norm(hidden)


# The encoders that take captions (sample.py routes prompts to them, whatever the batch key).
TEXT_ENCODERS = (TransformerTextEncoder, FrozenCLIPTextEncoder)


class SpatialRescaler(nn.Module):
    """Spatial condition encoder (the reference's SpatialRescaler, used by the semantic synthesis
    models): resize `n_stages` times by `multiplier` (`method`, bilinear by default), then, with
    `out_channels`, a learned 1x1 conv `channel_mapper` from in_channels to out_channels.

    Takes a label map of class ids (B, H, W), one-hot encoded to `in_channels` classes here (so data
    loaders carry ids, not 182 float channels), or a float map (B, in_channels, H, W) as it is.
    The semantic LDM-4 maps 182 COCO-Stuff classes at 256 px to 3 channels at 64 px (n_stages 2).
    """

    METHODS = ("nearest", "bilinear", "bicubic", "area")

    def __init__(self, n_stages: int = 1, method: str = "bilinear", multiplier: float = 0.5, in_channels: int = 3,
                 out_channels: int | None = None, bias: bool = False, key: str = "segmentation"):
        super().__init__()
        if n_stages < 0 or in_channels < 1 or (out_channels is not None and out_channels < 1):
            raise ValueError(f"n_stages ({n_stages}) must be >= 0, in_channels ({in_channels}) and out_channels "
                             f"({out_channels}) positive")
        if method not in self.METHODS:
            raise ValueError(f"method must be one of {self.METHODS}, got {method!r}")
        self.n_stages, self.method, self.multiplier = n_stages, method, multiplier
        self.in_channels, self.key = in_channels, key
        self.out_channels = in_channels if out_channels is None else out_channels
        if out_channels is not None:
            self.channel_mapper = nn.Conv2d(in_channels, out_channels, 1, bias=bias)

    def one_hot(self, labels: torch.Tensor) -> torch.Tensor:
        """Class ids (B, H, W) -> one-hot float (B, in_channels, H, W); ids out of range are refused."""
        if labels.dim() != 3 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(f"a label map must be integer class ids of shape (B, H, W), got {labels.dtype} "
                             f"{tuple(labels.shape)}")
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= self.in_channels:
            raise ValueError(f"label ids must lie in [0, {self.in_channels}), got {low}..{high}: check the label "
                             "map against the model's classes")
        dtype = self.channel_mapper.weight.dtype if hasattr(self, "channel_mapper") else torch.float32
        return F.one_hot(labels.long(), self.in_channels).permute(0, 3, 1, 2).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Label map (B, H, W) or float map (B, in_channels, H, W) -> (B, out_channels, h, w)."""
        if x.dim() == 3:
            x = self.one_hot(x)
        elif x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected class ids (B, H, W) or a map (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        for _ in range(self.n_stages):
            x = F.interpolate(x, scale_factor=self.multiplier, mode=self.method)
        return self.channel_mapper(x) if hasattr(self, "channel_mapper") else x
