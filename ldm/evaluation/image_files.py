"""Images as files, batch by batch: a folder of PNG / JPEG files, or an .npz in the layout of the
ADM evaluator (openai/guided-diffusion `evaluations/evaluator.py`: `arr_0`, (N, H, W, 3) uint8).
evaluate.py scores such files (`images=`) and keeps its samples as such files (save_png, save_npz).

An .npz is read and written in place, a batch at a time: 50k images at 256 px are 9.8 GB, and
every rank of a multi-GPU evaluation reads the file.
"""
from __future__ import annotations

import os
import zipfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
NPZ_KEYS = ("images", "arr_0")  # the array's name in an .npz, in the order looked for


def save_pngs(folder: str | Path, start: int, pixels: np.ndarray) -> None:
    """Write (B, H, W, 3) uint8 images as <folder>/<index>.png, index start, start + 1, ..."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, array in enumerate(pixels):
        Image.fromarray(array).save(folder / f"{start + i:06d}.png")


def write_npz(path: str | Path, batches: Iterable[np.ndarray], n: int, height: int, width: int) -> Path:
    """Write n images, given as (B, H, W, 3) uint8 batches in order, as `arr_0` of an uncompressed
    .npz, streamed batch by batch. Written to a temporary file and renamed, so a reader never sees
    a half-written file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    written = 0
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive, \
            archive.open("arr_0.npy", "w", force_zip64=True) as fh:
        np.lib.format.write_array_header_1_0(fh, {"descr": np.dtype(np.uint8).str, "fortran_order": False,
                                                  "shape": (n, height, width, 3)})
        for batch in batches:
            if batch.dtype != np.uint8 or batch.shape[1:] != (height, width, 3):
                raise ValueError(f"a batch of {batch.dtype} {batch.shape} in an npz of (N, {height}, {width}, 3) uint8")
            fh.write(np.ascontiguousarray(batch).tobytes())
            written += len(batch)
    if written != n:
        tmp.unlink()
        raise ValueError(f"{written} images given for an npz of {n}")
    os.replace(tmp, path)
    return path


class GivenImages:
    """The images of a folder (sorted by name) or an .npz (`images` or `arr_0`, (N, H, W, 3) uint8),
    read as uint8 (B, 3, H, W) batches. Batches are read in increasing order (an .npz member is
    then read forwards once, even when compressed)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"images={self.path} does not exist; pass a folder of PNG files or an .npz")
        self._member = None
        if self.path.is_dir():
            self.files = sorted(p for p in self.path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not self.files:
                raise FileNotFoundError(f"no {'/'.join(IMAGE_SUFFIXES)} files in {self.path}")
            self.count = len(self.files)
            with Image.open(self.files[0]) as first:
                self.width = first.size[0]
        else:
            self._open_npz()

    def _open_npz(self) -> None:
        self._archive = zipfile.ZipFile(self.path)
        names = [n.removesuffix(".npy") for n in self._archive.namelist()]
        key = next((k for k in NPZ_KEYS if k in names), None)
        if key is None:
            raise ValueError(f"{self.path} holds {names}; expected the images as `images` or `arr_0` "
                             "(N, H, W, 3) uint8, the layout of the ADM / guided-diffusion sample files")
        self._member = self._archive.open(f"{key}.npy")
        version = np.lib.format.read_magic(self._member)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in read_header:
            raise ValueError(f"{self.path}: .npy format {version} inside; write it with numpy.savez")
        shape, fortran, dtype = read_header[version](self._member)
        if len(shape) != 4 or shape[-1] != 3 or dtype != np.uint8 or fortran:
            raise ValueError(f"{self.path}[{key!r}] is {dtype} {shape}; expected (N, H, W, 3) uint8")
        self.count, self.width = shape[0], shape[2]
        self._row_bytes, self._data_start = int(np.prod(shape[1:])), self._member.tell()
        self._shape = shape

    def __len__(self) -> int:
        return self.count

    def batch(self, start: int, size: int) -> torch.Tensor:
        """Images start .. start + size - 1 as uint8 (size, 3, H, W)."""
        if self._member is None:
            arrays = []
            for file in self.files[start:start + size]:
                with Image.open(file) as img:
                    arrays.append(np.asarray(img.convert("RGB")))
            sizes = {a.shape for a in arrays}
            if len(sizes) > 1:
                raise ValueError(f"images in {self.path} differ in size ({sorted(sizes)}); resize them to one size first")
            array = np.stack(arrays)
        else:
            if self._member.tell() > self._data_start + start * self._row_bytes:  # backwards: from the start
                self._member = self._archive.open(self._member.name)
            self._member.seek(self._data_start + start * self._row_bytes)
            data = self._member.read(size * self._row_bytes)
            array = np.frombuffer(data, np.uint8).reshape(size, *self._shape[1:])
        return torch.from_numpy(array.copy()).permute(0, 3, 1, 2).contiguous()
