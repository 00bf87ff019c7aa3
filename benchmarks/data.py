"""Data-side throughput: our shard pipeline against a plain image-folder loader, and the rate at
which the first stage (kl-f8 shape) encodes images.

1. Loading: the same images (the built-in synthetic shapes, written once as WebDataset shards
   with ldm.data.write.write_shards and once as files of a torchvision ImageFolder) are read,
   decoded, transformed (ldm.data.transforms.ImageTransform: resize, centre crop, [-1, 1]) and
   batched, --passes passes over the images in one iteration per measurement, for each worker
   count: our ShardStream (training stream) + make_loader versus torchvision.datasets.ImageFolder
   in a torch DataLoader (RandomSampler). Reported: images/s over the whole iteration (worker
   start-up included) and after the first batch.
2. Encoding: ldm.first_stage.factory.autoencoder_kl(f=8) (the kl-f8 shape of the paper's zoo,
   random weights) encodes random 256 px images, `encode(x).sample()` without grad: images/s and
   encoder GFLOP per image (FlopCounterMode on the meta device). With --compile the encoder is
   compiled in place as `model.compile_first_stage` does; the compilation happens in the warm-up
   batches, whose time is recorded as warmup_s. peak_gib (CUDA): the peak above the memory in use
   before the encoder was built, warm-up included (harness.PeakMemory, as in unet.py).

    python benchmarks/data.py                                   # CPU: 512 images, workers 0,1,2
    python benchmarks/data.py --device cuda --precision bf16 --skip-loading --out gpu.jsonl
    python benchmarks/data.py --skip-loading --compile          # the compiled encoder

JSON lines go to stdout (and are appended to --out); markdown tables end the output.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, RandomSampler
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (GIB, PeakMemory, autocast, bench_device, environment, fmt, load_average, log,  # noqa: E402
                     synchronize, write_record)

from ldm.first_stage.factory import autoencoder_kl  # noqa: E402

# The loading side (ldm.data: webdataset, PIL) is imported where it is used, so that --skip-loading
# runs where only torch is installed (a bare GPU machine).


# --- data on disk ----------------------------------------------------------------------------------------

def prepare_images(root: Path, n: int, resolution: int, image_format: str, shards: int) -> tuple[Path, Path]:
    """Write `n` synthetic images as `shards` shards under root/shards and, byte for byte the same
    files, as an ImageFolder (one class) under root/folder. Existing complete data is reused."""
    from ldm.data.pipeline import IMAGE_KEYS
    from ldm.data.sources import SyntheticSource
    from ldm.data.write import write_shards

    shard_dir, folder = root / "shards", root / "folder" / "shapes"
    per_shard = -(-n // shards)
    write_shards(SyntheticSource(n, resolution=resolution, image_format=image_format), shard_dir,
                 per_shard=per_shard, progress=False)
    folder.mkdir(parents=True, exist_ok=True)
    if len(list(folder.iterdir())) != n:
        for shard in sorted(shard_dir.glob("*.tar")):
            with tarfile.open(shard) as tar:
                for member in tar.getmembers():
                    if member.name.rsplit(".", 1)[-1] in IMAGE_KEYS:
                        (folder / member.name).write_bytes(tar.extractfile(member).read())
    return shard_dir, folder.parent


def folder_loader(folder: Path, transform: ImageTransform, batch: int, workers: int, n: int) -> DataLoader:
    """The plain baseline: torchvision ImageFolder + DataLoader with the same transform, drawing
    `n` images (reshuffled passes over the folder) in one iteration."""
    from torchvision.datasets import ImageFolder

    dataset = ImageFolder(str(folder), transform=transform)
    return DataLoader(dataset, batch_size=batch, sampler=RandomSampler(dataset, num_samples=n), num_workers=workers,
                      drop_last=True, pin_memory=torch.cuda.is_available())


def shard_loader(shard_dir: Path, transform: ImageTransform, batch: int, workers: int, n: int) -> DataLoader:
    """Our pipeline: a training ShardStream of n // batch batches (endless passes over the shards,
    cut there) through make_loader."""
    from ldm.data.pipeline import SampleDecoder, ShardStream, make_loader

    stream = ShardStream(str(shard_dir), batch, SampleDecoder(transform), train=True, batches_per_epoch=n // batch)
    return make_loader(stream, num_workers=workers)


def time_iteration(loader: Iterable) -> dict[str, float]:
    """Images/s over one iteration of `loader`: all of it, and from the first batch on."""
    begin = time.perf_counter()
    images, first_at, first_images = 0, None, 0
    for batch in loader:
        x = batch["image"] if isinstance(batch, dict) else batch[0]
        images += x.shape[0]
        if first_at is None:
            first_at, first_images = time.perf_counter(), images
    end = time.perf_counter()
    steady = (images - first_images) / (end - first_at) if first_at is not None and end > first_at else None
    return {"images": images, "images_per_s": images / (end - begin), "steady_images_per_s": steady,
            "first_batch_s": (first_at or end) - begin}


def measure_loading(args: argparse.Namespace, root: Path) -> list[dict[str, Any]]:
    """One record per (pipeline, worker count), median over --repeats iterations."""
    begin = time.perf_counter()
    shard_dir, folder = prepare_images(root, args.images, args.resolution, args.format, args.shards)
    log(f"images ready in {time.perf_counter() - begin:.1f} s under {root}")
    from ldm.data.transforms import ImageTransform

    transform = ImageTransform(args.size)  # centre crop, no flip: the same work in both pipelines
    n = args.images * args.passes
    records = []
    for workers in args.workers:
        for name, make in (("shards", lambda w: shard_loader(shard_dir, transform, args.batch, w, n)),
                           ("image_folder", lambda w: folder_loader(folder, transform, args.batch, w, n))):
            runs = []
            for r in range(args.repeats):
                log(f"loading: {name}, {workers} workers, run {r + 1}/{args.repeats}")
                runs.append(time_iteration(make(workers)))
            records.append({"kind": "loading", "pipeline": name, "workers": workers, "batch": args.batch,
                            "format": args.format, "resolution": args.resolution, "size": args.size,
                            "images_per_s": statistics.median(m["images_per_s"] for m in runs),
                            "steady_images_per_s": statistics.median(
                                m["steady_images_per_s"] for m in runs if m["steady_images_per_s"]),
                            "runs": runs})
    return records


# --- first-stage encoding ------------------------------------------------------------------------------

def encoder_flops(resolution: int) -> int:
    """FLOPs of encode(x).sample() for one image, counted on the meta device."""
    with torch.device("meta"):
        model = autoencoder_kl(8, resolution=resolution).eval()
        x = torch.zeros(1, 3, resolution, resolution)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.encode(x).sample()
    return counter.get_total_flops()


def measure_encoding(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Images/s of the kl-f8 encoder (posterior sample) at --encode-batch, after warm-up."""
    cuda = device.type == "cuda"
    batch = args.encode_batch or (32 if cuda else 1)
    steps = args.encode_steps or (10 if cuda else 2)
    warmup = args.encode_warmup if args.encode_warmup is not None else (3 if cuda else 1)
    memory = PeakMemory(device)
    memory.start()  # before the model: its weights count, as in unet.py
    with torch.device(device):
        model = autoencoder_kl(8, resolution=args.encode_resolution).eval()
    if args.compile:
        model.encoder.compile()  # what LatentDiffusion(compile_first_stage=True) does
    x = torch.randn(batch, 3, args.encode_resolution, args.encode_resolution, device=device).clamp(-1, 1)

    def step() -> None:
        with torch.no_grad(), autocast(device, args.precision):
            model.encode(x).sample()

    begin = time.perf_counter()
    for _ in range(warmup):
        step()
    synchronize(device)
    warmup_s = time.perf_counter() - begin
    begin = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    elapsed = time.perf_counter() - begin
    flops = encoder_flops(args.encode_resolution)
    return {"kind": "encode", "first_stage": "kl-f8 (ch 128, mult 1,2,4,4, z 4)", "resolution": args.encode_resolution,
            "batch": batch, "precision": args.precision, "compile": args.compile, "steps": steps, "warmup": warmup,
            "warmup_s": warmup_s, "images_per_s": batch * steps / elapsed, "encoder_gflop_per_image": flops / 1e9,
            "peak_gib": memory.peak() / GIB if cuda else None}


