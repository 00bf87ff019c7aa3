"""The performance options do what they say and leave float32 results unchanged: channels_last
activations, norms in the activations' dtype, fused/foreach optimisers, torch.compile of the
denoiser (checkpoint keys unchanged), DDP static_graph and gradient checkpointing from config."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch._dynamo.utils import counters
from torch.overrides import TorchFunctionMode

from ldm.first_stage.identity import IdentityFirstStage
from ldm.modules.base import fast_optimizer_kwargs
from ldm.modules.latent_diffusion import LatentDiffusion
from ldm.nets.attention import BasicTransformerBlock, SelfAttentionBlock
from ldm.nets.unet import UNetModel

ROOT = Path(__file__).resolve().parent.parent
UNET = dict(in_channels=4, out_channels=4, model_channels=32, channel_mult=[1, 2], num_res_blocks=1,
            attention_resolutions=[1, 2], num_heads=2, use_spatial_transformer=True, context_dim=16, legacy=False)


def _randomised(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights everywhere (the zero-initialised output convs would hide differences)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


def _inputs(batch: int = 2):
    gen = torch.Generator().manual_seed(1)
    return (torch.randn(batch, 4, 8, 8, generator=gen), torch.tensor([3, 700][:batch]),
            torch.randn(batch, 5, 16, generator=gen))


def _pair(**fast) -> tuple[UNetModel, UNetModel]:
    ref = _randomised(UNetModel(**UNET))
    other = UNetModel(**UNET, **fast)
    other.load_state_dict(ref.state_dict())
    return ref, other


class _RecordCalls(TorchFunctionMode):
    """Records the first tensor argument of every call to the given torch functions."""

    def __init__(self, *funcs):
        super().__init__()
        self.funcs, self.seen = funcs, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.funcs:
            self.seen.append((func, args[0]))
        return func(*args, **(kwargs or {}))


def test_channels_last_runs_the_convolutions_in_nhwc_with_the_same_float32_result():
    ref, fast = _pair(channels_last=True)
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in fast.parameters() if p.ndim == 4)
    with _RecordCalls(F.conv2d) as rec, torch.no_grad():
        out = fast(*_inputs())
    inputs = [x for _, x in rec.seen if x.shape[-1] > 1 and x.shape[1] > 1]  # single-pixel layouts are ambiguous
    assert inputs and all(x.is_contiguous(memory_format=torch.channels_last) for x in inputs)
    with _RecordCalls(F.conv2d) as rec, torch.no_grad():
        expected = ref(*_inputs())
    assert not any(x.is_contiguous(memory_format=torch.channels_last) for _, x in rec.seen if x.shape[1] > 1)
    assert out.is_contiguous()  # handed back in the usual layout
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_channels_last_survives_device_moves_and_loading():
    model = UNetModel(**UNET, channels_last=True)
    model.load_state_dict(_randomised(UNetModel(**UNET)).state_dict())
    model.to(torch.float64).to(torch.float32)
    assert model.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)


def test_reduced_precision_norms_keep_bf16_activations_and_float32_results():
    ref, fast = _pair(fp32_norms=False)
    with torch.no_grad():
        torch.testing.assert_close(fast(*_inputs()), ref(*_inputs()), rtol=0, atol=0)  # float32: identical

    def norm_input_dtypes(model):
        with _RecordCalls(F.group_norm, F.layer_norm) as rec, torch.no_grad():
            model.to(torch.bfloat16)(*_inputs())
        return {(f.__name__, x.dtype) for f, x in rec.seen}

    assert norm_input_dtypes(ref) == {("group_norm", torch.float32), ("layer_norm", torch.float32)}
    assert norm_input_dtypes(fast) == {("group_norm", torch.bfloat16), ("layer_norm", torch.bfloat16)}
    with torch.no_grad():  # both bf16 models stay close to each other (statistics in float32 either way)
        torch.testing.assert_close(fast(*_inputs()), ref(*_inputs()), rtol=0.05, atol=0.05)


def test_reduced_precision_norms_under_autocast_return_bf16():
    _, fast = _pair(fp32_norms=False)
    seen = []
    fast.out[0].register_forward_hook(lambda m, args, out: seen.append((args[0].dtype, out.dtype)))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fast(*_inputs())
    assert seen == [(torch.bfloat16, torch.bfloat16)]


def test_fast_optimizer_kwargs_picks_fused_and_matches_the_loop():
    assert fast_optimizer_kwargs([nn.Parameter(torch.zeros(2))]) == {"fused": True}
    assert fast_optimizer_kwargs([nn.Parameter(torch.zeros(2, dtype=torch.complex64))]) == {"foreach": True}
    torch.manual_seed(0)
    start = [torch.randn(5, 3), torch.randn(7)]
    grads = [[torch.randn_like(p) for p in start] for _ in range(3)]
    results = []
    for kwargs in ({"foreach": False}, fast_optimizer_kwargs(start)):
        params = [nn.Parameter(p.clone()) for p in start]
        optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, **kwargs)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            optimizer.step()
        results.append(params)
    for loop, fast, initial in zip(*results, start):
        torch.testing.assert_close(fast, loop, rtol=1e-6, atol=1e-7)
        assert not torch.allclose(fast, initial)  # the parameters did move


def test_latent_diffusion_optimizer_uses_the_fast_implementation(monkeypatch):
    monkeypatch.setattr("ldm.modules.latent_diffusion.trainer_effective_lr", lambda *args: 1e-4)  # no Trainer here
    model = LatentDiffusion(UNetModel(**UNET), IdentityFirstStage(), image_size=8, ema_decay=None)
    optimizer = model.configure_optimizers()
    assert optimizer.defaults["fused"] is True


def test_compile_keeps_checkpoint_keys_and_is_applied_lazily():
    eager = LatentDiffusion(UNetModel(**UNET), IdentityFirstStage(), image_size=8, ema_decay=0.9)
    compiled = LatentDiffusion(UNetModel(**UNET), IdentityFirstStage(), image_size=8, ema_decay=0.9,
                               compile=True, compile_mode="default")
    assert compiled.model.diffusion_model._compiled_call_impl is not None
    assert eager.model.diffusion_model._compiled_call_impl is None
    assert list(compiled.state_dict()) == list(eager.state_dict())
    assert not any("_orig_mod" in k for k in compiled.state_dict())
    compiled.load_state_dict(eager.state_dict())  # strict, both ways
    eager.load_state_dict(compiled.state_dict())


def test_compile_blocks_compiles_only_the_attention_blocks_in_place():
    eager = LatentDiffusion(UNetModel(**UNET), IdentityFirstStage(), image_size=8, ema_decay=0.9)
    model = LatentDiffusion(UNetModel(**UNET), IdentityFirstStage(), image_size=8, ema_decay=0.9, compile="blocks")
    compiled = [m for m in model.modules() if m._compiled_call_impl is not None]
    assert len(compiled) == 7 and all(isinstance(m, BasicTransformerBlock) for m in compiled)  # 2 + 1 + 4 levels' blocks
    assert list(model.state_dict()) == list(eager.state_dict())
    model.load_state_dict(eager.state_dict())
    # Self-attention UNets (the paper's unconditional and class models) compile their SelfAttentionBlocks.
    self_attention = UNetModel(**{**UNET, "use_spatial_transformer": False, "context_dim": None})
    assert self_attention.compile_blocks() == 7
    assert all(isinstance(m, SelfAttentionBlock) for m in self_attention.modules() if m._compiled_call_impl)


def test_compile_settings_are_checked():
    with pytest.raises(ValueError, match="compile must be false, true .* or 'blocks'"):
        LatentDiffusion(UNetModel(**UNET), IdentityFirstStage(), image_size=8, compile="unet")
    with pytest.raises(ValueError, match="compile=blocks: Conv2d has no compile_blocks"):
        LatentDiffusion(nn.Conv2d(4, 4, 1), IdentityFirstStage(), image_size=8, compile="blocks")


def test_blocks_compiled_unet_matches_eager_and_shares_graphs_between_blocks():
    """Outputs and gradients as eager, with and without gradient checkpointing (the compiled
    blocks are recomputed inside checkpointed ones); seven blocks of two shapes compile two graphs."""
    torch._dynamo.reset()
    counters.clear()
    x, t, context = _inputs()
    for use_checkpoint in (False, True):
        eager = _randomised(UNetModel(**UNET, use_checkpoint=use_checkpoint))
        compiled = _randomised(UNetModel(**UNET, use_checkpoint=use_checkpoint))
        assert compiled.compile_blocks() == 7
        results = []
        for model in (eager, compiled):
            out = model(x, t, context)
            out.square().mean().backward()
            results.append((out.detach(), [p.grad for p in model.parameters()]))
        (out_e, grads_e), (out_c, grads_c) = results
        torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-5)
        for g_c, g_e in zip(grads_c, grads_e):
            torch.testing.assert_close(g_c, g_e, rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 2


def test_compile_first_stage_needs_an_encoder():
    with pytest.raises(ValueError, match="no encoder"):
        LatentDiffusion(UNetModel(**UNET), IdentityFirstStage(), image_size=8, compile_first_stage=True)


@pytest.mark.slow
def test_compiled_denoiser_matches_eager_on_the_cpu():
    unet = _randomised(UNetModel(**UNET))
    x, t, context = _inputs()
    with torch.no_grad():
        expected = unet(x, t, context)
    model = LatentDiffusion(unet, IdentityFirstStage(), nn.Identity(), conditioning_key="crossattn", image_size=8,
                            ema_decay=None, compile=True)
    with torch.no_grad():
        out = model.model(x, t, {"crossattn": context})
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_ddp_config_documents_static_graph_and_unet_configs_expose_the_options():
    ddp = yaml.safe_load((ROOT / "configs/trainer/ddp.yaml").read_text())
    assert "static_graph" in ddp["strategy"]
    for name in ("sd1", "toy"):
        unet = yaml.safe_load((ROOT / f"configs/unet/{name}.yaml").read_text())
        assert {"use_checkpoint", "channels_last", "fp32_norms"} <= set(unet)


def test_gradient_checkpointing_recomputes_blocks_with_the_same_gradients():
    ref, ckpt = _pair(use_checkpoint=True)
    grads = []
    for model in (ref, ckpt):
        calls = []
        handle = model.middle_block[0].register_forward_hook(lambda *a: calls.append(1))
        model(*_inputs()).square().mean().backward()
        handle.remove()
        grads.append([p.grad for p in model.parameters()])
        assert len(calls) == (2 if model is ckpt else 1)  # the checkpointed block runs again in backward
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
