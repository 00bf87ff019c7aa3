"""Where shard writers take samples from: the synthetic generator, an image folder, or
img2dataset-style tar shards. Every source yields WebDataset members (extension -> bytes/str)
in a fixed order, so a writer can resume at any sample index.
"""
from __future__ import annotations

import csv
import io
import json
import tarfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Protocol

from PIL import Image

from ldm.data.synthetic import SIZES, ShapesGenerator

IMAGE_EXTENSIONS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp", ".bmp": "bmp"}

Members = dict[str, bytes | str]


class Source(Protocol):
    """An ordered, re-readable collection of samples."""

    classes: list[str] | None

    def __len__(self) -> int: ...

    def iter_from(self, start: int) -> Iterator[Members | None]:
        """Samples from index `start` on; None for a sample that could not be read."""
        ...

    def settings(self) -> dict:
        """What identifies this source, to tell a resumable job from a different one."""
        ...


def encode_image(image: Image.Image, fmt: str, quality: int = 95) -> bytes:
    """PNG or JPEG bytes of a PIL image."""
    buf = io.BytesIO()
    if fmt == "png":
        image.save(buf, format="PNG", optimize=False)
    elif fmt == "jpg":
        image.convert("RGB").save(buf, format="JPEG", quality=quality)
    else:
        raise ValueError(f"image format must be 'png' or 'jpg', got {fmt!r}")
    return buf.getvalue()


class SyntheticSource:
    """`n` samples of the built-in shapes dataset."""

    classes = None

    def __init__(self, n: int, resolution: int = 64, seed: int = 0, image_format: str = "png",
                 max_objects: int = 3, sizes: Mapping[str, float] | None = None):
        self.n, self.image_format = n, image_format
        self.generator = ShapesGenerator(resolution, seed, max_objects, sizes)

    def __len__(self) -> int:
        return self.n

    def settings(self) -> dict:
        g = self.generator
        settings = {"source": "synthetic", "n": self.n, "resolution": g.resolution, "seed": g.seed,
                    "max_objects": g.max_objects, "format": self.image_format}
        if g.sizes != SIZES:  # recorded only when set, so folders written before sizes existed still match
            settings["sizes"] = g.sizes
        return settings

    def iter_from(self, start: int) -> Iterator[Members | None]:
        for i in range(start, self.n):
            s = self.generator[i]
            yield {self.image_format: encode_image(s.image, self.image_format), "txt": s.caption,
                   "cls": str(s.labels["class_label"]), "json": json.dumps(s.metadata())}


def _read_caption_table(path: Path) -> dict[str, str]:
    """file -> caption from a CSV (columns file,caption) or JSONL ({"file", "caption"})."""
    table: dict[str, str] = {}
    if path.suffix == ".jsonl":
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                row = json.loads(line)
                if "file" not in row or "caption" not in row:
                    raise ValueError(f"{path}:{n}: each JSONL row needs 'file' and 'caption'")
                table[row["file"]] = row["caption"]
    else:
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames or not {"file", "caption"} <= set(reader.fieldnames):
                raise ValueError(f"{path}: the CSV needs a header with columns 'file' and 'caption'")
            table = {row["file"]: row["caption"] for row in reader}
    return table


class FolderSource:
    """Images under a folder (recursively, sorted). Captions from a side file `name.txt` or a
    CSV/JSONL table keyed by the path relative to the folder (or the file name); class labels
    from the first-level sub-folder names when `labels_from_folders`."""

    def __init__(self, root: str | Path, captions: str | Path | None = None, labels_from_folders: bool = False):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        self.files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not self.files:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {self.root}")
        self.caption_table = _read_caption_table(Path(captions)) if captions else {}
        self.captions_path = str(captions) if captions else None
        self.classes = None
        if labels_from_folders:
            tops = {p.relative_to(self.root).parts[0] for p in self.files if len(p.relative_to(self.root).parts) > 1}
            if not tops:
                raise ValueError(f"labels_from_folders needs images in sub-folders of {self.root} (one per class)")
            self.classes = sorted(tops)

    def __len__(self) -> int:
        return len(self.files)

    def settings(self) -> dict:
        return {"source": "folder", "root": str(self.root.resolve()), "n": len(self.files),
                "captions": self.captions_path, "labels_from_folders": self.classes is not None}

    def _caption(self, path: Path) -> str | None:
        rel = path.relative_to(self.root).as_posix()
        if rel in self.caption_table:
            return self.caption_table[rel]
        if path.name in self.caption_table:
            return self.caption_table[path.name]
        side = path.with_suffix(".txt")
        return side.read_text().strip() if side.is_file() else None

    def iter_from(self, start: int) -> Iterator[Members | None]:
        for path in self.files[start:]:
            data = path.read_bytes()
            try:
                Image.open(io.BytesIO(data)).verify()
            except Exception:  # any decoder failure means the file is unusable
                yield None
                continue
            members: Members = {IMAGE_EXTENSIONS[path.suffix.lower()]: data}
            meta: dict = {"source_file": path.relative_to(self.root).as_posix()}
            caption = self._caption(path)
            if caption is not None:
                members["txt"] = caption
            if self.classes is not None:
                parts = path.relative_to(self.root).parts
                if len(parts) > 1:
                    members["cls"] = str(self.classes.index(parts[0]))
                    meta["class_name"] = parts[0]
            members["json"] = json.dumps(meta)
            yield members


class TarShardSource:
    """Samples of existing WebDataset / img2dataset tar shards (image + txt + json members),
    re-sharded as they are: bytes are copied, never re-encoded."""

    classes = None

    def __init__(self, shards: list[str]):
        self.shards = [str(s) for s in shards]
        missing = [s for s in self.shards if not Path(s).is_file()]
        if missing:
            raise FileNotFoundError(f"input shards not found: {missing[:5]}")
        self._keys = [(shard, key) for shard in self.shards for key in self._list_keys(shard)]

    @staticmethod
    def _list_keys(shard: str) -> list[str]:
        with tarfile.open(shard) as tar:
            keys: dict[str, None] = {}
            for member in tar.getmembers():
                stem, _, ext = member.name.partition(".")
                if member.isfile() and ("." + ext.lower()) in IMAGE_EXTENSIONS:
                    keys[stem] = None
            return list(keys)

    def __len__(self) -> int:
        return len(self._keys)

    def settings(self) -> dict:
        return {"source": "shards", "shards": [str(Path(s).resolve()) for s in self.shards], "n": len(self)}

    def iter_from(self, start: int) -> Iterator[Members | None]:
        by_shard: dict[str, list[str]] = {}
        for shard, key in self._keys[start:]:
            by_shard.setdefault(shard, []).append(key)
        for shard, keys in by_shard.items():
            wanted = set(keys)
            samples: dict[str, Members] = {}
            with tarfile.open(shard) as tar:
                for member in tar.getmembers():
                    stem, _, ext = member.name.partition(".")
                    if member.isfile() and stem in wanted:
                        data = tar.extractfile(member).read()
                        ext = ext.lower()
                        samples.setdefault(stem, {})[IMAGE_EXTENSIONS.get("." + ext, ext)] = (
                            data.decode("utf-8") if ext in ("txt", "json", "cls") else data)
            for key in keys:
                yield samples.get(key)
