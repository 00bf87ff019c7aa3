"""The evaluated samples kept as files: PNGs, and one .npz in the layout of the ADM evaluator
(openai/guided-diffusion `evaluations/evaluator.py`: `arr_0`, (N, H, W, 3) uint8)."""
from __future__ import annotations

import os
import zipfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image


def save_pngs(folder: str | Path, start: int, pixels: np.ndarray) -> None:
    """Write (B, H, W, 3) uint8 images as <folder>/<index>.png, index start, start + 1, ..."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, array in enumerate(pixels):
        Image.fromarray(array).save(folder / f"{start + i:06d}.png")


def write_npz(path: str | Path, batches: Iterable[np.ndarray], n: int, height: int, width: int) -> Path:
    """Write n images, given as (B, H, W, 3) uint8 batches in order, as `arr_0` of an uncompressed
    .npz, streamed batch by batch (50k images at 256 px are 9.8 GB: never all in memory). Written to
    a temporary file and renamed, so a reader sees no half-written file."""
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
