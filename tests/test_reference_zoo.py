"""Every condition type of the released LDM model zoo loads strictly into our modules and
reproduces the reference implementation's outputs (tests/fixtures/ldm-reference-zoo/README.md):
the paper's BERT text model, SD-1's CLIP text encoder, super-resolution, semantic synthesis and
inpainting, each with its first stage (KL f = 8 / 4, VQ f = 4)."""
from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from helpers import FIXTURES, compose
from ldm.convert.reference import (export_reference_checkpoint, load_reference_checkpoint,
                                   module_from_reference_config, reference_conditioning_key)
from ldm.nets.concat import paste_known
from ldm.nets.embedders import BertCaptionTokenizer, SpatialRescaler
from ldm.utils.checkpoint import CheckpointMismatchError, load_state_dict_file

ZOO = FIXTURES / "ldm-reference-zoo"
MODELS = ["text_bert_kl8", "sd1_clip_kl8", "sr_identity_vq4", "semantic_rescaler_kl4", "inpaint_vq4"]


def _io(name: str) -> dict:
    return torch.load(ZOO / f"{name}_io.pt", weights_only=True)


def _text_encoder(io: dict) -> str | None:
    """The fixture folder standing in for the hub model the YAML implies (bert-base-uncased, openai/clip-...)."""
    return str(ZOO / io["tokenizer"]) if io["tokenizer"] else None


@functools.lru_cache(maxsize=None)
def _loaded(name: str):
    io = _io(name)
    return load_reference_checkpoint(ZOO / f"{name}.ckpt", io["config"], text_encoder=_text_encoder(io)), io


def _batch(io: dict) -> dict:
    """Our batch for the fixture's condition inputs (our keys; inpainting mask: 1 = keep)."""
    c = io["condition"]
    return {"text": lambda: {"caption": c["prompts"]}, "sr": lambda: {"lowres": c["LR_image"]},
            "semantic": lambda: {"segmentation": c["segmentation"]},
            "inpaint": lambda: {"masked_image": c["masked_image"], "mask": 1 - c["mask_01"]}}[io["kind"]]()


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5) -> None:
    err = float((a - b).abs().max() / b.abs().max().clamp(min=1e-6))
    assert err < rtol, err


@pytest.mark.parametrize("name", MODELS)
def test_zoo_checkpoint_reproduces_condition_unet_and_first_stage(name):
    module, io = _loaded(name)
    u, a, c = io["unet"], io["autoencoder"], io["condition"]
    assert (module.model_ema is None) == (name == "sd1_clip_kl8")  # SD-1: use_ema False
    with torch.no_grad():
        cond = module.condition(_batch(io), tuple(u["x"].shape[-2:]))
        if io["kind"] == "text":
            _close(cond["crossattn"], c["context"])
            _close(module.encode_condition([""] * len(c["prompts"])), c["null_context"])
        else:
            _close(cond["concat"], c["concat"])
        _close(module.model(u["x"], u["t"], cond), u["out"])
        _close(module.decode_latents(a["latent"]), a["decoded"])  # VQ: quantised inside decode
        if "vq" in name:  # the latent the LDM diffuses is the pre-quantisation encoder output
            _close(module.encode_images(a["image"], sample=False), a["latent"])


@pytest.mark.parametrize("sampler", ["ddim", "plms"])
@pytest.mark.parametrize("name", MODELS)
def test_zoo_sampling_is_reproduced(name, sampler):
    module, io = _loaded(name)
    s = io[sampler]
    latent = module.sample(_batch(io), n=len(s["x_T"]), name=sampler, num_steps=s["steps"],
                           guidance_scale=io["guidance_scale"], x_T=s["x_T"], compat=True, progress=False,
                           return_latents=True, **({"eta": s["eta"]} if sampler == "ddim" else {}))
    _close(latent, s["latent"], rtol=2e-5)
    image = module.decode_latents(latent)
    _close(image, s["image"], rtol=2e-5)
    if "inpainted" in s:  # scripts/inpaint.py's composite in [0, 1]
        c = io["condition"]
        _close((paste_known(c["image"], image.clamp(-1, 1), 1 - c["mask_01"]) + 1) / 2, s["inpainted"], rtol=2e-5)


