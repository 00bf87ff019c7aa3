"""A Hydra multirun over f through the real train.py, and autoencoder training on 2 DDP ranks."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from helpers import TINY_RUN, compose
from ldm.cli.train import train
from ldm.modules.loading import load_module

ROOT = Path(__file__).resolve().parents[1]


def test_multirun_over_f_trains_one_autoencoder_per_f(tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "train.py", "-m", "experiment=toy/ae_kl", "first_stage.f=2,8", *TINY_RUN,
           f"paths.data_dir={tmp_path / 'data'}", f"hydra.sweep.dir={sweep}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for f in (2, 8):
        run = sweep / f"first_stage.f-{f}"
        assert (run / "checkpoints" / "last.ckpt").is_file()
        assert json.loads((run / "metrics.json").read_text())["val/psnr"] > 0
        module = load_module(run)
        assert module.first_stage.downsampling_factor == f
        with torch.no_grad():
            assert module.first_stage.encode(torch.zeros(1, 3, 32, 32)).mode().shape[-1] == 32 // f


def test_autoencoder_trains_on_two_ddp_ranks_with_the_discriminator_on(tmp_path):
    out = tmp_path / "run"
    cfg = compose("train", ["experiment=toy/ae_kl", "trainer=ddp_cpu", *TINY_RUN, "model.loss.disc_start=1"], out, tmp_path / "data")
    train(cfg)
    module = load_module(out)
    assert module.ae_steps == 3  # 3 batches per rank and epoch; both ranks step together
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["train/disc_loss"] > 0 and saved["val/psnr"] > 0
    # Written by rank 0 inside the spawned run: the calling process never sees the step counter.
    assert saved["global_step"] == torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] > 0


def test_multirun_of_ddp_jobs_gives_each_job_its_own_folder(tmp_path):
    """A two-point sweep where every job trains on 2 DDP (gloo) ranks: the jobs run one after the
    other, each in the folder named after its override, with rank 0's files only there."""
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "train.py", "-m", "experiment=toy/ae_kl", "trainer=ddp_cpu", "seed=1,2", *TINY_RUN,
           f"paths.data_dir={tmp_path / 'data'}", f"hydra.sweep.dir={sweep}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(".")) == ["seed-1", "seed-2"]
    for seed in (1, 2):
        run = sweep / f"seed-{seed}"
        assert json.loads((run / "config.yaml").read_text().split("seed: ")[1].split("\n")[0]) == seed
        assert (run / "checkpoints" / "last.ckpt").is_file()
        assert load_module(run).ae_steps == 3  # both ranks stepped together through the tiny epoch
        assert json.loads((run / "metrics.json").read_text())["val/psnr"] > 0


def test_text_ldm_trains_on_two_ddp_ranks_with_static_graph_and_the_flop_count(tmp_path):
    """The throughput callback counts the FLOPs of one update with a backward pass outside DDP's
    forward. Under DDP's static graph that backward once threw the reducer out of step whenever
    some parameters got no gradient in it (here the caption encoder, run without grad there), and
    every conditional LDM experiment stopped at its first step."""
    out = tmp_path / "run"
    cfg = compose("train", ["experiment=toy/ldm_text", "first_stage=identity", "unet.in_channels=3",
                            "unet.out_channels=3", "trainer=ddp_cpu", *TINY_RUN, "model.log_images=0",
                            "callbacks.throughput.window_size=2"], out, tmp_path / "data")
    assert cfg.ddp_static_graph and cfg.callbacks.throughput is not None
    train(cfg)
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 3
    with open(out / "csv" / "metrics.csv") as f:
        flops = [float(row["perf/tflops_per_s_per_device"]) for row in csv.DictReader(f)
                 if row.get("perf/tflops_per_s_per_device")]
    assert flops and all(v > 0 for v in flops)
