"""LatentDiffusion wiring that the toy experiments do not cover: adm-style class vectors, hybrid
(concat + cross-attention) conditioning, the state-dict layout, EMA sampling, min-SNR loss weights
and the lr schedule option."""
from __future__ import annotations

import pytest
import torch

from ldm.diffusion.objective import training_target
from ldm.diffusion.schedule import q_sample
from ldm.first_stage.identity import IdentityFirstStage
from ldm.modules.latent_diffusion import LatentDiffusion
from ldm.nets.concat import LowResConcat
from ldm.nets.embedders import ClassEmbedder
from ldm.nets.unet import UNetModel

UNET = dict(model_channels=32, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[2], num_head_channels=32)


def _batch(n=2):
    return {"image": torch.rand(n, 3, 16, 16) * 2 - 1, "class_label": torch.tensor([1, 4][:n]),
            "lowres": torch.rand(n, 3, 4, 4) * 2 - 1}


def test_adm_class_ids_go_to_the_unet_label_embedding():
    unet = UNetModel(in_channels=3, out_channels=3, num_classes=11, **UNET)
    model = LatentDiffusion(unet, IdentityFirstStage(), conditioning_key="adm", cond_stage_key="class_label",
                            uncond_value=10, p_uncond=0.1, image_size=16, ema_decay=None)
    cond = model.condition(_batch(), (16, 16))
    assert set(cond) == {"y"} and cond["y"].tolist() == [1, 4]
    assert model.null_condition(_batch(), (16, 16))["y"].tolist() == [10, 10]
    for p in unet.parameters():  # the zero-initialised output convs would block the gradient at init
        torch.nn.init.normal_(p, std=0.05)
    loss, logs = model.diffusion_loss(torch.zeros(2, 3, 16, 16), cond)
    loss.backward()
    assert unet.label_emb.weight.grad[[1, 4]].abs().sum() > 0
    labels = {"class_label": torch.tensor([2, 3])}
    out = model.sample(labels, num_steps=2, guidance_scale=2.0, progress=False)
    assert out.shape == (2, 3, 16, 16)
    # a negative condition replaces the null one in the unconditional branch
    same = model.sample(labels, num_steps=2, guidance_scale=2.0, progress=False, negative=torch.tensor([10, 10]))
    other = model.sample(labels, num_steps=2, guidance_scale=2.0, progress=False, negative=torch.tensor([7, 7]))
    assert torch.equal(out, same) and not torch.allclose(out, other)


def test_hybrid_concat_and_crossattn():
    unet = UNetModel(in_channels=6, out_channels=3, use_spatial_transformer=True, context_dim=8, **UNET)
    model = LatentDiffusion(unet, IdentityFirstStage(), ClassEmbedder(8, 5, null_class=True),
                            conditioning_key="hybrid", cond_stage_key="class_label", concat_stage=LowResConcat(),
                            uncond_value=5, image_size=16)
    batch = _batch()
    cond = model.condition(batch, (16, 16))
    assert cond["concat"].shape == (2, 3, 16, 16) and cond["crossattn"].shape == (2, 1, 8)
    null = model.null_condition(batch, (16, 16))
    assert torch.equal(null["concat"], cond["concat"])  # guidance keeps the image to super-resolve
    assert not torch.equal(null["crossattn"], cond["crossattn"])
    assert model.sample(_batch(), num_steps=2, guidance_scale=1.5, progress=False).shape == (2, 3, 16, 16)


