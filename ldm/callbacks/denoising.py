"""How the latent diffusion model denoises, as an image grid every N steps: for a few training
samples, the x0 prediction at several steps of a DDIM run, left (noise) to right (the sample)."""
from __future__ import annotations

import pytorch_lightning as pl
import torch

from ldm.callbacks.throughput import batch_size
from ldm.diffusion.objective import eps_x0_from_output
from ldm.diffusion.samplers import get_sampler, noise_for_seeds
from ldm.modules.latent_diffusion import LatentDiffusion
from ldm.utils.images import log_grid


@torch.no_grad()
def denoising_rows(module: LatentDiffusion, batch: dict, num_steps: int = 20, num_columns: int = 6) -> torch.Tensor:
    """Decoded x0 predictions of an unguided DDIM run with `num_steps` steps under the conditions of
    `batch` (seeds 0..n-1): per sample, `num_columns - 1` predictions at evenly spaced steps and
    then the final sample. Returns the images sample by sample ((n x num_columns), C, H, W) in
    [-1, 1]: a grid with nrow=num_columns shows one row per sample."""
    if num_columns < 2:
        raise ValueError(f"num_columns must be at least 2 (a prediction and the sample), got {num_columns}")
    batch = {k: (v.to(module.device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    image_size = batch["image"].shape[-1] if "image" in batch else module.hparams.image_size
    shape = module.latent_shape(image_size)
    cond = module.condition(batch, shape[1:])
    x_T, generators = noise_for_seeds(list(range(batch_size(batch))), shape, device=module.device)
    abar = module.schedule.alphas_cumprod
    predictions: list[torch.Tensor] = []

    def recording_denoiser(x: torch.Tensor, t: torch.Tensor, c) -> torch.Tensor:
        out = module.model(x, t, c)
        a = float(abar[int(t[0])])
        predictions.append(eps_x0_from_output(module.parameterization, out, x, a ** 0.5, (1 - a) ** 0.5)[1])
        return out

    sampler = get_sampler("ddim", schedule=module.schedule, parameterization=module.parameterization,
                          num_steps=num_steps)
    z = sampler.sample(recording_denoiser, x_T, cond, generator=generators, progress=False)
    picks = torch.linspace(0, len(predictions) - 1, num_columns - 1).round().long().tolist()
    columns = torch.stack([predictions[i] for i in picks] + [z], dim=1)  # (n, columns, C, h, w)
    return module.decode_latents(columns.flatten(0, 1)).clamp(-1, 1)


class DenoisingRows(pl.Callback):
    """Every `every_n_steps` optimiser steps, logs `denoising_rows` for the first `num_samples`
    samples of the first training batch as train/denoising (<run>/images/train_denoising_step*.png,
    wandb, TensorBoard). Uses the live weights (not the EMA), like the validation grid."""

    def __init__(self, every_n_steps: int = 1000, num_samples: int = 4, num_steps: int = 20, num_columns: int = 6):
        self.every_n_steps, self.num_samples = every_n_steps, num_samples
        self.num_steps, self.num_columns = num_steps, num_columns
        self._batch: dict | None = None
        self._logged_step = -1

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not isinstance(pl_module, LatentDiffusion):
            raise TypeError(f"DenoisingRows shows latent diffusion sampling; {type(pl_module).__name__} does not "
                            "sample. Remove callbacks.denoising for this model")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if self._batch is None:  # the same samples every time, so the rows compare across steps
            n = self.num_samples
            self._batch = {k: (v[:n].detach().cpu() if isinstance(v, torch.Tensor) else v[:n]) for k, v in batch.items()
                           if isinstance(v, list) or (isinstance(v, torch.Tensor) and v.ndim > 0)}
        step = trainer.global_step
        if step == 0 or step % self.every_n_steps or step == self._logged_step:  # once per step under accumulation
            return
        self._logged_step = step
        pl_module.eval()
        try:
            images = denoising_rows(pl_module, self._batch, self.num_steps, self.num_columns)
        finally:
            pl_module.train()
        log_grid(trainer, "train/denoising", images, nrow=self.num_columns)