def test_bert_text_model_has_the_reference_layout_and_refuses_a_wrong_yaml(tmp_path, monkeypatch):
    module, io = _loaded("text_bert_kl8")
    enc = module.cond_stage_model
    keys = set(enc.state_dict())
    assert {"transformer.token_emb.weight", "transformer.pos_emb.emb.weight", "transformer.to_logits.weight",
            "transformer.attn_layers.layers.0.1.to_q.weight", "transformer.attn_layers.layers.1.1.net.0.0.weight",
            "transformer.norm.weight"} <= keys
    assert enc.transformer.attn_layers.layers[0][1].to_q.weight.shape == (8 * 64, 32)  # 8 heads of 64 at width 32
    assert module.hparams.cond_stage_key == "caption" and module.hparams.uncond_value == ""
    # the reference attends to padding: changing a padding position's embedding changes the caption's tokens
    ids, mask = enc.tokenize(["a red circle"])
    change = torch.randn(32, generator=torch.Generator().manual_seed(0))  # not constant: LayerNorm removes that
    last = enc.transformer.pos_emb.emb.weight[-1]
    kept = last.clone()
    with torch.no_grad():
        before = enc.encode(ids, mask)
        last += change
        after = enc.encode(ids, mask)
        last.copy_(kept)  # the cached module is shared with the other tests
    assert (after[0, 0] - before[0, 0]).abs().max() > 1e-4

    config = dict(io["config"])
    config["cond_stage_config"] = {**config["cond_stage_config"],
                                   "params": {**config["cond_stage_config"]["params"], "n_layer": 1}}
    with pytest.raises(CheckpointMismatchError) as err:
        load_reference_checkpoint(ZOO / "text_bert_kl8.ckpt", config, text_encoder=_text_encoder(io))
    assert "cond_stage_model.transformer.attn_layers.layers.2.1.to_q.weight" in err.value.unexpected
    # offline, without the tokenizer folder: refused with what to do (not an empty tokenizer)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match=r"'bert-base-uncased' \(HF_HUB_OFFLINE is set.*save_pretrained"):
        module_from_reference_config(io["config"])
    with pytest.raises(OSError, match="save_pretrained"):
        BertCaptionTokenizer(tmp_path / "no-tokenizer-here")
    layout = {**config["cond_stage_config"], "params": {"n_embed": 32, "n_layer": 2, "use_tokenizer": False}}
    with pytest.raises(ValueError, match="layout-to-image"):
        module_from_reference_config({**io["config"], "cond_stage_config": layout})


def test_sd1_text_model_keys_are_mapped_explicitly(tmp_path, monkeypatch):
    io = _io("sd1_clip_kl8")
    state = load_state_dict_file(ZOO / "sd1_clip_kl8.ckpt")
    assert "cond_stage_model.transformer.text_model.embeddings.position_ids" in state  # transformers 4 layout
    module, _ = _loaded("sd1_clip_kl8")
    assert module.hparams.cond_stage_key == "caption"  # the YAML's `txt`: our captions key
    assert not any("text_model" in k for k in module.state_dict())  # transformers 5 names

    def refused(changed: dict, error=CheckpointMismatchError, match=None):
        path = tmp_path / "changed.ckpt"
        torch.save({"state_dict": changed}, path)
        with pytest.raises(error, match=match) as err:
            load_reference_checkpoint(path, io["config"], text_encoder=_text_encoder(io))
        return err.value

    extra = {**state, "cond_stage_model.transformer.text_model.pooler.weight": torch.zeros(1)}
    assert refused(extra).unexpected == ["cond_stage_model.transformer.pooler.weight"]
    missing = {k: v for k, v in state.items() if not k.endswith("final_layer_norm.bias")}
    assert refused(missing).missing == ["cond_stage_model.transformer.final_layer_norm.bias"]
    ids = "cond_stage_model.transformer.text_model.embeddings.position_ids"
    damaged = {**state, ids: state[ids].float() * 0.999}
    refused(damaged, ValueError, "position_ids is not 0 .. 76")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="openai/clip-vit-large-patch14.*HF_HUB_OFFLINE"):
        module_from_reference_config(io["config"])  # the YAML's hub default, offline
    with pytest.raises(ValueError, match="has no text encoder"):
        module_from_reference_config(_io("sr_identity_vq4")["config"], text_encoder=_text_encoder(io))


