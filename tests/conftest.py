"""Shared test setup: offline hubs, deterministic torch, fixtures. Helpers that tests import
(compose, TINY_RUN, make_tiny_clip, ...) are in tests/helpers.py."""
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from helpers import REFERENCE  # noqa: E402

# One thread per process: DDP tests run several processes on two cores.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _free_master_port(monkeypatch):
    """Every test's DDP run chooses a free port of its own. Lightning's spawn launcher sets
    MASTER_PORT in this process and leaves it, which would pin every later DDP run of the session
    (and the subprocesses started with this environment) to one port. setenv records the value
    before the test, so the teardown restores it and drops what a run set."""
    monkeypatch.setenv("MASTER_PORT", "")
    monkeypatch.delenv("MASTER_PORT")


@pytest.fixture
def reference_dir() -> Path:
    """Folder with the reference LDM implementation's checkpoints and outputs."""
    return REFERENCE
