"""Resuming: exact mid-epoch continuation, atomic checkpoint files, best-k checkpoints, SIGTERM
stops, and logs that continue in the run folder."""
from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.exceptions import SIGTERMException

from helpers import TINY_RUN, compose
from ldm.cli.train import train
from ldm.diffusion.schedule import BUFFER_NAMES
from ldm.modules.latent_diffusion import LatentDiffusion

ROOT = Path(__file__).resolve().parents[1]
# A small, fast autoencoder run: no LPIPS or rFID networks, the discriminator on from its 2nd step
# (so both optimisers step and Lightning's global_step counts two per batch).
AE = ["experiment=toy/ae_kl", *TINY_RUN, "model.loss.disc_start=2", "model.rfid_extractor=null",
      "model.loss.perceptual=null", "model.loss.perceptual_weight=0", "logger=csv"]
# A text-conditional LDM with EMA, LR warm-up and condition dropout straight on 32 px pixels.
LDM = ["experiment=toy/ldm_text", *TINY_RUN, "first_stage=identity", "unet.in_channels=3", "unet.out_channels=3",
       "unet.model_channels=32", "model.log_images=0", "model.warmup_steps=5", "cond.p_uncond=0.2"]


class KeyRecorder(pl.Callback):
    """Appends the sample keys of every training batch (one JSON line per step) to `path`.keys and
    writes the final global step and weights to `path`.final.pt."""

    def __init__(self, path: str):
        self.path = path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        with open(f"{self.path}.keys", "a") as fh:
            fh.write(json.dumps(list(batch["__key__"])) + "\n")

    def on_train_end(self, trainer, pl_module):
        final = {"global_step": trainer.global_step, "state_dict": pl_module.state_dict()}
        if isinstance(pl_module, LatentDiffusion):  # the float64 tables training uses, not the float32 buffers
            final["schedule"] = {name: getattr(pl_module.schedule, name) for name in BUFFER_NAMES}
        torch.save(final, f"{self.path}.final.pt")


class SignalDuringValidation(pl.Callback):
    """Sends this process SIGTERM during the validation at the end of epoch `epoch`, after its first
    batch, having saved the module's state dict as that validation began (`path`.live.pt)."""

    def __init__(self, path: str, epoch: int):
        self.path, self.epoch = path, epoch

    def _due(self, trainer) -> bool:
        return not trainer.sanity_checking and trainer.current_epoch == self.epoch

    def on_validation_epoch_start(self, trainer, pl_module):
        # Callback hooks run before the module's, which swaps the EMA weights in: these are the live ones.
        if self._due(trainer):
            torch.save({k: v.clone() for k, v in pl_module.state_dict().items()}, f"{self.path}.live.pt")

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if self._due(trainer) and batch_idx == 0:
            signal.raise_signal(signal.SIGTERM)  # Lightning's handler: stop at the next batch boundary


