"""End-to-end first-stage training through the train CLI: real shards, a real Trainer, files."""
from __future__ import annotations

import csv
import json

import pytest
import torch
import yaml

from conftest import TINY_RUN, compose
from ldm.cli.train import train
from ldm.modules.autoencoder import AutoencoderModule
from ldm.modules.loading import load_module


@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_toy_autoencoder_run_writes_a_complete_run_folder(tmp_path, kind):
    out = tmp_path / "run"
    cfg = compose("train", [f"experiment=toy/ae_{kind}", *TINY_RUN, "model.loss.disc_start=2"], out, tmp_path / "data")
    metrics = train(cfg)
    for name in ("config.yaml", "metrics.json", "checkpoints/last.ckpt", "csv/metrics.csv"):
        assert (out / name).is_file(), name
    assert list((out / "images").glob("val_reconstructions_step*.png"))
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["global_step"] > 0 and 0 < saved["val/psnr"] < 60 and saved["val/rfid"] >= 0
    assert metrics["val/psnr"] == pytest.approx(saved["val/psnr"])
    assert yaml.safe_load((out / "config.yaml").read_text())["first_stage"]["f"] == 4
    with (out / "csv" / "metrics.csv").open() as fh:
        columns = next(csv.reader(fh))
    assert "train/disc_loss" in columns  # the discriminator switched on at step 2 of 3
    if kind == "vq":
        assert "train/perplexity" in columns

    module = load_module(out)
    assert isinstance(module, AutoencoderModule) and module.ae_steps == 3
    assert module.first_stage.downsampling_factor == 4
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        z = module.first_stage.encode(x).mode()
    assert z.shape == (2, 4, 8, 8)
    assert ckpt["hyper_parameters"]["effective_lr"] == pytest.approx(2e-3)
