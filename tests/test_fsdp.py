"""trainer=fsdp trains for real, on the CPU over gloo (2 processes under torchrun): with the EMA
on (sharded), against the same run under DDP, into a checkpoint that a single-process sample.py
reads, and resumed under FSDP from a mid-run checkpoint."""
from __future__ import annotations

import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import TINY_RUN, compose
from ldm.cli.sample import sample
from test_launchers import TORCHRUN, TRAIN, assert_same_weights, env, free_port, probe, probes

# A text LDM with EMA straight on 32 px pixels (no first-stage run), 2 epochs of 3 steps.
LDM = ["experiment=toy/ldm_text", *TINY_RUN, "first_stage=identity", "unet.in_channels=3", "unet.out_channels=3",
       "unet.model_channels=32", "model.log_images=2", "model.val_sampler.num_steps=2", "cond.p_uncond=0.2",
       "trainer.max_epochs=2", "trainer.accelerator=cpu", "trainer.precision=32-true",
       "callbacks.checkpoint.every_n_train_steps=3", "launch.prepare_timeout_s=120"]
FSDP = ["trainer=fsdp", "trainer.strategy.mixed_precision=null"]
DDP = ["trainer=torchrun"]


def torchrun(tmp_path, name: str, overrides: list[str]) -> None:
    cmd = [TORCHRUN, "--standalone", "--nproc-per-node=2", f"--master-port={free_port()}", TRAIN, *overrides]
    done = subprocess.run(cmd, cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{name}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


def state(path) -> dict:
    return torch.load(path, weights_only=False, map_location="cpu")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    data = tmp / "data"
    for name, trainer in (("fsdp", FSDP), ("ddp", DDP)):
        torchrun(tmp, name, [*LDM, *trainer, f"hydra.run.dir={tmp / name}", f"paths.data_dir={data}",
                             *probe(tmp / f"{name}-probe")])
    return tmp


def test_fsdp_trains_on_the_cpu_like_ddp_with_its_ema(runs):
    fsdp, ddp = probes(runs / "fsdp-probe"), probes(runs / "ddp-probe")
    # the same batches, the same losses to float rounding (step by step, on both ranks)
    for a, b in zip(fsdp, ddp):
        assert a["batches"] == b["batches"] and len(a["losses"]) == 6
        np.testing.assert_allclose(a["losses"], b["losses"], rtol=1e-5)
    a, b = state(runs / "fsdp" / "checkpoints" / "last.ckpt"), state(runs / "ddp" / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 6
    sa, sb = a["state_dict"], b["state_dict"]
    assert sa.keys() == sb.keys()
    # the whole EMA in the FSDP checkpoint: every shadow in its parameter's full shape
    ema = [k for k in sa if k.startswith("model_ema.") and sa[k].ndim]
    assert ema and all(sa[k].shape == sb[k].shape for k in sa)
    assert int(sa["model_ema.num_updates"]) == int(sb["model_ema.num_updates"]) == 6
    # weights (and EMA) a tiny share of their training update apart: float rounding that Adam's
    # normalised first steps turn into up to +-lr for near-zero gradients
    start = state(runs / "fsdp" / "checkpoints" / "step0000003.ckpt")["state_dict"]
    floats = [k for k in sa if sa[k].is_floating_point()]
    between = sum(((sa[k] - sb[k]).double() ** 2).sum() for k in floats).sqrt()
    moved = sum(((sb[k] - start[k]).double() ** 2).sum() for k in floats).sqrt()
    assert between / moved < 1e-2, (between / moved).item()
    # and it is an average, not a copy of the weights
    assert not torch.equal(sa["model_ema.diffusion_modelout2weight"], sa["model.diffusion_model.out.2.weight"])


def test_fsdp_checkpoint_samples_in_a_single_process(runs, tmp_path):
    """sample.py reads the FSDP run like any other; with the EMA its images match the DDP run's."""
    images = {}
    for name in ("fsdp", "ddp"):
        out = tmp_path / name
        sample(compose("sample", [f"ckpt={runs / name}", f"out_dir={out}", "prompt=a small red circle", "n=2",
                                  "steps=3", "guidance=2.0"], tmp_path / "s"))
        images[name] = np.asarray(Image.open(out / "samples" / "00001.png")).astype(int)
    assert np.abs(images["fsdp"] - images["ddp"]).max() <= 2


def test_fsdp_resumes_under_fsdp_exactly(runs):
    """From the step-3 checkpoint (end of epoch 1) in a new folder: the uninterrupted run's weights,
    EMA included, and its batches."""
    tmp = runs
    torchrun(tmp, "resumed", [*LDM, *FSDP, f"hydra.run.dir={tmp / 'resumed'}", f"paths.data_dir={tmp / 'data'}",
                              f"ckpt_path={tmp / 'fsdp' / 'checkpoints' / 'step0000003.ckpt'}",
                              *probe(tmp / "resumed-probe")])
    resumed, straight = probes(tmp / "resumed-probe"), probes(tmp / "fsdp-probe")
    for a, b in zip(resumed, straight):
        assert a["start_step"] == 3 and a["batches"] == b["batches"][3:]
        np.testing.assert_allclose(a["losses"], b["losses"][3:], rtol=1e-6)
    a = state(tmp / "resumed" / "checkpoints" / "last.ckpt")["state_dict"]
    b = state(tmp / "fsdp" / "checkpoints" / "last.ckpt")["state_dict"]
    # (bit for bit in the runs here; to float rounding is what a CPU guarantees: see assert_same_weights)
    assert_same_weights(b, a, state(tmp / "fsdp" / "checkpoints" / "step0000003.ckpt")["state_dict"], rtol=1e-3)
