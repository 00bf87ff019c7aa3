"""The `compile` choice of the latent diffusion module: torch.compile in place, so parameter
names and checkpoints do not change and compilation happens at the first call."""
from __future__ import annotations

from torch import nn

# model.compile: off, the whole UNet, or its attention blocks (regional compilation)
COMPILE_CHOICES = (False, True, "blocks")


def compile_denoiser(unet: nn.Module, compile: bool | str, mode: str | None = None) -> None:
    """torch.compile `unet` in place with `mode` (None: torch's default): the whole network for
    True, only its attention blocks for "blocks" (`unet.compile_blocks`: a short warm-up,
    convolutions eager), nothing for False."""
    if compile not in COMPILE_CHOICES:
        raise ValueError(f"compile must be false, true (the whole UNet) or 'blocks' (its attention blocks), "
                         f"got {compile!r}")
    if compile == "blocks":
        if not callable(getattr(unet, "compile_blocks", None)):
            raise ValueError(f"compile=blocks: {type(unet).__name__} has no compile_blocks(); use compile=true")
        unet.compile_blocks(mode=mode)
    elif compile:
        unet.compile(mode=mode)


def compile_encoder(first_stage: nn.Module, mode: str | None = None) -> None:
    """torch.compile the first stage's encoder network in place (latents computed from images)."""
    encoder = getattr(first_stage, "encoder", None)
    if not isinstance(encoder, nn.Module):
        raise ValueError(f"compile_first_stage: {type(first_stage).__name__} has no encoder network to compile")
    encoder.compile(mode=mode)