def test_crossattn_pooled_feeds_the_context_and_its_mean_to_the_unet():
    """crossattn_pooled: the encoder's sequence goes to cross-attention and its mean over positions
    to the vector embedding (adm_in_channels), so both paths carry the condition and get gradients."""
    unet = UNetModel(in_channels=3, out_channels=3, use_spatial_transformer=True, context_dim=8,
                     adm_in_channels=8, **UNET)
    model = LatentDiffusion(unet, IdentityFirstStage(), ClassEmbedder(8, 5, null_class=True),
                            conditioning_key="crossattn_pooled", cond_stage_key="class_label", uncond_value=5,
                            p_uncond=0.1, image_size=16, ema_decay=None)
    cond = model.condition(_batch(), (16, 16))
    assert set(cond) == {"crossattn", "y"} and cond["y"].shape == (2, 8)
    assert torch.equal(cond["y"], cond["crossattn"].mean(dim=1))
    null = model.null_condition(_batch(), (16, 16))
    assert torch.equal(null["y"], model.cond_stage_model(torch.tensor([5, 5])).mean(dim=1))
    for p in unet.parameters():  # the zero-initialised output convs would block the gradient at init
        torch.nn.init.normal_(p, std=0.05)
    loss, _ = model.diffusion_loss(torch.zeros(2, 3, 16, 16), cond)
    loss.backward()
    assert unet.label_emb[0][0].weight.grad.abs().sum() > 0
    assert model.cond_stage_model.embedding.weight.grad[[1, 4]].abs().sum() > 0
    with pytest.raises(ValueError, match=r"\['crossattn', 'y'\]"):
        model.model(torch.zeros(2, 3, 16, 16), torch.tensor([1, 2]), {"crossattn": cond["crossattn"]})
    assert model.sample(_batch(), num_steps=2, guidance_scale=1.5, progress=False).shape == (2, 3, 16, 16)


def test_state_dict_is_the_reference_layout_and_sampling_uses_ema():
    model = LatentDiffusion(UNetModel(in_channels=3, out_channels=3, **UNET), IdentityFirstStage(),
                            scale_by_std=True, ema_decay=0.5, image_size=16)
    prefixes = {k.split(".")[0] for k in model.state_dict()}
    assert prefixes == {"model", "model_ema", "scale_factor", "betas", "alphas_cumprod", "alphas_cumprod_prev",
                        "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
                        "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
                        "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2"}
    assert "model_ema.diffusion_modelinput_blocks00weight" in model.state_dict()
    with torch.no_grad():
        for p in model.model.parameters():
            p.add_(0.1)  # live weights now differ from the EMA shadows
    live = model.sample(n=1, num_steps=2, use_ema=False, progress=False)
    ema = model.sample(n=1, num_steps=2, use_ema=True, progress=False)
    assert not torch.allclose(live, ema)
    assert torch.equal(model.sample(n=1, num_steps=2, use_ema=False, progress=False), live)  # weights restored


def test_config_errors_are_clear():
    unet = UNetModel(in_channels=3, out_channels=3, **UNET)
    with pytest.raises(ValueError, match="needs a cond_stage"):
        LatentDiffusion(unet, IdentityFirstStage(), conditioning_key="crossattn")
    with pytest.raises(ValueError, match="uncond_value"):
        LatentDiffusion(unet, IdentityFirstStage(), conditioning_key="adm", cond_stage_key="class_label", p_uncond=0.1)
    from ldm.first_stage.factory import autoencoder_kl

    model = LatentDiffusion(UNetModel(in_channels=4, out_channels=4, **UNET),
                            autoencoder_kl(4, ch=32, num_res_blocks=1, z_channels=4, resolution=32))
    with pytest.raises(ValueError, match="not divisible"):
        model.latent_shape(30)