class CrashAtStep(pl.Callback):
    """Raises (a lost node, a kill without warning) as the batch of global step `step` begins."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError(f"crash at step {self.step}")


def _run(base: list[str], out: Path, data: Path, *extra: str) -> None:
    record = [f"+callbacks.keys._target_=test_resume.KeyRecorder", f"+callbacks.keys.path={out}"]
    train(compose("train", [*base, *record, *extra], out, data))


def _keys(out: Path) -> list[list[str]]:
    return [json.loads(line) for line in Path(f"{out}.keys").read_text().splitlines()]


def _state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_same_weights(a: Path, b: Path) -> None:
    sa, sb = _state(a)["state_dict"], _state(b)["state_dict"]
    assert sa.keys() == sb.keys()
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def _assert_same_schedule(a: Path, b: Path) -> None:
    """All T entries of every schedule table, bit for bit."""
    sa, sb = _state(a)["schedule"], _state(b)["schedule"]
    different = {k: int((sa[k] != sb[k]).sum()) for k in BUFFER_NAMES if not torch.equal(sa[k], sb[k])}
    assert not different, f"schedule entries differ: {different}"


def _steps_logged(run: Path, key: str) -> list[int]:
    with (run / "csv" / "metrics.csv").open() as fh:
        return [int(r["step"]) for r in csv.DictReader(fh) if r.get(key)]


def _values_logged(run: Path, key: str) -> dict[int, str]:
    with (run / "csv" / "metrics.csv").open() as fh:
        return {int(r["step"]): r[key] for r in csv.DictReader(fh) if r.get(key)}


@pytest.mark.parametrize("workers", [0, 2])
def test_autoencoder_resumes_mid_epoch_exactly(tmp_path, workers):
    # 3 batches an epoch, 3 epochs: 9 batches, global_step 16 (one step, then two per batch).
    # The step-6 checkpoint lies after batch 4, inside the second epoch.
    base = [*AE, "trainer.max_epochs=3", f"data.num_workers={workers}",
            "callbacks.checkpoint.every_n_train_steps=6"]
    data = tmp_path / "data"
    _run(base, tmp_path / "full", data)
    middle = tmp_path / "full" / "checkpoints" / "step0000006.ckpt"
    assert _state(middle)["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 1, "batches": 1}]
    _run(base, tmp_path / "resumed", data, f"ckpt_path={middle}")

    full, resumed = tmp_path / "full.final.pt", tmp_path / "resumed.final.pt"
    assert _state(full)["global_step"] == _state(resumed)["global_step"] == 16
    _assert_same_weights(full, resumed)
    # the resumed run saw exactly the batches after the checkpoint, none again
    assert _keys(tmp_path / "resumed") == _keys(tmp_path / "full")[4:]
    assert not torch.equal(_state(middle)["state_dict"]["first_stage.encoder.conv_in.weight"],
                           _state(resumed)["state_dict"]["first_stage.encoder.conv_in.weight"])


def test_text_ldm_with_ema_resumes_mid_epoch_and_at_an_epoch_end_exactly(tmp_path):
    base = [*LDM, "trainer.max_epochs=3", "callbacks.checkpoint.every_n_train_steps=2"]
    data = tmp_path / "data"
    _run(base, tmp_path / "full", data)
    full = tmp_path / "full.final.pt"
    assert _state(full)["global_step"] == 9
    # step 4: mid-epoch (batch 1 of epoch 1); step 6: after the last batch of epoch 1
    for step, seen in ((4, 4), (6, 6)):
        out = tmp_path / f"from{step}"
        _run(base, out, data, f"ckpt_path={tmp_path / 'full' / 'checkpoints' / f'step{step:07d}.ckpt'}")
        _assert_same_weights(full, tmp_path / f"from{step}.final.pt")
        _assert_same_schedule(full, tmp_path / f"from{step}.final.pt")
        assert _keys(out) == _keys(tmp_path / "full")[seen:]
    ema = _state(full)["state_dict"]
    assert any(k.startswith("model_ema.") for k in ema) and int(ema["model_ema.num_updates"]) == 9



def test_finished_run_extended_crashed_and_resumed_equals_a_straight_run(tmp_path, caplog):
    # A finished 20-step run without periodic saves, extended to 40 steps with a save every 4,
    # crashes as step 31 begins (no signal, no save), and `ckpt_path=last` continues from its
    # newest checkpoint (step 28). Weights, all 1000 entries of every schedule table, the batches
    # and the logged losses equal those of 40 steps straight; last.ckpt is one file, always the
    # newest. (No best-k files: one written after step 30's validation would be the newest.)
    base = [*LDM, "trainer.max_epochs=-1", "callbacks.best=null"]
    periodic = "callbacks.checkpoint.every_n_train_steps=4"
    data, run = tmp_path / "data", tmp_path / "run"
    checkpoints = run / "checkpoints"
    _run([*base, "trainer.max_steps=40", periodic], tmp_path / "full", data)
    _run([*base, "trainer.max_steps=20", "callbacks.checkpoint.every_n_train_steps=100"], run, data)
    assert [p.name for p in checkpoints.iterdir()] == ["last.ckpt"]
    assert _state(checkpoints / "last.ckpt")["global_step"] == 20

    crash = ["+callbacks.crash._target_=test_resume.CrashAtStep", "+callbacks.crash.step=31"]
    with pytest.raises(RuntimeError, match="crash at step 31"):
        _run([*base, "trainer.max_steps=40", periodic, *crash], run, data, "ckpt_path=last")
    assert not list(checkpoints.glob("last-*")) and _state(checkpoints / "last.ckpt")["global_step"] == 28

    with caplog.at_level("INFO", logger="ldm.cli.train"):
        _run([*base, "trainer.max_steps=40", periodic], run, data, "ckpt_path=last")
    assert "resuming from last.ckpt (global step 28)" in caplog.text
    assert _state(tmp_path / "run.final.pt")["global_step"] == 40
    _assert_same_schedule(tmp_path / "full.final.pt", tmp_path / "run.final.pt")
    _assert_same_weights(tmp_path / "full.final.pt", tmp_path / "run.final.pt")
    keys, straight = _keys(run), _keys(tmp_path / "full")  # three attempts: steps 0-19, 20-30, 28-39
    assert keys[:28] + keys[31:] == straight and keys[28:31] == straight[28:31]
    # one row per step (the crashed attempt's steps 28-30 replaced), the same losses as straight
    assert _steps_logged(run, "train/loss") == list(range(40))
    assert _values_logged(run, "train/loss") == _values_logged(tmp_path / "full", "train/loss")
    assert _steps_logged(run, "val/loss") == _steps_logged(tmp_path / "full", "val/loss")
    periodic_files = [f"step{s:07d}.ckpt" for s in range(24, 41, 4)]
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt", *periodic_files]
    assert _state(checkpoints / "last.ckpt")["global_step"] == 40


@pytest.mark.parametrize("kind", ["ldm", "autoencoder"])
def test_signal_during_validation_saves_the_live_weights_and_the_run_resumes_exactly(tmp_path, kind):
    # Validation runs on the EMA weights (swapped in); a SIGTERM then arrives inside it. The ranks
    # stop together after the next training batch (ldm.callbacks.preemption), and the checkpoint
    # holds the live weights, the EMA only in its shadow entries; the run resumes exactly.
    base, weights, shadows = {"ldm": (LDM, "model.", "model_ema."),
                              "autoencoder": ([*AE, "model.ema_decay=0.9"], "first_stage.", "ema.")}[kind]
    base = [*base, "trainer.max_epochs=3"]
    data, run = tmp_path / "data", tmp_path / "run"
    _run(base, tmp_path / "full", data)
    stop = ["+callbacks.signal._target_=test_resume.SignalDuringValidation", f"+callbacks.signal.path={run}",
            "+callbacks.signal.epoch=1"]
    with pytest.raises(SIGTERMException):
        _run(base, run, data, *stop)
    saved = _state(run / "checkpoints" / "last.ckpt")
    live = torch.load(f"{run}.live.pt", weights_only=True)  # the state as that validation began
    assert saved["global_step"] == {"ldm": 7, "autoencoder": 12}[kind]  # the batch after 6 of 9
    state = saved["state_dict"]
    params = [k for k in state if k.startswith(weights) and shadows + k[len(weights):].replace(".", "") in state]
    # the live weights moved on by one step; the EMA (swapped in during validation) is not in their place
    assert params and all(not torch.equal(state[k], state[shadows + k[len(weights):].replace(".", "")])
                          for k in params if not torch.equal(live[k], live[shadows + k[len(weights):].replace(".", "")]))

    _run(base, run, data, "ckpt_path=last")
    _assert_same_weights(tmp_path / "full.final.pt", tmp_path / "run.final.pt")
    assert _keys(run) == _keys(tmp_path / "full")
    train_key = "train/loss" if kind == "ldm" else "train/rec_loss"
    # every training row, the batch the run stopped after included (logged before the run ended)
    assert _values_logged(run, train_key) == _values_logged(tmp_path / "full", train_key)
    # the validation the signal arrived in ran to its end
    assert _values_logged(run, "val/loss") == _values_logged(tmp_path / "full", "val/loss")


def test_ckpt_path_last_takes_the_newest_checkpoint_of_the_folder(tmp_path, caplog):
    from ldm.cli.train import resolve_ckpt_path

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for name, step, saved_at in (("last.ckpt", 20, 100.0), ("step0000040.ckpt", 40, 200.0),
                                 ("best-step0000044-0.5000.ckpt", 44, 300.0)):
        torch.save({"global_step": step, "saved_at": saved_at}, folder / name)
    (folder / "broken.ckpt").write_bytes(b"half a checkpoint")  # skipped with a warning
    with caplog.at_level("INFO"):
        assert resolve_ckpt_path("last", tmp_path) == str(folder / "best-step0000044-0.5000.ckpt")
    assert "resuming from best-step0000044-0.5000.ckpt (global step 44)" in caplog.text and "broken.ckpt" in caplog.text
    assert resolve_ckpt_path(str(tmp_path), tmp_path / "elsewhere") == str(folder / "best-step0000044-0.5000.ckpt")
    # resumed in its folder from step 20 (a rewind), the new branch's last.ckpt is newer than step 40/44
    torch.save({"global_step": 24, "saved_at": 400.0}, folder / "last.ckpt")
    caplog.clear()
    with caplog.at_level("INFO"):
        assert resolve_ckpt_path("last", tmp_path) == str(folder / "last.ckpt")
    assert "holds a later step (44)" in caplog.text
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        resolve_ckpt_path("last", tmp_path / "empty")


def test_atomic_save_survives_a_kill_during_the_write(tmp_path):
    ckpt = tmp_path / "last.ckpt"
    child = f"""
