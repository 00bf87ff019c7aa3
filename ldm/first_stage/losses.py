"""Training losses of first-stage autoencoders: reconstruction + perceptual + patch-GAN.

Pure functions for each term, and two modules that combine them the way the reference
(taming-transformers / LDM `LPIPSWithDiscriminator` for KL and `VQLPIPSWithDiscriminator` for VQ
autoencoders) does, with the same log keys. Both modules own the discriminator, so one module
serves the two optimiser steps: `optimizer_idx` 0 is the autoencoder (generator) step,
1 the discriminator step.

Formulas (REFERENCE.md section 6):
  KL:  nll = (|x - x_rec| + w_p P(x, x_rec)) / exp(logvar) + logvar, summed over pixels / B
       G = nll + kl_w * KL + d_w * f_disc * (-mean D(x_rec))
  VQ:  nll = mean(|x - x_rec| + w_p P(x, x_rec))
       G = nll + d_w * f_disc * (-mean D(x_rec)) + codebook_w * codebook_loss
  D = f_disc * (hinge or vanilla)(D(x), D(x_rec))
with f_disc = 0 before `disc_start` and d_w the adaptive weight.
"""
from __future__ import annotations

from typing import Literal, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.nets.discriminator import NLayerDiscriminator, NormName

DiscLossName = Literal["hinge", "vanilla"]
PixelLossName = Literal["l1", "l2"]


class HasKL(Protocol):
    """A latent posterior: `kl()` gives the KL divergence to N(0, I), one value per sample."""

    def kl(self) -> Tensor: ...


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Hinge discriminator loss: 0.5 (mean relu(1 - D(x)) + mean relu(1 + D(x_rec)))."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Non-saturating GAN discriminator loss: 0.5 (mean softplus(-D(x)) + mean softplus(D(x_rec)))."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


D_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


def generator_adversarial_loss(logits_fake: Tensor) -> Tensor:
    """Generator term of the autoencoder loss: -mean D(x_rec)."""
    return -logits_fake.mean()


def adopt_weight(weight: float, global_step: int, threshold: int) -> float:
    """`weight` from step `threshold` on, 0 before (the discriminator is off until disc_start)."""
    return 0.0 if global_step < threshold else weight


def calculate_adaptive_weight(nll_loss: Tensor, g_loss: Tensor, last_layer: Tensor, disc_weight: float) -> Tensor:
    """Adaptive GAN weight: ||d nll / d w|| / (||d g / d w|| + 1e-4), clamped to [0, 1e4],
    detached, times `disc_weight`, with w = `last_layer` (the decoder's last conv weight).

    Balances the two gradients at the decoder output. Both losses must still have their graph;
    the graph is kept for the backward pass that follows.

    Under DDP both gradients are first averaged over the ranks, i.e. taken on the whole global
    batch, so every rank uses the same weight and 2 ranks with B/2 images weigh as 1 with B (the
    reference uses each rank's own). Every rank must then call it, as every training step does.
    """
    nll_grad = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        grads = torch.stack([nll_grad, g_grad])
        dist.all_reduce(grads)
        nll_grad, g_grad = grads / dist.get_world_size()
    d_weight = nll_grad.norm() / (g_grad.norm() + 1e-4)
    return d_weight.clamp(0.0, 1e4).detach() * disc_weight


def kl_term(posterior: HasKL) -> Tensor:
    """KL regulariser of the KL autoencoder: per-sample KL summed over the batch / B."""
    kl = posterior.kl()
    return kl.sum() / kl.shape[0]


def pixel_error(inputs: Tensor, reconstructions: Tensor, kind: PixelLossName) -> Tensor:
    """Per-element reconstruction error: |x - x_rec| ('l1') or (x - x_rec)^2 ('l2')."""
    diff = inputs.contiguous() - reconstructions.contiguous()
    return diff.abs() if kind == "l1" else diff.pow(2)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {choices}")


