"""Reading WebDataset shards fast: tar members parsed straight from their 512-byte headers.

webdataset expands shards with Python's `tarfile`, whose per-member header processing costs more
than decoding a small PNG (benchmarks/data.py); with four members per sample it made the shard
pipeline slower than an image-folder loader. This reader parses the ustar header fields it
needs (name, size, type), follows GNU long names and pax `path` records, and hands the members to
webdataset's own URL opener and sample grouping, so `pipe:`, object-store URLs, gzip-compressed
shards and the error handler behave as with `wds.tarfile_to_samples`.
"""
from __future__ import annotations

import gzip
import io
from collections.abc import Callable, Iterable, Iterator
from typing import Any, BinaryIO

from webdataset.tariterators import group_by_keys, url_opener

BLOCK = 512
REGULAR = (b"0", b"\0", b"7")  # regular file types (7: contiguous file)


class TarFormatError(ValueError):
    """A shard is not a readable tar stream."""


def _field(header: bytes, start: int, end: int) -> bytes:
    return header[start:end].split(b"\0", 1)[0]


def _octal(header: bytes, start: int, end: int) -> int:
    raw = header[start:end]
    if raw[0] & 0x80:  # GNU base-256 for sizes of 8 GiB and more
        return int.from_bytes(raw[1:], "big")
    text = raw.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise TarFormatError(f"bad tar header field {raw!r}") from None


def _read_exact(stream: BinaryIO, n: int) -> bytes:
    data = stream.read(n)
    if len(data) != n:
        raise TarFormatError(f"tar stream ends inside a member ({len(data)} of {n} bytes)")
    return data


def _pax_path(records: bytes) -> str | None:
    """The `path` of a pax extended header ("<len> path=<name>\\n" records), if present."""
    for line in records.decode("utf-8", "replace").splitlines():
        _, _, item = line.partition(" ")
        if item.startswith("path="):
            return item[len("path="):]
    return None


def tar_members(stream: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """(name, data) of each regular file in a tar stream, in order (gzip-compressed or not)."""
    head = stream.read(2)
    stream = io.BufferedReader(_Prefixed(head, stream))  # type: ignore[arg-type]
    if head == b"\x1f\x8b":
        stream = gzip.GzipFile(fileobj=stream)  # type: ignore[assignment]
    long_name: str | None = None
    while True:
        header = stream.read(BLOCK)
        if not header or header == bytes(BLOCK):
            return  # end of archive (a zero block; some writers end the stream without one)
        if len(header) < BLOCK:
            raise TarFormatError(f"tar stream ends inside a header ({len(header)} of {BLOCK} bytes)")
        if sum(header[:148]) + 8 * 32 + sum(header[156:]) != _octal(header, 148, 156):  # checksum field as spaces
            raise TarFormatError("not a tar header (bad checksum)")
        size, kind = _octal(header, 124, 136), header[156:157]
        data = _read_exact(stream, size)
        stream.read(-size % BLOCK)  # padding to the next block
        if kind == b"L":  # GNU long name of the next member
            long_name = data.split(b"\0", 1)[0].decode("utf-8")
        elif kind == b"x":  # pax header of the next member
            long_name = _pax_path(data) or long_name
        elif kind in REGULAR:
            name = long_name
            if name is None:
                prefix = _field(header, 345, 500) if header[257:262] == b"ustar" else b""
                name = ((prefix + b"/" if prefix else b"") + _field(header, 0, 100)).decode("utf-8")
            long_name = None
            yield name, data
        else:  # directories, links, global headers: nothing to read
            long_name = None


class _Prefixed(io.RawIOBase):
    """A raw stream that replays `prefix` (bytes already read to sniff the format) before `rest`."""

    def __init__(self, prefix: bytes, rest: BinaryIO):
        self.prefix, self.rest = prefix, rest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.prefix:
            n = min(len(buffer), len(self.prefix))
            buffer[:n], self.prefix = self.prefix[:n], self.prefix[n:]
            return n
        data = self.rest.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)


def _expand(sources: Iterable[dict[str, Any]], handler: Callable[[Exception], bool]) -> Iterator[dict[str, Any]]:
    for source in sources:
        url = source["url"]
        try:
            for name, data in tar_members(source["stream"]):
                if name.startswith("__") or "/__" in name:  # webdataset's meta members
                    continue
                yield {"fname": name, "data": data, "__url__": url}
        except Exception as exn:  # a damaged shard: the handler counts it, the next shard follows
            exn.args = (*exn.args, url)
            if not handler(exn):
                raise
        finally:
            close = getattr(source["stream"], "close", None)
            if close is not None:
                close()
        yield {}  # end of shard: samples never span two shards


def tar_samples(sources: Iterable[dict[str, Any]], handler: Callable[[Exception], bool]) -> Iterator[dict[str, Any]]:
    """Samples (dicts of extension -> bytes, plus `__key__` and `__url__`) from shard URLs
    ({"url": ...} dicts), like `webdataset.tarfile_to_samples(handler=handler)`."""
    opened = url_opener(sources, handler=handler)
    return group_by_keys(_expand(opened, handler), handler=handler)
