"""Our LatentDiffusion checkpoints (CLIP text encoder) export to a diffusers folder that diffusers'
own StableDiffusionPipeline loads and samples exactly as we do, and import back unchanged; models
the pipeline cannot represent are refused with the reason."""
from __future__ import annotations

import json

import pytest
import torch

from helpers import assert_diffusers_pipeline_matches, make_tiny_clip
from ldm.convert.diffusers_pipeline import export_diffusers, load_diffusers_pipeline
from ldm.modules.loading import load_module

diffusers = pytest.importorskip("diffusers")
UNET = dict(in_channels=4, out_channels=4, model_channels=32, channel_mult=[1, 2], num_res_blocks=1,
            attention_resolutions=[1, 2], num_heads=2, use_spatial_transformer=True, context_dim=32)
DDCONFIG = dict(double_z=True, z_channels=4, resolution=16, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
                num_res_blocks=1, attn_resolutions=[], dropout=0.0)
PROMPTS = ["red blue", "blue"]


def build_config(clip: str, ema_decay: float | None = None, parameterization: str = "eps") -> dict:
    """Our model config (as train.py stores it) of a tiny SD-1-style model."""
    return {"_target_": "ldm.modules.latent_diffusion.LatentDiffusion",
            "unet": {"_target_": "ldm.nets.unet.UNetModel", **UNET},
            "first_stage": {"_target_": "ldm.first_stage.kl.AutoencoderKL", "ddconfig": DDCONFIG, "embed_dim": 4},
            "cond_stage": {"_target_": "ldm.nets.embedders.FrozenCLIPTextEncoder", "version": clip},
            "conditioning_key": "crossattn", "cond_stage_key": "caption", "cond_stage_trainable": False,
            "uncond_value": "", "scale_factor": 0.18215, "image_size": 16, "ema_decay": ema_decay,
            "parameterization": parameterization}


def make_checkpoint(folder, ema_decay: float | None = None, parameterization: str = "eps"):
    """Our checkpoint file of a tiny CLIP-conditioned model with random weights (EMA shadow differing)."""
    from hydra.utils import instantiate

    clip = folder / "clip"
    make_tiny_clip(clip)
    config = build_config(str(clip), ema_decay, parameterization)
    module = instantiate(config, _convert_="all")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # after the EMA copied its shadow, so the EMA and live weights differ
        for p in [*module.model.parameters(), *module.first_stage_model.parameters()]:
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    path = folder / "model.ckpt"
    torch.save({"state_dict": module.state_dict(), "build_config": config}, path)
    return path


def test_our_checkpoint_samples_the_same_in_diffusers(tmp_path):
    module = load_module(make_checkpoint(tmp_path, ema_decay=0.9999))
    folder = export_diffusers(module, tmp_path / "pipe")
    assert {p.name for p in folder.iterdir()} == {"unet", "vae", "text_encoder", "tokenizer", "scheduler",
                                                  "model_index.json"}
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["safety_checker"] == [None, None]
    assert_diffusers_pipeline_matches(module, folder, PROMPTS)  # the EMA weights, as sample.py's default
    with pytest.raises(FileExistsError, match="not empty"):
        export_diffusers(module, folder)


def test_diffusers_round_trip_gives_identical_state_dicts(tmp_path):
    module = load_module(make_checkpoint(tmp_path, parameterization="v"))
    back = load_diffusers_pipeline(export_diffusers(module, tmp_path / "pipe"))
    ours, theirs = module.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys()
    assert [k for k in ours if not torch.equal(ours[k], theirs[k])] == []
    assert back.parameterization == "v" and back.hparams.image_size == 16
    with torch.no_grad():
        torch.testing.assert_close(back.encode_condition(PROMPTS), module.encode_condition(PROMPTS), rtol=0, atol=0)


def test_models_the_pipeline_cannot_represent_are_refused(tmp_path):
    from ldm.convert.reference import load_reference_checkpoint
    from helpers import FIXTURES

    zoo = FIXTURES / "ldm-reference-zoo"
    for name, reason in [("text_bert_kl8", "TransformerTextEncoder"), ("sr_identity_vq4", "'concat'"),
                         ("semantic_rescaler_kl4", "no concat channels")]:
        io = torch.load(zoo / f"{name}_io.pt", weights_only=True)
        module = load_reference_checkpoint(zoo / f"{name}.ckpt", io["config"],
                                           text_encoder=str(zoo / io["tokenizer"]) if io["tokenizer"] else None)
        with pytest.raises(ValueError, match=f"no diffusers StableDiffusionPipeline equivalent: .*{reason}"):
            export_diffusers(module, tmp_path / name)
        assert not (tmp_path / name).exists()  # refused before anything is written
    ref = FIXTURES / "ldm-reference"  # a class-conditional model (ClassEmbedder) and an unconditional one
    for name, reason in [("txt_crossattn_f4", "ClassEmbedder"), ("uncond_selfattn_f4", "condition is None")]:
        config = torch.load(ref / f"{name}_io.pt", weights_only=True)["config"]
        with pytest.raises(ValueError, match=reason):
            export_diffusers(load_reference_checkpoint(ref / f"{name}.ckpt", config), tmp_path / name)


def test_released_sd1_checkpoint_exports_to_diffusers(tmp_path):
    from helpers import FIXTURES
    from ldm.convert.reference import load_reference_checkpoint

    zoo = FIXTURES / "ldm-reference-zoo"
    io = torch.load(zoo / "sd1_clip_kl8_io.pt", weights_only=True)
    module = load_reference_checkpoint(zoo / "sd1_clip_kl8.ckpt", io["config"], text_encoder=str(zoo / io["tokenizer"]))
    assert_diffusers_pipeline_matches(module, export_diffusers(module, tmp_path / "sd1"), ["a red circle", "a blue square"])
