"""UNet speed benchmark: our UNetModel against diffusers' UNet of the same shape and weights.

For a named config it measures, per implementation and in one process:
- training samples/s: forward + MSE + backward + AdamW (fused, as training uses it) on random data;
- inference UNet evaluations/s: forward without grad (what a sampler pays per step);
- forward FLOPs per sample, counted by torch.utils.flop_counter.FlopCounterMode on the meta
  device (the CPU attention kernel is not counted by FlopCounterMode, meta is exact and free);
- MFU = 3 x forward FLOPs x training samples/s / peak FLOP/s (CUDA only; REFERENCE.md section 11
  uses 989e12, the dense bf16 peak of H100/H200 SXM, for every precision);
- peak memory per phase above the memory in use before its model was built: from
  torch.cuda.max_memory_allocated, or on the CPU from the process's peak RSS (VmHWM, reset per
  phase);
- ours/diffusers ratios. diffusers gets our randomly drawn weights through the converters, and a
  startup cross-check prints the largest output difference, so both time the same network.

Our UNet can be measured in several fast-path variants at once (--ours): `base` (the reference
layout: NCHW, float32 norms), `cl` (channels_last), `bf16norm` (fp32_norms=False) and `fast`
(both); each gets its own ratio to diffusers. --checkpoint turns on gradient checkpointing in
both implementations (what it costs in speed and saves in training memory).

    python benchmarks/unet.py --suite cpu                      # small config, fp32, 5 alternating rounds
    python benchmarks/unet.py --suite gpu --out gpu.jsonl      # SD-1 b32 bf16 eager + compiled, CelebA b48, SD-1 checkpointed
    python benchmarks/unet.py --config sd1 --batch 8 --precision tf32 --device cuda
    python benchmarks/unet.py --config small --compile blocks   # regional compilation in both

JSON lines go to stdout (and are appended to --out); a markdown table ends the output; progress
goes to stderr.
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ldm.convert.diffusers_unet import (
    _module_map,
    diffusers_config_from_unet_kwargs,
    full_unet_kwargs,
    unet_state_dict_to_diffusers,
)
from ldm.modules.base import fast_optimizer_kwargs
from ldm.nets.unet import UNetModel

ROOT = Path(__file__).resolve().parent.parent
H100_BF16_DENSE_FLOPS = 989e12
PRECISIONS = ("fp32", "tf32", "bf16")
GIB = 2 ** 30
MIN_TIMED_STEPS = 3  # a phase cut by the time limit still times this many steps (or --steps if fewer)


@dataclass(frozen=True)
class BenchConfig:
    """A UNet shape to benchmark: UNetModel kwargs, latent side, context tokens (None: no context)."""

    unet: dict[str, Any]
    size: int
    tokens: int | None


def bench_config(name: str) -> BenchConfig:
    """The named benchmark shape: `small` (CPU), `celebahq` (paper LDM-4, 274M) or `sd1` (860M)."""
    if name == "small":
        # SD-1's layout scaled down: cross-attention at the two finer levels, none at the coarsest.
        return BenchConfig(dict(in_channels=4, out_channels=4, model_channels=64, channel_mult=[1, 2, 2],
                                num_res_blocks=2, attention_resolutions=[1, 2], num_heads=4,
                                use_spatial_transformer=True, context_dim=128, legacy=False), size=16, tokens=16)
    if name == "celebahq":
        # configs/latent-diffusion/celebahq-ldm-vq-4.yaml of the reference (REFERENCE.md section 7).
        return BenchConfig(dict(in_channels=3, out_channels=3, model_channels=224, channel_mult=[1, 2, 3, 4],
                                num_res_blocks=2, attention_resolutions=[8, 4, 2], num_head_channels=32),
                           size=64, tokens=None)
    if name == "sd1":
        kwargs = yaml.safe_load((ROOT / "configs/unet/sd1.yaml").read_text())
        kwargs.pop("_target_")
        return BenchConfig(kwargs, size=64, tokens=77)
    raise ValueError(f"unknown config {name!r}: choose small, celebahq or sd1")


# --- implementations --------------------------------------------------------------------------------

Call = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


@dataclass(frozen=True)
class Impl:
    """One implementation: how to construct it (weights drawn by default init), how to put our
    weights into its layout, and how to call it with (x, t, context)."""

    name: str
    model_class: str
    make: Callable[[], nn.Module]
    convert: Callable[[Mapping[str, torch.Tensor]], Mapping[str, torch.Tensor]]
    call: Call
    compile_blocks: Callable[[nn.Module], object]  # regional compilation in place (Row.compile "blocks")

    def build(self, weights: Mapping[str, torch.Tensor], device: torch.device) -> nn.Module:
        with torch.device(device):
            model = self.make()
        model.load_state_dict(self.convert(weights), strict=True)
        return model


# Our UNet's fast paths (UNetModel arguments) per --ours variant; `base` pins the reference
# behaviour, whatever the config file sets.
VARIANTS: dict[str, dict[str, bool]] = {
    "base": dict(channels_last=False, fp32_norms=True),
    "cl": dict(channels_last=True, fp32_norms=True),
    "bf16norm": dict(channels_last=False, fp32_norms=False),
    "fast": dict(channels_last=True, fp32_norms=False),
}


def ours_impl(kwargs: Mapping[str, Any], variant: str = "base", checkpoint: bool = False) -> Impl:
    """Our UNetModel with the fast paths of `variant` (named `ours` for base, else `ours-<variant>`),
    with gradient checkpointing per block if `checkpoint`."""
    full = {**kwargs, **VARIANTS[variant], "use_checkpoint": checkpoint}
    return Impl("ours" if variant == "base" else f"ours-{variant}", "ldm.nets.unet.UNetModel",
                lambda: UNetModel(**full), dict, lambda m, x, t, c: m(x, t, c), lambda m: m.compile_blocks())


def _unet2d_problems(cfg: Mapping[str, Any]) -> list[str]:
    checks = {
        "use_spatial_transformer is set (UNet2DConditionModel is the counterpart)": cfg["use_spatial_transformer"],
        "class or vector conditioning": cfg["num_classes"] is not None or cfg["adm_in_channels"] is not None,
        "use_scale_shift_norm": cfg["use_scale_shift_norm"],
        "resblock_updown": cfg["resblock_updown"],
        "conv_resample is false": not cfg["conv_resample"],
        "a fixed head count (UNet2DModel fixes the head width: set num_head_channels)": cfg["num_head_channels"] == -1,
    }
    return [what for what, bad in checks.items() if bad]


def unet2d_config(cfg: Mapping[str, Any], sample_size: int) -> dict[str, Any]:
    """diffusers UNet2DModel config of an unconditional self-attention UNetModel (full kwargs)."""
    attn = [2 ** level in cfg["attention_resolutions"] for level in range(len(cfg["channel_mult"]))]
    return dict(sample_size=sample_size, in_channels=cfg["in_channels"], out_channels=cfg["out_channels"],
                layers_per_block=cfg["num_res_blocks"],
                block_out_channels=[cfg["model_channels"] * m for m in cfg["channel_mult"]],
                down_block_types=["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
                up_block_types=["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
                attention_head_dim=cfg["num_head_channels"], norm_num_groups=32, norm_eps=1e-5,
                flip_sin_to_cos=True, freq_shift=0, dropout=cfg["dropout"], downsample_padding=1,
                act_fn="silu", mid_block_scale_factor=1, add_attention=True)


def _split_qkv(value: torch.Tensor, head_dim: int, new_order: bool) -> tuple[torch.Tensor, ...]:
    """Our fused Conv1d qkv weight (3C, C, 1) or bias (3C,) as separate q, k, v (C, C) / (C,)."""
    fused = value.squeeze(-1) if value.ndim == 3 else value
    c = fused.shape[0] // 3
    rest = fused.shape[1:]
    if new_order:  # [q, k, v], each split into heads
        return tuple(fused.reshape(3, c, *rest).unbind(0))
    # legacy: per head [q_h, k_h, v_h]
    per_head = fused.reshape(c // head_dim, 3, head_dim, *rest)
    return tuple(per_head[:, i].reshape(c, *rest) for i in range(3))


def unet2d_state_dict(weights: Mapping[str, torch.Tensor], cfg: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Our weights of an unconditional self-attention UNet in diffusers UNet2DModel's layout:
    ResBlocks and resamplers as for UNet2DConditionModel; attention norm -> group_norm, fused qkv
    -> to_q / to_k / to_v, proj_out (Conv1d) -> to_out.0 (Linear)."""
    modules = _module_map(cfg)
    out: dict[str, torch.Tensor] = {}
    for key, value in weights.items():
        parts = key.split(".")
        cut = next(c for c in range(len(parts) - 1, 0, -1) if ".".join(parts[:c]) in modules)
        target, (layer, *leaf) = modules[".".join(parts[:cut])], parts[cut:]
        if ".attentions." not in target and not target.startswith("mid_block.attentions"):
            out[".".join([target, layer, *leaf])] = value
        elif layer == "norm":
            out[".".join([target, "group_norm", *leaf])] = value
        elif layer == "qkv":
            for name, part in zip(("to_q", "to_k", "to_v"),
                                  _split_qkv(value, cfg["num_head_channels"], cfg["use_new_attention_order"])):
                out[".".join([target, name, *leaf])] = part
        elif layer == "proj_out":
            out[".".join([target, "to_out", "0", *leaf])] = value.squeeze(-1) if value.ndim == 3 else value
        else:
            raise ValueError(f"unexpected attention parameter {key}")
    return out