# --- output --------------------------------------------------------------------------------------------

def markdown_tables(records: list[dict[str, Any]]) -> str:
    lines = []
    loading = [r for r in records if r["kind"] == "loading"]
    if loading:
        lines += ["| pipeline | workers | batch | images/s | images/s (after 1st batch) | shards / folder |",
                  "|---|---|---|---|---|---|"]
        folder = {r["workers"]: r for r in loading if r["pipeline"] == "image_folder"}
        for r in loading:
            base = folder.get(r["workers"])
            ratio = r["images_per_s"] / base["images_per_s"] if r["pipeline"] == "shards" and base else None
            lines.append(f"| {r['pipeline']} | {r['workers']} | {r['batch']} | {r['images_per_s']:.1f} | "
                         f"{fmt(r['steady_images_per_s'], '.1f')} | {fmt(ratio, '.2f')} |")
    for r in records:
        if r["kind"] == "encode":
            lines += ["", "| first stage | resolution | batch | precision | compiled | warm-up s | images/s encoded "
                          "| GFLOP/image |",
                      "|---|---|---|---|---|---|---|---|",
                      f"| {r['first_stage']} | {r['resolution']} | {r['batch']} | {r['precision']} | "
                      f"{'yes' if r['compile'] else 'no'} | {r['warmup_s']:.1f} | {r['images_per_s']:.2f} | "
                      f"{r['encoder_gflop_per_image']:.1f} |"]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=512, help="images written (shards and folder each)")
    p.add_argument("--passes", type=int, default=4, help="passes over the images per measurement, so "
                   "start-up and the shuffle buffer's filling weigh little")
    p.add_argument("--resolution", type=int, default=256, help="side of the stored images (32..512)")
    p.add_argument("--size", type=int, default=256, help="side of the transformed training images")
    p.add_argument("--format", choices=("png", "jpg"), default="png", help="stored image format")
    p.add_argument("--shards", type=int, default=8, help="number of shards (>= the largest worker count)")
    p.add_argument("--batch", type=int, default=32, help="loader batch size")
    p.add_argument("--workers", default=None, help="comma-separated worker counts (default 0,1,...,cpu count)")
    p.add_argument("--repeats", type=int, default=1, help="measurements per (pipeline, workers); median reported")
    p.add_argument("--dir", type=Path, help="where to write (and reuse) the images (default: a temporary folder)")
    p.add_argument("--skip-loading", action="store_true", help="only measure encoding")
    p.add_argument("--skip-encode", action="store_true", help="only measure loading")
    p.add_argument("--device", default="auto", help="encoding device: auto (cuda if available), cpu, cuda")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="encoding precision (bf16: autocast)")
    p.add_argument("--compile", action="store_true", help="torch.compile the encoder (as model.compile_first_stage)")
    p.add_argument("--encode-resolution", type=int, default=256)
    p.add_argument("--encode-batch", type=int, help="default 32 on CUDA, 1 on the CPU")
    p.add_argument("--encode-steps", type=int, help="timed batches (default 10 on CUDA, 2 on the CPU)")
    p.add_argument("--encode-warmup", type=int, help="untimed batches (default 3 on CUDA, 1 on the CPU)")
    p.add_argument("--threads", type=int, help="torch threads of the main process (default: torch's)")
    p.add_argument("--out", type=Path, help="append the JSON lines to this file")
    args = p.parse_args(argv)
    args.workers = ([int(w) for w in args.workers.split(",")] if args.workers
                    else list(range(0, (os.cpu_count() or 1) + 1)))
    if min(args.workers) < 0 or max(args.workers) > args.shards:
        p.error(f"worker counts must be in [0, --shards={args.shards}]: every worker reads whole shards")
    if args.images < args.batch:
        p.error("--images must be at least --batch")
    if args.skip_loading and args.skip_encode:
        p.error("--skip-loading and --skip-encode together leave nothing to measure")
    if args.compile and args.encode_warmup == 0:
        p.error("--compile compiles in the warm-up batches: give --encode-warmup 1 or more")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = bench_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment(device, ("torchvision",))
    records = []
    if not args.skip_loading:
        with (nullcontext(str(args.dir)) if args.dir else tempfile.TemporaryDirectory()) as root:
            records += measure_loading(args, Path(root))
    if not args.skip_encode:
        log(f"encoding on {device}")
        records.append(measure_encoding(args, device))
    for record in records:
        write_record({**env, **record, "load_avg_end": load_average()}, args.out)
    print()
    print(markdown_tables(records))


if __name__ == "__main__":
    main()
