"""Stable Diffusion 2.x: a tiny SD-2-layout `.ckpt` whose text tower is made by open_clip itself
(as the reference FrozenOpenCLIPEmbedder builds it, random weights, no download) loads strictly
with a v2-inference-v-style YAML, gives open_clip's own penultimate-layer condition, samples with
v-prediction through sample.py and converts back unchanged."""
from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from helpers import assert_diffusers_pipeline_matches, compose
from ldm.convert import reference
from ldm.convert.reference import export_reference_checkpoint, load_reference, module_from_reference_config
from ldm.utils.checkpoint import CheckpointMismatchError, load_state_dict_file

open_clip = pytest.importorskip("open_clip")

ARCH = "ldm-test-tiny-text"  # registered with open_clip and with our tower table for these tests
TOWER = {"width": 64, "heads": 2, "layers": 3, "embed_dim": 32, "vocab_size": 49408, "context_length": 77}
PROMPTS = ["a photograph of an astronaut riding a horse", "Red, blue & GREEN!  don't", ""]


def v2_params(arch: str = ARCH) -> dict:
    """model.params of a v2-inference-v.yaml at tiny size (f = 2, 32 px)."""
    return {
        "parameterization": "v", "linear_start": 0.00085, "linear_end": 0.012, "num_timesteps_cond": 1,
        "log_every_t": 200, "timesteps": 1000, "first_stage_key": "jpg", "cond_stage_key": "txt", "image_size": 16,
        "channels": 4, "cond_stage_trainable": False, "conditioning_key": "crossattn",
        "monitor": "val/loss_simple_ema", "scale_factor": 0.18215, "use_ema": False,
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
            "use_checkpoint": True, "use_fp16": True, "image_size": 32, "in_channels": 4, "out_channels": 4,
            "model_channels": 32, "attention_resolutions": [2, 1], "num_res_blocks": 1, "channel_mult": [1, 2],
            "num_head_channels": 16, "use_spatial_transformer": True, "use_linear_in_transformer": True,
            "transformer_depth": 1, "context_dim": TOWER["width"], "legacy": False}},
        "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {
            "embed_dim": 4, "monitor": "val/rec_loss", "ddconfig": {
                "double_z": True, "z_channels": 4, "resolution": 32, "in_channels": 3, "out_ch": 3, "ch": 32,
                "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0},
            "lossconfig": {"target": "torch.nn.Identity"}}},
        "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
                              "params": {"arch": arch, "freeze": True, "layer": "penultimate"}},
    }


def make_openclip_tokenizer(folder) -> str:
    """open_clip's own BPE vocabulary (bpe_simple_vocab_16e6, shipped with open_clip) as a
    transformers CLIPTokenizer folder: the special tokens take transformers' names, same ids."""
    from transformers import CLIPTokenizer

    simple = open_clip.tokenizer.SimpleTokenizer()
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {names.get(token, token): i for token, i in simple.encoder.items()}
    merges = [pair for pair, _ in sorted(simple.bpe_ranks.items(), key=lambda item: item[1])]
    CLIPTokenizer(vocab=vocab, merges=merges).save_pretrained(folder)
    return str(folder)


def reference_condition(model, texts: list[str]) -> torch.Tensor:
    """FrozenOpenCLIPEmbedder.encode_with_transformer (REFERENCE.md section 12), layer penultimate:
    every resblock but the last, then ln_final (open_clip 3's blocks take batch-first input)."""
    tokens = open_clip.tokenize(texts)
    x = model.token_embedding(tokens) + model.positional_embedding
    for block in model.transformer.resblocks[:-1]:
        x = block(x, attn_mask=model.attn_mask)
    return model.ln_final(x)


