"""Every experiment config composes, and its modules instantiate (no training)."""
from __future__ import annotations

import json

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from helpers import CONFIGS, FIXTURES, compose
from ldm.first_stage.base import FirstStage

EXPERIMENTS = sorted(str(p.relative_to(CONFIGS / "experiment").with_suffix(""))
                     for p in (CONFIGS / "experiment").rglob("*.yaml"))
AUTOENCODERS = [e for e in EXPERIMENTS if "/ae_" in e]
OFFLINE = ["features=toy", "model.loss.perceptual=null", "model.loss.perceptual_weight=0"]


PAPER_LDMS = ["celebahq_ldm_vq4", "ffhq_ldm_vq4", "lsun_bedrooms_ldm_vq4", "lsun_churches_ldm_kl8", "imagenet_ldm_vq8",
              "imagenet_cin256_v2", "txt2img_ldm_kl8_g", "sr_ldm4", "inpainting_ldm4_big", "semantic_ldm4"]


def test_there_are_paper_and_toy_experiments():
    assert {"toy/ae_kl", "toy/ae_vq", "paper/ae_kl_f8", "paper/ae_vq_f16"} <= set(EXPERIMENTS)
    assert {f"paper/{n}" for n in PAPER_LDMS} <= set(EXPERIMENTS)
    assert {f"toy/ldm_{c}" for c in ("uncond", "class", "text", "sr", "inpaint")} <= set(EXPERIMENTS)


@pytest.fixture(scope="module")
def caption_shards(tmp_path_factory):
    from ldm.data.sources import SyntheticSource
    from ldm.data.write import write_shards

    out = tmp_path_factory.mktemp("shards") / "train"
    write_shards(SyntheticSource(8, 32, seed=0), out, per_shard=8, progress=False)
    return out


@pytest.mark.parametrize("name", PAPER_LDMS)
def test_paper_ldm_builds_at_reduced_width(tmp_path, caption_shards, name):
    """The paper's latent diffusion rows compose, and their modules build with every width cut
    down (the first stage with random weights instead of the released checkpoint)."""
    overrides = [f"experiment=paper/{name}", "first_stage.path=unused", f"data.train_urls={caption_shards}",
                 "unet.model_channels=32", "unet.num_res_blocks=1"]
    if name.startswith("txt2img"):
        overrides += ["cond.encoder.n_embed=64", "cond.encoder.n_layer=1", "cond.encoder.tokenizer.vocab_size=300"]
    cfg = compose("train", overrides, tmp_path / "run", tmp_path / "data")
    assert cfg.paper.evaluation
    arch = cfg.first_stage.model
    arch.ddconfig.ch = 32
    cfg.first_stage = arch  # random weights in place of the checkpoint
    model = instantiate(cfg.model, _convert_="all")
    assert model.first_stage_model.downsampling_factor == (8 if ("kl8" in name or "vq8" in name) else 4)
    c, h, w = model.latent_shape(128)
    x = torch.randn(1, c, h, w)
    batch = {"caption": ["a red circle"], "class_label": torch.tensor([3]),
             "lowres": torch.zeros(1, 3, 32, 32), "masked_image": torch.zeros(1, 3, 128, 128),
             "mask": torch.ones(1, 1, 128, 128), "segmentation": torch.zeros(1, 128, 128).long()}
    cond = model.condition(batch, (h, w))
    out = model.model(x, torch.tensor([10]), cond)
    assert out.shape == x.shape
    assert OmegaConf.select(cfg, "model.linear_start") > 0


# The composed model config of each paper LDM as configs/experiment/paper/ spelled it out in full
# (first-stage ddconfig and UNet written in each experiment), saved from that commit (b95e7e2).
PAPER_LDM_BEFORE = json.loads((FIXTURES / "paper_ldm_model_configs.json").read_text())
PLACEHOLDERS = ["first_stage.path=FS", "paths.output_dir=/OUT", "paths.log_dir=/LOG", "paths.data_dir=/DATA",
                "data.train_urls=/TRAIN", "data.val_urls=/VAL"]


