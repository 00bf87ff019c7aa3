"""A Lightning callback that scores a latent diffusion model during training with the evaluation
protocol of ldm.evaluation.protocol (the one evaluate.py uses)."""
from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

from ldm.evaluation.describe import describe_model
from ldm.evaluation.protocol import (SamplingProtocol, build_extractors, check_caption_metrics, condition_chunks,
                                     generate, sample_captions)
from ldm.metrics.collection import build_metrics
from ldm.modules.latent_diffusion import LatentDiffusion


class EvaluationCallback(pl.Callback):
    """Every `every_n_steps` optimiser steps and at the end of training, generate `num_samples`
    images (split over the DDP ranks, conditions from each rank's share of the datamodule's
    validation data), compute `metrics` against the validation images synchronised over all ranks,
    log them as `eval/<name>` and append one JSON line per evaluation to <run>/metrics/eval.jsonl.
    Each line also has `train_seconds`: wall-clock seconds of training so far, these evaluations'
    own time left out (validation and checkpointing stay in), carried over a resume: the x axis of
    FID against training time (the paper's efficiency view, python -m ldm.cli.tables).

    features: a feature-extractor config (a configs/features node with `_target_`), built here so
        IS can use the same network's logits. The validation images' features are computed once,
        at the first evaluation, and kept.
    sampler, steps, guidance, eta, use_ema: the sampling protocol (SamplingProtocol).
    seed: sample j of rank r uses seed + r + world_size * j, so the images are those of seeds
        seed .. seed + num_samples - 1 whatever the number of ranks.
    kid_subsets, kid_subset_size, is_splits, pr_k: metric settings (ldm.metrics.collection).
    classifier: the shape classifier folder of prompt_accuracy; clip_model: the CLIP model (folder or
        hub name) of clip_score. Both score the samples against the captions they were generated from.
    """

    def __init__(self, features: Mapping[str, Any], every_n_steps: int = 5000, num_samples: int = 1000,
                 metrics: Sequence[str] = ("fid",), sampler: str = "ddim", steps: int = 50, guidance: float = 1.0,
                 eta: float = 0.0, use_ema: bool = True, seed: int = 0, kid_subsets: int = 100,
                 kid_subset_size: int = 1000, is_splits: int = 10, pr_k: int = 3, classifier: str | None = None,
                 clip_model: str | None = None):
        if every_n_steps < 1 or num_samples < 1:
            raise ValueError(f"every_n_steps and num_samples must be >= 1, got {every_n_steps} and {num_samples}")
        self.features = OmegaConf.to_container(features, resolve=True) if OmegaConf.is_config(features) \
            else dict(features)
        self.metric_names = list(metrics)
        self.every_n_steps, self.num_samples, self.seed = every_n_steps, num_samples, seed
        self.protocol = SamplingProtocol(sampler, steps, float(guidance), float(eta), use_ema)
        self.metric_settings = {"kid_subsets": kid_subsets, "kid_subset_size": kid_subset_size,
                                "is_splits": is_splits, "pr_k": pr_k, "classifier": classifier,
                                "clip_model": clip_model}
        self.metrics = None
        self._extractor_name: str | None = None  # None: no metric uses a feature network
        self._n_real = 0  # validation images on the real side, all ranks (counted at the first evaluation)
        self._last_step: int | None = None
        self._seconds_before = 0.0  # training seconds of earlier attempts (a resumed run)
        self._clock: float | None = None  # perf_counter at this attempt's training start
        self._eval_seconds = 0.0  # spent in this attempt's evaluations

    def train_seconds(self) -> float:
        """Seconds spent training so far, over every attempt, without the evaluations."""
        if self._clock is None:
            return self._seconds_before
        return self._seconds_before + time.perf_counter() - self._clock - self._eval_seconds

    def state_dict(self) -> dict[str, Any]:
        return {"train_seconds": self.train_seconds()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._seconds_before = float(state_dict.get("train_seconds", 0.0))

    def on_train_start(self, trainer, pl_module) -> None:
        self._clock, self._eval_seconds = time.perf_counter(), 0.0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not isinstance(pl_module, LatentDiffusion):
            raise TypeError(f"EvaluationCallback evaluates latent diffusion models, not {type(pl_module).__name__} "
                            "(autoencoders log val/rfid, val/psnr and val/ssim themselves)")
        if self.num_samples < trainer.world_size:
            raise ValueError(f"num_samples={self.num_samples} is below the {trainer.world_size} ranks: "
                             "every rank must generate at least one sample")
        self.protocol.check(pl_module)
        check_caption_metrics(pl_module, self.metric_names)
        extractor, logits = build_extractors(self.features, self.metric_names)
        self._extractor_name = extractor.name if extractor is not None else None
        # The real side is computed once and kept across evaluations.
        self.metrics = build_metrics(self.metric_names, extractor, logits, reset_real_features=False,
                                     **self.metric_settings)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        # step > 0: with gradient accumulation the first batches end before the first step.
        if step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self._run(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_step != self._last_step:
            self._run(trainer, pl_module)

    def _val_batches(self, trainer: pl.Trainer) -> Iterable[dict]:
        datamodule = trainer.datamodule
        loader = datamodule.val_dataloader() if datamodule is not None else []
        if isinstance(loader, (list, tuple)):  # [] is Lightning's "no validation data"
            raise ValueError("EvaluationCallback takes its real images and conditions from the datamodule's "
                             "validation data: set data.val_urls")
        return loader

    def _add_reals(self, trainer: pl.Trainer, device: torch.device, batches: Iterable[dict]) -> int:
        """Feed this rank's validation images to the metrics; the total over ranks."""
        count = 0
        for batch in batches:
            self.metrics.update(batch["image"].to(device), real=True)
            count += len(batch["image"])
        counts = trainer.strategy.all_gather(torch.tensor(count, device=device)).reshape(-1)
        # Checked on every rank before any metric sync, so a starved rank fails them all, not hangs.
        if int(counts.min()) == 0:
            raise RuntimeError(f"some ranks got no validation batch (images per rank: {counts.tolist()}); "
                               "write more validation samples than there are ranks")
        return int(counts.sum())

    def _run(self, trainer: pl.Trainer, pl_module: LatentDiffusion) -> None:
        train_seconds, began = self.train_seconds(), time.perf_counter()
        try:
            self._evaluate(trainer, pl_module, train_seconds)
        finally:
            self._eval_seconds += time.perf_counter() - began

    @torch.no_grad()
    def _evaluate(self, trainer: pl.Trainer, pl_module: LatentDiffusion, train_seconds: float) -> None:
        self._last_step = trainer.global_step
        device = pl_module.device
        self.metrics.to(device)
        batches = self._val_batches(trainer)
        if not self._n_real:
            self._n_real = self._add_reals(trainer, device, batches)
        rank, world = trainer.global_rank, trainer.world_size
        n_local = self.num_samples // world + int(rank < self.num_samples % world)
        was_training = pl_module.training
        pl_module.eval()
        start, done = time.perf_counter(), 0
        try:
            for part in condition_chunks(batches, n_local):
                size = len(part["image"])
                seeds = [self.seed + rank + world * j for j in range(done, done + size)]
                images = generate(pl_module, part, size, part["image"].shape[-1], seeds, self.protocol)
                self.metrics.update(images.float(), real=False, captions=sample_captions(pl_module, part))
                done += size
        finally:
            pl_module.train(was_training)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = trainer.strategy.all_gather(torch.tensor(time.perf_counter() - start, device=device))
        values = {k: float(v) for k, v in self.metrics.compute().items()}  # synchronised over ranks
        self.metrics.reset()
        self._record(trainer, pl_module, values, self.num_samples / float(seconds.max()), train_seconds)

    def _record(self, trainer: pl.Trainer, pl_module: LatentDiffusion, values: dict[str, float],
                samples_per_s: float, train_seconds: float) -> None:
        logged = {f"eval/{k}": v for k, v in values.items()}
        logged["eval/samples_per_s"] = samples_per_s
        # Also for train.py's metrics.json: self.log is not allowed in on_train_end.
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in logged.items()})
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            logger.log_metrics(logged, step=trainer.global_step)
        line = {"global_step": trainer.global_step, "epoch": trainer.current_epoch, "metrics": values,
                "n": self.num_samples, "n_real": self._n_real, **asdict(self.protocol),
                "features": self._extractor_name, "samples_per_s": samples_per_s,
                "train_seconds": train_seconds,
                "world_size": trainer.world_size, **describe_model(pl_module)}
        path = Path(trainer.default_root_dir) / "metrics" / "eval.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as fh:
            fh.write(json.dumps(line) + "\n")

