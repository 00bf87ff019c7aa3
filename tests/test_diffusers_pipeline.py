"""A diffusers pipeline folder converts into our checkpoint with the same numerics, and samples."""
from __future__ import annotations

import json

import pytest
import torch

from helpers import compose, make_tiny_clip
from ldm.convert.diffusers_pipeline import convert
from ldm.convert.diffusers_unet import diffusers_config_from_unet_kwargs
from ldm.convert.diffusers_vae import diffusers_vae_config
from ldm.modules.loading import load_module

diffusers = pytest.importorskip("diffusers")
UNET = dict(in_channels=4, out_channels=4, model_channels=32, channel_mult=[1, 2], num_res_blocks=1,
            attention_resolutions=[1, 2], num_heads=2, use_spatial_transformer=True, context_dim=32)
DDCONFIG = dict(double_z=True, z_channels=4, resolution=16, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
                num_res_blocks=1, attn_resolutions=[], dropout=0.0)


def _randomize(model):
    with torch.no_grad():
        for p in model.parameters():  # zero-initialised output convs would hide mapping errors
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipe")
    torch.manual_seed(0)
    make_tiny_clip(folder / "text_encoder")
    make_tiny_clip(folder / "tokenizer")
    unet = _randomize(diffusers.UNet2DConditionModel(**diffusers_config_from_unet_kwargs(UNET, sample_size=8)))
    unet.save_pretrained(folder / "unet")
    vae = _randomize(diffusers.AutoencoderKL(**diffusers_vae_config(DDCONFIG, 4, scaling_factor=0.18215)))
    vae.save_pretrained(folder / "vae")
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
         "num_train_timesteps": 1000, "prediction_type": "epsilon"}))
    return folder, unet, vae


def test_converted_pipeline_matches_diffusers(pipeline, tmp_path):
    from transformers import CLIPTextModel, CLIPTokenizer

    folder, unet, vae = pipeline
    model = load_module(convert(folder, tmp_path / "model.ckpt"))
    assert model.hparams.image_size == 16 and model.scale_factor == pytest.approx(0.18215)
    scheduler = diffusers.DDIMScheduler.from_pretrained(folder / "scheduler")
    torch.testing.assert_close(model.alphas_cumprod, scheduler.alphas_cumprod.float(), rtol=1e-5, atol=1e-7)

    ids = CLIPTokenizer.from_pretrained(folder / "tokenizer")(["red blue"], padding="max_length", max_length=77,
                                                              return_tensors="pt").input_ids
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        context = CLIPTextModel.from_pretrained(folder / "text_encoder")(ids).last_hidden_state
        ours_context = model.encode_condition(["red blue"])
        torch.testing.assert_close(ours_context, context)
        expected = unet(x, t, encoder_hidden_states=context).sample
        torch.testing.assert_close(model.model(x, t, {"crossattn": ours_context}), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.decode_latents(z), vae.decode(z / 0.18215).sample, rtol=1e-5, atol=1e-5)


def test_sample_py_takes_a_converted_pipeline(pipeline, tmp_path):
    from ldm.cli.sample import sample

    folder, _, _ = pipeline
    ckpt = convert(folder, tmp_path / "model.ckpt")
    out = tmp_path / "out"
    sample(compose("sample", [f"ckpt={ckpt}", "prompt=red", "n=2", "steps=3", "guidance=2.0", f"out_dir={out}"],
                   tmp_path / "s"))
    assert len(list((out / "samples").glob("*.png"))) == 2
