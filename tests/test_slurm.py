"""train.py on a real SLURM cluster (marker `slurm`: `bash scripts/slurm_check.sh` starts a one-node
cluster on this machine with scripts/slurm_local.sh and runs these): sbatch + srun with
trainer=slurm on 2 tasks, the Hydra submitit launcher for a 2-job sweep over f, and pre-emption as
SLURM does it (`scancel --signal=USR1`, and `#SBATCH --signal=USR1@<s>` ahead of the time limit):
the job saves, requeues itself, and the requeued job resumes where it stopped."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from test_launchers import ROOT, TRAIN, assert_same_weights, check_checkpoints_by_rank_zero, env, probes

pytestmark = [pytest.mark.slurm,
              pytest.mark.skipif(shutil.which("sbatch") is None, reason="no SLURM (bash scripts/slurm_check.sh)")]

CPU = ["trainer=slurm", "trainer.accelerator=cpu", "trainer.precision=32-true", "callbacks.throughput=null",
       "launch.prepare_timeout_s=300"]
AE = ["experiment=toy/ae_kl", "debug=tiny", "data.batches_per_epoch=6", "data.shuffle_buffer=1",
      "model.loss.disc_start=2", "model.rfid_extractor=null", *CPU]
# A pixel-space text LDM with EMA: 8 epochs of 3 steps, a checkpoint every 3.
LDM = ["experiment=toy/ldm_text", "debug=tiny", "first_stage=identity", "unet.in_channels=3", "unet.out_channels=3",
       "unet.model_channels=32", "model.log_images=0", "cond.p_uncond=0.2", "trainer.max_epochs=8",
       "callbacks.checkpoint.every_n_train_steps=3", *CPU]
JOB_TIMEOUT_S = 900  # a job, requeues (SLURM holds a requeued job about 2.5 minutes) included


def batch_script(path: Path, command: list[str], *, tasks: int = 2, extra: str = "") -> Path:
    """The batch script a user writes (docs/scaling.md): fixed run folder, ckpt_path=last when a
    checkpoint exists, so a requeued job continues where it stopped."""
    path.write_text(f"""#!/bin/bash
#SBATCH --job-name={path.stem}
#SBATCH --nodes=1
#SBATCH --ntasks-per-node={tasks}
#SBATCH --cpus-per-task=1
#SBATCH --mem=6G
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output={path.with_suffix('.out')}
{extra}
RUN=$1
RESUME=$([ -f $RUN/checkpoints/last.ckpt ] && echo ckpt_path=last)
echo "attempt ${{SLURM_RESTART_COUNT:-0}} of job $SLURM_JOB_ID: $RESUME"
srun {' '.join(command)} hydra.run.dir=$RUN $RESUME +callbacks.probe.out=$RUN-probe-${{SLURM_RESTART_COUNT:-0}}
""")
    return path


def submit(script: Path, run: Path, wait: bool = False) -> str:
    cmd = ["sbatch", "--parsable", *(["--wait"] if wait else []), str(script), str(run)]
    done = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    out = script.with_suffix(".out")
    assert done.returncode == 0, f"{done.stderr}\n{out.read_text()[-4000:] if out.exists() else ''}"
    return done.stdout.strip().split(";")[0]


def job_state(job: str) -> dict[str, str]:
    shown = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S+)", shown))


def wait_job(job: str, script: Path) -> dict[str, str]:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        state = job_state(job)
        if state.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
            return state
        time.sleep(2)
    subprocess.run(["scancel", job])
    pytest.fail(f"job {job} still {job_state(job).get('JobState')} after {JOB_TIMEOUT_S} s:\n"
                f"{script.with_suffix('.out').read_text()[-4000:]}")


def ldm_command(tmp: Path) -> list[str]:
    return [sys.executable, TRAIN, *LDM, f"paths.data_dir={tmp / 'data'}", "+callbacks.probe._target_=launch_probe.Probe"]


def assert_resumed_as_straight(straight: Path, resumed_run: Path, resumed_probe: Path, start: int) -> None:
    """The requeued attempt started at the saved step, trained on the batches the uninterrupted run
    had left, with its losses, into its weights (to float rounding: docs/scaling.md)."""
    records, reference = probes(resumed_probe), probes(Path(f"{straight}-probe-0"))
    for rank in range(2):
        assert records[rank]["start_step"] == start
        assert records[rank]["batches"] == reference[rank]["batches"][start:]
        assert records[rank]["losses"] == pytest.approx(reference[rank]["losses"][start:], rel=1e-5)
    a = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    b = torch.load(resumed_run / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    assert a["global_step"] == b["global_step"] == 24
    first = torch.load(straight / "checkpoints" / "step0000003.ckpt", weights_only=False, map_location="cpu")
    assert_same_weights(a["state_dict"], b["state_dict"], first["state_dict"])


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The LDM job without interruption: the reference of the pre-emption tests."""
    tmp = tmp_path_factory.mktemp("slurm")
    run = tmp / "straight"
    submit(batch_script(tmp / "straight.sh", ldm_command(tmp)), run, wait=True)
    return run


