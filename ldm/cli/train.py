"""The logic behind train.py: build everything from the composed config and fit."""
from __future__ import annotations

import logging
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ProgressBar

from ldm.callbacks.run_metrics import RunMetrics, scalar_metrics
from ldm.utils.run_checkpoints import newest_checkpoint
from ldm.cli import launch

log = logging.getLogger(__name__)


def resolve_ckpt_path(ckpt_path: str | None, output_dir: Path) -> str | None:
    """A checkpoint to resume from: a .ckpt file, or the newest checkpoint (the one written last,
    see ldm.utils.run_checkpoints.newest_checkpoint) of a run folder or of this run folder
    ("last"), logged with its step. None starts fresh."""
    if ckpt_path is None:
        return None
    path = output_dir if ckpt_path == "last" else Path(ckpt_path)
    if path.is_dir():
        folder = path / "checkpoints"
        newest = newest_checkpoint(folder) if folder.is_dir() else None
        if newest is None:
            raise FileNotFoundError(f"ckpt_path={ckpt_path!r}: no checkpoint in {folder}. Pass a .ckpt file or a run "
                                    "folder holding checkpoints/*.ckpt (and set hydra.run.dir to it to continue "
                                    "in the same folder)")
        log.info("ckpt_path=%s: resuming from %s (global step %d), the newest checkpoint in %s", ckpt_path,
                 newest.path.name, newest.global_step, folder)
        path = newest.path
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path!r}: no checkpoint at {path}. Pass a .ckpt file or a run "
                                "folder holding checkpoints/*.ckpt (and set hydra.run.dir to it to continue "
                                "in the same folder)")
    return str(path)


def _instantiate_group(group: DictConfig | None) -> list:
    """Instantiate each `_target_` entry of a dict-of-components group (callbacks, loggers)."""
    if not group:
        return []
    return [instantiate(node) for node in group.values() if node is not None and "_target_" in node]


def plain(cfg: DictConfig) -> dict:
    """Resolved plain-container copy of a config (safe in weights_only checkpoints)."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


def out_of_memory_advice(trainer: pl.Trainer, batch_size: int, can_accumulate: bool) -> str:
    """What to change after a CUDA out-of-memory error: a smaller per-device batch, with gradient
    accumulation keeping the effective batch (and so the scaled learning rate) where the module allows it."""
    accumulate = trainer.accumulate_grad_batches
    if can_accumulate:
        fix = ("lower data.batch_size and raise trainer.accumulate_grad_batches to keep the effective batch, e.g. "
               f"data.batch_size={max(batch_size // 2, 1)} trainer.accumulate_grad_batches={accumulate * 2}")
    else:
        fix = (f"lower data.batch_size and raise model.accumulate_grad_batches (this module steps its optimisers "
               f"itself), e.g. data.batch_size={max(batch_size // 2, 1)} model.accumulate_grad_batches=2")
    return (f"out of GPU memory with data.batch_size={batch_size} per device on {trainer.num_devices} device(s) x "
            f"{trainer.num_nodes} node(s) and trainer.accumulate_grad_batches={accumulate} (effective batch "
            f"{batch_size * trainer.world_size * accumulate}). To fit: {fix}; or train in bf16-mixed precision, "
            "with trainer=fsdp or activation checkpointing (docs/scaling.md)")


def refuse_trainer_stepping(trainer_cfg: DictConfig) -> None:
    """A module that steps its own optimisers (the autoencoders) takes accumulation and clipping as
    model options: say so before Lightning refuses the trainer's."""
    if trainer_cfg.get("accumulate_grad_batches", 1) != 1 or trainer_cfg.get("gradient_clip_val") is not None:
        raise ValueError("this model steps its optimisers itself (manual optimisation): use model.accumulate_grad_batches "
                         "and model.gradient_clip_val instead of trainer.accumulate_grad_batches / "
                         "trainer.gradient_clip_val")


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit the configured model on the configured data; returns the final logged metrics.

    Writes into cfg.paths.output_dir: config.yaml (resolved), checkpoints/, csv/ logs,
    wandb/ (offline unless configured) and metrics.json.
    """
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True)
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), out)

    datamodule = instantiate(cfg.data, _convert_="all")
    callbacks = [*_instantiate_group(cfg.get("callbacks")), RunMetrics(out / "metrics.json")]
    if not cfg.trainer.get("enable_progress_bar", True):
        # The flag alone turns the bar off: Lightning refuses a progress-bar callback with it.
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    loggers = _instantiate_group(cfg.get("logger"))
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    group = None
    if launch.ranks_start_together(trainer):  # torchrun, srun: checks before anyone writes
        group = launch.start_group(trainer, cfg.launch.prepare_timeout_s)
        launch.check_same_run_folder(group, out)
        launch.check_shared_run_folder(group, out, cfg.launch.shared_fs_timeout_s)
    if trainer.is_global_zero:
        (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    # Data first, on global rank 0 only: building the model may need it (a text model trains its
    # tokenizer on the captions), so the other ranks build theirs once rank 0 is done.
    with launch.rank_zero_first(group, trainer.is_global_zero, cfg.launch.prepare_timeout_s) as first:
        if first:
            datamodule.prepare_data()
        model = instantiate(cfg.model, _convert_="all")  # plain containers: weights_only checkpoints
    # The module can rebuild itself from this (sample.py, evaluate.py, fine-tuning).
    model.build_config = plain(cfg.model)
    if not model.automatic_optimization:
        refuse_trainer_stepping(cfg.trainer)
    for lg in loggers:
        lg.log_hyperparams(plain(cfg))

    log.info("run folder: %s", out.resolve())
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    except torch.cuda.OutOfMemoryError as err:  # torch.OutOfMemoryError is the same class
        raise torch.cuda.OutOfMemoryError(
            out_of_memory_advice(trainer, cfg.data.batch_size, model.automatic_optimization)) from err

    if trainer.is_global_zero:
        log.info("checkpoints: %s", out / "checkpoints")
    return scalar_metrics(trainer)
