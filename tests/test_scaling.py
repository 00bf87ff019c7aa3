"""Scale-out: trainer configs for SLURM / torchrun / FSDP, the submitit sweep launcher, learning-rate
scaling and schedules, the throughput callback, denoising rows, and NaN / out-of-memory handling."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from lightning_fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment
from pytorch_lightning.loggers import CSVLogger

from helpers import CONFIGS, TINY_RUN, compose
from ldm.cli.train import train
from ldm.modules.autoencoder import AutoencoderModule
from ldm.modules.latent_diffusion import LatentDiffusion
from ldm.modules.nonfinite import NonFiniteLossError
from ldm.nets.unet import TimestepEmbedSequential
from ldm.nets.wrapper import DiffusionWrapper
from ldm.utils.lr import lr_factor, trainer_effective_lr

AE = ["experiment=toy/ae_kl", *TINY_RUN]
# A pixel-space (f = 1) toy LDM: no first-stage run to train first.
LDM = ["experiment=toy/ldm_uncond", "first_stage=identity", "unet.in_channels=3", "unet.out_channels=3",
       "unet.model_channels=32", "model.val_sampler.num_steps=2", *TINY_RUN]


def metrics_rows(run: Path) -> list[dict[str, str]]:
    with open(run / "csv" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def logged(run: Path, key: str) -> list[float]:
    return [float(row[key]) for row in metrics_rows(run) if row.get(key)]


# --- trainer and launcher configs ---------------------------------------------------------------

def test_slurm_trainer_takes_nodes_and_devices_from_slurm(tmp_path, monkeypatch):
    env = {"SLURM_NTASKS": "8", "SLURM_NTASKS_PER_NODE": "4", "SLURM_NNODES": "2", "SLURM_JOB_NAME": "train",
           "SLURM_NODELIST": "node[1-2]", "SLURM_JOB_ID": "123", "SLURM_PROCID": "5", "SLURM_LOCALID": "1",
           "SLURM_NODEID": "1"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    cfg = compose("train", ["trainer=slurm", "trainer.accelerator=cpu"], tmp_path / "run")
    assert (cfg.trainer.devices, cfg.trainer.num_nodes) == (4, 2)
    trainer = instantiate(cfg.trainer, logger=False)
    assert isinstance(trainer.strategy.cluster_environment, SLURMEnvironment)
    assert (trainer.world_size, trainer.global_rank, trainer.local_rank) == (8, 5, 1)
    # an explicit trainer.num_nodes wins over the environment
    assert compose("train", ["trainer=slurm", "trainer.num_nodes=3"], tmp_path / "run").trainer.num_nodes == 3


def test_torchrun_trainer_takes_nodes_and_devices_from_torchelastic(tmp_path, monkeypatch):
    env = {"TORCHELASTIC_RUN_ID": "r", "RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2",
           "GROUP_WORLD_SIZE": "2", "GROUP_RANK": "1", "MASTER_ADDR": "localhost", "MASTER_PORT": "29500"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    cfg = compose("train", ["trainer=torchrun", "trainer.accelerator=cpu"], tmp_path / "run")
    trainer = instantiate(cfg.trainer, logger=False)
    assert isinstance(trainer.strategy.cluster_environment, TorchElasticEnvironment)
    assert (trainer.num_devices, trainer.num_nodes, trainer.world_size, trainer.global_rank) == (2, 2, 4, 3)


def test_fsdp_trainer_wraps_unet_blocks_and_writes_full_checkpoints(tmp_path):
    cfg = compose("train", ["trainer=fsdp",
                            "trainer.strategy.activation_checkpointing_policy={_target_:torch.distributed.fsdp.wrap.ModuleWrapPolicy,"
                            "module_classes:[${trainer.strategy.auto_wrap_policy.module_classes.0}]}"],
                  tmp_path / "run")
    assert cfg.trainer.precision == "bf16-mixed"
    strategy = instantiate(cfg.trainer.strategy)
    units = {TimestepEmbedSequential, DiffusionWrapper}  # the blocks, and the denoiser the EMA covers
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == units
    # activations recomputed per block only: not also for the denoiser around them
    assert strategy._activation_checkpointing_kwargs["auto_wrap_policy"]._module_classes == {TimestepEmbedSequential}
    assert strategy._state_dict_type == "full" and strategy.sharding_strategy.name == "FULL_SHARD"
    assert "find_unused_parameters" not in strategy.kwargs  # no DDP-only keys reach FSDP


def test_slurm_sweep_launcher_sizes_jobs_from_the_trainer(tmp_path):
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher

    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = hydra_compose("train", ["hydra/launcher=slurm", "trainer=slurm", "trainer.devices=4",
                                      "trainer.num_nodes=2", "hydra.launcher.partition=gpu",
                                      f"hydra.sweep.dir={tmp_path}"], return_hydra_config=True)
    launcher = instantiate(cfg.hydra.launcher)
    assert isinstance(launcher, SlurmLauncher)
    params = launcher.params
    assert (params["nodes"], params["tasks_per_node"], params["gpus_per_node"]) == (2, 4, 4)
    assert params["partition"] == "gpu" and params["signal_delay_s"] == 90


@pytest.mark.parametrize("key", ["accumulate_grad_batches=2", "gradient_clip_val=1.0"])
def test_autoencoder_names_its_own_accumulation_and_clipping_for_the_trainers(tmp_path, key):
    """Manual optimisation: the trainer's keys are refused, naming the model's that do the job."""
    with pytest.raises(ValueError, match="use model.accumulate_grad_batches and model.gradient_clip_val"):
        train(compose("train", [*AE, f"trainer.{key}"], tmp_path / "run", tmp_path / "data"))


# --- learning rate -------------------------------------------------------------------------------

class _Data(pl.LightningDataModule):
    batch_size = 8


@pytest.mark.parametrize("nodes,devices,accumulate", [(1, 1, 1), (1, 2, 1), (2, 2, 1), (3, 2, 4), (4, 1, 2)])
def test_effective_lr_scales_with_nodes_devices_and_accumulation(tmp_path, nodes, devices, accumulate):
    trainer = pl.Trainer(accelerator="cpu", devices=devices, num_nodes=nodes, strategy="ddp",
                         accumulate_grad_batches=accumulate, logger=CSVLogger(tmp_path, name="", version=""),
                         enable_progress_bar=False, enable_checkpointing=False)
    trainer.datamodule = _Data()  # what fit(datamodule=...) attaches
    module = pl.LightningModule()
    module.trainer = trainer
    lr = trainer_effective_lr(module, 1e-6, scale_lr=True)
    assert lr == pytest.approx(1e-6 * 8 * nodes * devices * accumulate)
    assert module.hparams["effective_lr"] == lr
    assert f"{nodes * devices} GPUs ({nodes} nodes x {devices})" in module.hparams["lr_scaling"]
    assert trainer_effective_lr(module, 1e-6, scale_lr=False) == 1e-6
    trainer.logger.save()
    assert float(next(r["lr/effective"] for r in metrics_rows_of(tmp_path) if r["lr/effective"])) == pytest.approx(lr)


def test_lr_factor_warms_up_then_holds_or_decays():
    assert [lr_factor(s, 4) for s in (0, 3, 4, 1000)] == [0.25, 1.0, 1.0, 1.0]
    cosine = [lr_factor(s, 2, 12, "cosine") for s in (0, 1, 2, 7, 12, 50)]
    assert cosine == pytest.approx([0.5, 1.0, 1.0, 0.5, 0.0, 0.0])
    assert lr_factor(5, 0, 10, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    with pytest.raises(ValueError, match="set trainer.max_steps"):
        lr_factor(0, 2, None, "cosine")
    with pytest.raises(ValueError, match="unknown lr schedule"):
        lr_factor(0, 2, 10, "linear")


def test_ldm_cosine_lr_schedule_decays_over_max_steps(tmp_path):
    out = tmp_path / "run"
    train(compose("train", [*LDM, "model.lr_schedule=cosine", "model.warmup_steps=1", "model.base_lr=1e-3",
                            "trainer.max_steps=3"], out, tmp_path / "data"))
    assert logged(out, "lr-AdamW") == pytest.approx([1e-3, 1e-3, 0.5e-3])  # steps 0, 1, 2 of 3
    with pytest.raises(ValueError, match="set trainer.max_steps"):
        train(compose("train", [*LDM, "model.lr_schedule=cosine", "trainer.max_steps=-1"], tmp_path / "no_total",
                      tmp_path / "data"))


def metrics_rows_of(folder: Path) -> list[dict[str, str]]:
    with open(folder / "metrics.csv") as f:
        return list(csv.DictReader(f))


# --- throughput and denoising rows ----------------------------------------------------------------

def test_throughput_and_mfu_of_the_autoencoder_are_logged(tmp_path):
    out = tmp_path / "run"
    train(compose("train", [*AE, "callbacks.throughput.window_size=2", "callbacks.throughput.available_flops=1e12"],
                  out, tmp_path / "data"))
    for key in ("perf/samples_per_s", "perf/steps_per_s", "perf/tflops_per_s_per_device", "perf/mfu"):
        values = logged(out, key)
        assert values and all(math.isfinite(v) and v > 0 for v in values), key
    # MFU is the achieved FLOP/s over the 1e12 given
    row = next(r for r in metrics_rows(out) if r["perf/mfu"])
    assert float(row["perf/mfu"]) == pytest.approx(float(row["perf/tflops_per_s_per_device"]))
    assert logged(out, "lr/effective") and (out / "csv" / "hparams.yaml").read_text().count("effective_lr:") == 1


def test_ldm_throughput_without_peak_flops_and_denoising_rows(tmp_path):
    """On the CPU no peak FLOP/s is known: rates are logged, MFU is not. The denoising rows land
    in images/ at their step schedule."""
    out = tmp_path / "run"
    train(compose("train", [*LDM, "callbacks.throughput.window_size=2", "+callbacks@callbacks.denoising=denoising",
                            "callbacks.denoising.every_n_steps=2", "callbacks.denoising.num_samples=2",
                            "callbacks.denoising.num_steps=4", "callbacks.denoising.num_columns=3"],
                  out, tmp_path / "data"))
    assert all(v > 0 for v in logged(out, "perf/samples_per_s")) and logged(out, "perf/tflops_per_s_per_device")
    assert "perf/mfu" not in metrics_rows(out)[0]
    grids = sorted((out / "images").glob("train_denoising_step*.png"))
    assert [g.name for g in grids] == ["train_denoising_step0000002.png"]
    from PIL import Image
    w, h = Image.open(grids[0]).size
    assert (w, h) == (3 * 34 + 2, 2 * 34 + 2)  # 3 columns x 2 samples of 32 px, 2 px padding


def test_stand_in_parameters_keep_gradients_and_hooks_off_the_real_ones():
    from ldm.callbacks.throughput import stand_in_parameters

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
    net[2].weight = net[0].weight  # tied: one stand-in for both uses
    net[1].bias.requires_grad_(False)
    fired = []
    for name, param in net.named_parameters():
        if param.requires_grad:
            param.register_post_accumulate_grad_hook(lambda p, name=name: fired.append(name))
    before = dict(net.named_parameters())
    x = torch.randn(4, 3)
    with stand_in_parameters(net):
        assert net[0].weight is net[2].weight and net[0].weight is not before["0.weight"]
        assert not net[1].bias.requires_grad
        net(x).sum().backward()
        inside_grad = net[0].weight.grad.clone()
    assert fired == [] and all(p.grad is None for p in net.parameters())
    assert all(param is before[name] for name, param in net.named_parameters()) and net[2].weight is before["0.weight"]
    net(x).sum().backward()  # the same pass on the real parameters: the same gradient, hooks fired
    torch.testing.assert_close(net[0].weight.grad, inside_grad)
    assert sorted(set(fired)) == ["0.bias", "0.weight", "1.weight", "2.bias"]


def test_denoising_rows_end_with_the_sample():
    from ldm.callbacks.denoising import denoising_rows
    from ldm.first_stage.factory import identity
    from ldm.nets.unet import UNetModel

    torch.manual_seed(0)
    unet = UNetModel(in_channels=3, out_channels=3, model_channels=32, channel_mult=[1], num_res_blocks=1,
                     attention_resolutions=[], num_head_channels=32)
    module = LatentDiffusion(unet, identity(), timesteps=100, ema_decay=None, image_size=16).eval()
    rows = denoising_rows(module, {"image": torch.zeros(2, 3, 16, 16)}, num_steps=5, num_columns=4)
    assert rows.shape == (8, 3, 16, 16)
    sample = module.sample({"image": torch.zeros(2, 3, 16, 16)}, n=2, num_steps=5, progress=False, use_ema=False)
    torch.testing.assert_close(rows.view(2, 4, 3, 16, 16)[:, -1], sample.clamp(-1, 1))


# --- failures -------------------------------------------------------------------------------------

def nan_from_step(monkeypatch, cls, method: str, step: int) -> None:
    """Make `cls.method`'s loss NaN once the trainer reaches optimiser step `step`."""
    original = getattr(cls, method)

    def poisoned(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if self.trainer.global_step < step:
            return out
        return (out[0] * float("nan"), *out[1:]) if isinstance(out, tuple) else out * float("nan")

    monkeypatch.setattr(cls, method, poisoned)


def test_nan_loss_stops_naming_the_checkpoint_before_the_weights_that_gave_it(tmp_path, monkeypatch):
    # A checkpoint every step: last.ckpt and step0000002.ckpt hold the weights the NaN came from;
    # the one named is step 1's, and the run resumes from it.
    nan_from_step(monkeypatch, LatentDiffusion, "_step", step=2)
    out = tmp_path / "run"
    args = [*LDM, "callbacks.checkpoint.every_n_train_steps=1"]
    with pytest.raises(NonFiniteLossError, match="at step 2") as err:
        train(compose("train", args, out, tmp_path / "data"))
    good = out / "checkpoints" / "step0000001.ckpt"
    assert f"resume with ckpt_path={good}" in str(err.value) and "trainer.gradient_clip_val" in str(err.value)
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    monkeypatch.undo()
    train(compose("train", [*args, f"ckpt_path={good}"], out, tmp_path / "data"))
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3


@pytest.mark.parametrize("kind", ["ldm", "autoencoder"])
def test_diverging_learning_rate_names_no_poisoned_checkpoint(tmp_path, kind):
    # base_lr=1e6: the first update makes the weights ~1e5-1e6 (finite), the next loss is NaN.
    # The step-1 checkpoint holds those weights: it must not be named; start again instead.
    base = {"ldm": LDM, "autoencoder": [*AE, "model.rfid_extractor=null", "model.loss.perceptual=null",
                                        "model.loss.perceptual_weight=0"]}[kind]
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match="at step 1") as err:
        train(compose("train", [*base, "model.base_lr=1e6", "callbacks.checkpoint.every_n_train_steps=1"], out,
                      tmp_path / "data"))
    message = str(err.value)
    poisoned = torch.load(out / "checkpoints" / "step0000001.ckpt", weights_only=True)["state_dict"]
    assert max(float(v.abs().max()) for v in poisoned.values() if v.is_floating_point()) > 1e4
    assert "ckpt_path=" not in message and "start the run again" in message
    assert "lower model.base_lr (now 1000000.0)" in message
    # the autoencoders step their optimisers themselves and clip with their own setting
    assert ("set trainer.gradient_clip_val" in message) == (kind == "ldm")
    assert ("set model.gradient_clip_val" in message) == (kind == "autoencoder")


