"""First stages: KL / VQ / identity autoencoders, their nets, quantiser, posterior, config checks,
reference-checkpoint compatibility and diffusers conversion."""
import math

import pytest
import torch

from ldm.convert.diffusers_vae import ddconfig_from_diffusers, diffusers_vae_config, from_diffusers, to_diffusers
from ldm.first_stage.distributions import DeterministicLatent, DiagonalGaussian
from ldm.first_stage.factory import autoencoder_kl
from ldm.first_stage.identity import IdentityFirstStage
from ldm.first_stage.kl import AutoencoderKL
from ldm.first_stage.validate import first_stage_ddconfig, validate_first_stage
from ldm.first_stage.vq import AutoencoderVQ
from ldm.nets.quantize import VectorQuantizer
from ldm.utils.checkpoint import (CheckpointMismatchError, load_state_dict_file, load_strict, save_safetensors,
                                  sub_state_dict)

ALL_F = (1, 2, 4, 8, 16, 32)
REFERENCE_MODELS = ("txt_crossattn_f4", "uncond_selfattn_f4")


def tiny_ddconfig(**overrides):
    cfg = dict(double_z=True, z_channels=4, resolution=16, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
               num_res_blocks=1, attn_resolutions=[], dropout=0.0)
    cfg.update(overrides)
    return cfg


def reference_first_stage(reference_dir, name):
    """Our AutoencoderKL built from the reference config, with the reference weights loaded."""
    io = torch.load(reference_dir / f"{name}_io.pt", weights_only=True)
    params = dict(io["config"]["first_stage_config"]["params"])
    params.pop("lossconfig")  # the reference's training loss, not part of the network
    model = AutoencoderKL(**params).eval()
    weights = sub_state_dict(load_state_dict_file(reference_dir / f"{name}.ckpt"), "first_stage_model.")
    load_strict(model, weights, source=f"{name}.ckpt")
    return model, io["autoencoder"], weights


# --- shapes and layout ------------------------------------------------------------------------------

def image_side(f):
    """Smallest test image for f (the machine is slow): 16 px, or one latent pixel."""
    return max(16, f)


