"""LightningDataModule over WebDataset shards (local paths, brace patterns, `pipe:` commands,
object-store URLs), optionally writing the built-in synthetic shards first."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytorch_lightning as pl

from ldm.data.latents import write_latent_cache
from ldm.data.pipeline import SampleDecoder, ShardStream, check_positive, make_loader
from ldm.data.sources import SyntheticSource
from ldm.data.transforms import ImageTransform
from ldm.data.write import write_shards


class ShardDataModule(pl.LightningDataModule):
    """Training and validation batches from shards.

    Batches are dicts: `image` (float NCHW in [-1, 1]), `caption` (list of str),
    `class_label` (long, -1 when a sample has none), `skipped` (samples dropped as unusable
    since the previous batch), `skipped_where` (a tuple describing a few of them) and any
    `extra_keys` ({meta: json}: the .json metadata as dicts) and `label_maps` ({segmentation:
    seg.png}: per-pixel ids as int64 (B, H, W), resized, cropped and flipped with the image; ids
    bounded by `label_classes`, {segmentation: 182}; see SampleDecoder). Latent cache shards
    (ldm.data.latents) give `moments` and `__url__` in place of `image`. A stream that skips
    `max_consecutive_skips` samples in a row stops the run with an error (docs/data.md).

    `batch_transforms`: callables batch -> batch run in the loader workers after collation
    (ldm.data.degradations: SR low-res inputs, inpainting masks).

    `synthetic`, when given, asks for the built-in shapes dataset to be written before training
    into the folder `dir` (`<dir>/train`, and `<dir>/val` when val_urls is set), e.g.
    {dir: data/shapes-64, train_samples: 2000, val_samples: 256, resolution: 64, seed: 0,
    per_shard: 100, max_objects: 3, sizes: null, label_maps: false} (max_objects 1: single-object
    scenes; sizes {large: 0.4}: one object size that nearly fills the image, the quickstart's data;
    null: ldm.data.synthetic.SIZES; label_maps: each scene's seg.png as well). `train_urls` /
    `val_urls` must then be exactly those folders: shapes
    are written only where the spec says, never into a path given for other data.

    `latent_cache`, when its first_stage is set, encodes the training shards once with that
    trained first stage (ldm.data.latents, resumable) and trains from the cache, so the encoder
    and image decoding leave the training step: {first_stage: <run folder or .ckpt; null: no
    cache>, load: <callable first_stage -> FirstStage, e.g. ldm.modules.loading.load_first_stage
    as a `_partial_` config>, dir: <folder; null: default_cache_dir>, per_shard: 250,
    dtype: float16, batch_size: 64}. Validation keeps reading images (grids and FID need them). The cache holds
    centre crops without flips, so it is refused with random crops, flips or image degradations.
    """

    def __init__(self, train_urls: str | list[str], val_urls: str | list[str] | None = None, *,
                 image_size: int = 64, batch_size: int = 16, val_batch_size: int | None = None,
                 num_workers: int = 2, batches_per_epoch: int = 1000, shuffle_buffer: int = 1000,
                 resampled: bool = False, seed: int = 0, crop: str = "random", flip: bool = False,
                 val_max_samples: int | None = None, extra_keys: dict[str, str] | None = None,
                 label_maps: dict[str, str] | None = None, label_classes: dict[str, int] | None = None,
                 synthetic: dict | None = None, batch_transforms: list | None = None,
                 latent_cache: dict | None = None, max_consecutive_skips: int = 1000):
        super().__init__()
        check_positive("batch_size", batch_size)
        check_positive("val_batch_size", val_batch_size, allow_none=True)
        check_positive("batches_per_epoch", batches_per_epoch)
        check_positive("max_consecutive_skips", max_consecutive_skips)
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"data.num_workers must be an integer >= 0, got {num_workers!r}")
        # What prepare_data writes goes to folders all nodes share: global rank 0 alone writes it.
        self.prepare_data_per_node = False
        self._prepared = False
        self.train_urls, self.val_urls = train_urls, val_urls
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.num_workers, self.batches_per_epoch = num_workers, batches_per_epoch
        self.shuffle_buffer, self.resampled, self.seed = shuffle_buffer, resampled, seed
        self.max_consecutive_skips = max_consecutive_skips
        self.val_max_samples = val_max_samples
        self.synthetic = _check_synthetic(synthetic, train_urls, val_urls)
        maps = (dict(extra_keys or {}), dict(label_maps or {}), dict(label_classes or {}))
        self.train_decoder = SampleDecoder(ImageTransform(image_size, crop, flip), *maps)
        self.val_decoder = SampleDecoder(ImageTransform(image_size, "center", False), *maps)
        self.image_size = image_size
        self.batch_transforms = list(batch_transforms or [])
        self.latent_cache = _check_latent_cache(latent_cache, train_urls, image_size, crop, flip,
                                                self.batch_transforms, maps[1])

    def _write_synthetic(self) -> None:
        if self.synthetic is None:
            return
        spec = dict(self.synthetic)
        root, seed = Path(spec["dir"]), spec["seed"]
        splits = [("train", spec["train_samples"], seed)]
        if self.val_urls is not None:
            splits.append(("val", spec["val_samples"], seed + 1_000_003))  # disjoint from train
        for split, n, split_seed in splits:
            source = SyntheticSource(n, spec["resolution"] or self.image_size, split_seed,
                                     max_objects=spec["max_objects"], sizes=spec["sizes"],
                                     label_maps=spec["label_maps"])
            try:
                write_shards(source, root / split, per_shard=spec["per_shard"])
            except FileExistsError as err:  # other settings wrote this folder
                raise FileExistsError(f"{err}\n(from data.synthetic: delete {root / split} to write it anew, or set "
                                      "data.synthetic.dir to another folder)") from err

    def prepare_data(self) -> None:
        """Write the synthetic shards and the latent cache when configured (both resume; no-ops
        once complete). Once per process: train.py calls it before building the model, Lightning's
        fit calls it again."""
        if self._prepared:
            return
        self._write_synthetic()
        if self.latent_cache is not None:
            _write_latent_cache(self.latent_cache, self.train_urls, self.image_size)
        self._prepared = True

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self):
        rank, world = self._rank_world()
        urls = self.latent_cache["dir"] if self.latent_cache is not None else self.train_urls
        stream = ShardStream(urls, self.batch_size, self.train_decoder, train=True, rank=rank,
                             world_size=world, seed=self.seed, batches_per_epoch=self.batches_per_epoch,
                             shuffle_buffer=self.shuffle_buffer, resampled=self.resampled,
                             batch_transforms=self.batch_transforms, max_consecutive_skips=self.max_consecutive_skips)
        # Epochs whose training batches all ran. Unlike current_epoch this already counts an epoch
        # whose end hooks (and checkpoint) ran, so resuming from an end-of-epoch checkpoint starts
        # the next epoch's shuffle. (A mid-epoch resume is set by the loader's own state.)
        start_epoch = self.trainer.fit_loop.epoch_progress.current.processed if self.trainer is not None else 0
        return make_loader(stream, self.num_workers, start_epoch=start_epoch, stop_requested=self._stop_requested)

    def val_dataloader(self):
        if self.val_urls is None:
            return []
        rank, world = self._rank_world()
        stream = ShardStream(self.val_urls, self.val_batch_size, self.val_decoder, train=False, rank=rank,
                             world_size=world, seed=self.seed, max_samples=self.val_max_samples,
                             batch_transforms=self.batch_transforms, max_consecutive_skips=self.max_consecutive_skips)
        return make_loader(stream, min(self.num_workers, 1), stop_requested=self._stop_requested)

    def _stop_requested(self) -> bool:
        """Whether the Trainer got SIGTERM (its loop only looks at the next batch boundary)."""
        return self.trainer is not None and self.trainer.received_sigterm


def _is_plain_folder(urls) -> bool:
    """One local folder: not a list, brace pattern, `pipe:` command or URL."""
    return isinstance(urls, str) and not any(c in urls for c in "{}:")


_SYNTHETIC_DEFAULTS = {"val_samples": None, "resolution": None, "seed": 0, "per_shard": 100, "max_objects": 3,
                       "sizes": None, "label_maps": False}


def _check_synthetic(spec: dict | None, train_urls, val_urls) -> dict | None:
    """The synthetic spec with its defaults, or None; refuses one that does not say where it writes,
    or whose folders are not the ones the run reads (a mistyped path must not fill a new folder)."""
    if spec is None:
        return None
    unknown = set(spec) - set(_SYNTHETIC_DEFAULTS) - {"dir", "train_samples"}
    if unknown:
        raise ValueError(f"unknown data.synthetic keys: {sorted(unknown)}")
    if not spec.get("dir"):  # e.g. sample counts of a debug preset merged into data=shards
        raise ValueError(f"data.synthetic sets {sorted(k for k, v in spec.items() if v is not None)} but no dir, the "
                         "folder to write the built-in shapes into: only the synthetic data configs (data=shapes, "
                         "shapes_toy, shapes_single, shapes_large) write data. For your own shards set "
                         "data.synthetic=null")
    spec = {**_SYNTHETIC_DEFAULTS, **spec}
    splits = {"train": (train_urls, "train_samples")}
    if val_urls is not None:
        splits["val"] = (val_urls, "val_samples")
    for split, (urls, count) in splits.items():
        folder = Path(spec["dir"]) / split
        if not _is_plain_folder(urls) or os.path.abspath(urls) != os.path.abspath(folder):
            raise ValueError(f"data.{split}_urls={urls!r} is not the folder data.synthetic writes ({folder}). The "
                             "built-in shapes are written only into data.synthetic.dir: set data.synthetic.dir to "
                             "write them elsewhere, or train on existing shards with data=shards (data.synthetic=null)")
        check_positive(f"synthetic.{count}", spec.get(count))
    return spec


_CACHE_DEFAULTS = {"load": None, "dir": None, "per_shard": 250, "dtype": "float16", "batch_size": 64}


def default_cache_dir(first_stage: str | Path, train_urls: str | list[str], image_size: int) -> Path:
    """<first-stage run>/latent-cache/<train folder name>-<size>px-<hash of the shards' location>:
    the cache belongs to the encoder that wrote it (a .ckpt in <run>/checkpoints/ counts as that
    run), and other datasets or sizes get their own folder."""
    path = Path(first_stage)
    run = path.parent.parent if path.suffix == ".ckpt" else path
    plain = _is_plain_folder(train_urls)
    where = str(Path(train_urls).resolve()) if plain else repr(train_urls)
    name = Path(train_urls).name if plain else "shards"
    return run / "latent-cache" / f"{name}-{image_size}px-{hashlib.sha1(where.encode()).hexdigest()[:8]}"


def _check_latent_cache(spec: dict | None, train_urls, image_size: int, crop: str, flip: bool,
                        batch_transforms: list, label_maps: dict) -> dict | None:
    spec = {"first_stage": None, **_CACHE_DEFAULTS, **(spec or {})}
    unknown = set(spec) - set(_CACHE_DEFAULTS) - {"first_stage"}
    if unknown:
        raise ValueError(f"data.latent_cache takes first_stage and {sorted(_CACHE_DEFAULTS)}; got {sorted(unknown)}")
    if spec["first_stage"] is None:  # no encoder to skip (e.g. pixel space)
        return None
    if crop != "center" or flip:
        raise ValueError(f"data.latent_cache stores centre crops without flips, but data.crop={crop} and "
                         f"data.flip={flip}: set data.crop=center data.flip=false, or data.latent_cache.first_stage=null "
                         "to keep the augmentation (the encoder then runs every step)")
    if batch_transforms:
        raise ValueError("data.latent_cache holds no images, but data.batch_transforms degrade images (SR, "
                         "inpainting): set data.latent_cache.first_stage=null")
    if label_maps:
        raise ValueError(f"data.label_maps ({sorted(label_maps)}) are aligned with each image, which a latent cache "
                         "does not hold: set data.latent_cache.first_stage=null")
    if not callable(spec["load"]):
        raise ValueError(f"data.latent_cache.load must turn data.latent_cache.first_stage into a first stage, got "
                         f"{spec['load']!r}: set it to {{_target_: ldm.modules.loading.load_first_stage, "
                         "_partial_: true} (configs/data/shapes.yaml)")
    spec["dir"] = str(spec["dir"] or default_cache_dir(spec["first_stage"], train_urls, image_size))
    return spec


def _write_latent_cache(spec: dict, train_urls, image_size: int) -> None:
    try:
        write_latent_cache(spec["load"](spec["first_stage"]), spec["first_stage"], train_urls, spec["dir"],
                           image_size=image_size, batch_size=spec["batch_size"], dtype=spec["dtype"],
                           per_shard=spec["per_shard"])
    except FileExistsError as err:  # another encoder, dtype or size wrote this folder
        raise FileExistsError(f"{err}\n(from data.latent_cache: delete {spec['dir']} to re-encode, or set "
                              "data.latent_cache.dir to another folder)") from err