import sys, time, torch
from ldm.utils.checkpoint_io import AtomicCheckpointIO
io = AtomicCheckpointIO()
io.save_checkpoint({{"step": 1, "w": torch.ones(1000)}}, {str(ckpt)!r})
real_save = torch.save
def slow_save(obj, fh, *a, **k):
    fh.write(b"partial bytes of a big checkpoint")
    fh.flush()
    print("writing", flush=True)
    time.sleep(60)
torch.save = slow_save
io.save_checkpoint({{"step": 2, "w": torch.zeros(1000)}}, {str(ckpt)!r})
"""
    proc = subprocess.Popen([sys.executable, "-c", child], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"  # the second save is half written
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    saved = torch.load(ckpt, weights_only=True)
    assert saved["step"] == 1 and torch.equal(saved["w"], torch.ones(1000))
    assert [p.name for p in tmp_path.iterdir()] != ["last.ckpt"]  # the temp file was next to it


def test_sigterm_saves_last_and_exits_cleanly_then_resume_continues(tmp_path):
    out, data = tmp_path / "run", tmp_path / "data"
    args = [*AE, "data.batches_per_epoch=400", "trainer.max_epochs=1", "callbacks.checkpoint.every_n_train_steps=2",
            f"hydra.run.dir={out}", f"paths.data_dir={data}"]
    log = tmp_path / "stderr.txt"
    with log.open("w") as err:
        proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
    last = out / "checkpoints" / "last.ckpt"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not last.is_file():  # periodic saves: every 2 steps
        time.sleep(0.2)
    assert proc.poll() is None, log.read_text()[-3000:]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
    stopped = _state(last)
    assert 0 < stopped["ae_steps"] < 400
    metrics = out / "csv" / "metrics.csv"
    with metrics.open() as fh:
        before = [r["step"] for r in csv.DictReader(fh)]
    assert before

    # resume in the same folder for a few more batches: it continues from the stop, appends to the CSV
    train(compose("train", [*AE, f"data.batches_per_epoch={stopped['ae_steps'] + 2}", "trainer.max_epochs=1",
                            "callbacks.checkpoint.every_n_train_steps=2", "ckpt_path=last"], out, data))
    assert _state(last)["ae_steps"] == stopped["ae_steps"] + 2
    with metrics.open() as fh:
        after = [r["step"] for r in csv.DictReader(fh)]
    assert after[:len(before)] == before and len(after) > len(before)  # appended, not replaced


def _catches(pid: int, signum: int) -> bool:
    """Whether process `pid` has a handler installed for `signum` (Linux: SigCgt in /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    return False


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads /proc/<pid>/status (Linux)")
def test_sigusr1_during_start_up_is_held_until_the_first_batch_is_saved(tmp_path):
    # SLURM's --signal warning can come while the run still imports and writes its data: train.py
    # notes it from its first line on, and the run saves after its first batch and exits with 0
    # (Python's default would end it at once, with nothing saved and no requeue).
    out, data = tmp_path / "run", tmp_path / "data"
    args = [*AE, "trainer.max_epochs=1", f"hydra.run.dir={out}", f"paths.data_dir={data}"]
    log = tmp_path / "stderr.txt"
    with log.open("w") as err:
        proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None and not _catches(proc.pid, signal.SIGUSR1):
        time.sleep(0.01)
    assert not data.exists() and not out.exists()  # still starting up: no shards, no run folder yet
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=180) == 0, log.read_text()[-3000:]
    assert _state(out / "checkpoints" / "last.ckpt")["ae_steps"] == 1
    assert "stopped by a signal at step 1" in (out / "toy_ae_kl.log").read_text()
    assert _steps_logged(out, "train/rec_loss") == [0]


