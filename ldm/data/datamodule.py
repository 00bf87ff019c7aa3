"""LightningDataModule over WebDataset shards (local paths, brace patterns, `pipe:` commands,
object-store URLs), optionally writing the built-in synthetic shards first."""
from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl

from ldm.data.pipeline import SampleDecoder, ShardStream, make_loader
from ldm.data.sources import SyntheticSource
from ldm.data.transforms import ImageTransform
from ldm.data.write import write_shards


class ShardDataModule(pl.LightningDataModule):
    """Training and validation batches from shards.

    Batches are dicts: `image` (float NCHW in [-1, 1]), `caption` (list of str),
    `class_label` (long, -1 when a sample has none), `meta` (list of dicts from .json),
    `skipped` (samples dropped as unreadable since the previous batch) and any `extra_keys`.
    Latent cache shards (ldm.data.latents) give `moments` and `__url__` in place of `image`.

    `batch_transforms`: callables batch -> batch run in the loader workers after collation
    (ldm.data.degradations: SR low-res inputs, inpainting masks).

    `synthetic`, when given, names the built-in dataset to write into `train_urls` and
    `val_urls` (both then folders) before training, e.g.
    {train_samples: 2000, val_samples: 256, resolution: 64, seed: 0, per_shard: 100}.
    """

    def __init__(self, train_urls: str | list[str], val_urls: str | list[str] | None = None, *,
                 image_size: int = 64, batch_size: int = 16, val_batch_size: int | None = None,
                 num_workers: int = 2, batches_per_epoch: int = 1000, shuffle_buffer: int = 1000,
                 resampled: bool = False, seed: int = 0, crop: str = "random", flip: bool = False,
                 val_max_samples: int | None = None, extra_keys: dict[str, str] | None = None,
                 synthetic: dict | None = None, batch_transforms: list | None = None):
        super().__init__()
        self.train_urls, self.val_urls = train_urls, val_urls
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.num_workers, self.batches_per_epoch = num_workers, batches_per_epoch
        self.shuffle_buffer, self.resampled, self.seed = shuffle_buffer, resampled, seed
        self.val_max_samples, self.synthetic = val_max_samples, synthetic
        self.train_decoder = SampleDecoder(ImageTransform(image_size, crop, flip), dict(extra_keys or {}))
        self.val_decoder = SampleDecoder(ImageTransform(image_size, "center", False), dict(extra_keys or {}))
        self.image_size = image_size
        self.batch_transforms = list(batch_transforms or [])

    def prepare_data(self) -> None:
        """Write the synthetic shards when configured (resumes; a no-op once complete)."""
        if not self.synthetic:
            return
        spec = dict(self.synthetic)
        per_shard = spec.pop("per_shard", 100)
        resolution, seed = spec.pop("resolution", self.image_size), spec.pop("seed", 0)
        splits = [(self.train_urls, spec.pop("train_samples"), seed)]
        if self.val_urls is not None:
            splits.append((self.val_urls, spec.pop("val_samples"), seed + 1_000_003))  # disjoint from train
        if spec:
            raise ValueError(f"unknown data.synthetic keys: {sorted(spec)}")
        for folder, n, split_seed in splits:
            if not isinstance(folder, str) or any(c in folder for c in "{}:"):
                raise ValueError(f"with data.synthetic, data urls must be plain folders, got {folder!r}")
            write_shards(SyntheticSource(n, resolution, split_seed), Path(folder), per_shard=per_shard)

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self):
        rank, world = self._rank_world()
        stream = ShardStream(self.train_urls, self.batch_size, self.train_decoder, train=True, rank=rank,
                             world_size=world, seed=self.seed, batches_per_epoch=self.batches_per_epoch,
                             shuffle_buffer=self.shuffle_buffer, resampled=self.resampled,
                             batch_transforms=self.batch_transforms)
        # Epochs whose training batches all ran. Unlike current_epoch this already counts an epoch
        # whose end hooks (and checkpoint) ran, so resuming from an end-of-epoch checkpoint starts
        # the next epoch's shuffle. (A mid-epoch resume is set by the loader's own state.)
        start_epoch = self.trainer.fit_loop.epoch_progress.current.processed if self.trainer is not None else 0
        return make_loader(stream, self.num_workers, start_epoch=start_epoch)

    def val_dataloader(self):
        if self.val_urls is None:
            return []
        rank, world = self._rank_world()
        stream = ShardStream(self.val_urls, self.val_batch_size, self.val_decoder, train=False, rank=rank,
                             world_size=world, seed=self.seed, max_samples=self.val_max_samples,
                             batch_transforms=self.batch_transforms)
        return make_loader(stream, min(self.num_workers, 1))