def _randomize(module: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # zero-initialised output layers would hide layout errors
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    """(folder, open_clip text model, tokenizer folder): model.ckpt and v2-inference-v.yaml in folder."""
    folder = tmp_path_factory.mktemp("sd2")
    config = {"embed_dim": TOWER["embed_dim"], "text_cfg": {k: TOWER[k] for k in ("width", "heads", "layers",
                                                                                   "vocab_size", "context_length")},
              "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8}}
    (folder / "configs").mkdir()
    (folder / "configs" / f"{ARCH}.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder / "configs")
    torch.manual_seed(0)
    text = open_clip.create_model(ARCH, pretrained=None)  # what FrozenOpenCLIPEmbedder does, without weights
    del text.visual  # as FrozenOpenCLIPEmbedder does: SD-2 files hold the text tower only
    with torch.no_grad():
        text.text_projection.normal_()
        text.logit_scale.fill_(2.5)
    text.eval()
    tokenizer = make_openclip_tokenizer(folder / "tokenizer")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(reference.OPENCLIP_TEXT_TOWERS, ARCH, TOWER)
        module = module_from_reference_config(v2_params(), text_encoder=tokenizer)
    _randomize(module.model, 1)
    _randomize(module.first_stage_model, 2)
    state = {k: v for k, v in module.state_dict().items() if not k.startswith("cond_stage_model.")}
    state.update({f"cond_stage_model.model.{k}": v for k, v in text.state_dict().items()})
    torch.save({"state_dict": state, "global_step": 0}, folder / "model.ckpt")
    OmegaConf.save({"model": {"base_learning_rate": 1e-4, "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
                              "params": v2_params()}}, folder / "v2-inference-v.yaml")
    return folder, text, tokenizer


@pytest.fixture
def tiny_arch(monkeypatch):
    monkeypatch.setitem(reference.OPENCLIP_TEXT_TOWERS, ARCH, TOWER)


def _load(sd2):
    folder, _, tokenizer = sd2
    return load_reference(folder / "model.ckpt", folder / "v2-inference-v.yaml", text_encoder=tokenizer)


def test_sd2_condition_is_open_clips_penultimate_layer(sd2, tiny_arch):
    folder, text, _ = sd2
    module = _load(sd2)
    enc = module.cond_stage_model
    assert module.parameterization == "v" and module.model_ema is None and module.hparams.cond_stage_key == "caption"
    assert enc.transformer.config.hidden_act == "gelu" and enc.layer == "penultimate"
    # the UNet's spatial transformers project with Linear layers (use_linear_in_transformer)
    proj_in = module.model.diffusion_model.input_blocks[1][1].proj_in
    assert isinstance(proj_in, torch.nn.Linear) and proj_in.weight.shape == (32, 32)
    assert torch.equal(enc.tokenize(PROMPTS).cpu(), open_clip.tokenize(PROMPTS))  # pad id 0, end token, 77
    long = ["word " * 100]
    assert torch.equal(enc.tokenize(long), open_clip.tokenize(long))  # truncated, still ending with the end token
    with torch.no_grad():
        expected = reference_condition(text, PROMPTS)
        ours = module.encode_condition(PROMPTS)
        assert ours.shape == (3, 77, TOWER["width"])
        err = float((ours - expected).abs().max() / expected.abs().max())
        assert err < 1e-5, err
        # not the last layer's output: the penultimate choice matters
        last = text.ln_final(text.transformer(text.token_embedding(open_clip.tokenize(PROMPTS))
                                              + text.positional_embedding, attn_mask=text.attn_mask))
        assert (ours - last).abs().max() > 1e-2


def test_sd2_checkpoint_converts_back_unchanged(sd2, tiny_arch, tmp_path):
    folder, _, _ = sd2
    original = load_state_dict_file(folder / "model.ckpt")
    exported = load_state_dict_file(export_reference_checkpoint(_load(sd2), tmp_path / "back.ckpt"))
    assert exported.keys() == original.keys()
    assert all(torch.equal(exported[k], original[k]) for k in original)


def test_sd2_bad_inputs_are_refused(sd2, tiny_arch, tmp_path, monkeypatch):
    folder, text, tokenizer = sd2
    ckpt = folder / "model.ckpt"
    wide = {**TOWER, "width": 96, "heads": 3}
    monkeypatch.setitem(reference.OPENCLIP_TEXT_TOWERS, "wide", wide)
    with pytest.raises(CheckpointMismatchError) as err:
        reference.load_reference_checkpoint(ckpt, {**v2_params("wide"), "unet_config": {**v2_params()["unet_config"], "params": {
            **v2_params()["unet_config"]["params"], "context_dim": 96}}}, text_encoder=tokenizer)
    assert "cond_stage_model.transformer.embeddings.token_embedding.weight: checkpoint (49408, 64) vs model " \
           "(49408, 96)" in err.value.shapes
    deeper = {**TOWER, "layers": 4}
    monkeypatch.setitem(reference.OPENCLIP_TEXT_TOWERS, "deeper", deeper)
    with pytest.raises(CheckpointMismatchError) as err:
        reference.load_reference_checkpoint(ckpt, v2_params("deeper"), text_encoder=tokenizer)
    assert "cond_stage_model.transformer.encoder.layers.3.self_attn.q_proj.weight" in err.value.missing
    with pytest.raises(ValueError, match="arch 'ViT-B-32' is not known here; known: .*'ViT-H-14'"):
        module_from_reference_config(v2_params("ViT-B-32"), text_encoder=tokenizer)
    # a file that kept the visual tower: its keys are listed, not dropped
    state = load_state_dict_file(ckpt)
    torch.save({"state_dict": {**state, "cond_stage_model.model.visual.proj": torch.zeros(2)}}, tmp_path / "v.ckpt")
    with pytest.raises(CheckpointMismatchError) as err:
        reference.load_reference_checkpoint(tmp_path / "v.ckpt", v2_params(), text_encoder=tokenizer)
    assert err.value.unexpected == ["cond_stage_model.model.visual.proj"]
    # an SD-1 UNet (conv projections) against an SD-2 file
    conv = {**v2_params(), "unet_config": {**v2_params()["unet_config"], "params": {
        **v2_params()["unet_config"]["params"], "use_linear_in_transformer": False}}}
    with pytest.raises(CheckpointMismatchError, match=r"proj_in.weight: checkpoint \(32, 32\) vs model \(32, 32, 1, 1\)"):
        reference.load_reference_checkpoint(ckpt, conv, text_encoder=tokenizer)
    # SD 2.x's x4 upscaler (and the inpainting / depth models) are other classes: refused by name
    upscaler = tmp_path / "x4-upscaling.yaml"
    OmegaConf.save({"model": {"target": "ldm.models.diffusion.ddpm.LatentUpscaleDiffusion", "params": v2_params()}},
                   upscaler)
    with pytest.raises(ValueError, match="LatentUpscaleDiffusion: only the reference's LatentDiffusion loads"):
        load_reference(ckpt, upscaler, text_encoder=tokenizer)
    # offline without the tokenizer folder: what to pass
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match=r"laion/CLIP-ViT-H-14-laion2B-s32B-b79K.*HF_HUB_OFFLINE.*save_pretrained"):
        module_from_reference_config(v2_params())


def test_sample_py_draws_from_sd2_with_v_prediction(sd2, tiny_arch, tmp_path):
    from ldm.cli.sample import sample

    folder, _, tokenizer = sd2
    out = tmp_path / "samples"
    sample(compose("sample", [f"ckpt={folder / 'model.ckpt'}", f"reference_config={folder / 'v2-inference-v.yaml'}",
                              f"+reference_overrides.text_encoder={tokenizer}", "prompt=a red circle", "n=2", "steps=3",
                              "guidance=7.5", f"out_dir={out}"], tmp_path / "s"))
    record = json.loads((out / "samples.json").read_text())
    assert record["settings"]["guidance"] == 7.5 and record["settings"]["image_size"] == 32
    assert [r["prompt"] for r in record["images"]] == ["a red circle"] * 2
    assert len(list((out / "samples").glob("*.png"))) == 2


def test_sd2_exports_to_diffusers_and_samples_the_same(sd2, tiny_arch, tmp_path):
    """As diffusers' own SD-2 folders: a CLIPTextModel without the last block (its final LayerNorm
    output is the penultimate condition), pad token "!", a v_prediction DDIMScheduler."""
    pytest.importorskip("diffusers")
    from transformers import CLIPTextModel

    from ldm.convert.diffusers_pipeline import export_diffusers, load_diffusers_pipeline

    module = _load(sd2)
    folder = export_diffusers(module, tmp_path / "pipe")
    assert json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "v_prediction"
    text = CLIPTextModel.from_pretrained(folder / "text_encoder")
    assert text.config.num_hidden_layers == TOWER["layers"] - 1
    prompts = ["a photograph of an astronaut riding a horse", "red, blue & green"]  # no "!": see the encoder's doc
    assert_diffusers_pipeline_matches(module, folder, prompts, guidance=7.5)
    back = load_diffusers_pipeline(folder)  # and back: the same condition and weights, one block shorter
    with torch.no_grad():
        torch.testing.assert_close(back.encode_condition(prompts), module.encode_condition(prompts))
    ours = {k: v for k, v in module.state_dict().items() if not k.startswith("cond_stage_model.")}
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in ours.items())


def test_ldm_convert_makes_an_sd2_checkpoint_of_ours_that_sample_py_takes(sd2, tiny_arch, tmp_path):
    from ldm.cli.convert import main
    from ldm.cli.sample import sample
    from ldm.modules.loading import load_module

    folder, _, tokenizer = sd2
    out = tmp_path / "sd2-ours.ckpt"
    main([str(folder / "model.ckpt"), "--config", str(folder / "v2-inference-v.yaml"), "--tokenizer", tokenizer,
          "--to", "ours", "--out", str(out)])
    module = load_module(out)
    assert module.parameterization == "v"
    with torch.no_grad():
        torch.testing.assert_close(module.encode_condition(PROMPTS), _load(sd2).encode_condition(PROMPTS), rtol=0,
                                   atol=0)
    sample(compose("sample", [f"ckpt={out}", "prompt=a red circle", "n=1", "steps=2", f"out_dir={tmp_path / 's'}"],
                   tmp_path / "h"))
    assert (tmp_path / "s" / "samples" / "00000.png").is_file()
