"""LightningModule that trains a KL or VQ first stage with L1/L2 + LPIPS + patch-GAN losses.

Thin glue: the networks live in ldm.first_stage / ldm.nets, the losses in
ldm.first_stage.losses, the metrics in ldm.metrics. Manual optimisation: one autoencoder step
and (once the discriminator is on) one discriminator step per batch.
"""
from __future__ import annotations

import torch
from lightning_fabric.utilities.throughput import measure_flops
from torch import nn

from ldm.diffusion.ema import EMA
from ldm.diffusion.samplers.noise import NoiseGenerator
from ldm.first_stage.base import FirstStage
from ldm.first_stage.vq import AutoencoderVQ
from ldm.metrics.collection import FID
from ldm.metrics.features import FeatureExtractor
from ldm.metrics.lpips import LPIPS
from ldm.metrics.reconstruction import psnr, ssim
from ldm.modules.base import BuildableModule, fast_optimizer_kwargs
from ldm.modules.nonfinite import NonFiniteGuard
from ldm.utils.images import log_grid
from ldm.utils.lr import trainer_effective_lr


class AutoencoderModule(BuildableModule):
    """Trains `first_stage` with `loss` (KLAutoencoderLoss or VQAutoencoderLoss).

    base_lr / scale_lr: Adam learning rate, multiplied by batch x GPUs x accumulation when
        scale_lr (the reference's rule); the result is logged as `effective_lr`.
    ema_decay: keep an EMA of the autoencoder weights (used for validation) when set.
    rfid_extractor: feature network for the validation rFID (None: no rFID).
    lpips: perceptual network for the validation LPIPS; defaults to the loss's perceptual net.
    nonfinite_loss: "stop" or "skip" (no optimiser step for that batch) on a NaN/inf loss
        (ldm.modules.nonfinite).
    accumulate_grad_batches: optimiser steps every this many batches, on the gradients of their
        losses / k (both optimisers): the same update as one batch k times larger.
    gradient_clip_val: clip each optimiser's gradient norm to this before its step (None: no clipping).
    The optimisers are stepped here (manual optimisation), so Lightning refuses its own
    trainer.accumulate_grad_batches and trainer.gradient_clip_val for this module: these two
    take their place.
    """

    def __init__(self, first_stage: FirstStage, loss: nn.Module, base_lr: float = 4.5e-6, scale_lr: bool = True,
                 betas: tuple[float, float] = (0.5, 0.9), ema_decay: float | None = None,
                 rfid_extractor: FeatureExtractor | None = None, lpips: LPIPS | None = None,
                 log_images: int = 8, nonfinite_loss: str = "stop", accumulate_grad_batches: int = 1,
                 gradient_clip_val: float | None = None):
        super().__init__()
        if accumulate_grad_batches < 1:
            raise ValueError(f"model.accumulate_grad_batches must be >= 1, got {accumulate_grad_batches}")
        if gradient_clip_val is not None and gradient_clip_val <= 0:
            raise ValueError(f"model.gradient_clip_val must be > 0 (or null: no clipping), got {gradient_clip_val}")
        self.save_hyperparameters(ignore=["first_stage", "loss", "rfid_extractor", "lpips"])
        self.automatic_optimization = False
        self.first_stage, self.loss = first_stage, loss
        self.is_vq = isinstance(first_stage, AutoencoderVQ)
        self.ema = EMA(first_stage, ema_decay) if ema_decay else None
        # Metric helpers are kept out of the state dict: they are not part of the model.
        self._lpips = lpips if lpips is not None else getattr(loss, "perceptual_loss", None)
        self._rfid = FID(rfid_extractor) if rfid_extractor is not None else None
        self._val_batch: torch.Tensor | None = None
        self.ae_steps = 0  # autoencoder optimiser steps; Lightning's global_step also counts discriminator steps
        self.nonfinite = NonFiniteGuard(nonfinite_loss)

    def __setattr__(self, name, value):
        if name in ("_lpips", "_rfid"):  # plain attributes, not registered submodules
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def _ae_parameters(self) -> list[nn.Parameter]:
        params = list(self.first_stage.parameters())
        logvar = getattr(self.loss, "logvar", None)
        if logvar is not None and logvar.requires_grad:
            params.append(logvar)
        return params

    def configure_optimizers(self):
        lr = trainer_effective_lr(self, self.hparams.base_lr, self.hparams.scale_lr,
                                  accumulate=self.hparams.accumulate_grad_batches)
        betas = tuple(self.hparams.betas)
        ae_params, d_params = list(self._ae_parameters()), list(self.loss.discriminator.parameters())
        opt_ae = torch.optim.Adam(ae_params, lr=lr, betas=betas, **fast_optimizer_kwargs(ae_params))
        opt_d = torch.optim.Adam(d_params, lr=lr, betas=betas, **fast_optimizer_kwargs(d_params))
        return [opt_ae, opt_d]

    def reconstruct(self, x: torch.Tensor, generator: NoiseGenerator = None
                    ) -> tuple[torch.Tensor, object, dict[str, torch.Tensor]]:
        """(reconstruction, posterior or codebook loss, extra logs). generator: of the KL posterior
        sample (None: the global RNG; or one per image)."""
        if self.is_vq:
            rec, qloss, info = self.first_stage(x)
            return rec, qloss, {"perplexity": info.perplexity.detach(), "codebook_usage": info.usage.detach()}
        rec, posterior = self.first_stage(x, generator=generator)
        return rec, posterior, {}

    def measure_training_flops(self, batch: dict) -> int:
        """FLOPs of one autoencoder (generator) update on `batch`: reconstruction, loss and backward,
        counted by torch's FLOP counter (the discriminator's own update is not counted). Fills
        gradients: ldm.callbacks.throughput runs it on stand-in parameters."""
        x = batch["image"]
        last_layer = self.first_stage.decoder.last_layer

        def generator_loss(out: tuple) -> torch.Tensor:
            rec, reg, _ = out
            return self.loss(x, rec, reg, 0, self.ae_steps, last_layer=last_layer, split="train")[0]

        return measure_flops(self.first_stage, lambda: self.reconstruct(x), loss_fn=generator_loss)

    def training_step(self, batch: dict, batch_idx: int) -> None:
        x = batch["image"]
        opt_ae, opt_d = self.optimizers()
        k = self.hparams.accumulate_grad_batches
        disc_on = self.loss.disc_factor_at(self.ae_steps) > 0  # before disc_start the D loss is 0: skip the work
        # The generator's loss runs through the discriminator: its parameters are frozen meanwhile,
        # so the discriminator's (accumulated) gradients hold its own loss only.
        self.toggle_optimizer(opt_ae)
        # the posterior sample of each image from its own generator: the same on any number of ranks
        rec, reg, extra = self.reconstruct(x, self.sample_generators(len(x)))
        last_layer = self.first_stage.decoder.last_layer
        ae_loss, log = self.loss(x, rec, reg, 0, self.ae_steps, last_layer=last_layer, split="train")
        usable = self.nonfinite.usable(self, ae_loss, "autoencoder loss")
        if usable:
            self.manual_backward(ae_loss / k)
        self.untoggle_optimizer(opt_ae)
        if not usable:
            return
        if disc_on:
            d_loss, d_log = self.loss(x, rec.detach(), reg, 1, self.ae_steps, split="train")
            if self.nonfinite.usable(self, d_loss, "discriminator loss"):
                self.manual_backward(d_loss / k)
                log.update(d_log)
        if (batch_idx + 1) % k == 0:
            self._step(opt_ae)
            if disc_on:
                self._step(opt_d)
            if self.ema is not None:
                self.ema.update(self.first_stage)
            self.ae_steps += 1
        log.update({f"train/{k}": v for k, v in extra.items()})
        self.log("train/rec_loss", log.pop("train/rec_loss"), prog_bar=True, batch_size=len(x))
        self.log_dict(log, batch_size=len(x))

    def _step(self, optimizer) -> None:
        """Clip (if configured), step and clear one optimiser's accumulated gradients."""
        if self.hparams.gradient_clip_val is not None:
            self.clip_gradients(optimizer, gradient_clip_val=self.hparams.gradient_clip_val,
                                gradient_clip_algorithm="norm")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def on_validation_epoch_start(self) -> None:
        if self.ema is not None:
            self.ema.store(self.first_stage)
            self.ema.copy_to(self.first_stage)
        for helper in (self._lpips, self._rfid):
            if helper is not None:
                helper.to(self.device)
        if self._rfid is not None:
            self._rfid.reset()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        x = batch["image"]
        rec, reg, extra = self.reconstruct(x)
        _, log = self.loss(x, rec, reg, 0, self.ae_steps, split="val")
        # the one name every module logs for checkpoint selection (callbacks.best), as the
        # reference's autoencoder monitor: the reconstruction loss
        log["val/loss"] = log["val/rec_loss"]
        rec = rec.clamp(-1, 1)
        log["val/psnr"] = psnr(x, rec).mean()
        log["val/ssim"] = ssim(x, rec).mean()
        if self._lpips is not None:
            log["val/lpips"] = self._lpips(x, rec).mean()
        log.update({f"val/{k}": v for k, v in extra.items()})
        self.log_dict(log, sync_dist=True, batch_size=len(x))
        if self._rfid is not None:
            self._rfid.update(x, real=True)
            self._rfid.update(rec, real=False)
        if batch_idx == 0:
            self._val_batch = torch.cat([x[: self.hparams.log_images], rec[: self.hparams.log_images]])

    def on_validation_epoch_end(self) -> None:
        if self._rfid is not None:
            self.log("val/rfid", self._rfid.compute().to(self.device))
        if self._val_batch is not None and not self.trainer.sanity_checking:
            log_grid(self.trainer, "val/reconstructions", self._val_batch, nrow=len(self._val_batch) // 2)
        self._val_batch = None
        if self.ema is not None:
            self.ema.restore(self.first_stage)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.ema is not None:  # saved while validation runs on the EMA weights
            self.ema.put_live_weights(checkpoint["state_dict"], "first_stage.")
        checkpoint["ae_steps"] = self.ae_steps

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.ae_steps = checkpoint.get("ae_steps", 0)
