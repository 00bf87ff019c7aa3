"""Write WebDataset tar shards: `python -m ldm.data.write {synthetic,folder,shards} ...`.

Each shard holds a fixed number of samples (`{key}.png|jpg`, `.txt` caption, `.cls` label,
`.json` metadata, and with --label-maps / --masks `.seg.png` class ids and `.mask.png` inpainting
masks, one-channel PNGs at the image's size) and is written to a temporary name and renamed when
complete, so a killed job leaves only whole shards. `index.json` records the settings and each shard's sample count; a
rerun with the same settings resumes after the last complete shard, and a run with different
settings is refused unless `--overwrite` is given.
"""
from __future__ import annotations

import argparse
import io
import os
import tarfile
import time
from pathlib import Path

from tqdm import tqdm

from ldm.data.index import INDEX_NAME, ShardIndex
from ldm.data.sources import FolderSource, Members, Source, SyntheticSource, TarShardSource


def shard_name(prefix: str, i: int) -> str:
    return f"{prefix}-{i:06d}.tar"


def _write_tar(path: Path, samples: list[tuple[str, Members]]) -> None:
    """One tar with deterministic member metadata (same input -> same bytes)."""
    tmp = path.with_name(path.name + ".tmp")
    with tarfile.open(tmp, "w") as tar:
        for key, members in samples:
            for ext, value in members.items():
                data = value.encode("utf-8") if isinstance(value, str) else value
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o444
                tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, path)


def write_shards(source: Source, out: str | Path, per_shard: int = 1000, prefix: str = "shard",
                 overwrite: bool = False, progress: bool = True) -> ShardIndex:
    """Write `source` into shards of `per_shard` samples under `out`; returns the index.

    Unreadable source samples are skipped and counted in the index settings
    (`skipped`). Resumes when `out` already holds an index with the same settings; raises
    FileExistsError when it holds shards written otherwise (its callers say how to go on).
    """
    if per_shard < 1:
        raise ValueError(f"per_shard must be >= 1, got {per_shard}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {**source.settings(), "per_shard": per_shard, "prefix": prefix}
    index = ShardIndex.load(out)
    ours = sorted(out.glob(f"{prefix}-*.tar"))
    if overwrite:
        for path in ours + sorted(out.glob(f"{prefix}-*.tar.tmp")) + [out / INDEX_NAME]:
            path.unlink(missing_ok=True)
        index = None
    elif index is not None and {k: v for k, v in index.settings.items() if k != "skipped"} != settings:
        changed = {k: (index.settings.get(k), v) for k, v in settings.items() if index.settings.get(k) != v}
        raise FileExistsError(
            f"{out} already holds shards written with other settings (existing, requested): {changed}")
    elif index is None and ours:
        raise FileExistsError(f"{out} holds {len(ours)} shards but no {INDEX_NAME}")
    if index is None:
        index = ShardIndex(settings={**settings, "skipped": 0}, classes=source.classes)

    n_shards = (len(source) + per_shard - 1) // per_shard
    done = [i for i in range(n_shards) if shard_name(prefix, i) in index.shards and (out / shard_name(prefix, i)).is_file()]
    first = len(done)  # shards are written in order: the complete ones are a prefix
    index.shards = {shard_name(prefix, i): index.shards[shard_name(prefix, i)] for i in range(first)}
    start = first * per_shard
    bar = tqdm(total=len(source), initial=start, unit="img", desc=f"writing {out}", disable=not progress)
    shard_i, batch, skipped = first, [], index.settings.get("skipped", 0)
    for offset, members in enumerate(source.iter_from(start)):
        i = start + offset
        if members is None:
            skipped += 1
        else:
            batch.append((f"{i:09d}", members))
        bar.update(1)
        if (i + 1) % per_shard == 0 or i + 1 == len(source):
            _write_tar(out / shard_name(prefix, shard_i), batch)
            index.shards[shard_name(prefix, shard_i)] = len(batch)
            index.settings["skipped"] = skipped
            index.save(out)
            shard_i, batch = shard_i + 1, []
    bar.close()
    index.save(out)
    return index


# What the command lines (this one and ldm.cli.encode_latents) add to write_shards' FileExistsError.
CLI_EXISTS_ADVICE = "pass --overwrite to replace them, or choose another --out"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ldm.data.write", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="source", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", required=True, help="output folder for the shards and index.json")
    common.add_argument("--per-shard", type=int, default=1000, help="samples per shard")
    common.add_argument("--prefix", default="shard", help="shard file name prefix")
    common.add_argument("--overwrite", action="store_true", help="replace shards written with other settings")
    common.add_argument("--quiet", action="store_true", help="no progress bar")

    s = sub.add_parser("synthetic", parents=[common], help="the built-in coloured-shapes dataset")
    s.add_argument("--n", type=int, required=True, help="number of samples")
    s.add_argument("--resolution", type=int, default=64, help="image side in pixels (32-512)")
    s.add_argument("--seed", type=int, default=0, help="dataset seed (use another seed for a validation split)")
    s.add_argument("--format", choices=("png", "jpg"), default="png", help="image encoding")
    s.add_argument("--max-objects", type=int, default=3, help="1-3 objects per image")
    s.add_argument("--size", action="append", metavar="WORD=RADIUS", dest="sizes",
                   help="a size word of the captions and its object radius as a share of the image side "
                        "(repeat for several; default small=0.16 large=0.30)")
    s.add_argument("--label-maps", action="store_true",
                   help="add each scene's label map as seg.png (0 background, 1-6 the shapes)")

    f = sub.add_parser("folder", parents=[common], help="an image folder")
    f.add_argument("--src", required=True, help="folder with images (searched recursively)")
    f.add_argument("--captions", help="CSV (file,caption) or JSONL with captions; default: side .txt files")
    f.add_argument("--labels-from-folders", action="store_true", help="class label = first sub-folder name")
    f.add_argument("--label-maps", metavar="DIR",
                   help="folder of one-channel PNG label maps (class ids) with the images' relative paths and "
                        "stems, stored as seg.png")
    f.add_argument("--masks", metavar="DIR",
                   help="folder of binary PNG inpainting masks (0 = hole, 255 = kept) named like --label-maps, "
                        "stored as mask.png")

    t = sub.add_parser("shards", parents=[common], help="img2dataset-style tar shards (re-sharded, not re-encoded)")
    t.add_argument("--src", nargs="+", required=True, help="input tar files (brace patterns allowed)")
    return p