def test_inpainting_first_stage_is_saved_twice_and_round_trips(tmp_path):
    module, io = _loaded("inpaint_vq4")
    assert module.cond_stage_model is module.first_stage_model
    original = load_state_dict_file(ZOO / "inpaint_vq4.ckpt")
    exported = load_state_dict_file(export_reference_checkpoint(module, tmp_path / "out.ckpt"))
    assert exported.keys() == original.keys()
    assert all(torch.equal(exported[k], original[k]) for k in original)
    assert sum(k.startswith("cond_stage_model.") for k in exported) == sum(k.startswith("first_stage_model.")
                                                                          for k in exported)
    changed = dict(original)
    changed["cond_stage_model.quant_conv.bias"] = changed["cond_stage_model.quant_conv.bias"] + 1
    torch.save({"state_dict": changed}, tmp_path / "changed.ckpt")
    with pytest.raises(ValueError, match="tensors differ between the copies"):
        load_reference_checkpoint(tmp_path / "changed.ckpt", io["config"])


def test_conditioning_key_as_the_reference_derives_it():
    assert reference_conditioning_key({"cond_stage_config": {"target": "torch.nn.Identity"}}) == "concat"
    assert reference_conditioning_key({"cond_stage_config": "__is_first_stage__", "concat_mode": True}) == "concat"
    assert reference_conditioning_key({"cond_stage_config": {"target": "x.ClassEmbedder"}, "concat_mode": False}) \
        == "crossattn"
    assert reference_conditioning_key({"cond_stage_config": "__is_unconditional__", "conditioning_key": "concat"}) \
        is None
    io = _io("sr_identity_vq4")
    with pytest.raises(ValueError, match="unsupported reference condition encoder .*FrozenT5Embedder.*supported: "):
        module_from_reference_config({**io["config"], "cond_stage_config": {
            "target": "ldm.modules.encoders.modules.FrozenT5Embedder"}})
    with pytest.raises(ValueError, match="used with conditioning_key 'concat'"):
        module_from_reference_config({**io["config"], "conditioning_key": "crossattn"})


def test_spatial_rescaler_takes_ids_or_one_hot_maps():
    module, io = _loaded("semantic_rescaler_kl4")
    rescaler = module.cond_stage_model
    assert isinstance(rescaler, SpatialRescaler) and module.hparams.cond_stage_trainable
    c = io["condition"]
    with torch.no_grad():
        torch.testing.assert_close(rescaler(c["segmentation"]), rescaler(c["segmentation_onehot"]))
    with pytest.raises(ValueError, match=r"label ids must lie in \[0, 5\), got 0..7"):
        rescaler(torch.tensor([[[0, 7]]]))
    with pytest.raises(ValueError, match="class ids"):
        rescaler(torch.zeros(1, 4, 4))  # a float map without its class channels


def test_released_inpainting_first_stage_without_attention():
    """inpainting_big's first stage (vq-f4-noattn) has ddconfig attn_type: none: no self-attention
    anywhere, so no attention keys; the reference's 'linear' attention is refused."""
    node = _io("inpaint_vq4")["config"]["first_stage_config"]
    ddconfig = {**node["params"]["ddconfig"], "attn_type": "none"}
    from ldm.convert.reference import build_first_stage

    plain = build_first_stage(node)
    no_attn = build_first_stage({**node, "params": {**node["params"], "ddconfig": ddconfig}})
    dropped = set(plain.state_dict()) - set(no_attn.state_dict())
    assert dropped and all(".attn_1." in k for k in dropped) and set(no_attn.state_dict()) < set(plain.state_dict())
    assert no_attn.decode(no_attn.encode(torch.zeros(1, 3, 32, 32)).mode()).shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match="attn_type must be one of"):
        build_first_stage({**node, "params": {**node["params"], "ddconfig": {**ddconfig, "attn_type": "linear"}}})