@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
def test_min_snr_gamma_weights_each_sample_of_the_loss(parameterization):
    torch.manual_seed(0)
    model = LatentDiffusion(UNetModel(in_channels=3, out_channels=3, **UNET), IdentityFirstStage(),
                            parameterization=parameterization, image_size=16, ema_decay=None)
    z, noise = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)
    t = torch.tensor([0, 200, 600, 999])
    _, plain = model.diffusion_loss(z, None, t, noise)
    model.loss.min_snr_gamma = 5.0
    weighted_loss, weighted = model.diffusion_loss(z, None, t, noise)
    assert torch.equal(weighted["loss_simple"], plain["loss_simple"])  # the logged unweighted loss is unchanged
    # Recompute per sample: min(SNR, 5) in x0 terms, converted to the parameterisation's error.
    out = model.model(q_sample(model.schedule, z, t, noise), t, None)
    target = training_target(parameterization, model.schedule, z, noise, t)
    per_sample = ((out - target) ** 2).mean(dim=(1, 2, 3))
    snr = model.schedule.alphas_cumprod[t].float() / (1 - model.schedule.alphas_cumprod[t].float())
    to_x0 = {"eps": snr, "x0": torch.ones_like(snr), "v": snr + 1}[parameterization]
    expected = (per_sample * snr.clamp(max=5.0) / to_x0).mean()
    assert weighted_loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert weighted_loss.item() != pytest.approx(plain["loss"].item(), rel=1e-2)


def test_lr_schedule_and_min_snr_gamma_are_checked_when_the_module_is_built():
    unet = UNetModel(in_channels=3, out_channels=3, **UNET)
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        LatentDiffusion(unet, IdentityFirstStage(), lr_schedule="step")
    with pytest.raises(ValueError, match="min_snr_gamma must be positive"):
        LatentDiffusion(unet, IdentityFirstStage(), min_snr_gamma=0)


def test_timestep_focus_sets_the_training_timesteps():
    """model.timestep_focus reaches diffusion_loss: with share 1 every training timestep lies in
    the band, and a band outside the schedule is refused when the module is built."""
    unet = UNetModel(in_channels=3, out_channels=3, **UNET)
    model = LatentDiffusion(unet, IdentityFirstStage(), image_size=16, ema_decay=None,
                            timestep_focus={"low": 990, "high": 1000, "share": 1.0})
    seen = []
    model.model.register_forward_hook(lambda _m, args, _out: seen.append(args[1].clone()))
    model.diffusion_loss(torch.randn(64, 3, 16, 16), None)
    assert seen[0].numel() == 64 and int(seen[0].min()) >= 990
    with pytest.raises(ValueError, match="high <= 1000"):
        LatentDiffusion(unet, IdentityFirstStage(), timestep_focus={"low": 500, "high": 2000})


def test_img2img_strength_zero_is_the_input_and_one_is_sampling_from_noise():
    unet = UNetModel(in_channels=3, out_channels=3, num_classes=5, **UNET)
    for p in unet.parameters():  # a non-trivial denoiser: the output convs start at zero
        torch.nn.init.normal_(p, std=0.05)
    model = LatentDiffusion(unet, IdentityFirstStage(), conditioning_key="adm", cond_stage_key="class_label",
                            uncond_value=4, image_size=16, ema_decay=None, scale_factor=0.5, scale_by_std=False)
    init = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    labels = {"class_label": torch.tensor([1, 2])}
    kw = dict(num_steps=10, guidance_scale=2.0, seeds=[3, 8], progress=False)
    torch.testing.assert_close(model.sample(labels, init=init, strength=0.0, **kw),
                               model.decode_latents(model.encode_images(init, sample=False)))
    assert torch.equal(model.sample(labels, init=init, strength=1.0, **kw), model.sample(labels, **kw))
    half = model.sample(labels, init=init, strength=0.5, **kw)
    assert torch.isfinite(half).all() and not torch.allclose(half, model.sample(labels, **kw))
    # the noise of an image comes from its seed: one image alone comes out the same
    one = model.sample({"class_label": torch.tensor([2])}, init=init[1:], strength=0.5,
                       **{**kw, "seeds": [8]})
    torch.testing.assert_close(one, half[1:], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="strength must lie in"):
        model.sample(labels, init=init, strength=1.5, **kw)
    with pytest.raises(ValueError, match="px, expected 32"):
        model.sample(labels, init=init, image_size=32, **kw)
    with pytest.raises(ValueError, match="either init"):
        model.sample(labels, init=init, x_T=torch.zeros(2, 3, 16, 16), **kw)