class _AdversarialFirstStageLoss(nn.Module):
    """Shared part of the KL and VQ losses: perceptual net, discriminator, adaptive weight,
    discriminator step. Attribute names follow the reference so its state dicts line up
    (`discriminator.main.N.*`, `perceptual_loss.*`)."""

    def __init__(
        self,
        perceptual: nn.Module | None,
        disc_start: int,
        perceptual_weight: float,
        pixel_loss: PixelLossName,
        disc_num_layers: int,
        disc_in_channels: int,
        disc_ndf: int,
        disc_norm: NormName,
        disc_factor: float,
        disc_weight: float,
        disc_loss: DiscLossName,
    ):
        super().__init__()
        _check_choice("disc_loss", disc_loss, tuple(D_LOSSES))
        _check_choice("pixel_loss", pixel_loss, ("l1", "l2"))
        if perceptual_weight > 0 and perceptual is None:
            raise ValueError("perceptual_weight > 0 needs a perceptual network (e.g. ldm.metrics.lpips.build_lpips()); "
                             "pass one or set perceptual_weight: 0")
        self.perceptual_loss = perceptual
        if perceptual is not None:
            # A fixed metric: never trained, always in eval mode (see `train`).
            perceptual.requires_grad_(False).eval()
        self.perceptual_weight = perceptual_weight
        self.pixel_loss = pixel_loss
        self.discriminator = NLayerDiscriminator(disc_in_channels, disc_ndf, disc_num_layers, disc_norm)
        self.discriminator_iter_start = disc_start
        self.disc_loss = disc_loss
        self.disc_factor = disc_factor
        self.discriminator_weight = disc_weight

    def train(self, mode: bool = True) -> _AdversarialFirstStageLoss:
        """Set train/eval mode, keeping the perceptual network in eval mode: the reference
        lets Lightning switch on LPIPS's dropout during training, which only adds noise."""
        super().train(mode)
        if self.perceptual_loss is not None:
            self.perceptual_loss.eval()
        return self

    def reconstruction_terms(self, inputs: Tensor, reconstructions: Tensor) -> tuple[Tensor, Tensor]:
        """(rec, p): the per-element pixel error plus perceptual_weight * p, and p, the
        perceptual distance (B, 1, 1, 1), zero when perceptual_weight is 0."""
        rec = pixel_error(inputs, reconstructions, self.pixel_loss)
        if self.perceptual_weight > 0:
            p = self.perceptual_loss(inputs.contiguous(), reconstructions.contiguous())
            return rec + self.perceptual_weight * p, p
        return rec, torch.zeros((), device=inputs.device)

    def adaptive_weight(self, nll_loss: Tensor, g_loss: Tensor, last_layer: Tensor | None) -> Tensor:
        """`calculate_adaptive_weight` when a graph is there. Without one (validation under
        no_grad) it is 0, as in the reference; in training mode that is an error."""
        if last_layer is not None and nll_loss.requires_grad and g_loss.requires_grad:
            return calculate_adaptive_weight(nll_loss, g_loss, last_layer, self.discriminator_weight)
        if self.training:
            raise RuntimeError(
                "the adaptive discriminator weight needs gradients: call the loss with grad enabled and "
                "last_layer = the decoder's last conv weight (or put the loss in eval mode for validation)"
            )
        return torch.zeros((), device=nll_loss.device)

    def disc_factor_at(self, global_step: int) -> float:
        """The discriminator factor at `global_step`: disc_factor, or 0 before disc_start."""
        return adopt_weight(self.disc_factor, global_step, self.discriminator_iter_start)

    def generator_loss(self, reconstructions: Tensor) -> Tensor:
        """-mean D(x_rec) for the autoencoder step; gradients reach the reconstructions."""
        return generator_adversarial_loss(self.discriminator(reconstructions.contiguous()))

    def gan_terms(self, nll_loss: Tensor, reconstructions: Tensor, last_layer: Tensor | None,
                  disc_factor: float) -> tuple[Tensor, Tensor]:
        """(g_loss, d_weight) of the autoencoder step. While the discriminator is off
        (disc_factor 0, e.g. before disc_start) the term is multiplied by 0, so both are 0 without
        running the discriminator or the two gradient norms (the reference computes them anyway)."""
        if disc_factor == 0.0:
            zero = torch.zeros((), device=reconstructions.device)
            return zero, zero
        g_loss = self.generator_loss(reconstructions)
        return g_loss, self.adaptive_weight(nll_loss, g_loss, last_layer)

    def discriminator_step(
        self, inputs: Tensor, reconstructions: Tensor, global_step: int, split: str
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Discriminator loss on detached real and reconstructed images, and its log."""
        logits_real = self.discriminator(inputs.contiguous().detach())
        logits_fake = self.discriminator(reconstructions.contiguous().detach())
        disc_factor = self.disc_factor_at(global_step)
        d_loss = disc_factor * D_LOSSES[self.disc_loss](logits_real, logits_fake)
        log = {
            f"{split}/disc_loss": d_loss.clone().detach().mean(),
            f"{split}/logits_real": logits_real.detach().mean(),
            f"{split}/logits_fake": logits_fake.detach().mean(),
        }
        return d_loss, log


def _check_optimizer_idx(optimizer_idx: int) -> None:
    if optimizer_idx not in (0, 1):
        raise ValueError(f"optimizer_idx must be 0 (autoencoder step) or 1 (discriminator step), got {optimizer_idx}")


class KLAutoencoderLoss(_AdversarialFirstStageLoss):
    """Loss of the KL-regularised autoencoder (the reference `LPIPSWithDiscriminator`).

    perceptual: module called as perceptual(x, x_rec) on [-1, 1] images, returning (B, 1, 1, 1)
        (LPIPS); may be None when perceptual_weight is 0.
    logvar: scalar log-variance of the Gaussian/Laplace likelihood, initialised to logvar_init.
        Always a parameter named `logvar` (reference layout); it requires grad, and so is
        trained, only with learn_logvar (the reference autoencoder never optimises it).
    """

    def __init__(
        self,
        perceptual: nn.Module | None,
        disc_start: int,
        logvar_init: float = 0.0,
        learn_logvar: bool = False,
        kl_weight: float = 1.0,
        pixel_loss: PixelLossName = "l1",
        perceptual_weight: float = 1.0,
        disc_num_layers: int = 3,
        disc_in_channels: int = 3,
        disc_ndf: int = 64,
        disc_norm: NormName = "batch",
        disc_factor: float = 1.0,
        disc_weight: float = 1.0,
        disc_loss: DiscLossName = "hinge",
    ):
        super().__init__(perceptual, disc_start, perceptual_weight, pixel_loss, disc_num_layers,
                         disc_in_channels, disc_ndf, disc_norm, disc_factor, disc_weight, disc_loss)
        self.kl_weight = kl_weight
        self.logvar = nn.Parameter(torch.full((), float(logvar_init)), requires_grad=learn_logvar)

    def forward(
        self,
        inputs: Tensor,
        reconstructions: Tensor,
        posterior: HasKL,
        optimizer_idx: int,
        global_step: int,
        last_layer: Tensor | None = None,
        split: str = "train",
        weights: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """(loss, log) of the autoencoder step (optimizer_idx 0) or the discriminator step (1).

        posterior: the encoder's latent distribution (`kl()` per sample).
        last_layer: the decoder's last conv weight, for the adaptive discriminator weight.
        weights: optional per-element weights of the nll (broadcast against the images).
        """
        _check_optimizer_idx(optimizer_idx)
        if optimizer_idx == 1:
            return self.discriminator_step(inputs, reconstructions, global_step, split)

        rec_loss, _ = self.reconstruction_terms(inputs, reconstructions)
        nll = rec_loss / torch.exp(self.logvar) + self.logvar
        weighted_nll = nll if weights is None else weights * nll
        batch = inputs.shape[0]
        weighted_nll_loss = weighted_nll.sum() / batch
        nll_loss = nll.sum() / batch
        kl_loss = kl_term(posterior)

        disc_factor = self.disc_factor_at(global_step)
        g_loss, d_weight = self.gan_terms(nll_loss, reconstructions, last_layer, disc_factor)
        loss = weighted_nll_loss + self.kl_weight * kl_loss + d_weight * disc_factor * g_loss

        log = {
            f"{split}/total_loss": loss.clone().detach().mean(),
            f"{split}/logvar": self.logvar.detach(),
            f"{split}/kl_loss": kl_loss.detach().mean(),
            f"{split}/nll_loss": nll_loss.detach().mean(),
            f"{split}/rec_loss": rec_loss.detach().mean(),
            f"{split}/d_weight": d_weight.detach(),
            f"{split}/disc_factor": torch.tensor(disc_factor),
            f"{split}/g_loss": g_loss.detach().mean(),
        }
        return loss, log


class VQAutoencoderLoss(_AdversarialFirstStageLoss):
    """Loss of the vector-quantised autoencoder (the reference `VQLPIPSWithDiscriminator`).

    Unlike the KL loss the nll is a mean (not a sum / B) and there is no logvar; the quantiser's
    codebook + commitment loss is added with codebook_weight. The reference's forward takes the
    codebook loss first; here it is the third argument, as the posterior is in the KL loss.
    """

    def __init__(
        self,
        perceptual: nn.Module | None,
        disc_start: int,
        codebook_weight: float = 1.0,
        pixel_loss: PixelLossName = "l1",
        perceptual_weight: float = 1.0,
        disc_num_layers: int = 3,
        disc_in_channels: int = 3,
        disc_ndf: int = 64,
        disc_norm: NormName = "batch",
        disc_factor: float = 1.0,
        disc_weight: float = 1.0,
        disc_loss: DiscLossName = "hinge",
    ):
        super().__init__(perceptual, disc_start, perceptual_weight, pixel_loss, disc_num_layers,
                         disc_in_channels, disc_ndf, disc_norm, disc_factor, disc_weight, disc_loss)
        self.codebook_weight = codebook_weight

    def forward(
        self,
        inputs: Tensor,
        reconstructions: Tensor,
        codebook_loss: Tensor | None,
        optimizer_idx: int,
        global_step: int,
        last_layer: Tensor | None = None,
        split: str = "train",
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """(loss, log) of the autoencoder step (optimizer_idx 0) or the discriminator step (1).

        codebook_loss: the quantiser's loss (None counts as 0).
        last_layer: the decoder's last conv weight, for the adaptive discriminator weight.
        """
        _check_optimizer_idx(optimizer_idx)
        if optimizer_idx == 1:
            return self.discriminator_step(inputs, reconstructions, global_step, split)

        if codebook_loss is None:
            codebook_loss = torch.zeros((), device=inputs.device)
        rec_loss, p_loss = self.reconstruction_terms(inputs, reconstructions)
        nll_loss = rec_loss.mean()

        disc_factor = self.disc_factor_at(global_step)
        g_loss, d_weight = self.gan_terms(nll_loss, reconstructions, last_layer, disc_factor)
        loss = nll_loss + d_weight * disc_factor * g_loss + self.codebook_weight * codebook_loss.mean()

        log = {
            f"{split}/total_loss": loss.clone().detach().mean(),
            f"{split}/quant_loss": codebook_loss.detach().mean(),
            f"{split}/nll_loss": nll_loss.detach().mean(),
            f"{split}/rec_loss": rec_loss.detach().mean(),
            f"{split}/p_loss": p_loss.detach().mean(),
            f"{split}/d_weight": d_weight.detach(),
            f"{split}/disc_factor": torch.tensor(disc_factor),
            f"{split}/g_loss": g_loss.detach().mean(),
        }
        return loss, log
