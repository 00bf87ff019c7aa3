"""Train the shape classifier behind prompt accuracy on freshly generated shapes images.

    python -m ldm.cli.train_classifier --resolution 64 --out assets/classifiers/shapes-64
    python -m ldm.cli.train_classifier --resolution 32 --max-objects 1 --size large=0.4 \
        --out assets/classifiers/shapes-32-large        # for data=shapes_large (the quickstart's)

Training images come straight from the synthetic generator (ldm.data.synthetic), in process, no
shards: step s uses images s * batch_size ... of generator seed `seed`, so every image is new
and a run is a pure function of its arguments (on one device and thread count). Targets are the
drawn objects' shapes and colours (multi-hot, binary cross-entropy); AdamW with a linear warm-up
and cosine decay. `max_objects` and `sizes` are the generator's (data.synthetic.*): a classifier
reads best the scenes it was trained on (the default one misreads radius-0.4 hexagons as circles
and squares), so train one per synthetic data config. Afterwards the classifier is scored on
`held_out` images of generator seed `seed + 1` (never trained on) with the PromptAccuracy metric
against their own captions, and saved as <out>/classifier.safetensors + classifier.json
(settings, training and its scenes, held-out accuracy).
"""
from __future__ import annotations

import argparse
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from ldm.data.synthetic import ShapesGenerator
from ldm.data.write import parse_sizes
from ldm.metrics.prompt_accuracy import PromptAccuracy
from ldm.metrics.prompts import object_labels
from ldm.metrics.shape_classifier import ShapeClassifier, save_classifier
from ldm.utils.lr import lr_factor


def generated_batch(generator: ShapesGenerator, start: int, n: int) -> tuple[Tensor, Tensor, list[str]]:
    """Images start .. start + n - 1 of `generator`: uint8 (n, 3, H, W), their (n, L) bool labels, captions."""
    samples = [generator[i] for i in range(start, start + n)]
    images = torch.from_numpy(np.stack([np.asarray(s.image) for s in samples])).permute(0, 3, 1, 2).contiguous()
    return images, torch.stack([object_labels(s.objects) for s in samples]), [s.caption for s in samples]


@torch.no_grad()
def held_out_accuracy(model: ShapeClassifier, generator: ShapesGenerator, n: int, batch_size: int) -> dict[str, float]:
    """Prompt / shape / colour accuracy (and chance) of `model` on the first n images of `generator`
    against their own captions, plus `label_accuracy`: the share of correct present/absent calls."""
    model.eval()
    metric = PromptAccuracy(model)
    correct = 0
    for start in range(0, n, batch_size):
        images, labels, captions = generated_batch(generator, start, min(batch_size, n - start))
        metric.update(images, real=False, captions=captions)
        correct += int(((torch.sigmoid(model(images)) > metric.threshold) == labels).sum())
    result = {k: float(v) for k, v in metric.compute().items()}
    return {**result, "label_accuracy": correct / (n * labels.shape[1])}


def train_classifier(resolution: int, out: str | Path, steps: int = 1500, batch_size: int = 64, lr: float = 3e-3,
                     width: int = 16, seed: int = 0, held_out: int = 1000, progress: bool = True,
                     max_objects: int = 3, sizes: Mapping[str, float] | None = None) -> dict[str, Any]:
    """Train a ShapeClassifier at `resolution`, score it on held-out images, save it into `out`;
    returns the saved settings (see the module doc)."""
    if steps < 1 or batch_size < 1 or held_out < 1:
        raise ValueError(f"steps, batch_size and held_out must be >= 1, got {steps}, {batch_size}, {held_out}")
    torch.manual_seed(seed)
    model = ShapeClassifier(resolution, width)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    warmup = min(100, steps // 10 + 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, steps, "cosine"))
    train_images = ShapesGenerator(resolution, seed, max_objects, sizes)
    start_time = time.perf_counter()
    model.train()
    with tqdm(range(steps), desc=f"classifier {resolution}px", unit="step", disable=not progress) as bar:
        for step in bar:
            images, labels, _ = generated_batch(train_images, step * batch_size, batch_size)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(images), labels.float())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            if step % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}")
    train_seconds = time.perf_counter() - start_time
    accuracy = held_out_accuracy(model, ShapesGenerator(resolution, seed + 1, max_objects, sizes), held_out,
                                 batch_size)
    scenes = {"max_objects": max_objects, **({"sizes": dict(sizes)} if sizes is not None else {})}
    extra = {"training": {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
                          "images": steps * batch_size, "seconds": round(train_seconds, 1),
                          "threads": torch.get_num_threads(), **scenes},
             "held_out": {"n": held_out, "generator_seed": seed + 1, **accuracy}}
    save_classifier(model, out, extra)
    return {**model.settings, **extra}


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: python -m ldm.cli.train_classifier --resolution PX --out FOLDER [...]."""
    parser = argparse.ArgumentParser(prog="python -m ldm.cli.train_classifier",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--resolution", type=int, required=True, help="image size in px (32-256): the samples' size")
    parser.add_argument("--out", required=True, help="folder for classifier.safetensors and classifier.json")
    parser.add_argument("--steps", type=int, default=1500, help="optimiser steps (each on new images)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per step")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate")
    parser.add_argument("--width", type=int, default=16, help="channels of the stem (later stages: up to 4x)")
    parser.add_argument("--seed", type=int, default=0, help="generator seed of the training images (held out: seed+1)")
    parser.add_argument("--held-out", type=int, default=1000, help="held-out images scored after training")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--max-objects", type=int, default=3,
                        help="objects per scene, 1-3 (data.synthetic.max_objects)")
    parser.add_argument("--size", action="append", metavar="WORD=RADIUS", dest="sizes",
                        help="a size word and its object radius as a share of the side (data.synthetic.sizes); "
                             "repeat for several; default: the generator's sizes")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    summary = train_classifier(args.resolution, args.out, args.steps, args.batch_size, args.lr, args.width,
                               args.seed, args.held_out, max_objects=args.max_objects,
                               sizes=parse_sizes(args.sizes))
    print(json.dumps({"out": str(args.out), "training": summary["training"], "held_out": summary["held_out"]},
                     indent=1))


if __name__ == "__main__":
    main()
