"""Rebuild a trained module from its checkpoint alone (the config travels inside it).

The stored config is built only from the allow-list MODEL_TARGETS unless the caller trusts the
checkpoint: a checkpoint from a stranger then cannot read data, run commands or import code by
naming them in its config (the weights themselves are read with torch's weights_only loader).
"""
from __future__ import annotations

from pathlib import Path

import torch
from hydra.utils import instantiate

from ldm.first_stage.base import FirstStage
from ldm.modules.base import BuildableModule
from ldm.utils.checkpoint import find_checkpoint, load_strict
from ldm.utils.trusted_config import check_trusted

# What a stored model config may build without trust_config: this project's modules, networks,
# first stages, condition encoders, losses and metric networks. Not in it: anything that loads
# another file by path or reads data (load_first_stage, first_stage_from_checkpoint,
# ensure_tokenizer): the checkpoints of this project store what those loaded instead.
MODEL_TARGETS = frozenset({
    "ldm.modules.latent_diffusion.LatentDiffusion",
    "ldm.modules.autoencoder.AutoencoderModule",
    "ldm.convert.reference.module_from_reference_config",  # a released model's YAML params (ldm-convert --to ours)
    "ldm.nets.unet.UNetModel",
    "ldm.nets.concat.LowResConcat",
    "ldm.nets.concat.InpaintConcat",
    "ldm.nets.embedders.SpatialRescaler",
    "ldm.nets.embedders.BertCaptionTokenizer",
    "ldm.nets.embedders.ClassEmbedder",
    "ldm.nets.embedders.TransformerTextEncoder",
    "ldm.nets.embedders.FrozenCLIPTextEncoder",
    "ldm.nets.tokenizer.CaptionTokenizer.from_base64",
    "ldm.first_stage.kl.AutoencoderKL",
    "ldm.first_stage.vq.AutoencoderVQ",
    "ldm.first_stage.identity.IdentityFirstStage",
    "ldm.first_stage.factory.autoencoder_kl",
    "ldm.first_stage.factory.autoencoder_vq",
    "ldm.first_stage.factory.identity",
    "ldm.first_stage.losses.KLAutoencoderLoss",
    "ldm.first_stage.losses.VQAutoencoderLoss",
    "ldm.metrics.lpips.build_lpips",
    "ldm.metrics.features.ToyFeatures",
    "ldm.metrics.features.InceptionV3Features",
    "ldm.metrics.features.VGG16Features",
})


# Model-config entries that only training uses, left out when a stored config is rebuilt: the
# optimiser (a `_partial_` factory, which the allow-list refuses) and weight_decay, which earlier
# checkpoints carry at the top level (now optimizer.weight_decay).
TRAINING_ONLY = {"ldm.modules.latent_diffusion.LatentDiffusion": ("optimizer", "weight_decay")}


def load_module(path: str | Path, map_location: str | torch.device = "cpu",
                trust_config: bool = False) -> BuildableModule:
    """The LightningModule saved at `path` (file or run folder), rebuilt from the model config
    stored in the checkpoint (less its TRAINING_ONLY entries: the rebuilt module has the default
    optimiser) and loaded with strict key checking, in eval mode.

    Unless `trust_config`, a stored config naming anything outside MODEL_TARGETS (or using
    `_args_`, `_partial_`, interpolations) is refused with UntrustedConfigError before anything is
    built; with it, the config is built as it is, as train.py would."""
    ckpt_path = find_checkpoint(path)
    ckpt = torch.load(ckpt_path, map_location=map_location, weights_only=True)
    if "build_config" not in ckpt:
        raise ValueError(f"{ckpt_path} holds no build_config: it was not written by this project's train.py. "
                         "Original LDM checkpoints load with ldm.convert.reference")
    config = ckpt["build_config"]
    config = {k: v for k, v in config.items() if k not in TRAINING_ONLY.get(config.get("_target_"), ())}
    if not trust_config:
        check_trusted(config, MODEL_TARGETS, str(ckpt_path))
    module = instantiate(config, _convert_="all")
    load_strict(module, ckpt["state_dict"], str(ckpt_path))
    module.on_load_checkpoint(ckpt)
    return module.eval()


def load_first_stage(path: str | Path) -> FirstStage:
    """The trained first stage of a first-stage run (folder or .ckpt), frozen, for the
    latent diffusion stage. Its EMA weights are used when the run kept an EMA. Its stored config
    is checked as load_module checks it."""
    module = load_module(path)
    first_stage = getattr(module, "first_stage", None)
    if not isinstance(first_stage, FirstStage):
        raise ValueError(f"{path} is not a first-stage run (it holds a {type(module).__name__})")
    if getattr(module, "ema", None) is not None:
        module.ema.copy_to(first_stage)
    # The architecture, so a latent diffusion checkpoint can rebuild it without this run folder.
    first_stage.build_config = module.build_config["first_stage"]
    return first_stage.eval().requires_grad_(False)
