"""The start-up checks of ldm/cli/launch.py on 2 real gloo processes: one run folder for all ranks,
a run folder every rank can see, rank 0's failure or silence reaching the waiting rank."""
from __future__ import annotations

import json
import os
import socket
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from ldm.cli import launch


CASES = ("folders", "not_shared", "shared", "fails", "slow")  # "slow" last: it leaves rank 0 behind


def _rank(rank: int, tmp: str, port: int) -> None:
    """Every case in turn on this rank; its outcome (the error, if any) to outcome<rank>.json."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=60))
    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=3))
    outcomes = {}
    for case in CASES:
        own = Path(tmp, case, f"rank{rank}")  # a folder only this rank writes into: a filesystem of its own
        own.mkdir(parents=True)
        shared = Path(tmp, case, "shared")
        shared.mkdir(exist_ok=True)
        outcome = outcomes[case] = {"error": None}
        try:
            if case == "folders":
                launch.check_same_run_folder(group, own)
            elif case == "not_shared":
                launch.check_shared_run_folder(group, own, timeout_s=1)
            elif case == "shared":
                launch.check_shared_run_folder(group, shared, timeout_s=1)
                outcome["left"] = sorted(p.name for p in shared.iterdir())
            else:  # rank 0 prepares: fails, or takes longer than the waiting rank's 3 s
                with launch.rank_zero_first(group, rank == 0, timeout_s=3) as first:
                    if first and case == "fails":
                        raise ValueError("no .txt captions in the shards")
                    if first and case == "slow":
                        time.sleep(6)
        except Exception as err:  # noqa: BLE001 - recorded for the tests to check
            outcome["error"] = f"{type(err).__name__}: {err}"
    Path(tmp, f"outcome{rank}.json").write_text(json.dumps(outcomes))


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, list[dict]]:
    """case -> [rank 0's outcome, rank 1's]."""
    tmp = tmp_path_factory.mktemp("launch")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    mp.start_processes(_rank, args=(str(tmp), port), nprocs=2, start_method="spawn", join=True)
    per_rank = [json.loads((tmp / f"outcome{r}.json").read_text()) for r in range(2)]
    return {"tmp": tmp, "seconds": time.monotonic() - start, **{c: [per_rank[0][c], per_rank[1][c]] for c in CASES}}


def test_ranks_with_different_run_folders_all_stop_naming_them(outcomes):
    for outcome in outcomes["folders"]:
        error = outcome["error"]
        assert error.startswith("RuntimeError: the ranks of this launch write into different run folders")
        assert all(str(outcomes["tmp"] / "folders" / f"rank{r}") in error for r in (0, 1)) and "hydra.run.dir" in error


def test_a_run_folder_another_rank_cannot_see_stops_every_rank(outcomes):
    errors = [o["error"] for o in outcomes["not_shared"]]
    assert all("rank 1 on" in e and "not on a filesystem shared by all nodes" in e for e in errors), errors
    assert not list((outcomes["tmp"] / "not_shared" / "rank0").iterdir())  # rank 0's marker removed again


def test_a_shared_run_folder_passes_and_keeps_no_marker(outcomes):
    assert [o["error"] for o in outcomes["shared"]] == [None, None] and outcomes["shared"][0]["left"] == []


def test_rank_zero_failing_to_prepare_stops_the_waiting_rank_with_its_error(outcomes):
    errors = [o["error"] for o in outcomes["fails"]]
    assert errors[0] == "ValueError: no .txt captions in the shards"
    assert errors[1] == ("RuntimeError: global rank 0 failed while preparing the run: "
                         "ValueError: no .txt captions in the shards")


def test_a_waiting_rank_gives_up_after_the_timeout(outcomes):
    error = outcomes["slow"][1]["error"]
    assert error.startswith("TimeoutError: rank 1 on") and "launch.prepare_timeout_s=3" in error
    assert outcomes["seconds"] < 60
