"""The LDM denoiser: a time-conditioned UNet with self- or cross-attention.

Built like the reference `openaimodel.UNetModel`, so `model.diffusion_model.*` weights of the
original checkpoints load unchanged (keys `time_embed.{0,2}`, `label_emb`, `input_blocks.N.M`,
`middle_block.{0,1,2}`, `output_blocks.N.M`, `out.{0,2}`).

Layout: a 3x3 conv, then per resolution level `num_res_blocks` ResBlocks (each followed by an
attention block when the level's downsampling factor ds is in `attention_resolutions`) and,
between levels, a downsampler; a middle block (ResBlock, attention, ResBlock); the decoder mirrors
the encoder with `num_res_blocks + 1` ResBlocks per level, each fed the matching encoder
activation concatenated on channels. GroupNorm uses 32 groups, eps 1e-5, computed in float32
(unless `fp32_norms=False`).
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ldm.nets.attention import (BasicTransformerBlock, GroupNorm32, SelfAttentionBlock, SpatialTransformer,
                                set_norm_precision, zero_init)
from ldm.nets.timestep import timestep_embedding

NORM_EPS = 1e-5


def attention_head_count(channels: int, *, num_heads: int, num_head_channels: int, num_heads_upsample: int,
                         legacy: bool, spatial_transformer: bool, decoder: bool) -> int:
    """Number of heads of an attention block of width `channels`, by the reference's rule.

    A fixed head width (`num_head_channels` != -1) wins: channels // num_head_channels heads.
    Otherwise `num_heads`, except that with `legacy` the decoder's self-attention blocks (not the
    spatial transformers) use `num_heads_upsample`; without `legacy` the reference derives a head
    width from `num_heads` there, which gives `num_heads` heads again.
    """
    if num_head_channels != -1:
        return channels // num_head_channels
    if decoder and legacy and not spatial_transformer:
        return num_heads_upsample
    return num_heads


class Downsample(nn.Module):
    """Halve H and W: a 3x3 stride-2 conv `op` (padding 1), or 2x2 average pooling without conv."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        out_channels = channels if out_channels is None else out_channels
        if not use_conv and out_channels != channels:
            raise ValueError("a Downsample without conv cannot change the channel count")
        self.op = nn.Conv2d(channels, out_channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Double H and W by nearest-neighbour repetition, then (optionally) a 3x3 `conv`."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        out_channels = channels if out_channels is None else out_channels
        if not use_conv and out_channels != channels:
            raise ValueError("an Upsample without conv cannot change the channel count")
        self.conv = nn.Conv2d(channels, out_channels, 3, padding=1) if use_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return x if self.conv is None else self.conv(x)


class ResBlock(nn.Module):
    """Residual block conditioned on the time embedding.

    h = conv(act(norm(x))); add the projected embedding (or, with `use_scale_shift_norm`, apply it
    as norm(h) * (1 + scale) + shift); then act, dropout and a zero-initialised conv. With
    `up` / `down` both branches are resampled (without parameters) between the first norm-act and
    conv. The skip path is a 1x1 conv when the width changes.
    """

    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: int | None = None,
                 use_scale_shift_norm: bool = False, up: bool = False, down: bool = False):
        super().__init__()
        if up and down:
            raise ValueError("a ResBlock resamples up or down, not both")
        out_channels = channels if out_channels is None else out_channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(GroupNorm32(channels, NORM_EPS), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        if up:
            self.resample: nn.Module | None = Upsample(channels, use_conv=False)
        elif down:
            self.resample = Downsample(channels, use_conv=False)
        else:
            self.resample = None
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels))
        self.out_layers = nn.Sequential(GroupNorm32(out_channels, NORM_EPS), nn.SiLU(), nn.Dropout(dropout),
                                        zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1)))
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.resample is None:
            h = self.in_layers(x)
        else:
            h = self.in_layers[2](self.resample(self.in_layers[:2](x)))
            x = self.resample(x)
        emb_out = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class TimestepEmbedSequential(nn.Sequential):
    """A sequence of layers that hands the time embedding to ResBlocks and the context to
    spatial transformers."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


def _ints(name: str, values: Sequence[int]) -> list[int]:
    try:
        return [int(v) for v in values]
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a list of integers, got {values!r}") from err


class UNetModel(nn.Module):
    """The LDM denoiser eps/x0/v = f(x_t, t, context, y).

    Arguments keep the reference names. `attention_resolutions` are downsampling factors
    (1, 2, 4, ...), not pixel sizes. `num_heads` / `num_head_channels` (-1 = unset; one of them is
    required) set the attention heads, see `attention_head_count`. Conditioning: `num_classes`
    adds a learned class embedding (y: (B,) integer labels); `adm_in_channels` adds an embedding of
    a vector (y: (B, adm_in_channels)) through `label_emb.0.{0,2}` as in SD2 / sgm; cross-attention
    needs `use_spatial_transformer` with `context_dim` (context: (B, M, context_dim);
    `use_linear_in_transformer`: Linear proj_in / proj_out, SD 2.x's layout); concat
    conditioning is `in_channels` > `out_channels`. `use_checkpoint` recomputes each block's
    activations in the backward pass (torch.utils.checkpoint, non-reentrant). `dropout` acts
    in the ResBlocks, as in the reference. `config` holds every argument (defaults filled in,
    plain containers) for checkpoints and the converters.

    Fast paths that leave the weights and the float32 results unchanged:
    `channels_last` stores the conv weights and runs the activations in channels-last
    (NHWC) memory format (tensor-core convolutions need no layout transposes, and the spatial
    transformers' token view is then contiguous); the output is returned contiguous (NCHW).
    `fp32_norms=False` lets the GroupNorms / LayerNorms of bf16 / fp16 activations (autocast or
    a reduced-precision model) read and write that dtype, statistics still in float32, instead
    of the reference's float32 round trip.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        model_channels: int,
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        dropout: float = 0.0,
        channel_mult: Sequence[int] = (1, 2, 4, 8),
        conv_resample: bool = True,
        num_classes: int | None = None,
        adm_in_channels: int | None = None,
        use_checkpoint: bool = False,
        num_heads: int = -1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        use_spatial_transformer: bool = False,
        transformer_depth: int = 1,
        context_dim: int | None = None,
        use_linear_in_transformer: bool = False,
        legacy: bool = True,
        channels_last: bool = False,
        fp32_norms: bool = True,
    ):
        super().__init__()
        channel_mult = _ints("channel_mult", channel_mult)
        attention_resolutions = _ints("attention_resolutions", attention_resolutions)
        num_heads_upsample = num_heads if num_heads_upsample == -1 else num_heads_upsample
        self.config = dict(
            in_channels=in_channels, out_channels=out_channels, model_channels=model_channels,
            num_res_blocks=num_res_blocks, attention_resolutions=attention_resolutions, dropout=dropout,
            channel_mult=channel_mult, conv_resample=conv_resample, num_classes=num_classes,
            adm_in_channels=adm_in_channels, use_checkpoint=use_checkpoint, num_heads=num_heads,
            num_head_channels=num_head_channels, num_heads_upsample=num_heads_upsample,
            use_scale_shift_norm=use_scale_shift_norm, resblock_updown=resblock_updown,
            use_new_attention_order=use_new_attention_order, use_spatial_transformer=use_spatial_transformer,
            transformer_depth=transformer_depth, context_dim=context_dim,
            use_linear_in_transformer=use_linear_in_transformer, legacy=legacy,
            channels_last=channels_last, fp32_norms=fp32_norms)
        check_unet_config(self.config)
        self.model_channels = model_channels
        self.num_classes = num_classes
        self.adm_in_channels = adm_in_channels
        self.context_dim = context_dim
        self.use_checkpoint = use_checkpoint
        self.channels_last = channels_last

        emb_dim = 4 * model_channels
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if num_classes is not None:
            self.label_emb: nn.Module = nn.Embedding(num_classes, emb_dim)
        elif adm_in_channels is not None:
            self.label_emb = nn.Sequential(nn.Sequential(
                nn.Linear(adm_in_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)))

        def attention(ch: int, decoder: bool) -> nn.Module:
            heads = attention_head_count(
                ch, num_heads=num_heads, num_head_channels=num_head_channels,
                num_heads_upsample=num_heads_upsample, legacy=legacy,
                spatial_transformer=use_spatial_transformer, decoder=decoder)
            if use_spatial_transformer:
                return SpatialTransformer(ch, heads, ch // heads, depth=transformer_depth, context_dim=context_dim,
                                          use_linear=use_linear_in_transformer)
            return SelfAttentionBlock(ch, heads, use_new_attention_order=use_new_attention_order)

        def resblock(ch_in: int, ch_out: int, **updown: bool) -> ResBlock:
            return ResBlock(ch_in, emb_dim, dropout, ch_out, use_scale_shift_norm=use_scale_shift_norm, **updown)

        stem = nn.Conv2d(in_channels, model_channels, 3, padding=1)
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(stem)])
        skip_channels = [model_channels]
        ch, ds = model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [resblock(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(attention(ch, decoder=False))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                down = resblock(ch, ch, down=True) if resblock_updown else Downsample(ch, conv_resample)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(resblock(ch, ch), attention(ch, decoder=False), resblock(ch, ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [resblock(ch + skip_channels.pop(), mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(attention(ch, decoder=True))
                if level and i == num_res_blocks:
                    layers.append(resblock(ch, ch, up=True) if resblock_updown else Upsample(ch, conv_resample))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(GroupNorm32(ch, NORM_EPS), nn.SiLU(),
                                 zero_init(nn.Conv2d(model_channels, out_channels, 3, padding=1)))
        set_norm_precision(self, fp32_norms)
        if channels_last:
            # Only 4-D tensors (conv kernels) change layout; .to(device) and load_state_dict keep it.
            self.to(memory_format=torch.channels_last)

    def _run(self, block: TimestepEmbedSequential, h: torch.Tensor, emb: torch.Tensor,
             context: torch.Tensor | None) -> torch.Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(block, h, emb, context, use_reentrant=False)
        return block(h, emb, context)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None,
                y: torch.Tensor | None = None) -> torch.Tensor:
        """Denoise x (B, in_channels, H, W) at `timesteps` ((B,) or a scalar, integer or float).

        `context` (B, M, context_dim) is required exactly when the model has cross-attention, `y`
        exactly when it has a class or vector embedding. H and W must divide by
        2 ** (len(channel_mult) - 1). Returns (B, out_channels, H, W) in x's dtype.
        """
        self._check_inputs(x, context, y)
        timesteps = torch.as_tensor(timesteps, device=x.device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        if timesteps.shape != (x.shape[0],):
            raise ValueError(f"timesteps must have shape ({x.shape[0]},) or be a scalar, got {tuple(timesteps.shape)}")
        # Without autocast, run in the parameters' dtype (e.g. a bf16 copy of the model for sampling).
        dtype = self.time_embed[0].weight.dtype
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(dtype))
        if y is not None:
            emb = emb + self.label_emb(y if self.num_classes is not None else y.to(dtype))
        if context is not None:
            context = context.to(dtype)

        h = x.to(dtype)
        if self.channels_last:
            h = h.contiguous(memory_format=torch.channels_last)
        skips = []
        for block in self.input_blocks:
            h = self._run(block, h, emb, context)
            skips.append(h)
        h = self._run(self.middle_block, h, emb, context)
        for block in self.output_blocks:
            h = self._run(block, torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h).to(x.dtype).contiguous()

    def compile_blocks(self, **compile_kwargs: Any) -> int:
        """torch.compile each attention block in place (regional compilation); returns how many.

        The repeated blocks are the transformer blocks of a cross-attention UNet (the set diffusers'
        `compile_repeated_blocks` compiles) or the self-attention blocks otherwise. Blocks of one
        width share one compiled graph, so the warm-up is a fraction of compiling the whole UNet,
        while convolutions and ResBlocks run eagerly. `compile_kwargs` go to torch.compile (e.g.
        mode); parameter names are unchanged, and compilation happens at the first call.
        """
        # Never empty: the middle block always has one.
        blocks = [m for m in self.modules() if isinstance(m, (BasicTransformerBlock, SelfAttentionBlock))]
        for block in blocks:
            block.compile(**compile_kwargs)
        return len(blocks)

    def _check_inputs(self, x: torch.Tensor, context: torch.Tensor | None, y: torch.Tensor | None) -> None:
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg["in_channels"]:
            raise ValueError(f"x must have shape (B, {cfg['in_channels']}, H, W), got {tuple(x.shape)}")
        factor = 2 ** (len(cfg["channel_mult"]) - 1)
        if x.shape[-2] % factor or x.shape[-1] % factor:
            raise ValueError(f"H and W ({x.shape[-2]}x{x.shape[-1]}) must be multiples of {factor} for "
                             f"{len(cfg['channel_mult'])} resolution levels")
        batch = x.shape[0]
        if self.context_dim is None and context is not None:
            raise ValueError("this UNet has no cross-attention (context_dim is unset) but got a context")
        if self.context_dim is not None and (context is None or context.ndim != 3 or context.shape[0] != batch
                                             or context.shape[-1] != self.context_dim):
            got = None if context is None else tuple(context.shape)
            raise ValueError(f"this UNet cross-attends to a context of shape ({batch}, M, {self.context_dim}); "
                             f"got {got}")
        if self.num_classes is None and self.adm_in_channels is None:
            if y is not None:
                raise ValueError("this UNet has no class or vector conditioning (num_classes / adm_in_channels "
                                 "unset) but got y")
        elif self.num_classes is not None:
            if y is None or y.shape != (batch,) or y.is_floating_point():
                got = None if y is None else f"{tuple(y.shape)} {y.dtype}"
                raise ValueError(f"this class-conditional UNet needs y: integer labels of shape ({batch},); got {got}")
        elif y is None or y.shape != (batch, self.adm_in_channels):
            got = None if y is None else tuple(y.shape)
            raise ValueError(f"this UNet needs y: a vector of shape ({batch}, {self.adm_in_channels}); got {got}")


def check_unet_config(cfg: Mapping[str, Any]) -> None:
    """Refuse UNet configurations (a full UNetModel argument dict, num_heads_upsample resolved)
    that the reference would build wrongly or fail on later, saying what to fix."""
    for name in ("in_channels", "out_channels", "model_channels", "num_res_blocks"):
        if not isinstance(cfg[name], int) or cfg[name] < 1:
            raise ValueError(f"{name} must be a positive integer, got {cfg[name]!r}")
    mults = cfg["channel_mult"]
    if not mults or min(mults) < 1:
        raise ValueError(f"channel_mult must be a non-empty list of positive integers, got {mults}")
    widths = [cfg["model_channels"] * m for m in mults]
    if any(w % 32 for w in widths):
        raise ValueError(f"every block width model_channels * channel_mult[i] must be a multiple of 32 "
                         f"(GroupNorm groups), got widths {widths}")
    if not 0.0 <= cfg["dropout"] < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {cfg['dropout']}")
    reachable = [2 ** level for level in range(len(mults))]
    unused = [r for r in cfg["attention_resolutions"] if r not in reachable]
    if unused:
        # The reference silently ignores these, and some paper configs list them: warn, don't fail.
        warnings.warn(f"attention_resolutions {unused} are never reached: they are downsampling factors "
                      f"and this UNet has {reachable}; those entries add no attention", stacklevel=3)
    if cfg["num_classes"] is not None:
        if isinstance(cfg["num_classes"], str) or cfg["num_classes"] < 1:
            raise ValueError(f"num_classes must be a positive integer, got {cfg['num_classes']!r}; for a "
                             f"vector condition y (the reference's 'sequential') set adm_in_channels instead")
        if cfg["adm_in_channels"] is not None:
            raise ValueError("set num_classes (class labels) or adm_in_channels (a vector y), not both")
    if cfg["adm_in_channels"] is not None and cfg["adm_in_channels"] < 1:
        raise ValueError(f"adm_in_channels must be a positive integer, got {cfg['adm_in_channels']}")

    st = cfg["use_spatial_transformer"]
    if st and cfg["context_dim"] is None:
        raise ValueError("use_spatial_transformer needs context_dim, the feature size of the "
                         "cross-attention context (e.g. 768 for CLIP ViT-L text tokens)")
    if not st and cfg["context_dim"] is not None:
        raise ValueError("context_dim is set but use_spatial_transformer is false: set "
                         "use_spatial_transformer=true for cross-attention, or drop context_dim")
    if st and cfg["transformer_depth"] < 1:
        raise ValueError(f"transformer_depth must be >= 1, got {cfg['transformer_depth']}")
    if not st and cfg["use_linear_in_transformer"]:
        raise ValueError("use_linear_in_transformer applies to spatial transformers: set use_spatial_transformer=true "
                         "or drop it")
    if st and cfg["use_new_attention_order"]:
        raise ValueError("use_new_attention_order only applies to self-attention blocks; "
                         "drop it with use_spatial_transformer")

    nh, nhc, nh_up = cfg["num_heads"], cfg["num_head_channels"], cfg["num_heads_upsample"]
    if nh == -1 and nhc == -1:
        raise ValueError("set num_heads or num_head_channels (both are -1)")
    used = [nhc] if nhc != -1 else [nh, nh_up]
    if min(used) < 1:
        raise ValueError(f"head counts must be positive (or -1 for unset): num_heads={nh}, "
                         f"num_head_channels={nhc}, num_heads_upsample={nh_up}")
    # Every attention site: (width, in the decoder) for attended levels, plus the middle block.
    sites = {(w, dec) for w, r in zip(widths, reachable) if r in cfg["attention_resolutions"]
             for dec in (False, True)} | {(widths[-1], False)}
    for width, decoder in sorted(sites):
        heads = attention_head_count(width, num_heads=nh, num_head_channels=nhc, num_heads_upsample=nh_up,
                                     legacy=cfg["legacy"], spatial_transformer=st, decoder=decoder)
        if width % (nhc if nhc != -1 else heads):
            raise ValueError(f"attention width {width} does not split into heads with num_heads={nh}, "
                             f"num_head_channels={nhc}, num_heads_upsample={nh_up}: choose values that "
                             f"divide every attention width ({sorted({w for w, _ in sites})})")