def diffusers_impl(bench: BenchConfig, checkpoint: bool = False) -> tuple[Impl | None, str]:
    """diffusers' counterpart of `bench` (None and the reason when there is none), with its
    gradient checkpointing on if `checkpoint`."""
    if importlib.util.find_spec("diffusers") is None:
        return None, "diffusers is not installed"
    import diffusers

    def build(cls: type, config: dict[str, Any]) -> Callable[[], nn.Module]:
        def make() -> nn.Module:
            model = cls(**config)
            if checkpoint:
                model.enable_gradient_checkpointing()
            return model
        return make

    cfg = full_unet_kwargs(bench.unet)
    if cfg["use_spatial_transformer"]:
        try:
            config = diffusers_config_from_unet_kwargs(bench.unet, sample_size=bench.size)
        except ValueError as err:
            return None, str(err)
        return Impl("diffusers", "diffusers.UNet2DConditionModel",
                    build(diffusers.UNet2DConditionModel, config),
                    lambda w: unet_state_dict_to_diffusers(w, bench.unet),
                    lambda m, x, t, c: m(x, t, encoder_hidden_states=c, return_dict=False)[0],
                    lambda m: m.compile_repeated_blocks()), ""
    problems = _unet2d_problems(cfg)
    if problems:
        return None, "no diffusers UNet2DModel mapping for " + "; ".join(problems)
    config = unet2d_config(cfg, bench.size)
    return Impl("diffusers", "diffusers.UNet2DModel", build(diffusers.UNet2DModel, config),
                lambda w: unet2d_state_dict(w, cfg), lambda m, x, t, c: m(x, t, return_dict=False)[0],
                lambda m: m.compile_repeated_blocks()), ""