def test_sbatch_srun_trains_the_autoencoder_on_2_tasks(tmp_path):
    run = tmp_path / "ae"
    command = [sys.executable, TRAIN, *AE, f"paths.data_dir={tmp_path / 'data'}",
               "+callbacks.probe._target_=launch_probe.Probe"]
    submit(batch_script(tmp_path / "ae.sh", command), run, wait=True)
    records = probes(Path(f"{run}-probe-0"))
    assert [(r["global_rank"], r["local_rank"], r["world_size"], r["num_nodes"], r["env"]["SLURM_PROCID"])
            for r in records] == [(0, 0, 2, 1, "0"), (1, 1, 2, 1, "1")]
    seen = [[k for b in r["batches"] for k in b["keys"]] for r in records]
    assert len(seen[0]) == len(seen[1]) == 24 and not set(seen[0]) & set(seen[1])
    assert len(set(seen[0]) | set(seen[1])) == 48  # one pass over the 48 images: none twice
    check_checkpoints_by_rank_zero(records, run)
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["ae_steps"] == 6


def test_submitit_sweep_runs_one_two_task_job_per_f(tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, TRAIN, "-m", "hydra/launcher=slurm", "hydra.launcher.partition=debug",
           "hydra.launcher.gpus_per_node=0", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=6",
           "hydra.launcher.timeout_min=15", "trainer.devices=2", "trainer.num_nodes=1", *AE, "first_stage.f=4,8",
           f"paths.data_dir={tmp_path / 'data'}", f"hydra.sweep.dir={sweep}",
           "hydra.sweep.subdir=f-${first_stage.f}"]  # the overrides' folder name would pass 255 characters
    done = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-4000:]
    from ldm.modules.loading import load_module

    for f in (4, 8):
        run = sweep / f"f-{f}"
        log = (run / "toy_ae_kl.log").read_text()
        assert "MEMBER: 1/2" in log and "MEMBER: 2/2" in log  # both tasks of the job joined
        assert load_module(run).first_stage.downsampling_factor == f
    jobs = {p.name.split("_")[0] for p in (sweep / ".submitit").iterdir() if "_" in p.name}
    assert len(jobs) == 1 and len(list((sweep / ".submitit").glob("*_[01]"))) == 2  # one array job, 2 tasks


def test_scancel_usr1_saves_requeues_and_the_requeued_job_resumes(straight, tmp_path):
    run = tmp_path / "preempted"
    script = batch_script(tmp_path / "preempted.sh", ldm_command(tmp_path))
    job = submit(script, run)
    first = run / "checkpoints" / "step0000003.ckpt"
    deadline = time.monotonic() + 300
    while not first.is_file() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert first.is_file(), script.with_suffix(".out").read_text()[-3000:]
    subprocess.run(["scancel", "--signal=USR1", job], check=True)
    state = wait_job(job, script)
    log = script.with_suffix(".out").read_text()
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "1", log[-3000:]
    saved = int(re.search(r"stopped by a signal at step (\d+)", log).group(1))
    assert f"requeued SLURM job {job}" in log and 3 <= saved < 24
    assert_resumed_as_straight(straight, run, Path(f"{run}-probe-1"), saved)


def test_signal_ahead_of_the_time_limit_saves_requeues_and_resumes(straight, tmp_path):
    """#SBATCH --time with --signal=USR1@<s>: SLURM's own warning (no scancel). The first attempt
    trains slowly (5 s per batch, launch_probe.Slow: about 140 s in all) so that the warning, due
    120 s after the start and sent by SLURM up to a minute early, finds it training; the requeued
    attempt runs at full speed and is done before its own warning."""
    run = tmp_path / "timed"
    command = [*ldm_command(tmp_path), "+callbacks.slow._target_=launch_probe.Slow", "+callbacks.slow.seconds=5"]
    script = batch_script(tmp_path / "timed.sh", command, extra="#SBATCH --time=00:04:00\n#SBATCH --signal=USR1@120")
    job = submit(script, run)
    state = wait_job(job, script)
    log = script.with_suffix(".out").read_text()
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "1", log[-3000:]
    saved = int(re.search(r"stopped by a signal at step (\d+)", log).group(1))
    assert f"requeued SLURM job {job}" in log and 0 < saved < 24
    assert_resumed_as_straight(straight, run, Path(f"{run}-probe-1"), saved)