def test_last_good_checkpoint_is_loaded_and_checked(tmp_path):
    from ldm.utils.run_checkpoints import checkpoints_in, last_good_checkpoint

    def save(name: str, step: int, weight: float, exp_avg_sq: float = 1.0) -> None:
        torch.save({"global_step": step, "state_dict": {"w": torch.full((3,), weight)},
                    "optimizer_states": [{"state": {0: {"exp_avg_sq": torch.tensor([exp_avg_sq])}}}]},
                   tmp_path / name)

    save("step1.ckpt", 1, 1.0)
    save("step2.ckpt", 2, 1.0, exp_avg_sq=float("inf"))  # finite weights, but not the optimiser state
    save("step3.ckpt", 3, float("nan"))
    save("step4.ckpt", 4, 1.0)  # saved at the step whose weights gave the NaN: too late
    found = checkpoints_in(tmp_path)
    assert last_good_checkpoint(found, before_step=4).path.name == "step1.ckpt"
    assert last_good_checkpoint(found, before_step=1) is None


def test_nan_loss_skip_leaves_the_ldm_weights_and_counts(tmp_path, monkeypatch):
    nan_from_step(monkeypatch, LatentDiffusion, "_step", step=1)
    out = tmp_path / "run"
    train(compose("train", [*LDM, "model.nonfinite_loss=skip", "model.ema_decay=null"], out, tmp_path / "data"))
    assert logged(out, "train/nonfinite_skipped")[-1] == 2  # batches 2 and 3
    state = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_nan_loss_skip_makes_no_autoencoder_update(tmp_path, monkeypatch):
    # manual optimisation: each batch makes an autoencoder and a discriminator step (global_step += 2)
    nan_from_step(monkeypatch, AutoencoderModule, "reconstruct", step=2)
    out = tmp_path / "run"
    train(compose("train", [*AE, "model.nonfinite_loss=skip", "model.loss.disc_start=0"], out, tmp_path / "data"))
    checkpoint = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["ae_steps"] == 1 and checkpoint["global_step"] == 2  # the two later batches: no update
    assert logged(out, "train/nonfinite_skipped")[-1] == 2
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values() if v.is_floating_point())


def test_out_of_memory_names_batch_devices_and_accumulation(tmp_path, monkeypatch):
    def oom(self, batch, batch_idx):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(LatentDiffusion, "training_step", oom)
    with pytest.raises(torch.OutOfMemoryError) as err:
        train(compose("train", [*LDM, "data.batch_size=4", "trainer.accumulate_grad_batches=2"],
                      tmp_path / "run", tmp_path / "data"))
    message = str(err.value)
    assert "data.batch_size=4 per device on 1 device(s) x 1 node(s)" in message
    assert "data.batch_size=2 trainer.accumulate_grad_batches=4" in message  # same effective batch of 8
    assert "Tried to allocate" in str(err.value.__cause__)
