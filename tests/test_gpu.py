"""CUDA checks: training, sampling, the reference fixtures, the latent cache, evaluation, resume
and checkpoint portability on a GPU (`pytest -m gpu`; scripts/gpu_check.sh runs them first).

Skipped without CUDA. LDM_GPU_TESTS_ON_CPU=1 runs the same tests on the CPU at the same size
(scripts/gpu_check.sh --smoke, in CI) so that they cannot rot between GPU windows; there the
CUDA-against-CPU comparisons compare the CPU with itself, bf16 autocast is the CPU's, and
torch.compile uses dynamo's eager backend (graph capture without inductor's minutes of C++
compilation). Every fp32 comparison runs with TF32 off.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import REFERENCE, TINY_RUN, compose, make_random_inception
from ldm.cli.encode_latents import encode_shards
from ldm.cli.evaluate import evaluate
from ldm.cli.train import train
from ldm.convert.reference import load_reference_checkpoint
from ldm.data.index import ShardIndex
from ldm.diffusion.samplers import SAMPLERS
from ldm.diffusion.schedule import DiffusionSchedule, make_betas
from ldm.modules.loading import load_module

pytestmark = pytest.mark.gpu

CAPTIONS = ["a small red circle on a grey background", "a large blue star on a beige background"]
# The discriminator from the first step, no networks that need downloaded weights.
AE_GAN = [*TINY_RUN, "model.loss.disc_start=0", "model.rfid_extractor=null", "model.loss.perceptual=null",
          "model.loss.perceptual_weight=0", "logger=csv"]
FAST = ["unet.channels_last=true", "unet.fp32_norms=false"]


@pytest.fixture(scope="module")
def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if os.environ.get("LDM_GPU_TESTS_ON_CPU") == "1":
        return torch.device("cpu")
    pytest.skip("needs a CUDA device (LDM_GPU_TESTS_ON_CPU=1 rehearses these tests on the CPU)")


@pytest.fixture(autouse=True)
def exact_float32():
    """TF32 off: fp32 on the GPU is then comparable with the CPU and the reference outputs."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(scope="module")
def cheap_compile_on_cpu(device):
    """On the CPU rehearsal, torch.compile with dynamo's eager backend (see the module docstring)."""
    if device.type == "cuda":
        yield
        return
    original = torch.compile
    torch.compile = lambda model=None, **kw: original(model, **{**kw, "backend": "eager", "mode": None})
    yield
    torch.compile = original