# --- inputs, weights, FLOPs, cross-check ----------------------------------------------------------------

def random_weights(model: nn.Module, device: torch.device, seed: int) -> dict[str, torch.Tensor]:
    """Random values on `device` for every parameter of `model` (which may be on meta).

    Matrices / kernels ~ N(0, 1/fan_in); norm scales 1 + N(0, 0.02^2); other vectors N(0, 0.02^2).
    The zero-initialised output convs get values too, so the cross-check sees every path.
    """
    gen = torch.Generator(device).manual_seed(seed)
    weights = {}
    for module_name, module in model.named_modules():
        is_norm = isinstance(module, (nn.GroupNorm, nn.LayerNorm))
        for name, p in module.named_parameters(recurse=False):
            noise = torch.randn(p.shape, generator=gen, device=device)
            if p.ndim >= 2:
                value = noise * p[0].numel() ** -0.5
            else:
                value = (1.0 if is_norm and name == "weight" else 0.0) + 0.02 * noise
            weights[f"{module_name}.{name}" if module_name else name] = value
    return weights


def make_inputs(bench: BenchConfig, batch: int, device: torch.device, seed: int) -> dict[str, torch.Tensor | None]:
    """Latents x, target noise, integer timesteps and (for cross-attention) a context."""
    gen = torch.Generator(device).manual_seed(seed)
    shape = (batch, bench.unet["in_channels"], bench.size, bench.size)
    out_shape = (batch, bench.unet["out_channels"], bench.size, bench.size)
    context = None
    if bench.tokens is not None:
        context = torch.randn(batch, bench.tokens, bench.unet["context_dim"], generator=gen, device=device)
    return {"x": torch.randn(shape, generator=gen, device=device),
            "target": torch.randn(out_shape, generator=gen, device=device),
            "t": torch.randint(0, 1000, (batch,), generator=gen, device=device),
            "context": context}


def forward_flops(impl: Impl, bench: BenchConfig) -> int:
    """Forward FLOPs for one sample, counted on the meta device (no memory, no compute)."""
    meta = torch.device("meta")
    with torch.device(meta):
        model = impl.make().eval()
    inputs = make_inputs(bench, 1, torch.device("cpu"), 0)
    inputs = {k: None if v is None else v.to(meta) for k, v in inputs.items()}
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        impl.call(model, inputs["x"], inputs["t"], inputs["context"])
    return counter.get_total_flops()


@contextmanager
def fp32_math(device: torch.device, tf32: bool) -> Iterator[None]:
    """Let CUDA matmuls and convolutions use TF32 (tf32=True) or strict IEEE fp32, restoring after."""
    if device.type != "cuda":
        yield
        return
    # The long-standing switches: inductor reads both, and they keep torch's newer per-backend
    # fp32_precision settings consistent (mixing the two APIs makes some reads raise).
    saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    torch.backends.cudnn.allow_tf32 = tf32
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.allow_tf32 = saved[1]


