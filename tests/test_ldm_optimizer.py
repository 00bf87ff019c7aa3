"""The LDM's optimiser as a configured factory (model.optimizer, a Hydra `_partial_`): it is the one
training uses, a moved key is refused by name, and stored configs of both layouts rebuild."""
from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from helpers import TINY_RUN, compose
from ldm.cli.train import train
from ldm.modules.loading import load_module

# A pixel-space (f = 1) toy LDM: no first-stage run to train first.
LDM = ["experiment=toy/ldm_uncond", "first_stage=identity", "unet.in_channels=3", "unet.out_channels=3",
       "unet.model_channels=32", "model.log_images=0", *TINY_RUN]


def test_the_configured_optimizer_trains_with_the_scaled_base_lr(tmp_path):
    out = tmp_path / "run"
    train(compose("train", [*LDM, "model.optimizer._target_=torch.optim.SGD", "+model.optimizer.momentum=0.9",
                            "model.base_lr=1e-3", "model.scale_lr=true", "trainer.max_steps=2"],
                  out, tmp_path / "data"))
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    (group,) = ckpt["optimizer_states"][0]["param_groups"]
    assert group["momentum"] == 0.9 and group["weight_decay"] == 0.01 and "betas" not in group  # SGD
    assert group["lr"] == pytest.approx(1e-3 * 4)  # base_lr x batch 4 x 1 GPU x 1
    assert ckpt["build_config"]["optimizer"]["_target_"] == "torch.optim.SGD"  # recorded as configured
    # The stored config (with its `_partial_` optimiser) rebuilds without trust_config.
    module = load_module(out)
    assert sorted(module.state_dict()) == sorted(ckpt["state_dict"])


def test_moved_keys_and_an_optimizer_lr_are_refused_by_name(tmp_path):
    cfg = compose("train", [*LDM, "+model.weight_decay=0.1"], tmp_path / "run", tmp_path / "data")
    with pytest.raises(Exception, match=r"model.weight_decay is now model.optimizer.weight_decay"):
        instantiate(cfg.model, _convert_="all")
    cfg = compose("train", [*LDM, "+model.optimizer.lr=0.1"], tmp_path / "run", tmp_path / "data")
    with pytest.raises(Exception, match="set model.base_lr instead"):
        instantiate(cfg.model, _convert_="all")


def test_a_checkpoint_of_the_earlier_layout_still_rebuilds(tmp_path):
    """Checkpoints written before model.optimizer existed carry weight_decay at the top level
    and no optimizer: load_module rebuilds them (both are training-only)."""
    node = OmegaConf.to_container(compose("train", LDM, tmp_path / "run", tmp_path / "data").model, resolve=True)
    module = instantiate(node, _convert_="all")
    old = {k: v for k, v in node.items() if k != "optimizer"} | {"weight_decay": 0.01}
    path = tmp_path / "old.ckpt"
    torch.save({"build_config": old, "state_dict": module.state_dict()}, path)
    loaded = load_module(path)
    assert loaded.state_dict().keys() == module.state_dict().keys()
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in loaded.state_dict().items())
