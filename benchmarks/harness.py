"""What every benchmark script shares: the device, timing loops, peak memory, paired ratios,
the environment record and the JSON-lines output.

The scripts run as `python benchmarks/<name>.py`, so they import this file as `harness` (their
folder is on sys.path).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import importlib
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from ldm.utils.device import resolve_device

GIB = 2 ** 30
MIN_TIMED_STEPS = 3  # a phase cut by the time limit still times this many steps (or fewer if asked)


def log(message: str) -> None:
    """Progress to stderr (stdout carries the JSON lines)."""
    print(message, file=sys.stderr, flush=True)


def fmt(value: Any, spec: str) -> str:
    """`value` formatted with `spec`, '-' for None (table cells)."""
    return "-" if value is None else format(value, spec)


def bench_device(name: str) -> torch.device:
    """--device value (auto | cpu | cuda | cuda:N) -> torch.device; exits with the reason for a
    device that is not there or not supported."""
    try:
        device = resolve_device(name)
    except ValueError as err:
        raise SystemExit(str(err)) from err
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device {name}: only cpu and cuda are supported")
    return device


def autocast(device: torch.device, precision: str):
    """bf16 autocast for --precision bf16, nothing for the float32 precisions."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so that a clock read after it counts that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cleanup(device: torch.device) -> None:
    """Free what the last measurement left (Python garbage, CUDA cache)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


class PeakMemory:
    """Peak memory of one phase in bytes, above what was in use at `start` (build the model after
    it, so its weights count and the memory of other phases does not).

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


def timed_steps(step: Callable[[], None], steps: int, deadline: float,
                device: torch.device) -> tuple[float, float | None, int]:
    """(seconds per step, fastest step or None, steps run); stops early past `deadline`
    (perf_counter), but not before MIN_TIMED_STEPS steps (a single step after compilation can
    still include a recompile).

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


def paired_step_ratios(step_fns: Mapping[str, Callable[[], None]], device: torch.device, steps: int,
                       warmup: int) -> dict[str, float]:
    """Per step function but the last (the reference): the median over `steps` step pairs of the
    reference's step time over its own, the steps interleaved (the order alternating per pair), so
    both sides of each pair meet the same machine load. Above 1: faster than the reference."""
    names = list(step_fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for fn in step_fns.values():
        for _ in range(warmup):
            fn()
    for i in range(steps):
        for name in (names if i % 2 == 0 else names[::-1]):
            synchronize(device)
            begin = time.perf_counter()
            step_fns[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - begin)
    reference = times[names[-1]]
    return {name: statistics.median(b / a for a, b in zip(times[name], reference)) for name in names[:-1]}


def environment(device: torch.device, packages: Iterable[str] = ()) -> dict[str, Any]:
    """What the numbers depend on: versions (torch, python and `packages` where installed),
    device and its name, threads, machine load."""
    info: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(),
                            "device": device.type, "threads": torch.get_num_threads(),
                            "cpu_count": os.cpu_count(), "load_avg": load_average()}
    for package in packages:
        if importlib.util.find_spec(package) is not None:
            info[package] = importlib.import_module(package).__version__
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    else:
        cpuinfo = Path("/proc/cpuinfo")
        names = [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines()
                 if ln.startswith("model name")] if cpuinfo.exists() else []
        info["device_name"] = names[0] if names else platform.processor()
    return info


def load_average() -> list[float]:
    """The machine's 1, 5 and 15 minute load averages, rounded."""
    return [round(v, 2) for v in os.getloadavg()]


def write_record(record: Mapping[str, Any], out: Path | None) -> None:
    """One JSON line to stdout and, when `out` is given, appended to that file."""
    line = json.dumps(record)
    print(line, flush=True)
    if out is not None:
        with out.open("a") as f:
            f.write(line + "\n")
