"""scripts/quickstart.sh (the README's first command) end to end at tiny size: both training
stages, the time limit it gives the LDM out of its budget, the grid and the evaluation."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from omegaconf import OmegaConf
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_script_end_to_end_within_its_budget(tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "PY": sys.executable, "QUICKSTART_DIR": str(run), "QUICKSTART_BUDGET_S": "1000"}
    result = subprocess.run(["bash", "scripts/quickstart.sh", "debug=tiny", f"paths.data_dir={tmp_path / 'data'}"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # The LDM gets the budget less the time spent so far and the 150 s kept for what follows it.
    started = int(re.search(r"\[quickstart (\d+)s\] text LDM ->", result.stdout).group(1))
    max_time = OmegaConf.load(run / "ldm" / "config.yaml").trainer.max_time
    days, hours, minutes, seconds = (int(x) for x in max_time.split(":"))
    assert days == hours == 0 and abs(60 * minutes + seconds - (1000 - started - 150)) <= 1
    assert "text LDM trained for 3 steps" in result.stdout  # debug=tiny's epoch ends first
    assert Image.open(run / "samples" / "grid_captioned.png").size[0] > 4 * 32
    metrics = json.loads((run / "eval" / "metrics.json").read_text())["metrics"]
    assert 0 <= metrics["prompt_accuracy"] <= 1 and metrics["fid"] >= 0
    assert f"grid:         {run}/samples/grid_captioned.png" in result.stdout
