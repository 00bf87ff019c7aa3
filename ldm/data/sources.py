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

import numpy as np
from PIL import Image

from ldm.data.synthetic import SIZES, ShapesGenerator
from ldm.data.transforms import ID_MODES, read_ids

IMAGE_EXTENSIONS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp", ".bmp": "bmp"}
# Per-pixel members aligned with the image (docs/data.md): a label map of class ids and an
# inpainting mask (255 = known pixel kept, 0 = hole), each a one-channel PNG at the image's size.
LABEL_MAP_MEMBER = "seg.png"
MASK_MEMBER = "mask.png"

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


def encode_label_map(ids: np.ndarray) -> bytes:
    """Lossless PNG of a (H, W) map of non-negative integer ids: 8-bit when every id is below 256,
    else 16-bit."""
    if ids.ndim != 2 or ids.dtype.kind not in "iub":
        raise ValueError(f"a label map is a (H, W) array of integer ids, got {ids.dtype} {ids.shape}")
    if ids.size and (ids.min() < 0 or ids.max() > 65535):
        raise ValueError(f"label ids must lie in [0, 65535], got {ids.min()}..{ids.max()}")
    buf = io.BytesIO()
    Image.fromarray(ids.astype(np.uint8 if ids.size == 0 or ids.max() < 256 else np.uint16)).save(buf, format="PNG")
    return buf.getvalue()


class SyntheticSource:
    """`n` samples of the built-in shapes dataset; with `label_maps`, each with its `seg.png`
    (ShapesGenerator.label_map: 0 background, 1..6 the shapes)."""

    classes = None

    def __init__(self, n: int, resolution: int = 64, seed: int = 0, image_format: str = "png",
                 max_objects: int = 3, sizes: Mapping[str, float] | None = None, label_maps: bool = False):
        self.n, self.image_format, self.label_maps = n, image_format, label_maps
        self.generator = ShapesGenerator(resolution, seed, max_objects, sizes)

    def __len__(self) -> int:
        return self.n

    def settings(self) -> dict:
        g = self.generator
        settings = {"source": "synthetic", "n": self.n, "resolution": g.resolution, "seed": g.seed,
                    "max_objects": g.max_objects, "format": self.image_format}
        if g.sizes != SIZES:  # recorded only when set, so folders written before sizes existed still match
            settings["sizes"] = g.sizes
        if self.label_maps:  # likewise
            settings["label_maps"] = True
        return settings

    def iter_from(self, start: int) -> Iterator[Members | None]:
        for i in range(start, self.n):
            s = self.generator[i]
            members: Members = {self.image_format: encode_image(s.image, self.image_format), "txt": s.caption,
                                "cls": str(s.labels["class_label"]), "json": json.dumps(s.metadata())}
            if self.label_maps:
                members[LABEL_MAP_MEMBER] = encode_label_map(self.generator.label_map(s))
            yield members


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
    from the first-level sub-folder names when `labels_from_folders`.

    `label_maps` / `masks`: folders of one-channel PNGs with the images' relative paths and stems
    (`<src>/a/cat.jpg` -> `<label_maps>/a/cat.png`), stored as `seg.png` / `mask.png` members.
    Every image must have one, one channel at its size (checked from the files' headers before
    the first shard is written); a mask must be binary (0 = hole, 255 or 1 = kept; checked as it
    is written)."""

    def __init__(self, root: str | Path, captions: str | Path | None = None, labels_from_folders: bool = False,
                 label_maps: str | Path | None = None, masks: str | Path | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        self.files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if label_maps is not None or masks is not None:
            # a map folder inside src must not be taken for images
            skip = [Path(d).resolve() for d in (label_maps, masks) if d is not None]
            self.files = [p for p in self.files if not any(d in p.resolve().parents for d in skip)]
        if not self.files:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {self.root}")
        self.maps = {member: Path(folder) for member, folder in ((LABEL_MAP_MEMBER, label_maps), (MASK_MEMBER, masks))
                     if folder is not None}
        for member, folder in self.maps.items():
            self._check_maps(member, folder)
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

    def map_file(self, image: Path, folder: Path) -> Path:
        """The label map or mask of `image` in `folder`: the same relative path, with .png."""
        return (folder / image.relative_to(self.root)).with_suffix(".png")

    def _check_maps(self, member: str, folder: Path) -> None:
        """Refuse, before anything is written, images without their map or with one of another size
        (only the files' headers are read)."""
        option = "--label-maps" if member == LABEL_MAP_MEMBER else "--masks"
        if not folder.is_dir():
            raise FileNotFoundError(f"{option} {folder} is not a folder")
        missing = [p for p in self.files if not self.map_file(p, folder).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} of {len(self.files)} images have no {option} file, e.g. {missing[0]} needs "
                f"{self.map_file(missing[0], folder)}: every image needs a PNG with its relative path and stem "
                f"in {folder} (remove the images that have none, or draw their maps)")
        for image in self.files:
            try:
                with Image.open(image) as img:
                    size = img.size
            except (OSError, SyntaxError):  # an unreadable image is skipped (and counted) when written
                continue
            path = self.map_file(image, folder)
            with Image.open(path) as ids:
                if ids.size != size:
                    raise ValueError(f"{path} is {ids.size[0]}x{ids.size[1]} px but its image {image} is "
                                     f"{size[0]}x{size[1]} px: a {option} file must have its image's size "
                                     "(resize it with nearest-neighbour, never a smoothing filter)")
                if ids.mode not in ID_MODES:
                    raise ValueError(f"{path} is a {ids.mode} image; {option} files are one channel of ids "
                                     f"(PNG mode {', '.join(ID_MODES)}): convert colours to ids first")

    def settings(self) -> dict:
        settings = {"source": "folder", "root": str(self.root.resolve()), "n": len(self.files),
                    "captions": self.captions_path, "labels_from_folders": self.classes is not None}
        for member, folder in self.maps.items():  # recorded only when given: older folders still match
            settings[member] = str(folder.resolve())
        return settings

    def _map_member(self, member: str, image: Path) -> bytes:
        path = self.map_file(image, self.maps[member])
        ids = read_ids(path.read_bytes(), str(path))
        if member == MASK_MEMBER and not np.isin(ids, (0, 255)).all():
            if ids.max() <= 1:  # mode 1, or a 0/1 mask
                ids = ids * 255
            else:
                raise ValueError(f"{path} holds values {np.unique(ids)[:6].tolist()}...; a mask is binary: 0 for the "
                                 "hole to fill, 255 (or 1) for the pixels kept")
        return encode_label_map(ids)

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
            for member in self.maps:
                members[member] = self._map_member(member, path)
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