def test_concat_model_needs_exactly_one_source_of_its_channels():
    module, io = _loaded("semantic_rescaler_kl4")
    parts = dict(unet=module.model.diffusion_model, first_stage=module.first_stage_model, conditioning_key="concat",
                 cond_stage_key="segmentation")
    from ldm.modules.latent_diffusion import LatentDiffusion
    from ldm.nets.concat import LowResConcat

    with pytest.raises(ValueError, match="give one of them"):
        LatentDiffusion(**parts)
    with pytest.raises(ValueError, match="give one of them"):
        LatentDiffusion(**parts, cond_stage=module.cond_stage_model, concat_stage=LowResConcat())
    # a label map at the wrong size for the latent grid is refused by name, not by a cat() error
    with pytest.raises(ValueError, match=r"the concat condition is \(4, 4\), the latent grid \(8, 8\)"):
        module.condition({"segmentation": torch.zeros(1, 16, 16, dtype=torch.long)}, (8, 8))


# ---------------------------------------------------------------------------- sample.py


def _yaml(tmp_path, name: str, **changes) -> str:
    params = {**_io(name)["config"], **changes}
    params = {k: v for k, v in params.items() if v is not None}
    path = tmp_path / f"{name}.yaml"
    OmegaConf.save({"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": params}}, path)
    return str(path)


def _sample_py(tmp_path, name: str, *args: str, yaml: str | None = None, text_encoder: bool = False):
    from ldm.cli.sample import sample

    out = tmp_path / "samples"
    overrides = [f"ckpt={ZOO / f'{name}.ckpt'}", f"reference_config={yaml or _yaml(tmp_path, name)}", "steps=2",
                 f"out_dir={out}", *args]
    if text_encoder:
        overrides.append(f"+reference_overrides.text_encoder={_text_encoder(_io(name))}")
    sample(compose("sample", overrides, tmp_path / "s"))
    return out, json.loads((out / "samples.json").read_text())


@pytest.mark.parametrize("name", ["text_bert_kl8", "sd1_clip_kl8"])
def test_sample_py_prompts_reach_a_released_text_model(tmp_path, name):
    out, record = _sample_py(tmp_path, name, "prompt=a red circle", "n=2", text_encoder=True)
    assert [r["prompt"] for r in record["images"]] == ["a red circle"] * 2
    assert record["settings"]["guidance"] == 3.0  # the default for a text model
    assert Image.open(out / "samples" / "00001.png").size == (32, 32)


def test_sample_py_super_resolves_with_a_released_sr_yaml(tmp_path):
    low = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(low).save(tmp_path / "low.png")
    # as the released bsr_sr YAML: no conditioning_key, concat_mode true
    yaml = _yaml(tmp_path, "sr_identity_vq4", conditioning_key=None, concat_mode=True)
    out, record = _sample_py(tmp_path, "sr_identity_vq4", f"lowres={tmp_path / 'low.png'}", "n=1", yaml=yaml)
    assert record["settings"]["guidance"] == 1.0 and record["settings"]["image_size"] == 32
    assert Image.open(out / "samples" / "00000.png").size == (32, 32)
    with pytest.raises(ValueError, match="changes nothing .* concat channels"):
        _sample_py(tmp_path, "sr_identity_vq4", f"lowres={tmp_path / 'low.png'}", "n=1", "guidance=3", yaml=yaml)
    with pytest.raises(ValueError, match="needs lowres="):
        _sample_py(tmp_path, "sr_identity_vq4", "n=1", yaml=yaml)


