"""The f-sweep (scripts/fsweep.sh): its configs wire each LDM to the autoencoder of its f, and the
whole script runs end to end at tiny size."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from helpers import CONFIGS, compose

ROOT = Path(__file__).resolve().parents[1]


def test_ldm_finds_the_autoencoder_of_its_f(tmp_path):
    """The script's overrides give each f the same UNet, batch and steps, and f > 1 the folder
    the autoencoder sweep writes for that f (hydra.sweep.subdir f-<f>)."""
    ae = compose("train", ["experiment=fsweep/ae", "first_stage.f=8"], tmp_path / "ae", tmp_path / "data")
    ldm = compose("train", ["experiment=fsweep/ldm", "fsweep.f=8", "first_stage.path=sweep/ae/f-${fsweep.f}"],
                  tmp_path / "ldm", tmp_path / "data")
    pixel = compose("train", ["experiment=fsweep/ldm", "fsweep.f=1", "first_stage=identity",
                              "fsweep.latent_channels=3"], tmp_path / "ldm", tmp_path / "data")
    ae_r, ldm_r, pix_r = ({k: v for k, v in OmegaConf.to_container(c, resolve=False).items() if k != "hydra"}
                          for c in (ae, ldm, pixel))
    ae_r, ldm_r, pix_r = (OmegaConf.to_container(OmegaConf.create(c), resolve=True) for c in (ae_r, ldm_r, pix_r))
    assert ldm_r["first_stage"]["path"] == "sweep/ae/f-8"
    subdirs = [OmegaConf.to_container(OmegaConf.load(CONFIGS / "experiment" / "fsweep" / f"{n}.yaml"))["hydra"]
               ["sweep"]["subdir"] for n in ("ae", "ldm")]
    assert subdirs == ["f-${first_stage.f}", "f-${fsweep.f}"]
    assert pix_r["first_stage"]["_target_"].endswith("identity") and pix_r["unet"]["in_channels"] == 3
    assert ldm_r["unet"]["in_channels"] == ae_r["first_stage"]["z_channels"] == 4
    for key in ("unet", "data", "trainer"):  # a matched budget: only the first stage and its channels differ
        a, b = dict(ldm_r[key]), dict(pix_r[key])
        if key == "unet":
            for d in (a, b):
                d.pop("in_channels"), d.pop("out_channels")
        assert a == b, key
    assert ldm_r["data"]["val_urls"] == ae_r["data"]["val_urls"]  # the LDMs are scored on the AEs' data


@pytest.mark.slow  # 108 s on two lightly loaded CPU cores: 3 training jobs, 3 evaluations, the tables
def test_fsweep_script_end_to_end(tmp_path):
    out = tmp_path / "sweep"
    env = {**os.environ, "PY": sys.executable, "FSWEEP_DIR": str(out), "FSWEEP_F": "1 4", "FSWEEP_EVAL_N": "4",
           "FSWEEP_LDM_ARGS": "callbacks.evaluation.num_samples=4 callbacks.evaluation.steps=2 "
                              "model.val_sampler.num_steps=2"}
    result = subprocess.run(["bash", "scripts/fsweep.sh", "debug=tiny", f"paths.data_dir={tmp_path / 'data'}"],
                            cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with open(out / "tables" / "compression.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(int(r["f"]) for r in rows) == [1, 4]
    assert all(r["FID"] for r in rows)
    # the domain features with a bootstrap interval, and the training speed from the curves
    assert all(r["FID 95%"] and r["train steps/s"] for r in rows)
    assert (out / "tables" / "fid_vs_time.png").is_file()
    assert next(r for r in rows if r["f"] == "4")["PSNR"]  # the autoencoder's evaluation joined its LDM
    assert (out / "tables" / "fid_vs_steps.png").is_file()
