"""Image grids on disk and in the experiment loggers."""
from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch
from PIL import Image
from torchvision.utils import make_grid

from ldm.data.transforms import to_uint8


def grid_image(images: torch.Tensor, nrow: int = 8, padding: int = 2) -> Image.Image:
    """[-1, 1] NCHW images -> one PIL grid image."""
    grid = make_grid(to_uint8(images.detach().float().cpu()), nrow=nrow, padding=padding, pad_value=255)
    return Image.fromarray(grid.permute(1, 2, 0).numpy())


def captioned_grid(images: torch.Tensor, captions: list[str], nrow: int = 4, scale: int = 2,
                   line_chars: int = 24) -> Image.Image:
    """A grid with each image's caption written under it (images upscaled `scale` x, nearest),
    so what was asked for and what came out are seen together."""
    from PIL import ImageDraw
    import textwrap

    tiles = [Image.fromarray(a).resize((a.shape[1] * scale, a.shape[0] * scale), Image.Resampling.NEAREST)
             for a in to_uint8(images.detach().float().cpu()).permute(0, 2, 3, 1).numpy()]
    wrapped = [textwrap.wrap(c, line_chars) or [""] for c in captions]
    w, h = tiles[0].size
    w = max(w, 6 * line_chars + 8)
    text_h = 12 * max(len(lines) for lines in wrapped) + 6
    rows = (len(tiles) + nrow - 1) // nrow
    sheet = Image.new("RGB", (nrow * w, rows * (h + text_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (tile, lines) in enumerate(zip(tiles, wrapped)):
        x, y = (i % nrow) * w, (i // nrow) * (h + text_h)
        sheet.paste(tile, (x + (w - tile.size[0]) // 2, y))
        for j, line in enumerate(lines):
            draw.text((x + 4, y + h + 3 + 12 * j), line, fill="black")
    return sheet


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 8) -> Path:
    """Write a PNG grid of `images` to `path` (folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid_image(images, nrow).save(path)
    return path


def log_grid(trainer: pl.Trainer, key: str, images: torch.Tensor, nrow: int = 8) -> Path | None:
    """Save a grid under <run>/images/<key>_step<N>.png (rank 0) and send it to wandb and
    TensorBoard loggers when present. Returns the PNG path on rank 0."""
    if not trainer.is_global_zero:
        return None
    path = save_grid(images, Path(trainer.default_root_dir) / "images" / f"{key.replace('/', '_')}_step{trainer.global_step:07d}.png", nrow)
    for logger in trainer.loggers:
        name = type(logger).__name__
        if name == "WandbLogger":
            logger.log_image(key=key, images=[str(path)], step=trainer.global_step)
        elif name == "TensorBoardLogger":
            import numpy as np

            logger.experiment.add_image(key, np.asarray(Image.open(path)), trainer.global_step, dataformats="HWC")
    return path
