"""First-stage moments: what a latent cache stores of an encoder's posterior, and the posterior
that stored moments stand for (pure; the cache itself is ldm.data.latents).

A KL first stage's moments are the (2C, h, w) concatenation of its diagonal Gaussian's mean and
log-variance, so training still draws a fresh posterior sample every step; for VQ (the
pre-quantisation latent) and identity first stages they are the (C, h, w) latent itself.
"""
from __future__ import annotations

import torch

from ldm.first_stage.base import FirstStage, Posterior
from ldm.first_stage.distributions import DeterministicLatent, DiagonalGaussian
from ldm.first_stage.kl import AutoencoderKL

# How to rewrite moments that do not fit, named in the errors below.
REENCODE = "python -m ldm.cli.encode_latents --first-stage <this model's first-stage run>"


def latent_kind(first_stage: FirstStage) -> str:
    """'kl' for first stages whose posterior is a diagonal Gaussian, else 'deterministic'
    (VQ pre-quantisation latents, identity)."""
    return "kl" if isinstance(first_stage, AutoencoderKL) else "deterministic"


def moment_channels(first_stage: FirstStage) -> int:
    """Channels of the cached moments of `first_stage`: 2C (mean, logvar) for KL, else C."""
    c = first_stage.latent_channels
    return 2 * c if latent_kind(first_stage) == "kl" else c


def posterior_moments(posterior: Posterior) -> tuple[torch.Tensor, str]:
    """(moments, kind) of an encoder output: cat(mean, logvar) on channels for a DiagonalGaussian
    ('kl'), the latent for a DeterministicLatent ('deterministic')."""
    if isinstance(posterior, DiagonalGaussian):
        return torch.cat([posterior.mean, posterior.logvar], dim=1), "kl"
    if isinstance(posterior, DeterministicLatent):
        return posterior.latent, "deterministic"
    raise TypeError(f"cannot cache a {type(posterior).__name__} posterior: "
                    "expected a DiagonalGaussian or a DeterministicLatent")


def describe(first_stage: FirstStage) -> str:
    """The first stage's class, kind, f and channels, for error messages."""
    return (f"{type(first_stage).__name__} (kind {latent_kind(first_stage)}, f = {first_stage.downsampling_factor}, "
            f"{first_stage.latent_channels} latent channels, so {moment_channels(first_stage)} moment channels)")


def posterior_from_moments(moments: torch.Tensor, first_stage: FirstStage,
                           source: str = "(location unknown)") -> Posterior:
    """The posterior that `moments` (B, 2C or C, h, w) stand for under `first_stage`: a
    DiagonalGaussian for KL, the latent itself otherwise. Moments of another shape are refused;
    `source` names where they came from in that error."""
    if moments.dim() != 4 or moments.shape[1] != moment_channels(first_stage):
        raise ValueError(
            f"latent cache {source} holds moments of shape {tuple(moments.shape[1:])} per sample, but this model's "
            f"first stage is {describe(first_stage)}. Re-encode the cache with `{REENCODE}` or set first_stage.path "
            "to the run that wrote it")
    return DiagonalGaussian(moments) if latent_kind(first_stage) == "kl" else DeterministicLatent(moments)
