"""End-to-end first-stage training through the train CLI: real shards, a real Trainer, files."""
from __future__ import annotations

import csv
import json

import pytest
import pytorch_lightning as pl
import torch
import yaml
from hydra.utils import instantiate

from helpers import TINY_RUN, compose
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


class GradNorms(pl.Callback):
    """Records each optimiser's gradient norm as it steps and the data each step saw."""

    def __init__(self):
        self.norms: list[float] = []
        self.grads: list[torch.Tensor] = []
        self.keys: list[str] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.keys += list(batch["__key__"])

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        self.grads.append(torch.cat([g.flatten() for g in grads]))
        self.norms.append(float(torch.linalg.vector_norm(self.grads[-1])))


def _ae_run(tmp_path, name, *overrides):
    """A VQ autoencoder run (no posterior noise, no perceptual network) of 2 optimiser steps' worth
    of data, returning its final state and the recorder."""
    recorder = GradNorms()
    cfg = compose("train", ["experiment=toy/ae_vq", *TINY_RUN, "model.rfid_extractor=null", "model.log_images=0",
                            "+trainer.limit_val_batches=0", "trainer.max_epochs=1", *overrides], tmp_path / name, tmp_path / "data")
    model = instantiate(cfg.model, _convert_="all")
    model.build_config = {}
    datamodule = instantiate(cfg.data, _convert_="all")
    datamodule.prepare_data()
    trainer = instantiate(cfg.trainer, callbacks=[recorder], logger=False, enable_checkpointing=False)
    trainer.fit(model, datamodule=datamodule)
    return model, recorder


def test_autoencoder_accumulation_over_k_batches_equals_one_batch_k_times_larger(tmp_path):
    torch.manual_seed(0)
    big, big_rec = _ae_run(tmp_path, "big", "data.batch_size=8", "data.batches_per_epoch=2",
                           "model.loss.disc_start=100000")
    torch.manual_seed(0)
    acc, acc_rec = _ae_run(tmp_path, "acc", "data.batch_size=2", "data.batches_per_epoch=8",
                           "model.accumulate_grad_batches=4", "model.loss.disc_start=100000")
    assert big_rec.keys == acc_rec.keys  # the same images in the same order
    assert big.ae_steps == acc.ae_steps == 2 and len(acc_rec.norms) == 2
    # The first update's gradient is the same vector; the second is taken at weights that Adam moved
    # by +-lr wherever a gradient entry is near zero (its sign then depends on the last bits), so
    # only its norm is compared.
    first = (acc_rec.grads[0] - big_rec.grads[0]).abs().max() / big_rec.grads[0].abs().max()
    assert first < 1e-4  # float32 sums in another order
    assert acc_rec.norms == pytest.approx(big_rec.norms, rel=1e-3)


def test_autoencoder_with_the_gan_accumulates_and_clips_both_optimisers(tmp_path):
    model, recorder = _ae_run(tmp_path, "gan", "data.batch_size=2", "data.batches_per_epoch=6", "model.loss.disc_start=0",
                              "model.accumulate_grad_batches=3", "model.gradient_clip_val=0.01")
    # 6 batches, a step every 3: 2 autoencoder steps and 2 discriminator steps, each clipped
    assert model.ae_steps == 2 and model.trainer.global_step == 4 and len(recorder.norms) == 4
    assert all(0 < n <= 0.01 * (1 + 1e-5) for n in recorder.norms)
    with pytest.raises(Exception, match="accumulate_grad_batches must be >= 1"):  # hydra wraps the ValueError
        _ae_run(tmp_path, "bad", "model.accumulate_grad_batches=0")
