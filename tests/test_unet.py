"""The LDM denoiser UNet: reference numerics, conditioning shapes, mixed precision, gradient
checkpointing, diffusers conversion and configuration errors."""
from __future__ import annotations

import pytest
import torch

from ldm.convert.diffusers_unet import (
    diffusers_config_from_unet_kwargs,
    diffusers_state_dict_to_unet,
    diffusers_unet2d_config,
    unet_kwargs_from_diffusers_config,
    unet_state_dict_to_diffusers,
    unet_state_dict_to_diffusers_unet2d,
)
from ldm.nets.attention import SelfAttentionBlock
from ldm.nets.timestep import timestep_embedding
from ldm.nets.unet import UNetModel, attention_head_count
from ldm.utils.checkpoint import load_state_dict_file, load_strict, sub_state_dict

TINY = dict(in_channels=4, out_channels=4, model_channels=32, num_res_blocks=1, channel_mult=[1, 2])
CROSS = dict(TINY, attention_resolutions=[1, 2], num_heads=2, use_spatial_transformer=True, context_dim=16)


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter (also the zero-initialised output convs) a random value, so that every
    path of the network contributes to its output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            is_norm = isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm))
            for name, p in module.named_parameters(recurse=False):
                centre = 1.0 if is_norm and name == "weight" else 0.0
                p.copy_(centre + 0.1 * torch.randn(p.shape, generator=gen))
    return model


def _inputs(batch: int = 2, channels: int = 4, size: int = 8, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, size, size, generator=gen), torch.tensor([3, 871])[:batch]


# --- timestep embedding ------------------------------------------------------------------------

def test_timestep_embedding_matches_reference(reference_dir):
    ref = torch.load(reference_dir / "tables.pt", weights_only=True)["timestep_embedding"]
    ours = timestep_embedding(ref["t"], ref["dim"])
    torch.testing.assert_close(ours, ref["embedding"].float(), rtol=1e-5, atol=1e-5)


def test_timestep_embedding_layout_and_odd_dim():
    t = torch.tensor([0.0, 2.5])
    emb = timestep_embedding(t, 7)
    half = 3
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(half) / half)
    torch.testing.assert_close(emb[:, :half], torch.cos(t[:, None] * freqs))
    torch.testing.assert_close(emb[:, half:2 * half], torch.sin(t[:, None] * freqs))
    assert torch.equal(emb[:, -1], torch.zeros(2))
    with pytest.raises(ValueError, match="1-D"):
        timestep_embedding(torch.zeros(2, 1), 8)


# --- the reference implementation's outputs ----------------------------------------------------

@pytest.mark.parametrize("name", ["txt_crossattn_f4", "uncond_selfattn_f4"])
def test_reference_checkpoint_reproduces_reference_output(reference_dir, name):
    io = torch.load(reference_dir / f"{name}_io.pt", weights_only=True)
    params = dict(io["config"]["unet_config"]["params"])
    params.pop("image_size")  # the reference stores it but does not use it
    model = UNetModel(**params).eval()
    weights = load_state_dict_file(reference_dir / f"{name}.ckpt")
    load_strict(model, sub_state_dict(weights, "model.diffusion_model."), name)
    data = io["unet"]
    with torch.no_grad():
        out = model(data["x"], data["t"], context=data.get("context"))
    ref = data["out"]
    scale = ref.abs().max().item()
    assert scale > 0.1  # a real output, not the zero of an untrained output conv
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * scale)


def test_self_attention_head_orders_are_channel_permutations_of_each_other():
    torch.manual_seed(0)
    channels, heads = 64, 4
    d = channels // heads
    legacy = randomize(SelfAttentionBlock(channels, heads))
    new = SelfAttentionBlock(channels, heads, use_new_attention_order=True)
    new.load_state_dict(legacy.state_dict())
    # legacy row (head h, part p, i) = h*3d + p*d + i; new-order row = p*C + h*d + i
    order = torch.tensor([h * 3 * d + p * d + i for p in range(3) for h in range(heads) for i in range(d)])
    with torch.no_grad():
        new.qkv.weight.copy_(legacy.qkv.weight[order])
        new.qkv.bias.copy_(legacy.qkv.bias[order])
    x = torch.randn(2, channels, 4, 4)
    torch.testing.assert_close(new(x), legacy(x), rtol=1e-5, atol=1e-5)
    new.load_state_dict(legacy.state_dict())
    assert not torch.allclose(new(x), legacy(x), atol=1e-3)  # the two orders really differ