def on(device: torch.device) -> list[str]:
    """Overrides that put a training run on `device` with trainer=gpu (bf16-mixed)."""
    return ["trainer=gpu"] + ([] if device.type == "cuda" else ["trainer.accelerator=cpu"])


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| over max |b|."""
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-12))


def read_metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gpu_data")


@pytest.fixture(scope="module")
def ae_run(tmp_path_factory, device, data_dir) -> Path:
    """A tiny KL-f4 autoencoder trained on `device` in bf16-mixed with the GAN on."""
    out = tmp_path_factory.mktemp("gpu_ae") / "run"
    train(compose("train", ["experiment=toy/ae_kl", *AE_GAN, *on(device)], out, data_dir))
    return out


@pytest.fixture(scope="module")
def text_run(tmp_path_factory, device, data_dir, ae_run) -> Path:
    """A tiny text LDM on `ae_run`, trained on `device` in bf16-mixed with the fast paths."""
    out = tmp_path_factory.mktemp("gpu_text") / "run"
    train(compose("train", ["experiment=toy/ldm_text", *TINY_RUN, *on(device), *FAST, f"first_stage.path={ae_run}"],
                  out, data_dir))
    return out


def assert_gan_trained(run: Path) -> None:
    """Both optimisers stepped with finite losses, and the checkpoint holds finite weights."""
    metrics = read_metrics(run)
    assert metrics["global_step"] == 6  # 3 batches, generator and discriminator each step
    for key in ("train/rec_loss", "train/disc_loss", "train/g_loss"):
        assert math.isfinite(metrics[key]), key
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_kl_autoencoder_trains_with_the_gan_in_bf16(ae_run):
    assert_gan_trained(ae_run)


def test_vq_autoencoder_trains_with_the_gan_in_bf16(tmp_path, device, data_dir):
    out = tmp_path / "run"
    train(compose("train", ["experiment=toy/ae_vq", *AE_GAN, *on(device)], out, data_dir))
    assert_gan_trained(out)


def unet_io(model, device: torch.device, batch: dict) -> tuple:
    """A fixed UNet input (x_t, t, condition) of `model` on `device`."""
    model = model.to(device)
    shape = model.latent_shape(32)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, *shape, generator=g).to(device)
    t = torch.tensor([10, 700], device=device)
    batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    return x, t, model.condition(batch, shape[1:])


CONDITIONS = {
    "text": {"caption": CAPTIONS},
    "class": {"class_label": torch.tensor([0, 5])},
    "sr": {"lowres": torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1},
}


@pytest.mark.parametrize("cond", sorted(CONDITIONS))
def test_ldm_trains_in_bf16_with_the_fast_paths_close_to_float32(tmp_path, device, data_dir, ae_run, text_run, cond):
    out = text_run
    if cond != "text":
        out = tmp_path / "run"
        train(compose("train", [f"experiment=toy/ldm_{cond}", *TINY_RUN, *on(device), *FAST,
                                f"first_stage.path={ae_run}"], out, data_dir))
    metrics = read_metrics(out)
    assert metrics["global_step"] == 3 and math.isfinite(metrics["train/loss"])
    model = load_module(out)
    unet = model.model.diffusion_model
    assert unet.channels_last and unet.config["fp32_norms"] is False
    x, t, c = unet_io(model, device, CONDITIONS[cond])
    with torch.no_grad():
        full = model.model(x, t, c)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            half = model.model(x, t, c)
    # bf16 changes the result (autocast was on), by less than bf16's few significant digits
    assert 0 < relative_error(half, full) < 0.05


def test_ldm_trains_with_compiled_blocks_and_matches_eager(tmp_path, device, data_dir, ae_run, cheap_compile_on_cpu):
    out = tmp_path / "run"
    train(compose("train", ["experiment=toy/ldm_text", *TINY_RUN, *on(device), *FAST, "model.compile=blocks",
                            f"first_stage.path={ae_run}"], out, data_dir))
    assert read_metrics(out)["global_step"] == 3
    model = load_module(out)
    x, t, c = unet_io(model, device, CONDITIONS["text"])
    with torch.no_grad():
        eager = model.model(x, t, c)
        assert model.model.diffusion_model.compile_blocks() > 0
        compiled = model.model(x, t, c)
    assert relative_error(compiled, eager) < 1e-4


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_with_guidance_on_the_device_equals_the_cpu(text_run, device, name):
    model = load_module(text_run)
    steps = {"num_steps": 6}
    if name == "ddpm":  # it walks every step of the schedule: 100 instead of the model's 1000
        model.schedule = DiffusionSchedule(make_betas("linear", 100, 0.0015, 0.0195))
        steps = {}
    kwargs = dict(batch={"caption": CAPTIONS}, name=name, guidance_scale=3.0, seeds=[4, 9], progress=False,
                  return_latents=True, **steps)
    cpu = model.sample(**kwargs)
    gpu = model.to(device).sample(**kwargs)
    assert gpu.device.type == device.type and torch.isfinite(gpu).all()
    assert relative_error(gpu.cpu(), cpu) < 1e-4


@pytest.mark.parametrize("name", ["txt_crossattn_f4", "uncond_selfattn_f4"])
def test_reference_fixtures_reproduced_on_the_device_in_float32(device, name):
    io = torch.load(REFERENCE / f"{name}_io.pt", weights_only=True)
    uncond = 0 if io["config"].get("conditioning_key") else None
    module = load_reference_checkpoint(REFERENCE / f"{name}.ckpt", io["config"], uncond_value=uncond).to(device)
    u, a = io["unet"], io["autoencoder"]
    with torch.no_grad():
        cond = {"crossattn": module.encode_condition(u["class_label"].to(device))} if "class_label" in u else None
        assert relative_error(module.model(u["x"].to(device), u["t"].to(device), cond).cpu(), u["out"]) < 1e-5
        decoded = module.first_stage_model.decode(a["posterior_mean"].to(device))
        assert relative_error(decoded.cpu(), a["decoded_from_mean"]) < 1e-5
    for sampler in ("ddim", "plms"):
        s = io[sampler]
        batch = {"class_label": s["class_label"]} if s["class_label"] is not None else None
        latent = module.sample(batch, n=s["x_T"].shape[0], name=sampler, num_steps=s["steps"],
                               guidance_scale=s["guidance_scale"], x_T=s["x_T"], compat=True, progress=False,
                               return_latents=True, **({"eta": s["eta"]} if sampler == "ddim" else {}))
        assert relative_error(latent.cpu(), s["latent"]) < 2e-5, sampler
        assert relative_error(module.decode_latents(latent).cpu(), s["image"]) < 2e-5, sampler


def test_latent_cache_written_on_the_device_equals_the_cpu_cache(tmp_path, device, data_dir, ae_run):
    shards = str(data_dir / "shapes-32" / "val")
    kw = dict(batch_size=4, dtype="float32", workers=0, progress=False)
    on_device = encode_shards(ae_run, shards, tmp_path / "dev", device=device.type, **kw)
    on_cpu = encode_shards(ae_run, shards, tmp_path / "cpu", device="cpu", **kw)
    assert on_device.total == on_cpu.total == 8

    def moments(index: ShardIndex, folder: Path) -> np.ndarray:
        import io
        import tarfile

        arrays = []
        for shard in index.shards:
            with tarfile.open(folder / shard) as tar:
                for member in sorted(m.name for m in tar.getmembers() if m.name.endswith(".npy")):
                    arrays.append(np.load(io.BytesIO(tar.extractfile(member).read())))
        return np.stack(arrays)

    a, b = moments(on_device, tmp_path / "dev"), moments(on_cpu, tmp_path / "cpu")
    assert a.shape == b.shape and a.shape[0] == 8
    assert relative_error(torch.from_numpy(a), torch.from_numpy(b)) < 1e-4


def test_evaluation_callback_and_evaluate_py_with_inception_on_the_device(tmp_path, device, data_dir, ae_run,
                                                                          monkeypatch):
    monkeypatch.setenv("LDM_INCEPTION_WEIGHTS", str(make_random_inception(tmp_path / "inception.pth")))
    out = tmp_path / "run"
    small = ["kid_subsets=5", "kid_subset_size=4", "is_splits=2"]
    callback = ["+callbacks@callbacks.evaluation=evaluation", "callbacks.evaluation.every_n_steps=3",
                "callbacks.evaluation.num_samples=8", "callbacks.evaluation.steps=3",
                "callbacks.evaluation.metrics=[fid,kid,is]", *(f"callbacks.evaluation.{s}" for s in small)]
    train(compose("train", ["experiment=toy/ldm_text", *TINY_RUN, *on(device), "features=inception",
                            f"first_stage.path={ae_run}", *callback], out, data_dir))
    logged = [json.loads(x) for x in (out / "metrics" / "eval.jsonl").read_text().splitlines()]
    assert logged and logged[-1]["features"] == "inception-v3-tf-2015-12-05"
    assert all(math.isfinite(v) for v in logged[-1]["metrics"].values())

    path = evaluate(compose("evaluate", [f"ckpt={out}", f"real={data_dir / 'shapes-32' / 'val'}", "n=8", "steps=3",
                                         "guidance=3", "metrics=[fid,kid,is]", f"device={device.type}",
                                         "num_workers=0", "batch_size=4", *small, f"out_dir={tmp_path / 'eval'}"],
                            tmp_path / "eval"))
    record = json.loads(path.read_text())
    assert record["n"] == 8
    # The callback's last evaluation and evaluate.py sample the same images from the same weights.
    for key in ("fid", "is_mean", "kid_mean"):
        assert record["metrics"][key] == pytest.approx(logged[-1]["metrics"][key], rel=1e-3, abs=1e-5), key


def test_resume_on_the_device_is_bit_equal_to_the_uninterrupted_run(tmp_path, device, data_dir, ae_run,
                                                                    monkeypatch):
    """Deterministic algorithms on (cuBLAS needs its workspace setting for that); the text LDM
    with EMA and condition dropout, resumed mid-epoch, ends with every tensor bit-equal."""
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    base = ["experiment=toy/ldm_text", *TINY_RUN, *on(device), f"first_stage.path={ae_run}", "trainer.max_epochs=2",
            "trainer.deterministic=true", "callbacks.checkpoint.every_n_train_steps=2", "model.log_images=0",
            "cond.p_uncond=0.2"]
    try:
        train(compose("train", base, tmp_path / "full", data_dir))
        middle = tmp_path / "full" / "checkpoints" / "step0000004.ckpt"
        train(compose("train", [*base, f"ckpt_path={middle}"], tmp_path / "resumed", data_dir))
    finally:
        torch.use_deterministic_algorithms(False)
    full, resumed = (torch.load(p / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
                     for p in (tmp_path / "full", tmp_path / "resumed"))
    assert full["global_step"] == resumed["global_step"] == 6
    a, b = full["state_dict"], resumed["state_dict"]
    assert a.keys() == b.keys()
    differ = {k: float((a[k].float() - b[k].float()).abs().max()) for k in a if not torch.equal(a[k], b[k])}
    assert not differ, f"{len(differ)} of {len(a)} tensors differ, largest {max(differ.values()):.3g}"


def test_checkpoint_written_on_the_device_loads_on_the_cpu(text_run, device):
    model = load_module(text_run, map_location="cpu")
    assert all(p.device.type == "cpu" for p in model.parameters())
    x, t, c = unet_io(model, torch.device("cpu"), CONDITIONS["text"])
    with torch.no_grad():
        cpu = model.model(x, t, c)
        x, t, c = unet_io(model, device, CONDITIONS["text"])
        dev = model.model(x, t, c)
    assert relative_error(dev.cpu(), cpu) < 1e-4


def test_fsdp_with_the_sharded_ema_trains_and_its_checkpoint_samples(device, tmp_path):
    """trainer=fsdp as the preset has it on a GPU (NCCL, bf16 autocast, gradients reduced in bf16,
    Lightning's own wrapping): one process under torchrun, the text LDM with its EMA, a full
    checkpoint with the whole EMA that samples in one process. The 2-process checks (FSDP = DDP,
    exact resume) run on the CPU in tests/test_fsdp.py; with 2 GPUs they take
    trainer.accelerator=gpu there."""
    import subprocess

    from test_fsdp import LDM
    from test_launchers import TORCHRUN, TRAIN, env, free_port

    run = tmp_path / "run"
    on_cpu = ["trainer.accelerator=cpu", "trainer.precision=32-true", "trainer.strategy.mixed_precision=null"]
    overrides = [o for o in LDM if not o.startswith(("trainer.accelerator", "trainer.precision"))]
    cmd = [TORCHRUN, "--standalone", "--nproc-per-node=1", f"--master-port={free_port()}", TRAIN, *overrides,
           "trainer=fsdp", *(on_cpu if device.type == "cpu" else []), f"hydra.run.dir={run}",
           f"paths.data_dir={tmp_path / 'data'}"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")["state_dict"]
    assert int(state["model_ema.num_updates"]) == 6
    assert state["model_ema.diffusion_modelout2weight"].shape == state["model.diffusion_model.out.2.weight"].shape
    module = load_module(run).to(device)
    images = module.sample({"caption": CAPTIONS}, num_steps=3, guidance_scale=2.0, progress=False)
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