def test_best_k_checkpoints_follow_val_loss_and_runs_without_validation_still_work(tmp_path):
    data = tmp_path / "data"
    out = tmp_path / "run"
    train(compose("train", [*AE, "trainer.max_epochs=4", "callbacks.best.save_top_k=2"], out, data))
    best = sorted((out / "checkpoints").glob("best-*.ckpt"))
    assert len(best) == 2
    scores = [float(p.stem.rsplit("-", 1)[1]) for p in best]
    with (out / "csv" / "metrics.csv").open() as fh:
        logged = sorted(float(r["val/loss"]) for r in csv.DictReader(fh) if r.get("val/loss"))
    assert len(logged) == 4 and sorted(scores) == pytest.approx(logged[:2], abs=1e-4)

    no_val = tmp_path / "noval"
    train(compose("train", [*AE, "data.val_urls=null", "~data.synthetic.val_samples"], no_val, data))
    assert (no_val / "checkpoints" / "last.ckpt").is_file() and not list((no_val / "checkpoints").glob("best-*"))


def test_wandb_run_id_is_kept_in_the_run_folder(tmp_path, monkeypatch):
    from ldm.utils.loggers import wandb_logger

    monkeypatch.setenv("WANDB_MODE", "offline")
    first = wandb_logger(save_dir=str(tmp_path), project="ldm-test", name="t")
    run_id = (tmp_path / "wandb" / "run_id").read_text()
    assert first.version == run_id
    again = wandb_logger(save_dir=str(tmp_path), project="ldm-test", name="t")
    assert again.version == run_id
