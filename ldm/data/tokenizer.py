"""Training the caption tokenizer (ldm.nets.tokenizer) on the captions of WebDataset shards:
`python -m ldm.data.tokenizer`, or `ensure_tokenizer` when a text model is built for a run."""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

from ldm.nets.tokenizer import CaptionTokenizer

log = logging.getLogger(__name__)


def captions_from_shards(urls: str | list[str]) -> Iterator[str]:
    """The `.txt` members (captions) of WebDataset shards, in shard order.

    `urls`: anything ldm.data.pipeline.expand_urls takes (folder with index.json, brace pattern,
    '::'-separated list, `pipe:` commands).
    """
    import webdataset as wds

    from ldm.data.pipeline import expand_urls
    from ldm.data.tar import tar_samples

    for sample in tar_samples(({"url": u} for u in expand_urls(urls)), wds.reraise_exception):
        if "txt" in sample:
            yield sample["txt"].decode("utf-8").strip()


def ensure_tokenizer(path: str | Path, shards: str | list[str], vocab_size: int = 512) -> CaptionTokenizer:
    """The tokenizer at `path`; trained on the captions of `shards` and saved there first when
    the file does not exist yet (a run trains it once and reuses it when resumed)."""
    path = Path(path)
    if path.is_file():
        return CaptionTokenizer.load(path)
    captions = _Counter(captions_from_shards(shards))
    tokenizer = CaptionTokenizer.train(captions, vocab_size)
    if captions.n == 0:
        raise ValueError(f"no .txt captions in the shards {shards!r}: a text-conditional model needs captions")
    tokenizer.save(path)
    log.info("trained the caption tokenizer on %d captions: %d tokens -> %s", captions.n, tokenizer.vocab_size, path)
    return tokenizer


class _Counter:
    """Passes an iterable through and counts its items (the trainer consumes it once)."""

    def __init__(self, items: Iterable[str]):
        self.items, self.n = items, 0

    def __iter__(self) -> Iterator[str]:
        for item in self.items:
            self.n += 1
            yield item


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m ldm.data.tokenizer",
        description="Train the caption tokenizer (byte-level BPE) on the .txt members of WebDataset shards.")
    parser.add_argument("--shards", required=True,
                        help="shard folder (with index.json), brace pattern or '::'-separated list")
    parser.add_argument("--out", required=True, help="tokenizer.json to write")
    parser.add_argument("--vocab-size", type=int, default=512,
                        help="largest vocabulary (default 512, enough for the synthetic shapes captions; "
                             "web captions want ~30000)")
    args = parser.parse_args(argv)

    try:
        captions = _Counter(captions_from_shards(args.shards))
        tokenizer = CaptionTokenizer.train(captions, args.vocab_size)
    except (FileNotFoundError, ValueError) as exc:
        sys.exit(f"error: {exc}")
    if captions.n == 0:
        sys.exit(f"error: no .txt caption members in the shards {args.shards!r}; the tokenizer learns "
                 "from captions, so write shards that have them (e.g. `python -m ldm.data.write synthetic ...`)")
    tokenizer.save(args.out)
    print(f"trained on {captions.n} captions: {tokenizer.vocab_size} tokens "
          f"(asked for at most {args.vocab_size}) -> {args.out}")


if __name__ == "__main__":
    main()