def parse_sizes(items: list[str] | None) -> dict[str, float] | None:
    """{"large": 0.4} from ["large=0.4"]; None when no --size was given."""
    if not items:
        return None
    sizes = {}
    for item in items:
        word, sep, radius = item.partition("=")
        try:
            sizes[word] = float(radius)
        except ValueError:
            sep = ""
        if not sep or not word:
            raise SystemExit(f"--size takes WORD=RADIUS (e.g. large=0.4), got {item!r}")
    return sizes


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    args = _parser().parse_args(argv)
    if args.source == "synthetic":
        source: Source = SyntheticSource(args.n, args.resolution, args.seed, args.format, args.max_objects,
                                         parse_sizes(args.sizes), args.label_maps)
    elif args.source == "folder":
        try:
            source = FolderSource(args.src, args.captions, args.labels_from_folders, args.label_maps, args.masks)
        except (FileNotFoundError, ValueError) as err:  # a missing or mismatched map: nothing written
            raise SystemExit(f"error: {err}") from err
    else:
        from braceexpand import braceexpand

        source = TarShardSource([p for pattern in args.src for p in braceexpand(pattern)])
    t0 = time.time()
    try:
        index = write_shards(source, args.out, args.per_shard, args.prefix, args.overwrite, progress=not args.quiet)
    except FileExistsError as err:
        raise SystemExit(f"{err}: {CLI_EXISTS_ADVICE}") from err
    print(f"{index.total} samples in {len(index.shards)} shards under {args.out} "
          f"({index.settings.get('skipped', 0)} unreadable skipped, {time.time() - t0:.1f} s)")


if __name__ == "__main__":
    main()