@pytest.mark.parametrize("name", PAPER_LDMS)
def test_paper_ldm_composes_from_first_stage_and_unet_files_as_before(name):
    """Each paper LDM takes its first stage from configs/first_stage/paper/ and its UNet from
    configs/unet/paper/ through its defaults list, and composes to the model config it had when
    it spelled both out."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    text = (CONFIGS / "experiment" / "paper" / f"{name}.yaml").read_text()
    assert "ddconfig" not in text and "\nunet:" not in text  # no re-spelled architecture left
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = hydra_compose(config_name="train", overrides=[f"experiment=paper/{name}", *PLACEHOLDERS])
    before = dict(PAPER_LDM_BEFORE[name])
    # the one key that moved since: weight_decay into the optimizer config
    before["optimizer"] = {"_target_": "torch.optim.AdamW", "_partial_": True,
                           "weight_decay": before.pop("weight_decay")}
    assert OmegaConf.to_container(cfg.model, resolve=True) == before


def test_cond_groups_set_only_cross_attention_unet_keys_and_compose_after_unet(tmp_path):
    """The cond groups are `_global_` and may write `unet:` keys; they write only what the
    condition alone decides (cross-attention on, its context width), and train.yaml composes them
    after `unet`, so those two keys follow the condition whatever UNet file is chosen."""
    for path in sorted((CONFIGS / "cond").glob("*.yaml")):
        keys = set(OmegaConf.load(path).get("unet", {}))
        assert keys <= {"use_spatial_transformer", "context_dim"}, (path.name, keys)
    defaults = OmegaConf.to_container(OmegaConf.load(CONFIGS / "train.yaml").defaults)
    groups = [next(iter(d)) if isinstance(d, dict) else d for d in defaults]
    assert groups.index("unet") < groups.index("cond")
    cfg = compose("train", ["model=ldm", "unet=sd1", "cond=class", "cond.encoder.embed_dim=96"],
                  tmp_path / "run", tmp_path / "data")
    assert cfg.unet.model_channels == 320 and cfg.unet.context_dim == 96 and cfg.unet.use_spatial_transformer


@pytest.mark.parametrize("experiment", AUTOENCODERS)
def test_autoencoder_experiment_composes_and_instantiates(tmp_path, experiment):
    overrides = [f"experiment={experiment}", *OFFLINE]
    if experiment.startswith("paper/"):
        overrides += [f"data.train_urls={tmp_path}/train", f"data.val_urls={tmp_path}/val"]
    cfg = compose("train", overrides, tmp_path / "run", tmp_path / "data")
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # every interpolation resolves
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


@pytest.mark.parametrize("experiment", [e for e in EXPERIMENTS if e.startswith("toy/ldm_")])
def test_toy_ldm_experiments_resolve(tmp_path, experiment):
    cfg = compose("train", [f"experiment={experiment}", "first_stage.path=some/run"], tmp_path / "run", tmp_path / "data")
    resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    assert resolved["model"]["image_size"] == 32 and resolved["first_stage"]["path"] == "some/run"


FSWEEP = [e for e in EXPERIMENTS if e.startswith("fsweep/")]


def test_every_experiment_is_tested_here():
    """A new experiment config must land in one of the groups this file composes and builds."""
    covered = (set(AUTOENCODERS) | {f"paper/{n}" for n in PAPER_LDMS} | set(FSWEEP)
               | {e for e in EXPERIMENTS if e.startswith("toy/ldm_")})
    assert sorted(set(EXPERIMENTS) - covered) == []


@pytest.mark.parametrize("f", [1, 2, 4, 8, 16, 32])
def test_fsweep_builds_for_every_f(tmp_path, caption_shards, f):
    """The f-sweep's autoencoder builds for each f > 1, and its LDM (same UNet for all f) denoises
    the latent of that f: pixels for f = 1, a random KL autoencoder of fsweep/ae's shape otherwise."""
    if f > 1:
        ae = compose("train", ["experiment=fsweep/ae", f"first_stage.f={f}"], tmp_path / "ae", tmp_path / "data")
        assert instantiate(ae.first_stage).downsampling_factor == f
        stage = ["first_stage=kl", f"first_stage.f={f}", "first_stage.ch=32", "first_stage.num_res_blocks=1",
                 "first_stage.z_channels=4", "first_stage.attn_resolutions=[]"]
    else:
        stage = ["first_stage=identity", "fsweep.latent_channels=3"]
    cfg = compose("train", ["experiment=fsweep/ldm", f"fsweep.f={f}", *stage, f"data.train_urls={caption_shards}"],
                  tmp_path / "run", tmp_path / "data")
    model = instantiate(cfg.model, _convert_="all")
    c, h, w = model.latent_shape(cfg.data.image_size)
    assert (h, w) == (cfg.data.image_size // f, cfg.data.image_size // f) == (64 // f, 64 // f)
    x = torch.randn(2, c, h, w)
    cond = model.condition({"caption": ["a red circle", "a blue square"]}, (h, w))
    assert model.model(x, torch.tensor([10, 500]), cond).shape == x.shape
