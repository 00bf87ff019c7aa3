"""Shared test setup: offline hubs, deterministic torch, fixture paths."""
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
REFERENCE = FIXTURES / "ldm-reference"

# One thread per process: DDP tests run several processes on two cores.
torch.set_num_threads(1)


@pytest.fixture
def reference_dir() -> Path:
    """Folder with the reference LDM implementation's checkpoints and outputs."""
    return REFERENCE
