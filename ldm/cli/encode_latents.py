"""Encode image shards once with a trained first stage into a latent cache (ldm.data.latents),
for training the latent diffusion stage without running the encoder.

    ldm-encode-latents --first-stage runs/ae --shards data/train --out data/train-latents
    python -m ldm.cli.encode_latents ...                  # the same

Each output sample keeps the input's members except the image (`.txt`, `.cls`, `.json`, ...) and
adds `moments.npy`: for a KL first stage the (2C, h, w) concatenation of the posterior's mean and
log-variance, so training still draws a fresh posterior sample every step; for VQ (the
pre-quantisation latent) and identity first stages the (C, h, w) latent itself. Images are
centre-cropped at the first stage's training resolution (or --image-size): random crops and flips
would be frozen into the cache, so there are none.

The job is atomic and resumable (rerun the same command), and `index.json` records the
first-stage checkpoint (path and SHA-256), f, latent channels, kind ('kl' or 'deterministic') and
the stored dtype. A training run reading a cache checks these against its own first stage.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from omegaconf import OmegaConf

from ldm.data.index import ShardIndex
from ldm.data.latents import DTYPES, write_latent_cache
from ldm.data.write import CLI_EXISTS_ADVICE
from ldm.modules.loading import load_first_stage
from ldm.utils.device import resolve_device


def training_resolution(path: str | Path) -> int:
    """The image size a first-stage run trained at (data.image_size of its config.yaml)."""
    path = Path(path)
    config = path / "config.yaml" if path.is_dir() else path.parent.parent / "config.yaml"
    size = OmegaConf.select(OmegaConf.load(config), "data.image_size") if config.is_file() else None
    if size is None:
        raise ValueError(f"cannot tell the training resolution of {path} (no data.image_size in {config}); "
                         "pass --image-size")
    return int(size)


def encode_shards(first_stage: str | Path, shards: str | list[str], out: str | Path, *,
                  image_size: int | None = None, batch_size: int = 64, device: str = "auto",
                  dtype: str = "float16", workers: int = 0, per_shard: int = 1000, prefix: str = "shard",
                  overwrite: bool = False, progress: bool = True) -> ShardIndex:
    """Encode the image shards `shards` with the first stage of the run `first_stage` (folder or
    .ckpt) into a latent cache under `out`; returns its index. Resumes an interrupted job."""
    dev = resolve_device(device)
    return write_latent_cache(load_first_stage(first_stage), first_stage, shards, out,
                              image_size=image_size or training_resolution(first_stage), batch_size=batch_size,
                              device=dev, dtype=dtype, workers=workers, per_shard=per_shard, prefix=prefix,
                              overwrite=overwrite, progress=progress)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ldm-encode-latents", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--first-stage", required=True, help="first-stage run folder or .ckpt file")
    p.add_argument("--shards", nargs="+", required=True,
                   help="image shards: folders with index.json, brace patterns, '::'-separated lists")
    p.add_argument("--out", required=True, help="output folder for the latent shards and index.json")
    p.add_argument("--image-size", type=int,
                   help="centre-crop side in pixels (default: the first stage's training resolution)")
    p.add_argument("--batch-size", type=int, default=64, help="images per encoder call")
    p.add_argument("--device", default="auto", help="auto (GPU if present), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float16", help="storage type of the moments")
    p.add_argument("--workers", type=int, default=4, help="image decoding processes (0: in this process)")
    p.add_argument("--per-shard", type=int, default=1000, help="samples per output shard")
    p.add_argument("--prefix", default="shard", help="output shard file name prefix")
    p.add_argument("--overwrite", action="store_true", help="replace a cache written with other settings")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    args = _parser().parse_args(argv)
    t0 = time.time()
    try:
        index = encode_shards(args.first_stage, args.shards, args.out, image_size=args.image_size,
                              batch_size=args.batch_size, device=args.device, dtype=args.dtype, workers=args.workers,
                              per_shard=args.per_shard, prefix=args.prefix, overwrite=args.overwrite,
                              progress=not args.quiet)
    except FileExistsError as err:
        raise SystemExit(f"{err}: {CLI_EXISTS_ADVICE}") from err
    s = index.settings
    print(f"{index.total} samples in {len(index.shards)} shards under {args.out}: {s['kind']} moments of "
          f"f = {s['f']}, {s['latent_channels']} latent channels, {s['dtype']} "
          f"({s.get('skipped', 0)} unreadable skipped, {time.time() - t0:.1f} s)")


if __name__ == "__main__":
    main()
