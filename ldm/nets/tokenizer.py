"""Caption tokenizer of the trainable text encoder (ldm.nets.embedders); trained on a run's captions by
ldm.data.tokenizer (`python -m ldm.data.tokenizer`).

A byte-level BPE built with the Hugging Face `tokenizers` library. Byte-level BPE was chosen
over WordPiece because its training is reproducible: the `tokenizers` WordPiece trainer numbers
its `##` continuation symbols in hash-map order, so two runs on the same captions give different
vocabularies, while the byte-level trainer starts from a fixed 256-symbol alphabet and breaks
ties by symbol id. Byte-level also means no caption is ever out of vocabulary.

Text is NFC-normalised, lowercased and its whitespace collapsed before tokenizing. Every encoded
caption reads `[CLS] tokens... [SEP] [PAD]...`; `[UNK]` and `[MASK]` are reserved (BERT's special
token set) and never produced by encoding. The empty caption "" encodes as `[CLS] [SEP]`, the
null condition of classifier-free guidance.
"""
from __future__ import annotations

import base64
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)  # byte alphabet plus the special tokens


class CaptionTokenizer:
    """Caption text <-> fixed-length id tensors, around a `tokenizers.Tokenizer`."""

    def __init__(self, tokenizer: Tokenizer):
        missing = [t for t in SPECIAL_TOKENS if tokenizer.token_to_id(t) is None]
        if missing:
            raise ValueError(f"tokenizer lacks the special tokens {missing}; train one with "
                             "CaptionTokenizer.train or `python -m ldm.data.tokenizer`")
        self.backend = tokenizer
        self.pad_id, self.cls_id, self.sep_id = (tokenizer.token_to_id(t) for t in ("[PAD]", "[CLS]", "[SEP]"))

    @classmethod
    def train(cls, captions: Iterable[str], vocab_size: int) -> CaptionTokenizer:
        """Learn a vocabulary of at most `vocab_size` tokens from `captions` (any iterable,
        read once). Same captions in the same order -> the same tokenizer, byte for byte."""
        if isinstance(captions, str):
            raise TypeError("captions must be an iterable of strings, not one string")
        if vocab_size < MIN_VOCAB_SIZE:
            raise ValueError(f"vocab_size must be at least {MIN_VOCAB_SIZE} (256 byte symbols + "
                             f"{len(SPECIAL_TOKENS)} special tokens), got {vocab_size}")
        tokenizer = Tokenizer(models.BPE())
        tokenizer.normalizer = normalizers.Sequence([
            normalizers.NFC(), normalizers.Lowercase(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()])
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tokenizer.train_from_iterator(captions, trainer)
        return cls(tokenizer)

    @classmethod
    def load(cls, path: str | Path) -> CaptionTokenizer:
        """Read a tokenizer.json written by `save`."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer file at {path}; train one with "
                                    "`python -m ldm.data.tokenizer --shards ... --out tokenizer.json`")
        return cls(Tokenizer.from_file(str(path)))

    def save(self, path: str | Path) -> None:
        """Write the whole tokenizer (normaliser, vocabulary, merges) to one JSON file, atomically:
        a reader (another rank, a resumed run) finds the whole file or none."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        self.backend.save(str(tmp))
        os.replace(tmp, path)

    def to_base64(self) -> str:
        """The whole tokenizer (the JSON `save` writes, a few KB) as base64 text, which checkpoints
        store in their config: unlike the JSON it holds no `${`, which OmegaConf would resolve."""
        return base64.b64encode(self.backend.to_str().encode("utf-8")).decode("ascii")

    @classmethod
    def from_base64(cls, data: str) -> CaptionTokenizer:
        """The tokenizer whose `to_base64` text this is."""
        return cls(Tokenizer.from_str(base64.b64decode(data, validate=True).decode("utf-8")))

    @property
    def vocab_size(self) -> int:
        """Number of token ids, special tokens included (ids are 0 .. vocab_size - 1)."""
        return self.backend.get_vocab_size()

    def encode_batch(self, captions: Sequence[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (B, max_len) int64 and attention mask (B, max_len) bool (True = real token).

        Each row is `[CLS] tokens [SEP]` followed by `[PAD]`; captions too long keep their first
        max_len - 2 tokens and still end with `[SEP]`.
        """
        if isinstance(captions, str):
            raise TypeError("captions must be a list of strings, not one string")
        if max_len < 2:
            raise ValueError(f"max_len must be >= 2 (room for [CLS] and [SEP]), got {max_len}")
        ids = torch.full((len(captions), max_len), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(captions), max_len), dtype=torch.bool)
        for row, encoding in enumerate(self.backend.encode_batch(list(captions))):
            tokens = [self.cls_id, *encoding.ids[:max_len - 2], self.sep_id]
            ids[row, :len(tokens)] = torch.tensor(tokens)
            mask[row, :len(tokens)] = True
        return ids, mask

    def lengths(self, captions: Sequence[str]) -> list[int]:
        """Tokens each caption encodes to, `[CLS]` and `[SEP]` included, before any truncation."""
        return [len(encoding.ids) + 2 for encoding in self.backend.encode_batch(list(captions))]

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of one row of ids, special tokens dropped (normalised: lowercase, single spaces)."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return self.backend.decode(ids, skip_special_tokens=True).strip()