# --- conditioning modes --------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, extra, out_channels", [
    (dict(TINY, attention_resolutions=[2], num_head_channels=16), {}, 4),
    (dict(TINY, attention_resolutions=[2], num_heads=4, num_classes=10),
     {"y": torch.tensor([0, 9])}, 4),
    (CROSS, {"context": torch.randn(2, 5, 16)}, 4),
    (dict(TINY, in_channels=7, out_channels=3, attention_resolutions=[], num_heads=1), {}, 3),
    (dict(TINY, attention_resolutions=[1], num_heads=2, adm_in_channels=6,
          use_scale_shift_norm=True, resblock_updown=True), {"y": torch.randn(2, 6)}, 4),
], ids=["unconditional", "class", "crossattn", "concat", "adm_vector"])
def test_output_shapes_per_conditioning(kwargs, extra, out_channels):
    model = randomize(UNetModel(**kwargs)).eval()
    x, t = _inputs(channels=kwargs["in_channels"], size=16)
    with torch.no_grad():
        out = model(x, t, **extra)
        assert out.shape == (2, out_channels, 16, 16)
        assert torch.isfinite(out).all()
        if extra:  # the condition reaches the output
            key, value = next(iter(extra.items()))
            other = value.flip(0) if key == "y" and value.ndim == 1 else torch.randn_like(value.float())
            assert not torch.allclose(model(x, t, **{key: other}), out)


def test_scalar_timestep_is_broadcast_over_the_batch():
    model = randomize(UNetModel(**CROSS)).eval()
    x, _ = _inputs()
    ctx = torch.randn(2, 3, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x, torch.tensor(17), ctx), model(x, torch.tensor([17, 17]), ctx))


@pytest.mark.parametrize("call, match", [
    (lambda m, x, t: m(x, t), "cross-attends"),
    (lambda m, x, t: m(x, t, torch.randn(2, 3, 8)), "cross-attends"),
    (lambda m, x, t: m(x, t, torch.randn(2, 3, 16), y=torch.tensor([1, 2])), "no class or vector"),
    (lambda m, x, t: m(x[..., :7, :7], t, torch.randn(2, 3, 16)), "multiples of 2"),
    (lambda m, x, t: m(x, t[:1], torch.randn(2, 3, 16)), "timesteps must have shape"),
])
def test_forward_refuses_inconsistent_inputs(call, match):
    model = UNetModel(**CROSS)
    x, t = _inputs()
    with pytest.raises(ValueError, match=match):
        call(model, x, t)


# --- precision and memory ------------------------------------------------------------------------