def test_sample_py_draws_from_a_label_map(tmp_path):
    labels = _io("semantic_rescaler_kl4")["condition"]["segmentation"][0].numpy().astype(np.uint8)
    Image.fromarray(labels).save(tmp_path / "seg.png")
    out, record = _sample_py(tmp_path, "semantic_rescaler_kl4", f"segmentation={tmp_path / 'seg.png'}", "n=1")
    assert record["settings"]["image_size"] == 32 and (out / "samples" / "00000.png").is_file()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(ValueError, match="one channel of class ids"):
        _sample_py(tmp_path, "semantic_rescaler_kl4", f"segmentation={tmp_path / 'rgb.png'}", "n=1")
    Image.fromarray(np.full((32, 32), 9, np.uint8)).save(tmp_path / "bad.png")
    with pytest.raises(ValueError, match=r"label ids must lie in \[0, 5\)"):
        _sample_py(tmp_path, "semantic_rescaler_kl4", f"segmentation={tmp_path / 'bad.png'}", "n=1")


def test_sample_py_inpaints_as_the_reference_script(tmp_path):
    image = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    fill = np.zeros((32, 32), np.uint8)
    fill[8:24, 8:24] = 255  # the reference's masks: white = the region to fill
    Image.fromarray(image).save(tmp_path / "image.png")
    Image.fromarray(fill).save(tmp_path / "mask.png")
    args = [f"init_image={tmp_path / 'image.png'}", f"mask={tmp_path / 'mask.png'}", "mask_white=fill", "n=1"]
    out, record = _sample_py(tmp_path, "inpaint_vq4", *args)
    result = np.asarray(Image.open(out / "samples" / "00000.png"))
    keep = fill == 0
    assert np.array_equal(result[keep], image[keep])  # the known pixels pasted back exactly
    assert np.abs(result[~keep].astype(int) - image[~keep]).mean() > 5  # the hole is generated
    Image.fromarray(fill[:16, :16]).save(tmp_path / "small.png")
    with pytest.raises(ValueError, match="draw the mask at the image's size"):
        _sample_py(tmp_path, "inpaint_vq4", *args[:1], f"mask={tmp_path / 'small.png'}", "n=1")
    with pytest.raises(ValueError, match="needs both init_image= and mask="):
        _sample_py(tmp_path, "inpaint_vq4", "n=1")


# ---------------------------------------------------------------------------- evaluate.py


def test_evaluate_py_takes_a_released_ldm_and_a_released_first_stage(tmp_path):
    from ldm.cli.evaluate import evaluate
    from ldm.data.sources import SyntheticSource
    from ldm.data.write import write_shards
    from ldm.utils.checkpoint import sub_state_dict

    real = tmp_path / "val"
    write_shards(SyntheticSource(4, 32, seed=0), real, per_shard=4, progress=False)

    def run(*args: str) -> dict:
        out = tmp_path / f"e{len(list(tmp_path.glob('e*')))}"
        cfg = compose("evaluate", ["features=toy", "num_workers=0", "batch_size=2", "kid_subset_size=2",
                                   f"real={real}", "metrics=[fid]", f"out_dir={out}", *args], out)
        return json.loads(evaluate(cfg).read_text())

    record = run(f"ckpt={ZOO / 'sr_identity_vq4.ckpt'}", f"reference_config={_yaml(tmp_path, 'sr_identity_vq4')}",
                 "n=2", "steps=2", "batch_transforms=[{_target_: ldm.data.degradations.SRDegradation, factor: 4}]")
    assert record["kind"] == "ldm" and record["run"]["conditioning"] == "concat" and record["n"] == 2
    assert {"fid", "psnr", "ssim"} <= set(record["metrics"]) and record["run"]["reference_config"]

    # a released first stage: its own model.ckpt and config.yaml (models/first_stage_models/<name>/)
    node = _io("sr_identity_vq4")["config"]["first_stage_config"]
    OmegaConf.save({"model": node}, tmp_path / "vq.yaml")
    weights = sub_state_dict(load_state_dict_file(ZOO / "sr_identity_vq4.ckpt"), "first_stage_model.")
    torch.save({"state_dict": {**weights, "loss.logvar": torch.zeros(())}}, tmp_path / "vq.ckpt")
    record = run(f"ckpt={tmp_path / 'vq.ckpt'}", f"reference_config={tmp_path / 'vq.yaml'}", "n=null")
    assert record["kind"] == "autoencoder" and record["n"] == 4 and record["run"]["first_stage"] == "vq"
    assert record["image_size"] == 32 and {"rfid", "psnr", "ssim"} <= set(record["metrics"])
