"""Where one UNet training step spends its time: torch.profiler over one step of our UNet
(forward + MSE + backward + AdamW, as benchmarks/unet.py times it), after warm-up steps.

Prints (and appends to --out, as markdown) the top kernels by self time on the device (CUDA) or
the top leaf operators by self CPU time (CPU), and the share of the step in convolutions,
attention, matrix products, norms, elementwise work, the optimizer and the rest. The evidence for
the next speed-up toward docs/benchmarks.md's targets.

    python benchmarks/profile_step.py --config sd1 --batch 32 --precision bf16              # eager
    python benchmarks/profile_step.py --config sd1 --batch 32 --precision bf16 --compile    # torch.compile
    python benchmarks/profile_step.py --config small --batch 2 --device cpu                 # a CPU rehearsal
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import bench_device, synchronize  # noqa: E402
from unet import VARIANTS, Row, bench_config, make_step, ours_impl, random_weights  # noqa: E402

# First match wins; names of cuDNN / cuBLAS / CUTLASS / inductor (triton_*) kernels and of aten ops.
CATEGORIES: list[tuple[str, re.Pattern]] = [
    ("attention", re.compile(r"flash|fmha|attention|sdpa|softmax", re.I)),
    ("convolution", re.compile(r"conv|cudnn|implicit_gemm|winograd|fprop|dgrad|wgrad|nchw|nhwc", re.I)),
    ("norm", re.compile(r"norm|welford|triton_red|triton_per", re.I)),
    ("matmul", re.compile(r"gemm|matmul|\bmm\b|aten::mm|addmm|bmm|cutlass|nvjet|linear", re.I)),
    ("optimizer", re.compile(r"adam|multi_tensor|foreach", re.I)),
    ("elementwise", re.compile(r"elementwise|vectorized|triton_poi|silu|gelu|add|mul|copy|cat|fill|where|"
                               r"reduce|sum|mean|pow|div|cast|to_copy", re.I)),
]


def category(name: str) -> str:
    """The category of a kernel or operator name (CATEGORIES), or 'other'."""
    return next((label for label, pattern in CATEGORIES if pattern.search(name)), "other")


def profile_step(config: str, batch: int, precision: str, variant: str, compile_model: bool,
                 device: torch.device, warmup: int, top: int) -> dict:
    """Profile one training step after `warmup` steps; the top `top` entries and the category shares."""
    bench = bench_config(config)
    impl = ours_impl(bench.unet, variant)
    with torch.device("meta"):
        weights = random_weights(impl.make(), device, 0)
    row = Row(config, batch, precision, compile_model, ours=(variant,), phases=("train",))
    step = make_step(impl, "train", row, bench, weights, device)
    begin = time.perf_counter()
    for _ in range(warmup):
        step()
    synchronize(device)
    warmup_s = time.perf_counter() - begin
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        synchronize(device)
    on_device = device.type == "cuda"
    events = []
    for e in prof.key_averages():
        self_us = e.self_device_time_total if on_device else e.self_cpu_time_total
        # CUDA: kernels carry the device self time (operators only launch them). CPU: leaf aten ops.
        if self_us > 0 and (on_device or e.key.startswith("aten::")):
            events.append((e.key, self_us, e.count))
    events.sort(key=lambda item: -item[1])
    total = sum(us for _, us, _ in events) or 1.0
    shares: dict[str, float] = {}
    for name, us, _ in events:
        shares[category(name)] = shares.get(category(name), 0.0) + us / total
    return {"kind": "profile", "config": config, "batch": batch, "precision": precision, "variant": variant,
            "compile": compile_model, "device": torch.cuda.get_device_name(device) if on_device else "cpu",
            "torch": torch.__version__, "warmup_s": warmup_s, "step_ms": total / 1e3, "time": "device" if on_device
            else "cpu", "shares": dict(sorted(shares.items(), key=lambda kv: -kv[1])),
            "top": [{"name": n, "ms": us / 1e3, "calls": c, "share": us / total, "category": category(n)}
                    for n, us, c in events[:top]]}


def markdown(record: dict) -> str:
    """The record as a markdown section: category shares, then the top entries."""
    compiled = "compiled" if record["compile"] else "eager"
    lines = [f"### {record['config']} b{record['batch']} {record['precision']} {record['variant']} {compiled} "
             f"({record['device']}, torch {record['torch']})", "",
             f"{record['time']} time in the profiled step: {record['step_ms']:.1f} ms "
             f"(warm-up {record['warmup_s']:.1f} s)", "",
             "| category | share |", "|---|---|"]
    lines += [f"| {k} | {v:.1%} |" for k, v in record["shares"].items()]
    lines += ["", "| kernel / operator | category | calls | ms | share |", "|---|---|---|---|---|"]
    for e in record["top"]:
        name = e["name"] if len(e["name"]) <= 90 else e["name"][:87] + "..."
        lines.append(f"| `{name}` | {e['category']} | {e['calls']} | {e['ms']:.2f} | {e['share']:.1%} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=("small", "celebahq", "sd1"), default="sd1")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    p.add_argument("--ours", choices=sorted(VARIANTS), default="fast", help="our UNet variant (default fast)")
    p.add_argument("--compile", action="store_true", help="torch.compile the whole UNet")
    p.add_argument("--device", default="auto")
    p.add_argument("--warmup", type=int, default=3, help="steps before the profiled one (compilation included)")
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--out", type=Path, help="append the markdown section to this file (JSON beside it, .jsonl)")
    args = p.parse_args(argv)
    record = profile_step(args.config, args.batch, args.precision, args.ours, args.compile,
                          bench_device(args.device), args.warmup, args.top)
    text = markdown(record)
    print(text)
    if args.out:
        with open(args.out, "a") as fh:
            fh.write(text + "\n")
        with open(args.out.with_suffix(".jsonl"), "a") as fh:
            fh.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