@pytest.mark.parametrize("f", ALL_F)
def test_kl_shapes_for_every_f(f):
    torch.manual_seed(0)
    side = image_side(f)
    ddconfig = first_stage_ddconfig(f, ch=32, num_res_blocks=1, resolution=side)
    model = AutoencoderKL(ddconfig, embed_dim=ddconfig["z_channels"]).eval()
    assert model.downsampling_factor == f and len(ddconfig["ch_mult"]) == int(math.log2(f)) + 1
    x = torch.rand(2, 3, side, side) * 2 - 1
    with torch.no_grad():
        posterior = model.encode(x)
        z = posterior.sample()
        assert z.shape == (2, model.latent_channels, side // f, side // f)
        assert posterior.logvar.shape == z.shape
        assert model.decode(z).shape == x.shape
    # The decoder mirrors the encoder: up[i] sits at the resolution of down[i], with one extra block.
    for i, level in enumerate(model.decoder.up):
        assert len(level.block) == 2
        assert level.block[-1].conv2.out_channels == model.encoder.down[i].block[-1].conv2.out_channels
        assert hasattr(level, "upsample") == (i != 0)
        assert hasattr(model.encoder.down[i], "downsample") == (i != len(model.decoder.up) - 1)


@pytest.mark.parametrize("f", ALL_F)
def test_vq_shapes_for_every_f(f):
    torch.manual_seed(0)
    side = image_side(f)
    ddconfig = first_stage_ddconfig(f, ch=32, num_res_blocks=1, resolution=side, z_channels=3, double_z=False)
    model = AutoencoderVQ(ddconfig, n_embed=16, embed_dim=3).eval()
    x = torch.rand(2, 3, side, side) * 2 - 1
    with torch.no_grad():
        latent = model.encode(x)
        assert latent.sample().shape == (2, 3, side // f, side // f)
        assert model.decode(latent.sample()).shape == x.shape
        reconstruction, loss, info = model(x)
    assert model.downsampling_factor == f and model.latent_channels == 3
    assert reconstruction.shape == x.shape and loss.dim() == 0
    assert info.indices.shape == (2, side // f, side // f) and int(info.indices.max()) < 16
    assert 1.0 <= float(info.perplexity) <= 16.0 + 1e-4


def test_paper_ddconfig_per_f():
    assert first_stage_ddconfig(8)["ch_mult"] == [1, 2, 4, 4]
    assert first_stage_ddconfig(16)["ch_mult"] == [1, 1, 2, 2, 4] and first_stage_ddconfig(16)["z_channels"] == 16
    assert first_stage_ddconfig(32)["attn_resolutions"] == [16, 8]
    for f in ALL_F:
        cfg = first_stage_ddconfig(f)
        assert validate_first_stage(cfg, cfg["z_channels"], "kl", image_size=256) == f
    with pytest.raises(ValueError, match="f = 3"):
        first_stage_ddconfig(3)


def test_ch_mult_override_sets_the_widths_and_keeps_f():
    model = autoencoder_kl(4, ch=32, num_res_blocks=1, z_channels=4, attn_resolutions=[], resolution=32,
                           ch_mult=[1, 1, 2])
    assert model.downsampling_factor == 4 and model.encoder.conv_out.in_channels == 64
    assert model.encode(torch.randn(2, 3, 32, 32)).mean.shape == (2, 4, 8, 8)
    paper = autoencoder_kl(4, ch=32, num_res_blocks=1, z_channels=4, attn_resolutions=[], resolution=32)
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in paper.parameters()) / 2
    with pytest.raises(ValueError, match=r"ch_mult \[1, 2\] has 2 levels, f = 4 needs 3"):
        first_stage_ddconfig(4, ch_mult=[1, 2])


def test_decoder_last_layer_is_final_conv_and_gets_gradient():
    model = AutoencoderKL(tiny_ddconfig(), embed_dim=4)
    assert model.decoder.last_layer is model.decoder.conv_out.weight
    reconstruction, _ = model(torch.randn(1, 3, 16, 16))
    (grad,) = torch.autograd.grad(reconstruction.abs().mean(), model.decoder.last_layer)
    assert grad.shape == model.decoder.conv_out.weight.shape and grad.abs().sum() > 0


# --- the reference implementation's checkpoints and outputs -------------------------------------------

@pytest.mark.parametrize("name", REFERENCE_MODELS)
def test_reference_checkpoint_reproduces_reference_outputs(reference_dir, name):
    model, expected, _ = reference_first_stage(reference_dir, name)
    with torch.no_grad():
        posterior = model.encode(expected["image"])
        decoded = model.decode(posterior.mode())
    torch.testing.assert_close(posterior.mean, expected["posterior_mean"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(posterior.logvar, expected["posterior_logvar"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(decoded, expected["decoded_from_mean"], rtol=1e-5, atol=1e-6)


def test_strict_load_lists_the_offending_keys(reference_dir):
    # The self-attention model's weights (z = 3, attention at 16 px) into the other one's config.
    weights = sub_state_dict(load_state_dict_file(reference_dir / "uncond_selfattn_f4.ckpt"), "first_stage_model.")
    io = torch.load(reference_dir / "txt_crossattn_f4_io.pt", weights_only=True)
    params = dict(io["config"]["first_stage_config"]["params"])
    params.pop("lossconfig")
    model = AutoencoderKL(**params)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointMismatchError) as err:
        load_strict(model, weights, source="uncond_selfattn_f4.ckpt")
    assert "encoder.down.1.attn.0.q.weight" in err.value.unexpected
    assert "decoder.up.1.attn.1.proj_out.bias" in err.value.unexpected
    assert any(s.startswith("quant_conv.weight: checkpoint (6, 6, 1, 1) vs model (8, 8, 1, 1)") for s in err.value.shapes)
    assert err.value.missing == []
    assert "encoder.down.1.attn.0.q.weight" in str(err.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing was loaded


def test_safetensors_round_trip(reference_dir, tmp_path):
    model, expected, _ = reference_first_stage(reference_dir, "uncond_selfattn_f4")
    save_safetensors(model.state_dict(), tmp_path / "vae.safetensors")
    torch.manual_seed(123)
    fresh = AutoencoderKL(model.ddconfig, embed_dim=model.embed_dim).eval()
    load_strict(fresh, load_state_dict_file(tmp_path / "vae.safetensors"))
    with torch.no_grad():
        decoded = fresh.decode(fresh.encode(expected["image"]).mode())
    torch.testing.assert_close(decoded, expected["decoded_from_mean"], rtol=1e-5, atol=1e-6)


# --- diffusers ---------------------------------------------------------------------------------------

def test_diffusers_vae_converts_both_ways():
    diffusers = pytest.importorskip("diffusers")
    ddconfig = tiny_ddconfig(num_res_blocks=2)
    torch.manual_seed(0)
    theirs = diffusers.AutoencoderKL(**diffusers_vae_config(ddconfig, 4, scaling_factor=0.18215)).eval()
    with torch.no_grad():  # non-trivial norms and biases so that every mapped key matters
        for p in theirs.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert ddconfig_from_diffusers(theirs.config) == (ddconfig, 4)

    ours = AutoencoderKL(ddconfig, embed_dim=4).eval()
    load_strict(ours, from_diffusers(theirs.state_dict()), source="diffusers")
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    z = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        their_posterior, our_posterior = theirs.encode(x).latent_dist, ours.encode(x)
        torch.testing.assert_close(our_posterior.mean, their_posterior.mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(our_posterior.logvar, their_posterior.logvar, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.decode(z), theirs.decode(z).sample, rtol=1e-5, atol=1e-5)

    back = diffusers.AutoencoderKL(**diffusers_vae_config(ddconfig, 4, scaling_factor=0.18215))
    back.load_state_dict(to_diffusers(ours.state_dict()), strict=True)
    for key, value in theirs.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    round_trip = from_diffusers(to_diffusers(ours.state_dict()))
    assert round_trip.keys() == ours.state_dict().keys()
    assert all(torch.equal(round_trip[k], v) for k, v in ours.state_dict().items())


def test_diffusers_export_refuses_inexpressible_models():
    model = AutoencoderKL(tiny_ddconfig(attn_resolutions=[8]), embed_dim=4)
    with pytest.raises(ValueError, match="attn_resolutions"):
        to_diffusers(model.state_dict())
    with pytest.raises(ValueError, match="attn_resolutions"):
        diffusers_vae_config(model.ddconfig, 4, scaling_factor=1.0)


# --- posteriors ----------------------------------------------------------------------------------------

def test_diagonal_gaussian_matches_torch_distributions():
    torch.manual_seed(0)
    mean, logvar = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    posterior = DiagonalGaussian(torch.cat([mean, logvar], dim=1))
    q = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    prior = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    kl = torch.distributions.kl_divergence(q, prior).sum(dim=(1, 2, 3))
    torch.testing.assert_close(posterior.kl(), kl)
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(posterior.nll(x), -q.log_prob(x).sum(dim=(1, 2, 3)))
    sample = posterior.sample(torch.Generator().manual_seed(7))
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(sample, mean + (0.5 * logvar).exp() * eps)
    assert posterior.mode() is posterior.mean


def test_diagonal_gaussian_clamps_logvar():
    moments = torch.cat([torch.zeros(1, 2, 1, 1), torch.tensor([[[[50.0]], [[-50.0]]]])], dim=1)
    posterior = DiagonalGaussian(moments)
    assert posterior.logvar.flatten().tolist() == [20.0, -30.0]
    assert torch.isfinite(posterior.var).all() and float(posterior.std[0, 1]) == pytest.approx(math.exp(-15.0))
    with pytest.raises(ValueError, match="2C"):
        DiagonalGaussian(torch.zeros(1, 3, 2, 2))


def test_kl_forward_samples_or_takes_the_mean():
    torch.manual_seed(0)
    model = AutoencoderKL(tiny_ddconfig(), embed_dim=4).eval()
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        posterior = model.encode(x)
        from_mean, _ = model(x, sample_posterior=False)
        torch.testing.assert_close(from_mean, model.decode(posterior.mean))
        sampled, _ = model(x, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(sampled, model.decode(posterior.sample(torch.Generator().manual_seed(3))))
    assert not torch.allclose(sampled, from_mean)


# --- VQ ----------------------------------------------------------------------------------------------

def hand_made_quantizer(**kwargs):
    vq = VectorQuantizer(n_embed=3, embed_dim=2, **kwargs)
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [-1.0, 2.0]]))
    return vq


# Three latent vectors (B=1, C=2, H=1, W=3): (0.1, 0.2) -> code 0, (0.9, 1.2) and (0.8, 0.7) -> code 1.
HAND_Z = torch.tensor([[[[0.1, 0.9, 0.8]], [[0.2, 1.2, 0.7]]]])
HAND_CODES = torch.tensor([[[[0.0, 1.0, 1.0]], [[0.0, 1.0, 1.0]]]])
HAND_MSE = (0.05 + 0.05 + 0.13) / 6


@pytest.mark.parametrize("legacy", [False, True])
def test_vq_loss_and_gradients_follow_the_formula(legacy):
    vq = hand_made_quantizer(beta=0.25, legacy=legacy)
    z = HAND_Z.clone().requires_grad_(True)
    z_q, loss, info = vq(z)
    torch.testing.assert_close(z_q, HAND_CODES)
    assert info.indices.tolist() == [[[0, 1, 1]]]
    assert loss.item() == pytest.approx(1.25 * HAND_MSE)  # both terms have the same value
    p = torch.tensor([1 / 3, 2 / 3])
    assert float(info.perplexity) == pytest.approx(math.exp(-(p * p.log()).sum().item()), rel=1e-5)
    assert float(info.usage) == pytest.approx(2 / 3)

    loss.backward()
    diff = (HAND_Z - HAND_CODES) * 2 / 6  # d mean((a - b)^2) / da
    commit_w, codebook_w = (1.0, 0.25) if legacy else (0.25, 1.0)
    torch.testing.assert_close(z.grad, commit_w * diff)
    per_code = -diff[0].reshape(2, 3).t()  # gradient on the code each vector picked
    expected = torch.stack([per_code[0], per_code[1] + per_code[2], torch.zeros(2)]) * codebook_w
    torch.testing.assert_close(vq.embedding.weight.grad, expected)


def test_vq_straight_through_passes_the_output_gradient_to_the_encoder():
    vq = hand_made_quantizer()
    z = HAND_Z.clone().requires_grad_(True)
    upstream = torch.randn_like(HAND_Z)
    z_q, _, _ = vq(z)
    (z_q * upstream).sum().backward()
    torch.testing.assert_close(z.grad, upstream)


def test_ema_codebook_moves_codes_towards_assigned_vectors():
    vq = hand_made_quantizer(ema_decay=0.5, eps=0.0)
    assert not vq.embedding.weight.requires_grad
    z = HAND_Z.clone().requires_grad_(True)
    _, loss, _ = vq.train()(z)
    assert loss.item() == pytest.approx(0.25 * HAND_MSE)  # commitment only
    # One update, decay 0.5, counts start at 1: code 1 got (0.9, 1.2) and (0.8, 0.7).
    code1 = (0.5 * torch.tensor([1.0, 1.0]) + 0.5 * torch.tensor([1.7, 1.9])) / (0.5 * 1 + 0.5 * 2)
    code0 = (0.5 * torch.tensor([0.0, 0.0]) + 0.5 * torch.tensor([0.1, 0.2])) / (0.5 * 1 + 0.5 * 1)
    expected = torch.stack([code0, code1, torch.tensor([-1.0, 2.0])])
    torch.testing.assert_close(vq.embedding.weight, expected)  # code 2, never picked, stays put
    for _ in range(30):
        vq(HAND_Z)
    torch.testing.assert_close(vq.embedding.weight[1], torch.tensor([0.85, 0.95]), atol=1e-4, rtol=0)
    torch.testing.assert_close(vq.embedding.weight[0], torch.tensor([0.1, 0.2]), atol=1e-4, rtol=0)
    frozen = vq.embedding.weight.clone()
    vq.eval()(HAND_Z + 0.3)
    assert torch.equal(vq.embedding.weight, frozen)  # no updates outside training


def test_quantizer_rejects_bad_settings():
    with pytest.raises(ValueError, match="legacy"):
        VectorQuantizer(4, 2, legacy=True, ema_decay=0.99)
    with pytest.raises(ValueError, match="ema_decay"):
        VectorQuantizer(4, 2, ema_decay=1.5)
    with pytest.raises(ValueError, match=r"\(B, 2, H, W\)"):
        VectorQuantizer(4, 2)(torch.zeros(1, 3, 2, 2))


def test_vq_encode_is_pre_quantisation_and_decode_quantises():
    torch.manual_seed(0)
    model = AutoencoderVQ(tiny_ddconfig(double_z=False), n_embed=8, embed_dim=4).eval()
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        latent = model.encode(x)
        assert isinstance(latent, DeterministicLatent)
        torch.testing.assert_close(latent.sample(), model.quant_conv(model.encoder(x)))
        assert latent.sample(torch.Generator().manual_seed(0)) is latent.mode()
        indices = model.quantize(latent.mode())[2].indices
        codes = model.quantize.embedding(indices).permute(0, 3, 1, 2)
        torch.testing.assert_close(model.decode(latent.mode()), model.decoder(model.post_quant_conv(codes)))
        torch.testing.assert_close(model(x)[0], model.decode(latent.mode()))


# --- identity ------------------------------------------------------------------------------------------

def test_identity_first_stage_is_pixel_space():
    stage = IdentityFirstStage(in_channels=3)
    x = torch.rand(2, 3, 8, 8)
    assert stage.encode(x).sample(torch.Generator()) is x and stage.encode(x).mode() is x
    assert stage.decode(x) is x
    assert stage.downsampling_factor == 1 and stage.latent_channels == 3
    with pytest.raises(ValueError, match="in_channels"):
        stage.encode(torch.rand(2, 4, 8, 8))


# --- config validation -----------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, embed_dim, image_size, names", [
    (dict(ch_mult=[1, 1, 1, 1, 1, 1, 1]), 4, None, "ddconfig.ch_mult"),  # f = 64
    (dict(ch=8), 4, None, "ddconfig.ch"),  # GroupNorm(32) cannot split 8 channels
    (dict(resolution=15), 4, None, "ddconfig.resolution"),
    (dict(), 4, 33, "image_size"),
    (dict(attn_resolutions=[12]), 4, None, "ddconfig.attn_resolutions"),
    (dict(double_z=False), 4, None, "ddconfig.double_z"),
    (dict(), 3, None, "embed_dim"),
    (dict(ch_mul=[1, 2]), 4, None, "unknown keys \\['ch_mul'\\]"),
])
def test_config_validation_names_the_keys_to_change(overrides, embed_dim, image_size, names):
    ddconfig = tiny_ddconfig(**overrides)
    with pytest.raises(ValueError, match=names):
        validate_first_stage(ddconfig, embed_dim, "kl", image_size=image_size)


def test_models_validate_their_config_when_built():
    with pytest.raises(ValueError, match="double_z"):
        AutoencoderVQ(tiny_ddconfig(), n_embed=8, embed_dim=4)
    with pytest.raises(ValueError, match="embed_dim"):
        AutoencoderKL(tiny_ddconfig(), embed_dim=3)
    with pytest.raises(ValueError, match="not both"):
        AutoencoderKL(tiny_ddconfig(), embed_dim=4, ch=64)
    model = AutoencoderKL(embed_dim=4, **tiny_ddconfig())  # keywords instead of a dict
    assert model.downsampling_factor == 2 and model.latent_channels == 4
