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

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def compose(config_name: str, overrides: list[str], out_dir: Path, data_dir: Path | None = None):
    """A Hydra config as train.py would get it, with the run folder and data under tmp paths."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    paths = [f"paths.output_dir={out_dir}", f"paths.log_dir={out_dir.parent}"]
    if data_dir is not None:
        paths.append(f"paths.data_dir={data_dir}")
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides + paths)


# Small data and steps for end-to-end runs of the toy experiments (configs/debug/tiny.yaml).
TINY_RUN = ["debug=tiny"]