def cross_check(impls: list[Impl], bench: BenchConfig, weights: Mapping[str, torch.Tensor],
                device: torch.device) -> dict[str, float]:
    """Largest |output difference| of each other implementation from the first, fp32 (no TF32), batch 2."""
    inputs = make_inputs(bench, 2, device, 1)
    outputs = {}
    with fp32_math(device, tf32=False), torch.no_grad():
        for impl in impls:
            model = impl.build(weights, device).eval()
            outputs[impl.name] = impl.call(model, inputs["x"], inputs["t"], inputs["context"]).float()
            del model
            cleanup(device)
    first = outputs[impls[0].name]
    result = {"output_max_abs": first.abs().max().item()}
    for name, out in list(outputs.items())[1:]:
        result[f"max_abs_diff_{name}"] = (out - first).abs().max().item()
    return result


# --- measurement ---------------------------------------------------------------------------------------

def cleanup(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


class PeakMemory:
    """Peak memory of one phase in bytes, above what was in use at `start` (the model is built
    after it, so its weights count; the shared master weights and inputs of other phases do not).

    CUDA: torch.cuda.max_memory_allocated. CPU (Linux, glibc): the peak RSS (VmHWM, reset through
    /proc/self/clear_refs); free heap memory is first handed back (malloc_trim), so memory cached
    by an earlier phase is not reused unseen.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.base = 0

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
            Path("/proc/self/clear_refs").write_text("5")
            self.base = _status_kib("VmRSS") * 1024

    def peak(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) - self.base
        return _status_kib("VmHWM") * 1024 - self.base


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


@dataclass(frozen=True)
class Row:
    """One measured setting; both implementations run it."""

    config: str
    batch: int
    precision: str
    compile: bool | str  # False, True (the whole model) or "blocks" (COMPILE_LABELS)
    ours: tuple[str, ...] = ("base",)  # our variants (VARIANTS keys)
    phases: tuple[str, ...] = ("train", "infer")
    checkpoint: bool = False  # gradient checkpointing in both implementations (acts in training only)


def measure_phase(impl: Impl, phase: str, row: Row, bench: BenchConfig, weights: Mapping[str, torch.Tensor],
                  device: torch.device, steps: int, warmup: int, deadline: float) -> dict[str, float]:
    """Time `steps` training steps (phase 'train') or no-grad forwards ('infer') after `warmup`.
    Stops early (after at least MIN_TIMED_STEPS timed steps) once `deadline` (perf_counter) has passed."""
    memory = PeakMemory(device)
    cleanup(device)
    memory.start()
    step = make_step(impl, phase, row, bench, weights, device)
    with fp32_math(device, tf32=row.precision == "tf32"):
        begin = time.perf_counter()
        for _ in range(warmup):
            step()
        synchronize(device)
        warmup_s = time.perf_counter() - begin
        step_s, best_s, done = timed_steps(step, steps, deadline, device)
    return {"samples_per_s": row.batch / step_s, "step_ms": 1e3 * step_s, "best_step_ms": best_s and 1e3 * best_s,
            "best_samples_per_s": best_s and row.batch / best_s, "steps": done, "warmup_s": warmup_s,
            "peak_gib": memory.peak() / GIB}


# Row.compile -> the table's "compile" column, and the progress log's label.
COMPILE_LABELS: dict[bool | str, str] = {False: "no", True: "yes", "blocks": "blocks"}
COMPILE_LOG: dict[bool | str, str] = {False: "", True: " compiled", "blocks": " blocks compiled"}


def make_step(impl: Impl, phase: str, row: Row, bench: BenchConfig, weights: Mapping[str, torch.Tensor],
              device: torch.device) -> Callable[[], None]:
    """A fresh model of `impl` and one step of `phase` on it: 'train' = forward + MSE + backward +
    AdamW (fused where training uses it), 'infer' = a no-grad forward."""
    model = impl.build(weights, device)
    if row.compile == "blocks":
        impl.compile_blocks(model)
    fn = torch.compile(model) if row.compile is True else model
    inputs = make_inputs(bench, row.batch, device, 2)
    x, t, ctx, target = inputs["x"], inputs["t"], inputs["context"], inputs["target"]
    if phase == "train":
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, **fast_optimizer_kwargs(model.parameters()))

        def step() -> None:
            with autocast(device, row.precision):
                out = impl.call(fn, x, t, ctx)
            F.mse_loss(out.float(), target).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    else:
        model.eval()

        def step() -> None:
            with torch.no_grad(), autocast(device, row.precision):
                impl.call(fn, x, t, ctx)
    return step


def paired_ratios(impls: list[Impl], phase: str, row: Row, bench: BenchConfig, weights: Mapping[str, torch.Tensor],
                  device: torch.device, steps: int, warmup: int) -> dict[str, float]:
    """Per implementation but the last (diffusers): the median over `steps` step pairs of the last
    one's step time over its own, with every model resident and the steps interleaved (the order
    alternating per pair), so both sides of each pair meet the same machine load."""
    step_fns = {impl.name: make_step(impl, phase, row, bench, weights, device) for impl in impls}
    times: dict[str, list[float]] = {name: [] for name in step_fns}
    with fp32_math(device, tf32=row.precision == "tf32"):
        for fn in step_fns.values():
            for _ in range(warmup):
                fn()
        for i in range(steps):
            for name in (list(step_fns) if i % 2 == 0 else list(step_fns)[::-1]):
                synchronize(device)
                begin = time.perf_counter()
                step_fns[name]()
                synchronize(device)
                times[name].append(time.perf_counter() - begin)
    theirs = times[impls[-1].name]
    return {impl.name: statistics.median(b / a for a, b in zip(times[impl.name], theirs)) for impl in impls[:-1]}


def timed_steps(step: Callable[[], None], steps: int, deadline: float,
                device: torch.device) -> tuple[float, float | None, int]:
    """(seconds per step, fastest step or None, steps run); stops early past `deadline`, but not
    before MIN_TIMED_STEPS steps (a single step after compilation can still include a recompile).

    CUDA: the loop's mean with one synchronisation at the end, so the host queues the next step
    while the device works, as in training. CPU: the median step, because on a shared machine
    other processes add long, random stalls to some steps.
    """
    if device.type == "cuda":
        begin, done = time.perf_counter(), 0
        while done < steps and (done < MIN_TIMED_STEPS or time.perf_counter() < deadline):
            step()
            done += 1
        synchronize(device)
        return (time.perf_counter() - begin) / done, None, done
    times: list[float] = []
    while len(times) < steps and (len(times) < MIN_TIMED_STEPS or time.perf_counter() < deadline):
        begin = time.perf_counter()
        step()
        times.append(time.perf_counter() - begin)
    return statistics.median(times), min(times), len(times)


def peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    """The FLOP/s that MFU divides by: --peak-tflops, else 989e12 on H100/H200, else none."""
    if override_tflops is not None:
        return override_tflops * 1e12
    if device.type == "cuda" and any(n in torch.cuda.get_device_name(device) for n in ("H100", "H200")):
        return H100_BF16_DENSE_FLOPS
    return None


def environment(device: torch.device) -> dict[str, Any]:
    """What the numbers depend on: versions, device, threads, machine load."""
    info: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(),
                            "device": device.type, "threads": torch.get_num_threads(),
                            "cpu_count": os.cpu_count(), "load_avg": [round(v, 2) for v in os.getloadavg()]}
    if importlib.util.find_spec("diffusers") is not None:
        import diffusers
        info["diffusers"] = diffusers.__version__
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    else:
        cpuinfo = Path("/proc/cpuinfo")
        names = [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines()
                 if ln.startswith("model name")] if cpuinfo.exists() else []
        info["device_name"] = names[0] if names else platform.processor()
    return info


class Benchmark:
    """Runs rows, emitting one JSON record per (row, implementation) and one per row of ratios."""

    def __init__(self, device: torch.device, steps: int, warmup: int, rounds: int, deadline: float,
                 peak: float | None, seed: int, out: Path | None, paired: int = 0):
        self.device, self.steps, self.warmup, self.rounds, self.paired = device, steps, warmup, rounds, paired
        self.deadline, self.peak, self.seed, self.out = deadline, peak, seed, out
        self.records: list[dict[str, Any]] = []
        self._checked: dict[tuple[str, tuple[str, ...]], dict[str, float]] = {}
        self._flops: dict[tuple[str, Any], int] = {}

    def emit(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        line = json.dumps(record)
        print(line, flush=True)
        if self.out is not None:
            with self.out.open("a") as f:
                f.write(line + "\n")

    def run(self, row: Row) -> None:
        bench = bench_config(row.config)
        impls = [ours_impl(bench.unet, v, row.checkpoint) for v in row.ours]
        theirs, why_not = diffusers_impl(bench, row.checkpoint)
        if theirs is not None:
            impls.append(theirs)
        else:
            log(f"[{row.config}] measuring ours only: {why_not}")
        with torch.device("meta"):
            skeleton = impls[0].make()
        weights = random_weights(skeleton, self.device, self.seed)
        checked = (row.config, tuple(i.name for i in impls))
        if checked not in self._checked:
            self._checked[checked] = cross_check(impls, bench, weights, self.device)
            log(f"[{row.config}] cross-check (fp32, batch 2): {self._checked[checked]}")
        base = {"config": row.config, "batch": row.batch, "precision": row.precision, "compile": row.compile,
                "checkpoint": row.checkpoint,
                "ours_variants": {f"ours-{v}" if v != "base" else "ours": VARIANTS[v] for v in row.ours},
                "latent": [bench.unet["in_channels"], bench.size, bench.size], "context_tokens": bench.tokens,
                "params_m": sum(v.numel() for v in weights.values()) / 1e6, "steps": self.steps,
                "warmup": self.warmup, "n_rounds": self.rounds,
                "timing": "mean step, one sync" if self.device.type == "cuda" else "median step",
                **environment(self.device), "cross_check": self._checked[checked],
                "diffusers_unavailable": why_not or None}
        runs: dict[str, dict[str, list[dict[str, float]]]] = {i.name: {p: [] for p in row.phases} for i in impls}
        skipped: list[str] = []
        errors: list[str] = []
        for r in range(self.rounds):
            order = impls if r % 2 == 0 else impls[::-1]  # alternate who goes first against drift in load
            for phase in row.phases:
                for impl in order:
                    if time.perf_counter() > self.deadline:
                        skipped.append(f"{impl.name} {phase} round {r}")
                        continue
                    log(f"[{row.config} b{row.batch} {row.precision}{COMPILE_LOG[row.compile]}"
                        f"{' checkpointed' if row.checkpoint else ''}] "
                        f"{impl.name} {phase} round {r + 1}/{self.rounds}")
                    try:
                        runs[impl.name][phase].append(measure_phase(
                            impl, phase, row, bench, weights, self.device, self.steps, self.warmup, self.deadline))
                        log(f"  -> {runs[impl.name][phase][-1]}")  # kept in the log should the run be cut
                    except Exception as err:  # e.g. out of memory: record it, go on with the other phases
                        errors.append(f"{impl.name} {phase} round {r}: {type(err).__name__}: {str(err)[:300]}")
                        log(f"FAILED {errors[-1]}")
                    if row.compile:
                        torch._dynamo.reset()  # drop the compiled graphs (and the memory they hold)
                    cleanup(self.device)
        paired: dict[str, dict[str, float]] = {impl.name: {} for impl in impls[:-1]}
        if self.paired and theirs is not None:
            for phase in row.phases:
                if time.perf_counter() > self.deadline:
                    skipped.append(f"paired {phase}")
                    continue
                log(f"[{row.config} b{row.batch} {row.precision}] paired {phase}: {self.paired} interleaved step pairs")
                for name, value in paired_ratios(impls, phase, row, bench, weights, self.device, self.paired,
                                                 self.warmup).items():
                    paired[name][f"{phase}_paired_ratio"] = value
                cleanup(self.device)
        if skipped:
            log(f"time limit reached: skipped {', '.join(skipped)}")
        per_impl = {}
        for impl in impls:
            per_impl[impl.name] = self._impl_record(impl, row.config, bench, runs[impl.name])
            self.emit({**base, "kind": "impl", **per_impl[impl.name], "skipped": skipped or None,
                       "errors": [e for e in errors if e.startswith(impl.name)] or None,
                       "load_avg_end": [round(v, 2) for v in os.getloadavg()]})
        if theirs is not None:
            for ours in impls[:-1]:
                self.emit({**base, "kind": "ratio", "impl": ours.name, "paired_steps": self.paired or None,
                           **ratios(per_impl[ours.name], per_impl["diffusers"]), **paired[ours.name]})

    def _impl_record(self, impl: Impl, config: str, bench: BenchConfig,
                     runs: dict[str, list[dict[str, float]]]) -> dict[str, Any]:
        key = (impl.model_class, config)
        if key not in self._flops:  # the variants of one network share its FLOPs; counting SD-1 takes a while
            self._flops[key] = forward_flops(impl, bench)
        flops = self._flops[key]
        record: dict[str, Any] = {"impl": impl.name, "model_class": impl.model_class,
                                  "fwd_gflop_per_sample": flops / 1e9, "rounds": runs}
        for phase, key in (("train", "train_samples_per_s"), ("infer", "infer_evals_per_s")):
            values = [m["samples_per_s"] for m in runs.get(phase, [])]
            record[key] = statistics.median(values) if values else None
            # CPU: the fastest step of all rounds, which the stalls of a shared machine cannot slow.
            best = [m["best_samples_per_s"] for m in runs.get(phase, []) if m["best_samples_per_s"]]
            record[key.replace("_per_s", "_best_per_s")] = max(best) if best else None
            record[f"{phase}_peak_gib"] = max((m["peak_gib"] for m in runs.get(phase, [])), default=None)
        record["mfu"] = (3 * flops * record["train_samples_per_s"] / self.peak
                         if self.peak and record["train_samples_per_s"] else None)
        return record


def ratios(ours: Mapping[str, Any], theirs: Mapping[str, Any]) -> dict[str, float | None]:
    """ours / diffusers for speed (higher is better for us) and memory (lower is better for us)."""
    def ratio(key: str) -> float | None:
        a, b = ours.get(key), theirs.get(key)
        return a / b if a and b else None
    return {"train_ratio": ratio("train_samples_per_s"), "infer_ratio": ratio("infer_evals_per_s"),
            "train_best_ratio": ratio("train_samples_best_per_s"), "infer_best_ratio": ratio("infer_evals_best_per_s"),
            "train_mem_ratio": ratio("train_peak_gib"), "infer_mem_ratio": ratio("infer_peak_gib")}


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _with_extras(value: Any, spec: str, bold: bool = False, **extras: Any) -> str:
    """'value', followed by '(label: x; ...)' for the extras that exist (fastest step, paired)."""
    text = f"**{_fmt(value, spec)}**" if bold else _fmt(value, spec)
    given = [f"{label.replace('_', ' ')}: {_fmt(v, spec)}" for label, v in extras.items() if v is not None]
    return f"{text} ({'; '.join(given)})" if given else text


def markdown_table(records: list[dict[str, Any]]) -> str:
    """One line per implementation and one 'ours / diffusers' line per row. Speeds are medians;
    on the CPU the rate of the fastest step and, with --paired, the paired ratio follow in brackets."""
    lines = ["| config | impl | batch | precision | compile | grad ckpt | train samples/s | MFU | "
             "evals/s (inference) | peak GiB train | peak GiB infer | fwd GFLOP/sample |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        head = (f"| {r['config']} | {{}} | {r['batch']} | {r['precision']} | {COMPILE_LABELS[r['compile']]} | "
                f"{'yes' if r.get('checkpoint') else 'no'} |")
        if r["kind"] == "impl":
            lines.append(head.format(r["impl"]) + " | ".join([
                " " + _with_extras(r["train_samples_per_s"], ".2f", fastest_step=r.get("train_samples_best_per_s")),
                _fmt(r["mfu"] and 100 * r["mfu"], ".1f") + ("%" if r["mfu"] else ""),
                _with_extras(r["infer_evals_per_s"], ".2f", fastest_step=r.get("infer_evals_best_per_s")),
                _fmt(r["train_peak_gib"], ".2f"),
                _fmt(r["infer_peak_gib"], ".2f"), f"{r['fwd_gflop_per_sample']:.1f} |"]))
        else:
            lines.append(head.format(f"**{r['impl']} / diffusers**") + " | ".join([
                " " + _with_extras(r["train_ratio"], ".3f", True, fastest_step=r.get("train_best_ratio"),
                                   paired=r.get("train_paired_ratio")), "",
                _with_extras(r["infer_ratio"], ".3f", True, fastest_step=r.get("infer_best_ratio"),
                             paired=r.get("infer_paired_ratio")),
                _fmt(r["train_mem_ratio"], ".3f"), _fmt(r["infer_mem_ratio"], ".3f"), " |"]))
    return "\n".join(lines)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- command line --------------------------------------------------------------------------------------

SUITES: dict[str, dict[str, Any]] = {
    # The CPU targets: eager fp32, small config (ratio >= 1.0 for training and sampling). One
    # thread: on a shared 2-core machine a descheduled OpenMP thread stalls every parallel op.
    # channels_last is the only fast path that acts in float32.
    # Five rounds of 8 steps: with 3 of 6 the training ratio of one unchanged pair of networks
    # ranged 0.93-1.15 over three runs on one day.
    # Then 30 interleaved step pairs per phase (--paired): the steadiest ratio on a shared machine.
    "cpu": dict(rows=[Row("small", 4, "fp32", False, ours=("base", "cl"))], steps=8, warmup=2, rounds=5,
                time_limit=None, threads=1, paired=30),
    # The GPU targets. The eager rows take seconds a phase, so they go first: SD-1 with our fast
    # paths (base and cl were measured twice on 2026-11-26, docs/benchmarks.md), CelebA-HQ LDM-4,
    # SD-1 training with gradient checkpointing in both. Then SD-1 compiled training, whose
    # compilation takes about 100 s per implementation (both must start before the time limit),
    # SD-1 with only the attention blocks compiled (regional compilation: short warm-ups), and
    # last SD-1 compiled inference; the limit may cut the last two.
    "gpu": dict(rows=[Row("sd1", 32, "bf16", False, ours=("fast",)),
                      Row("celebahq", 48, "bf16", False, ours=("fast",)),
                      Row("sd1", 32, "bf16", False, ours=("fast",), phases=("train",), checkpoint=True),
                      Row("sd1", 32, "bf16", True, ours=("fast",), phases=("train",)),
                      Row("sd1", 32, "bf16", "blocks", ours=("fast",)),
                      Row("sd1", 32, "bf16", True, ours=("fast",), phases=("infer",))],
                steps=10, warmup=3, rounds=1, time_limit=330.0, threads=None, paired=0),
}
DEFAULTS = dict(steps=10, warmup=3, rounds=1, time_limit=None, threads=None, paired=0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=sorted(SUITES), help="a preset list of rows (excludes --config, "
                   "--batch, --precision, --compile, --checkpoint)")
    p.add_argument("--config", choices=("small", "celebahq", "sd1"), help="UNet shape to measure")
    p.add_argument("--batch", type=int, help="batch size (default 8)")
    p.add_argument("--precision", choices=PRECISIONS, help="fp32 (strict), tf32 (CUDA: TF32 matmul/conv) or "
                   "bf16 (autocast, fp32 weights); default fp32")
    p.add_argument("--compile", nargs="?", const="full", choices=("full", "blocks"),
                   help="torch.compile both implementations: full (the default) the whole UNet, blocks only its "
                   "repeated attention blocks (ours: compile_blocks; diffusers: compile_repeated_blocks)")
    p.add_argument("--checkpoint", action="store_true", help="gradient checkpointing in both implementations "
                   "(ours: use_checkpoint per block; diffusers: enable_gradient_checkpointing)")
    p.add_argument("--ours", default="base", help="comma-separated variants of our UNet to measure: "
                   f"{', '.join(VARIANTS)} (default base)")
    p.add_argument("--phases", default="train,infer", help="comma-separated phases: train, infer (default both)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    p.add_argument("--steps", type=int, help="timed steps per phase (default 10; suite cpu: 8)")
    p.add_argument("--warmup", type=int, help="untimed steps per phase, compilation included "
                   "(default 3; suite cpu: 2)")
    p.add_argument("--rounds", type=int, help="repetitions of every phase, alternating which implementation "
                   "goes first; the median is reported (default 1; suite cpu: 5)")
    p.add_argument("--time-limit", type=float, help="seconds; phases not started by then are skipped and "
                   "timed loops stop early (default none; suite gpu: 330)")
    p.add_argument("--paired", type=int, help="after the rounds, this many interleaved step pairs per phase with "
                   "all models resident; the ratio record gets the median paired ratio (default 0 = off; "
                   "suite cpu: 30)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's; suite cpu: 1)")
    p.add_argument("--peak-tflops", type=float, help="peak TFLOP/s for MFU (default 989 on H100/H200, "
                   "else no MFU)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--out", type=Path, help="append the JSON lines to this file")
    args = p.parse_args(argv)
    single = {"--config": args.config, "--batch": args.batch, "--precision": args.precision}
    if args.suite:
        given = [k for k, v in single.items() if v is not None] + \
            [flag for flag, on in (("--compile", args.compile), ("--checkpoint", args.checkpoint)) if on]
        if given:
            p.error(f"--suite sets the rows itself; drop {', '.join(given)}")
    elif args.config is None:
        p.error("give --config (small, celebahq, sd1) or --suite (cpu, gpu)")
    if any(v is not None and v < 1 for v in (args.steps, args.rounds, args.threads, args.batch)):
        p.error("--steps, --rounds, --threads and --batch must be >= 1")
    if args.warmup is not None and args.warmup < 0:
        p.error("--warmup must be >= 0")
    if args.paired is not None and args.paired < 0:
        p.error("--paired must be >= 0")
    args.ours, args.phases = tuple(args.ours.split(",")), tuple(args.phases.split(","))
    args.compile = {None: False, "full": True, "blocks": "blocks"}[args.compile]  # as Row.compile
    if not set(args.ours) <= set(VARIANTS) or len(set(args.ours)) != len(args.ours):
        p.error(f"--ours takes distinct names among {', '.join(VARIANTS)}")
    if not set(args.phases) <= {"train", "infer"} or not args.phases:
        p.error("--phases takes train and/or infer")
    return args


def resolve_device(name: str) -> torch.device:
    """--device value -> torch.device, refusing CUDA where there is none."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device {name}: only cpu and cuda are supported")
    return device


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = resolve_device(args.device)
    if args.suite:
        preset = SUITES[args.suite]
        rows = preset["rows"]
    else:
        preset = DEFAULTS
        rows = [Row(args.config, args.batch or 8, args.precision or "fp32", args.compile, args.ours, args.phases,
                    args.checkpoint)]
    opts = {k: getattr(args, k) if getattr(args, k) is not None else preset[k] for k in DEFAULTS}
    if device.type == "cpu" and any(r.precision == "tf32" for r in rows):
        raise SystemExit("--precision tf32 needs a CUDA device (TF32 is a tensor-core format)")
    if opts["threads"] is not None:
        torch.set_num_threads(opts["threads"])
    deadline = time.perf_counter() + opts["time_limit"] if opts["time_limit"] else float("inf")
    bench = Benchmark(device, opts["steps"], opts["warmup"], opts["rounds"], deadline,
                      peak_flops(device, args.peak_tflops), args.seed, args.out, opts["paired"])
    for row in rows:
        if time.perf_counter() > deadline:
            log(f"time limit reached: row {row} not measured")
            continue
        bench.run(row)
    print()
    print(markdown_table(bench.records))


if __name__ == "__main__":
    main()
