"""Original LDM checkpoints load strictly into our LatentDiffusion and reproduce the reference's
outputs: UNet, autoencoder, q_sample and the full DDIM / PLMS sampling with guidance."""
from __future__ import annotations

import pytest
import torch

from ldm.convert.reference import export_reference_checkpoint, load_reference_checkpoint
from ldm.diffusion.schedule import q_sample
from ldm.utils.checkpoint import CheckpointMismatchError, load_state_dict_file

MODELS = ["txt_crossattn_f4", "uncond_selfattn_f4"]


def _load(reference_dir, name):
    io = torch.load(reference_dir / f"{name}_io.pt", weights_only=True)
    uncond = 0 if io["config"].get("conditioning_key") else None
    module = load_reference_checkpoint(reference_dir / f"{name}.ckpt", io["config"], uncond_value=uncond)
    return module, io


def _close(a, b, rtol=1e-5):
    scale = b.abs().max().clamp(min=1e-6)
    assert (a - b).abs().max() / scale < rtol, float((a - b).abs().max() / scale)


@pytest.mark.parametrize("name", MODELS)
def test_reference_checkpoint_reproduces_unet_autoencoder_and_q_sample(reference_dir, name):
    module, io = _load(reference_dir, name)
    assert module.model_ema.num_updates.item() == io["ema"]["num_updates"]
    u = io["unet"]
    cond = None
    if "class_label" in u:
        context = module.encode_condition(u["class_label"])
        _close(context, u["context"])
        cond = {"crossattn": context}
    with torch.no_grad():
        _close(module.model(u["x"], u["t"], cond), u["out"])
        a = io["autoencoder"]
        posterior = module.first_stage_model.encode(a["image"])
        _close(posterior.mean, a["posterior_mean"])
        _close(module.encode_images(a["image"], sample=False), a["scaled_latent_of_mean"])
        _close(module.first_stage_model.decode(a["posterior_mean"]), a["decoded_from_mean"])
    q = io["q_sample"]
    _close(q_sample(module.schedule, q["x0"], q["t"], q["noise"]), q["xt"])
    if module.hparams.scale_by_std:
        assert module.scale_factor.item() == pytest.approx(0.7)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("sampler", ["ddim", "plms"])
def test_reference_sampling_is_reproduced_with_ema_weights(reference_dir, name, sampler):
    module, io = _load(reference_dir, name)
    s = io[sampler]
    batch = {"class_label": s["class_label"]} if s["class_label"] is not None else None
    n = s["x_T"].shape[0]
    latent = module.sample(batch, n=n, name=sampler, num_steps=s["steps"], guidance_scale=s["guidance_scale"],
                           x_T=s["x_T"], compat=True, progress=False, return_latents=True,
                           **({"eta": s["eta"]} if sampler == "ddim" else {}))
    _close(latent, s["latent"], rtol=2e-5)
    _close(module.decode_latents(latent), s["image"], rtol=2e-5)


def test_export_round_trip_and_strict_refusal(reference_dir, tmp_path):
    module, io = _load(reference_dir, "uncond_selfattn_f4")
    out = export_reference_checkpoint(module, tmp_path / "exported.ckpt")
    original = load_state_dict_file(reference_dir / "uncond_selfattn_f4.ckpt")
    exported = load_state_dict_file(out)
    assert exported.keys() == original.keys()
    assert all(torch.equal(exported[k], original[k]) for k in original)
    # a config that does not match the file is refused with the offending keys listed
    config = dict(io["config"])
    config["unet_config"] = {"params": {**io["config"]["unet_config"]["params"], "num_res_blocks": 1}}
    with pytest.raises(CheckpointMismatchError, match="unexpected") as err:
        load_reference_checkpoint(reference_dir / "uncond_selfattn_f4.ckpt", config)
    assert any("input_blocks" in k for k in err.value.unexpected)


def test_sample_py_takes_an_original_checkpoint_with_its_yaml(reference_dir, tmp_path):
    import json

    from omegaconf import OmegaConf

    from helpers import compose
    from ldm.cli.sample import sample

    io = torch.load(reference_dir / "txt_crossattn_f4_io.pt", weights_only=True)
    yaml_path = tmp_path / "txt_crossattn_f4.yaml"
    OmegaConf.save({"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": io["config"]}}, yaml_path)
    out = tmp_path / "samples"
    sample(compose("sample", [f"ckpt={reference_dir / 'txt_crossattn_f4.ckpt'}", f"reference_config={yaml_path}",
                              "+reference_overrides.uncond_value=0", "class_label=[1,7]", "n=2", "steps=3",
                              f"out_dir={out}"], tmp_path / "s"))
    record = json.loads((out / "samples.json").read_text())
    assert [r["class_label"] for r in record["images"]] == [1, 7]
    assert (out / "samples" / "00001.png").is_file()
