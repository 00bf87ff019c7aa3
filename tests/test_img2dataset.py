"""The real img2dataset (in its own venv: it requires webdataset<0.3, we pin 1.0.2) downloads from a
loopback HTTP server, and train.py trains on its output folder as it is (scripts/img2dataset_check.sh).
Marked slow: it pip-installs img2dataset from PyPI (about a minute with pip's cache, more without)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_real_img2dataset_output_trains_the_toy_autoencoder(tmp_path):
    # IMG2DATASET_WORK keeps the venv between runs (the script reuses an existing one)
    work = Path(os.environ.get("IMG2DATASET_WORK", tmp_path))
    env = {**os.environ, "WORK": str(work), "LDM_PYTHON": sys.executable, "STEPS": "4"}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "img2dataset_check.sh")], env=env, capture_output=True,
                          text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "== img2dataset: 300 images in 4 shards, 1 URL failed; train.py: 4 steps" in done.stdout
    assert sorted(p.name for p in (work / "shards").glob("*.tar")) == [f"{i:05d}.tar" for i in range(4)]
    assert (work / "run" / "checkpoints" / "last.ckpt").is_file()
