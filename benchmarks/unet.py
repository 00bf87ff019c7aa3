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
import importlib.util
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (GIB, PeakMemory, autocast, bench_device, cleanup, environment, fmt, load_average,  # noqa: E402
                     log, paired_step_ratios, synchronize, timed_steps, write_record)

from ldm.convert.diffusers_unet import (  # noqa: E402
    diffusers_config_from_unet_kwargs,
    diffusers_unet2d_config,
    full_unet_kwargs,
    unet_state_dict_to_diffusers,
    unet_state_dict_to_diffusers_unet2d,
)
from ldm.modules.base import fast_optimizer_kwargs  # noqa: E402
from ldm.nets.unet import UNetModel  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
H100_BF16_DENSE_FLOPS = 989e12
PRECISIONS = ("fp32", "tf32", "bf16")


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
    try:
        config = diffusers_unet2d_config(bench.unet, sample_size=bench.size)
    except ValueError as err:
        return None, str(err)
    return Impl("diffusers", "diffusers.UNet2DModel", build(diffusers.UNet2DModel, config),
                lambda w: unet_state_dict_to_diffusers_unet2d(w, bench.unet),
                lambda m, x, t, c: m(x, t, return_dict=False)[0],
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
    one's step time over its own, with every model resident and the steps interleaved
    (harness.paired_step_ratios)."""
    step_fns = {impl.name: make_step(impl, phase, row, bench, weights, device) for impl in impls}
    with fp32_math(device, tf32=row.precision == "tf32"):
        return paired_step_ratios(step_fns, device, steps, warmup)


def peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    """The FLOP/s that MFU divides by: --peak-tflops, else 989e12 on H100/H200, else none."""
    if override_tflops is not None:
        return override_tflops * 1e12
    if device.type == "cuda" and any(n in torch.cuda.get_device_name(device) for n in ("H100", "H200")):
        return H100_BF16_DENSE_FLOPS
    return None


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
        write_record(record, self.out)

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
                **environment(self.device, ("diffusers",)), "cross_check": self._checked[checked],
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
                       "load_avg_end": load_average()})
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


def _with_extras(value: Any, spec: str, bold: bool = False, **extras: Any) -> str:
    """'value', followed by '(label: x; ...)' for the extras that exist (fastest step, paired)."""
    text = f"**{fmt(value, spec)}**" if bold else fmt(value, spec)
    given = [f"{label.replace('_', ' ')}: {fmt(v, spec)}" for label, v in extras.items() if v is not None]
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
                fmt(r["mfu"] and 100 * r["mfu"], ".1f") + ("%" if r["mfu"] else ""),
                _with_extras(r["infer_evals_per_s"], ".2f", fastest_step=r.get("infer_evals_best_per_s")),
                fmt(r["train_peak_gib"], ".2f"),
                fmt(r["infer_peak_gib"], ".2f"), f"{r['fwd_gflop_per_sample']:.1f} |"]))
        else:
            lines.append(head.format(f"**{r['impl']} / diffusers**") + " | ".join([
                " " + _with_extras(r["train_ratio"], ".3f", True, fastest_step=r.get("train_best_ratio"),
                                   paired=r.get("train_paired_ratio")), "",
                _with_extras(r["infer_ratio"], ".3f", True, fastest_step=r.get("infer_best_ratio"),
                             paired=r.get("infer_paired_ratio")),
                fmt(r["train_mem_ratio"], ".3f"), fmt(r["infer_mem_ratio"], ".3f"), " |"]))
    return "\n".join(lines)


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


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = bench_device(args.device)
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
