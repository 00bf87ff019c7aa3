"""The real launchers on this machine: two torchrun "nodes" started side by side on loopback, each
in its own working folder, running train.py with trainer=torchrun for the toy autoencoder and the
toy text LDM on its latent cache; a kill of one node and a relaunch of both that resumes exactly.

The SLURM tests (marker `slurm`, not in the default run) need a running cluster: see
scripts/slurm_check.sh, which starts one (scripts/slurm_local.sh) and runs them.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "train.py")
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
LAUNCH_TIMEOUT_S = 240  # every launch of both nodes, start-up included

# 48 training images in 4 shards of 12; 2 ranks x 6 batches of 4 = one pass over the data per epoch
# (shuffle_buffer=1: no buffer carrying samples across passes, so an epoch is exactly one pass).
SMALL = ["debug=tiny", "data.batches_per_epoch=6", "data.shuffle_buffer=1", "trainer.accelerator=cpu",
         "trainer.precision=32-true", "launch.prepare_timeout_s=120", "launch.shared_fs_timeout_s=10",
         "callbacks.throughput=null"]
AE = ["experiment=toy/ae_kl", *SMALL, "model.loss.disc_start=2", "model.rfid_extractor=null"]
LDM = ["experiment=toy/ldm_text", *SMALL, "data.latent_cache.per_shard=12", "model.log_images=0",
       "cond.p_uncond=0.2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}


def start_nodes(tmp: Path, name: str, overrides: list[str], nodes: int = 2) -> list[subprocess.Popen]:
    """`nodes` torchrun agents, one per "node", each in its own working folder and console log
    (tmp/<name>-node<k>.log), meeting at a c10d rendezvous on 127.0.0.1."""
    port, procs = free_port(), []
    for k in range(nodes):
        cwd = tmp / f"node{k}"
        cwd.mkdir(exist_ok=True)
        cmd = [TORCHRUN, f"--nnodes={nodes}", "--nproc-per-node=1", f"--node-rank={k}", "--rdzv-backend=c10d",
               f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id={name}", "--local-addr=127.0.0.1", "--max-restarts=0",
               TRAIN, "trainer=torchrun", *overrides]
        log = open(tmp / f"{name}-node{k}.log", "w")
        procs.append(subprocess.Popen(cmd, cwd=cwd, env=env(), stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))  # its own process group: killable as a node
    return procs


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (torchrun starts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_node(proc: subprocess.Popen) -> None:
    """SIGKILL a node: its torchrun agent and every worker below it, as a machine that dies."""
    for pid in [*descendants(proc.pid), proc.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def wait_nodes(procs: list[subprocess.Popen], tmp: Path, name: str) -> None:
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    try:
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc in procs:
            if proc.poll() is None:
                kill_node(proc)
    logs = {k: (tmp / f"{name}-node{k}.log").read_text() for k in range(len(procs))}
    for k, proc in enumerate(procs):
        assert proc.returncode == 0, f"node {k} of {name} exited with {proc.returncode}:\n{logs[k][-4000:]}"


def run_nodes(tmp: Path, name: str, overrides: list[str]) -> dict[int, str]:
    """Both nodes to the end; their console logs."""
    wait_nodes(start_nodes(tmp, name, overrides), tmp, name)
    return {k: (tmp / f"{name}-node{k}.log").read_text() for k in range(2)}


def probes(folder: Path, world: int = 2) -> list[dict]:
    return [json.loads((folder / f"rank{r}.json").read_text()) for r in range(world)]


def probe(out: Path) -> list[str]:
    return ["+callbacks.probe._target_=launch_probe.Probe", f"+callbacks.probe.out={out}"]


def check_ranks_and_data(records: list[dict], epochs: int, n_samples: int = 48) -> None:
    """Global ranks 0 and 1 on nodes 0 and 1, world size 2; in each epoch the two ranks together
    saw every sample exactly once."""
    assert [(r["global_rank"], r["node_rank"], r["local_rank"], r["world_size"], r["num_nodes"]) for r in records] \
        == [(0, 0, 0, 2, 2), (1, 1, 0, 2, 2)]
    assert [r["env"]["RANK"] for r in records] == ["0", "1"]
    for epoch in range(epochs):
        seen = [key for r in records for b in r["batches"] if b["epoch"] == epoch for key in b["keys"]]
        assert len(seen) == n_samples and len(set(seen)) == n_samples, f"epoch {epoch}: {len(set(seen))} distinct"
        per_rank = [{key for b in r["batches"] if b["epoch"] == epoch for key in b["keys"]} for r in records]
        assert not per_rank[0] & per_rank[1]


def check_checkpoints_by_rank_zero(records: list[dict], run: Path) -> None:
    """Every checkpoint file went through rank 0's checkpoint IO, none through rank 1's."""
    assert records[1]["checkpoints_written"] == []
    written = {Path(p) for p in records[0]["checkpoints_written"]}
    assert run / "checkpoints" / "last.ckpt" in written and all(p.parent == run / "checkpoints" for p in written)


@pytest.fixture(scope="module")
def two_node_runs(tmp_path_factory):
    """The toy autoencoder, then the toy text LDM on its latent cache, each on 2 torchrun nodes
    with their own working folders; the run and data folders are shared (absolute paths)."""
    tmp = tmp_path_factory.mktemp("torchrun")
    data, ae, ldm = tmp / "data", tmp / "ae", tmp / "ldm"
    ae_logs = run_nodes(tmp, "ae", [*AE, f"hydra.run.dir={ae}", f"paths.data_dir={data}", *probe(tmp / "ae-probe")])
    ldm_logs = run_nodes(tmp, "ldm", [*LDM, "trainer.max_epochs=2", f"first_stage.path={ae}", f"hydra.run.dir={ldm}",
                                      f"paths.data_dir={data}", *probe(tmp / "ldm-probe")])
    return {"tmp": tmp, "data": data, "ae": ae, "ldm": ldm, "ae_logs": ae_logs, "ldm_logs": ldm_logs}


def test_two_torchrun_nodes_train_the_autoencoder(two_node_runs):
    runs = two_node_runs
    records = probes(runs["tmp"] / "ae-probe")
    check_ranks_and_data(records, epochs=1)
    check_checkpoints_by_rank_zero(records, runs["ae"])
    # the synthetic shards were written by rank 0 alone (node 1's console shows no writer)
    assert "writing " in runs["ae_logs"][0] and "writing " not in runs["ae_logs"][1]
    ckpt = torch.load(runs["ae"] / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    assert ckpt["ae_steps"] == 6 and not list(runs["ae"].glob(".launch-*"))  # the launch's marker is gone


def test_two_torchrun_nodes_train_the_text_ldm_on_one_latent_cache_and_tokenizer(two_node_runs):
    runs = two_node_runs
    records = probes(runs["tmp"] / "ldm-probe")
    check_ranks_and_data(records, epochs=2)
    check_checkpoints_by_rank_zero(records, runs["ldm"])
    logs = runs["ldm_logs"]
    # tokenizer and latent cache: written once, by rank 0; rank 1 read them
    assert logs[0].count("trained the caption tokenizer") == 1 and "trained the caption tokenizer" not in logs[1]
    cache = next((runs["ae"] / "latent-cache").iterdir())
    assert f"writing {cache}" in logs[0] and f"writing {cache}" not in logs[1]
    assert json.loads((cache / "index.json").read_text())["total"] == 48
    # scale_by_std: one value, on every rank and in the checkpoint
    assert records[0]["scale_factor"] == records[1]["scale_factor"] != 1.0
    ckpt = torch.load(runs["ldm"] / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    assert ckpt["state_dict"]["scale_factor"].item() == pytest.approx(records[0]["scale_factor"])
    assert ckpt["global_step"] == 12


def test_a_killed_node_then_a_relaunch_of_both_resumes_exactly(two_node_runs):
    """The LDM of the previous test again in a new folder: node 1 is killed (SIGKILL to its agent and
    worker) once a checkpoint exists, node 0 then fails; both are started again with ckpt_path=last
    and end with the weights of the uninterrupted run, having trained on the batches it had left."""
    runs, tmp = two_node_runs, two_node_runs["tmp"]
    run = tmp / "ldm-killed"
    base = [*LDM, "trainer.max_epochs=2", f"first_stage.path={runs['ae']}", f"hydra.run.dir={run}",
            f"paths.data_dir={runs['data']}", "callbacks.checkpoint.every_n_train_steps=3"]
    procs = start_nodes(tmp, "killed", [*base, *probe(tmp / "killed-probe")])
    first = run / "checkpoints" / "step0000003.ckpt"
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    while not first.is_file() and time.monotonic() < deadline and all(p.poll() is None for p in procs):
        time.sleep(0.1)
    assert first.is_file(), (tmp / "killed-node0.log").read_text()[-3000:]
    kill_node(procs[1])
    try:
        procs[0].wait(timeout=120)  # the survivor stops on its own: its peer is gone
    finally:
        kill_node(procs[0])
    assert procs[0].returncode != 0 and not (tmp / "killed-probe").exists()  # neither rank finished
    resumed_from = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")["global_step"]
    assert 3 <= resumed_from < 12

    run_nodes(tmp, "relaunch", [*base, "ckpt_path=last", *probe(tmp / "relaunch-probe")])
    records = probes(tmp / "relaunch-probe")
    assert [r["start_step"] for r in records] == [resumed_from] * 2
    straight = probes(tmp / "ldm-probe")
    for rank in range(2):
        assert records[rank]["batches"] == straight[rank]["batches"][resumed_from:]
        assert records[rank]["losses"] == pytest.approx(straight[rank]["losses"][resumed_from:], rel=1e-5)
    a = torch.load(runs["ldm"] / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")["state_dict"]
    b = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")["state_dict"]
    assert_same_weights(a, b, torch.load(first, weights_only=False, map_location="cpu")["state_dict"])


def assert_same_weights(a: dict, b: dict, start: dict, rtol: float = 2e-2) -> None:
    """`a` and `b` (state dicts) equal to float rounding: their distance at most `rtol` of how far
    training moved `a` from `start`. Not bit for bit: on the CPU a resumed process can differ from
    the uninterrupted one in the last bit of a convolution some steps on (its memory is laid out
    differently), and Adam turns last-bit noise in a near-zero gradient into steps of up to lr
    (docs/scaling.md, "What was run here")."""
    assert a.keys() == b.keys()
    floats = [k for k, v in a.items() if v.is_floating_point()]
    between = sum(((a[k] - b[k]).double() ** 2).sum() for k in floats).sqrt()
    moved = sum(((a[k] - start[k]).double() ** 2).sum() for k in floats).sqrt()
    assert moved > 0 and between / moved < rtol, (between / moved).item()
