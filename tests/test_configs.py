"""Every experiment config composes, and its modules instantiate (no training)."""
from __future__ import annotations

from pathlib import Path

import pytest
from hydra.utils import instantiate

from conftest import CONFIGS, compose
from ldm.first_stage.base import FirstStage

EXPERIMENTS = sorted(str(p.relative_to(CONFIGS / "experiment").with_suffix(""))
                     for p in (CONFIGS / "experiment").rglob("*.yaml"))
OFFLINE = ["features=toy", "model.loss.perceptual=null", "model.loss.perceptual_weight=0"]


def test_there_are_paper_and_toy_experiments():
    assert {"toy/ae_kl", "toy/ae_vq", "paper/ae_kl_f8", "paper/ae_vq_f16"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_instantiates(tmp_path, experiment):
    overrides = [f"experiment={experiment}", *OFFLINE]
    if experiment.startswith("paper/"):
        overrides += [f"data.train_urls={tmp_path}/train", f"data.val_urls={tmp_path}/val"]
    cfg = compose("train", overrides, tmp_path / "run", tmp_path / "data")
    first_stage = instantiate(cfg.first_stage)
    assert isinstance(first_stage, FirstStage)
    assert cfg.data.image_size % first_stage.downsampling_factor == 0
    if experiment.startswith("paper/ae_"):
        name = experiment.split("ae_")[1]  # e.g. kl_f8
        assert first_stage.downsampling_factor == int(name.split("_f")[1])
        # the whole training module builds at the paper's width
        model = instantiate(cfg.model, _convert_="all")
        assert model.first_stage is not None
    instantiate(cfg.trainer, logger=False)


def test_bad_f_and_indivisible_image_size_are_refused_at_build_time(tmp_path):
    cfg = compose("train", ["experiment=toy/ae_kl", "first_stage.f=3"], tmp_path / "run", tmp_path / "data")
    with pytest.raises(Exception, match="f = 3"):
        instantiate(cfg.first_stage)
    cfg = compose("train", ["experiment=toy/ae_kl", "first_stage.f=8", "data.synthetic.resolution=36"],
                  tmp_path / "run", tmp_path / "data")
    with pytest.raises(Exception, match="divisible"):
        instantiate(cfg.first_stage)
