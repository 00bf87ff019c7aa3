"""Training speed in the loggers: samples/s, steps/s and, when the FLOPs are known, MFU.

Lightning's `Throughput` does the windowed rates and the MFU arithmetic; this callback feeds it
the timings, measures the FLOPs of one training update once (torch's FLOP counter through
Lightning's `measure_flops`, on the first batch) and logs the results under perf/.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytorch_lightning as pl
import torch
from lightning_fabric.utilities.throughput import Throughput, get_available_flops
from pytorch_lightning.strategies import DDPStrategy, SingleDeviceStrategy
from pytorch_lightning.utilities import rank_zero_warn
from torch import nn


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype matmuls run in under a Lightning precision setting ("bf16-mixed", "32-true", ...):
    the row of the peak-FLOPs table that applies."""
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    if precision.startswith("64"):
        return torch.float64
    return torch.float32


@contextmanager
def stand_in_parameters(module: nn.Module) -> Iterator[None]:
    """Within the block every parameter of `module` is a new leaf sharing the original's storage
    (one stand-in per shared parameter), restored afterwards. A backward pass inside fills only
    the stand-ins' gradients and fires none of the hooks on the originals: DDP's reducer counts
    those hooks in the first step of a static graph, and a backward outside its own forward that
    reaches only some parameters throws it out of step ("Expected to have finished reduction in
    the prior iteration")."""
    originals: list[tuple[nn.Module, str, nn.Parameter]] = []
    stand_ins: dict[int, nn.Parameter] = {}
    for submodule in module.modules():
        for name, param in submodule.named_parameters(recurse=False):
            if id(param) not in stand_ins:
                stand_ins[id(param)] = nn.Parameter(param.detach(), requires_grad=param.requires_grad)
            originals.append((submodule, name, param))
            setattr(submodule, name, stand_ins[id(param)])
    try:
        yield
    finally:
        for submodule, name, param in originals:
            setattr(submodule, name, param)


def batch_size(batch: dict) -> int:
    """Samples in a batch dict: the length of its first batched entry (tensor or list)."""
    for value in batch.values():
        if isinstance(value, list) or (isinstance(value, torch.Tensor) and value.ndim > 0):
            return len(value)
    raise ValueError(f"cannot tell the batch size of a batch with keys {sorted(batch)}")


class ThroughputLogger(pl.Callback):
    """Logs, from rank 0, every trainer.log_every_n_steps batches:

    perf/samples_per_s: images per second over all ranks;
    perf/samples_per_s_per_device, perf/steps_per_s (optimiser updates, i.e. batches / accumulation);
    perf/tflops_per_s_per_device and perf/mfu (achieved / peak FLOP/s of one device) when the FLOPs
    of an update are known.

    The module's `measure_training_flops(batch)` (forward + backward of what one update trains) is
    called once on the first training batch, in eval mode, with the RNG state restored and on
    stand-in parameters (`stand_in_parameters`: no gradients or DDP hooks reach the real ones), so
    the run trains exactly as without this callback. It is skipped under sharded strategies (FSDP):
    there the weights exist only inside the wrapped forward, and no MFU is logged.
    Rates are averages over the last `window_size` logging intervals (trainer.log_every_n_steps
    batches each; timings are taken only then); validation time is left out.

    available_flops: peak FLOP/s of one device; None: Lightning's table for known GPUs at the
        trainer's precision (an unknown device or the CPU has none: then no MFU).
    """

    def __init__(self, window_size: int = 5, available_flops: float | None = None):
        if window_size < 2:
            raise ValueError(f"window_size must be at least 2 (rates need two timings), got {window_size}")
        self.window_size = window_size
        self.available_flops = available_flops
        self.flops_per_batch: int | None = None
        self._throughput: Throughput | None = None
        self._t0 = self._paused_at = 0.0
        self._batches = 0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        peak = self.available_flops
        if peak is None:
            peak = get_available_flops(trainer.strategy.root_device, compute_dtype(str(trainer.precision)))
        self._throughput = Throughput(available_flops=peak, world_size=trainer.world_size,
                                      window_size=self.window_size)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._throughput.reset()
        self._batches = 0
        self._t0 = time.perf_counter()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        if self.flops_per_batch is None and self._batches == 0:
            self.flops_per_batch = self._measure(trainer, pl_module, batch)
            self._t0 = time.perf_counter()  # the measurement is not training time

    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch) -> int | None:
        measure = getattr(pl_module, "measure_training_flops", None)
        if measure is None:
            return None
        if not isinstance(trainer.strategy, (SingleDeviceStrategy, DDPStrategy)):
            rank_zero_warn(f"ThroughputLogger: FLOPs are not measured under {type(trainer.strategy).__name__}; "
                           "perf/mfu is not logged")
            return None
        devices = [trainer.strategy.root_device] if trainer.strategy.root_device.type == "cuda" else []
        was_training = pl_module.training
        pl_module.eval()  # no dropout draws, no running statistics or EMA codebook updates
        try:
            with torch.random.fork_rng(devices=devices), stand_in_parameters(pl_module):
                return int(measure(batch))
        finally:
            pl_module.train(was_training)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        self._batches += 1
        if self._batches % trainer.log_every_n_steps:
            return  # timing only at logging steps: a synchronisation per step would stall the GPU queue
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()  # time finished work, not queued kernels
        samples = self._batches * batch_size(batch)
        self._throughput.update(time=time.perf_counter() - self._t0, batches=self._batches, samples=samples,
                                flops=self.flops_per_batch)
        rates = self._throughput.compute()
        if "device/samples_per_sec" not in rates:
            return  # fewer than window_size steps so far
        per_device = rates["device/samples_per_sec"]
        metrics = {"perf/samples_per_s": per_device * trainer.world_size,
                   "perf/samples_per_s_per_device": per_device,
                   "perf/steps_per_s": rates["device/batches_per_sec"] / trainer.accumulate_grad_batches}
        if "device/flops_per_sec" in rates:
            metrics["perf/tflops_per_s_per_device"] = rates["device/flops_per_sec"] / 1e12
        if "device/mfu" in rates:
            metrics["perf/mfu"] = rates["device/mfu"]
        pl_module.log_dict(metrics, rank_zero_only=True)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._paused_at = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t0 += time.perf_counter() - self._paused_at  # validation is not training time
