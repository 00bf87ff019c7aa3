"""ldm-convert (ldm/cli/convert.py), run as its console entry on tiny files: reference .ckpt + YAML,
our checkpoints and diffusers folders convert into each other, and bad inputs exit with what to do."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from helpers import FIXTURES
from ldm.cli.convert import main
from ldm.modules.loading import load_module
from ldm.utils.checkpoint import load_state_dict_file

ROOT = Path(__file__).resolve().parent.parent
ZOO = FIXTURES / "ldm-reference-zoo"


def ldm_convert(*args: str) -> subprocess.CompletedProcess:
    """`python -m ldm.cli.convert ARGS` (what the ldm-convert script runs) in a fresh interpreter."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "ldm.cli.convert", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def _zoo(tmp_path, name: str) -> tuple[Path, Path, dict]:
    """A zoo fixture's .ckpt and its YAML written as the release ships it."""
    io = torch.load(ZOO / f"{name}_io.pt", weights_only=True)
    yaml = tmp_path / f"{name}.yaml"
    OmegaConf.save({"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": io["config"]}}, yaml)
    return ZOO / f"{name}.ckpt", yaml, io


def test_released_sd1_ckpt_to_diffusers_and_back_to_ours(tmp_path):
    ckpt, yaml, io = _zoo(tmp_path, "sd1_clip_kl8")
    run = ldm_convert(ckpt, "--config", yaml, "--tokenizer", ZOO / io["tokenizer"], "--to", "diffusers",
                      "--out", tmp_path / "pipe")
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "pipe" / "model_index.json").is_file() and "wrote" in run.stdout
    run = ldm_convert(tmp_path / "pipe", "--to", "ours", "--out", tmp_path / "ours.ckpt")
    assert run.returncode == 0, run.stderr
    from ldm.convert.reference import load_reference

    released = load_reference(ckpt, yaml, text_encoder=str(ZOO / io["tokenizer"])).state_dict()
    ours = load_module(tmp_path / "ours.ckpt").state_dict()
    assert ours.keys() == released.keys() and all(torch.equal(ours[k], released[k]) for k in ours)


def test_reference_to_ours_to_reference_is_unchanged(tmp_path):
    ckpt, yaml, _ = _zoo(tmp_path, "sr_identity_vq4")
    assert ldm_convert(ckpt, "--config", yaml, "--to", "ours", "--out", tmp_path / "ours.ckpt").returncode == 0
    module = load_module(tmp_path / "ours.ckpt")  # a checkpoint of ours: sample.py / evaluate.py take it alone
    assert module.hparams.cond_stage_key == "lowres"
    main([str(tmp_path / "ours.ckpt"), "--to", "reference", "--out", str(tmp_path / "ref" / "model.ckpt")])
    original, back = load_state_dict_file(ckpt), load_state_dict_file(tmp_path / "ref" / "model.ckpt")
    assert back.keys() == original.keys() and all(torch.equal(back[k], original[k]) for k in original)
    assert OmegaConf.load(tmp_path / "ref" / "config.yaml") == OmegaConf.load(yaml)


def test_bad_inputs_exit_with_what_to_do(tmp_path, capsys):
    ckpt, yaml, io = _zoo(tmp_path, "sr_identity_vq4")
    run = ldm_convert(ckpt, "--to", "diffusers", "--out", tmp_path / "x")
    assert run.returncode == 2 and "stores no build_config" in run.stderr and "--config" in run.stderr
    assert "Traceback" not in run.stderr

    def refused(*args: str) -> str:
        with pytest.raises(SystemExit) as exit_:
            main([str(a) for a in args])
        assert exit_.value.code == 2
        return capsys.readouterr().err

    assert "no diffusers StableDiffusionPipeline equivalent" in refused(ckpt, "--config", yaml, "--to", "diffusers",
                                                                        "--out", tmp_path / "p")
    assert "already a reference checkpoint" in refused(ckpt, "--config", yaml, "--to", "reference", "--out",
                                                      tmp_path / "r.ckpt")
    assert "drop it" in refused(ckpt, "--config", yaml, "--tokenizer", "x", "--to", "ours", "--out", tmp_path / "o")
    (tmp_path / "taken.ckpt").write_bytes(b"")
    assert "exists" in refused(ckpt, "--config", yaml, "--to", "ours", "--out", tmp_path / "taken.ckpt")
    assert (tmp_path / "taken.ckpt").read_bytes() == b""  # nothing overwritten
    # a YAML that does not match the checkpoint: the key lists, not a traceback
    other = _zoo(tmp_path, "inpaint_vq4")[1]
    assert "does not match the configured model" in refused(ckpt, "--config", other, "--to", "ours", "--out",
                                                            tmp_path / "m.ckpt")
    assert not (tmp_path / "m.ckpt").exists()