AUTOCAST_MODELS = {
    "crossattn_class": (dict(CROSS, num_classes=3), {"context": torch.randn(2, 3, 16), "y": torch.tensor([0, 2])}),
    "selfattn_updown": (dict(TINY, attention_resolutions=[1, 2], num_head_channels=16, use_scale_shift_norm=True,
                             resblock_updown=True), {}),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("kind", list(AUTOCAST_MODELS))
def test_autocast_forward_and_backward_close_to_fp32(kind, dtype):
    kwargs, cond = AUTOCAST_MODELS[kind]
    model = randomize(UNetModel(**kwargs))
    x, t = _inputs()
    with torch.no_grad():
        ref = model(x, t, **cond)
    with torch.autocast("cpu", dtype=dtype):
        out = model(x, t, **cond)
    assert out.dtype == torch.float32
    err = ((out.detach() - ref).norm() / ref.norm()).item()
    assert 0 < err < 3e-2  # reduced precision really ran, and stayed close
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_bf16_weights_without_autocast():
    model = randomize(UNetModel(**dict(TINY, attention_resolutions=[2], num_head_channels=16)))
    x, t = _inputs()
    with torch.no_grad():
        ref = model(x, t)
        out = model.to(torch.bfloat16)(x, t)
    assert out.dtype == torch.float32
    assert ((out - ref).norm() / ref.norm()).item() < 3e-2


def test_gradient_checkpointing_gives_same_gradients_and_recomputes():
    model = randomize(UNetModel(**dict(CROSS, use_scale_shift_norm=True)))
    x, t = _inputs()
    ctx = torch.randn(2, 3, 16)
    calls = []
    model.middle_block[1].register_forward_hook(lambda *args: calls.append(1))

    def grads(use_checkpoint: bool) -> list[torch.Tensor]:
        model.zero_grad()
        model.use_checkpoint = use_checkpoint
        calls.clear()
        model(x, t, ctx).square().mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads(False)
    assert len(calls) == 1
    checkpointed = grads(True)
    assert len(calls) == 2  # the middle block's transformer ran again during backward
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# --- head-count rule and configuration errors ----------------------------------------------------

def test_head_count_rule_follows_the_reference():
    rule = dict(num_heads=2, num_head_channels=-1, num_heads_upsample=4, spatial_transformer=False)
    assert attention_head_count(64, legacy=True, decoder=True, **rule) == 4
    assert attention_head_count(64, legacy=False, decoder=True, **rule) == 2
    assert attention_head_count(64, legacy=True, decoder=False, **rule) == 2
    assert attention_head_count(64, legacy=True, decoder=True, **dict(rule, spatial_transformer=True)) == 2
    assert attention_head_count(64, legacy=True, decoder=True, **dict(rule, num_head_channels=8)) == 8

    kwargs = dict(TINY, attention_resolutions=[2], num_heads=2, num_heads_upsample=4)
    legacy, new = UNetModel(**kwargs), UNetModel(**kwargs, legacy=False)
    assert legacy.input_blocks[3][1].num_heads == 2 and legacy.middle_block[1].num_heads == 2
    assert legacy.output_blocks[0][1].num_heads == 4 and new.output_blocks[0][1].num_heads == 2


@pytest.mark.parametrize("kwargs, match", [
    (dict(CROSS, context_dim=None), "needs context_dim"),
    (dict(TINY, attention_resolutions=[2], num_heads=2, context_dim=16), "use_spatial_transformer"),
    (dict(TINY, attention_resolutions=[2]), "set num_heads or num_head_channels"),
    (dict(TINY, attention_resolutions=[2], num_head_channels=24), "does not split into heads"),
    (dict(TINY, attention_resolutions=[2], num_heads=3), "does not split into heads"),
    (dict(TINY, attention_resolutions=[2], num_heads=2, num_heads_upsample=3), "does not split into heads"),
    (dict(TINY, model_channels=48, attention_resolutions=[], num_heads=1), "multiple of 32"),
    (dict(TINY, attention_resolutions=[], num_heads=1, num_classes=10, adm_in_channels=4), "not both"),
    (dict(TINY, attention_resolutions=[], num_heads=1, num_classes="sequential"), "adm_in_channels"),
    (dict(CROSS, use_new_attention_order=True), "only applies to self-attention"),
    (dict(TINY, attention_resolutions=[1], num_heads=2, use_linear_in_transformer=True),
     "use_linear_in_transformer applies to spatial transformers"),
    (dict(CROSS, transformer_depth=0), "transformer_depth"),
    (dict(TINY, attention_resolutions=[], num_heads=1, dropout=1.0), "dropout"),
    (dict(TINY, attention_resolutions=[], num_heads=1, channel_mult=[]), "channel_mult"),
    (dict(TINY, attention_resolutions=[], num_heads=1, num_res_blocks=0), "num_res_blocks"),
])
def test_constructor_refuses_bad_configs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        UNetModel(**kwargs)


def test_unreachable_attention_resolution_warns_and_adds_nothing():
    with pytest.warns(UserWarning, match=r"\[8\] are never reached"):
        model = UNetModel(**dict(TINY, attention_resolutions=[8], num_heads=1))
    plain = UNetModel(**dict(TINY, attention_resolutions=[], num_heads=1))
    assert model.state_dict().keys() == plain.state_dict().keys()


# --- diffusers ------------------------------------------------------------------------------------

DIFFUSERS_CASES = [
    dict(TINY, attention_resolutions=[1], num_head_channels=16, use_spatial_transformer=True, context_dim=16,
         transformer_depth=2, num_classes=5),
    dict(TINY, num_res_blocks=2, attention_resolutions=[2], num_heads=2, use_spatial_transformer=True,
         context_dim=16, use_scale_shift_norm=True, adm_in_channels=7),
    # SD 2.x: Linear proj_in / proj_out (diffusers' use_linear_projection), 64-wide heads as num_head_channels
    dict(CROSS, num_heads=-1, num_head_channels=16, use_linear_in_transformer=True, legacy=False),
]


@pytest.mark.parametrize("kwargs", DIFFUSERS_CASES, ids=["class_headwidth", "adm_scaleshift", "sd2_linear"])
def test_diffusers_round_trip_gives_same_outputs(kwargs):
    diffusers = pytest.importorskip("diffusers")
    config = diffusers_config_from_unet_kwargs(kwargs)
    theirs = randomize(diffusers.UNet2DConditionModel(**config)).eval()
    ours_kwargs = unet_kwargs_from_diffusers_config(theirs.config)
    ours = UNetModel(**ours_kwargs).eval()
    load_strict(ours, diffusers_state_dict_to_unet(theirs.state_dict(), ours_kwargs), "diffusers")

    x, t = _inputs()
    ctx = torch.randn(2, 3, 16)
    y = torch.tensor([1, 4]) if kwargs.get("num_classes") else torch.randn(2, 7) if kwargs.get("adm_in_channels") \
        else None
    assert ours_kwargs.get("use_linear_in_transformer", False) == kwargs.get("use_linear_in_transformer", False)
    with torch.no_grad():
        expected = theirs(x, t, ctx, class_labels=y).sample
        torch.testing.assert_close(ours(x, t, ctx, y), expected, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(ours(x, t, torch.randn(2, 3, 16), y), expected, atol=1e-4)

        back = diffusers.UNet2DConditionModel(**config).eval()
        back.load_state_dict(unet_state_dict_to_diffusers(ours.state_dict(), ours_kwargs), strict=True)
        torch.testing.assert_close(back(x, t, ctx, class_labels=y).sample, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("new_order", [False, True], ids=["legacy_qkv", "new_qkv"])
def test_unconditional_self_attention_unet_gives_diffusers_unet2dmodel_outputs(new_order):
    """The paper's unconditional UNets (fused-qkv self-attention, e.g. CelebA-HQ LDM-4) in
    diffusers' UNet2DModel layout: the same network, so the same outputs."""
    diffusers = pytest.importorskip("diffusers")
    kwargs = dict(TINY, attention_resolutions=[2], num_head_channels=16, use_new_attention_order=new_order)
    ours = randomize(UNetModel(**kwargs)).eval()
    theirs = diffusers.UNet2DModel(**diffusers_unet2d_config(kwargs, sample_size=8)).eval()
    theirs.load_state_dict(unet_state_dict_to_diffusers_unet2d(ours.state_dict(), kwargs), strict=True)
    x, t = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(theirs(x, t).sample, ours(x, t), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no diffusers UNet2DModel mapping for .*use_spatial_transformer"):
        diffusers_unet2d_config(CROSS)
    with pytest.raises(ValueError, match="no diffusers counterpart"):
        unet_state_dict_to_diffusers_unet2d({"input_blocks.9.0.op.weight": torch.zeros(1)}, kwargs)


def test_diffusers_config_maps_heads_and_block_types():
    config = diffusers_config_from_unet_kwargs(dict(CROSS, channel_mult=[1, 2, 2], attention_resolutions=[2],
                                                    num_heads=-1, num_head_channels=8))
    assert config["down_block_types"] == ["DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
    assert config["up_block_types"] == ["UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]
    assert config["attention_head_dim"] == [4, 8, 8]  # heads per level (diffusers' naming)
    assert config["block_out_channels"] == [32, 64, 64]


def test_diffusers_conversion_refuses_other_layouts():
    with pytest.raises(ValueError, match="use_spatial_transformer"):
        diffusers_config_from_unet_kwargs(dict(TINY, attention_resolutions=[2], num_heads=2))
    with pytest.raises(ValueError, match="resblock_updown"):
        unet_state_dict_to_diffusers({}, dict(CROSS, resblock_updown=True))
    with pytest.raises(ValueError, match="no diffusers counterpart"):
        unet_state_dict_to_diffusers({"input_blocks.9.0.op.weight": torch.zeros(1)}, CROSS)
