"""What the data configs ask for: synthetic shards only where a synthetic data config writes them,
a clean real-data config under data=shards, bad counts refused when the config is built, and
train.py flags that work alone."""
from __future__ import annotations

import json

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from helpers import CONFIGS, TINY_RUN, compose
from ldm.cli.train import train
from ldm.data.index import ShardIndex
from ldm.data.sources import SyntheticSource
from ldm.data.write import main as write_main
from ldm.data.write import write_shards

TOYS = sorted(f"toy/{p.stem}" for p in (CONFIGS / "experiment" / "toy").glob("*.yaml"))
# small enough to fail fast if a run starts at all (debug=tiny would add data.synthetic counts)
ONE_STEP = ["data.batch_size=2", "data.batches_per_epoch=1", "data.num_workers=0", "trainer.max_epochs=1",
            "logger=csv"]


@pytest.mark.parametrize("experiment", TOYS)
def test_toy_experiments_on_shards_compose_to_a_real_data_config(tmp_path, experiment):
    stage = ["first_stage.path=some/run"] if "/ldm_" in experiment else []
    cfg = compose("train", [f"experiment={experiment}", "data=shards", "data.train_urls=mine/train", *stage],
                  tmp_path / "run", tmp_path / "data")
    plain = compose("train", ["data=shards", "data.train_urls=mine/train"], tmp_path / "run", tmp_path / "data")
    assert cfg.data.synthetic is None
    # only what any data takes may differ from data=shards: the batch, the epoch length, the latent
    # cache, the degradations of the SR / inpainting conditions and the label maps of the semantic
    # one (configs/cond)
    changed = {k for k in cfg.data if cfg.data[k] != plain.data[k]}
    assert changed <= {"batch_size", "batches_per_epoch", "latent_cache", "batch_transforms", "label_maps",
                       "label_classes"}, changed


def test_a_mistyped_train_path_never_creates_data(tmp_path):
    typo = tmp_path / "data" / "shapez-32" / "train"
    cfg = compose("train", ["experiment=toy/ae_kl", "data=shards", f"data.train_urls={typo}",
                            f"data.val_urls={typo.parent / 'val'}", *ONE_STEP], tmp_path / "run", tmp_path / "data")
    with pytest.raises(FileNotFoundError, match="shapez-32/train"):
        train(cfg)
    assert not typo.parent.exists()
    # a synthetic data config writes only into its own folder: another train_urls is refused
    cfg = compose("train", ["experiment=toy/ae_kl", f"data.train_urls={typo}", *ONE_STEP], tmp_path / "run",
                  tmp_path / "data")
    with pytest.raises(Exception, match=r"data.train_urls=.*shapez-32/train' is not the folder data.synthetic writes"):
        train(cfg)
    assert not typo.exists() and not (tmp_path / "data" / "shapes-32").exists()


def test_synthetic_data_configs_keep_their_datasets(tmp_path):
    """The toy, quickstart and f-sweep experiments write the same folders with the same settings as
    before their synthetic counts moved into the data configs (folders written then are reused)."""
    # (the f-sweep's own folder since it takes 512 validation scenes: FID on >= 500 real images)
    expected = {"toy/ae_kl": ("shapes-32", 32, 3, None, 128), "toy/ldm_text": ("shapes-32", 32, 3, None, 128),
                "toy/ae_kl_quickstart": ("shapes-32-large", 32, 1, {"large": 0.4}, 128),
                "toy/ldm_text_quickstart": ("shapes-32-large", 32, 1, {"large": 0.4}, 128),
                "fsweep/ae": ("shapes-64-fsweep", 64, 1, None, 512), "fsweep/ldm": ("shapes-64-fsweep", 64, 1, None, 512)}
    for experiment, (folder, resolution, max_objects, sizes, val_samples) in expected.items():
        extra = ["first_stage.path=r"] if "ldm" in experiment else []
        extra += ["fsweep.f=4"] if experiment == "fsweep/ldm" else []
        cfg = compose("train", [f"experiment={experiment}", *extra], tmp_path / "run", tmp_path / "data")
        data = OmegaConf.to_container(cfg.data, resolve=True)
        assert data["train_urls"] == str(tmp_path / "data" / folder / "train"), experiment
        assert data["val_urls"] == str(tmp_path / "data" / folder / "val"), experiment
        spec = data["synthetic"]
        assert (spec["train_samples"], spec["val_samples"], spec["resolution"], spec["seed"], spec["per_shard"],
                spec["max_objects"], spec["sizes"]) == (2000, val_samples, resolution, 0, 250, max_objects, sizes), \
            experiment


@pytest.mark.parametrize("size", [0, -4])
def test_a_bad_batch_size_is_refused_when_the_config_is_built(tmp_path, size):
    cfg = compose("train", ["experiment=toy/ae_kl", f"data.batch_size={size}", "data.val_urls=null"],
                  tmp_path / "run", tmp_path / "data")
    with pytest.raises(Exception, match=f"data.batch_size must be a positive integer, got {size}"):  # Hydra wraps it
        instantiate(cfg.data, _convert_="all")


def test_a_synthetic_folder_written_otherwise_is_refused_with_advice_for_train_py(tmp_path):
    write_shards(SyntheticSource(10, 32, seed=5), tmp_path / "data" / "shapes-32" / "train", per_shard=5,
                 progress=False)
    cfg = compose("train", ["experiment=toy/ae_kl", *TINY_RUN], tmp_path / "run", tmp_path / "data")
    with pytest.raises(FileExistsError) as err:
        instantiate(cfg.data, _convert_="all").prepare_data()
    message = str(err.value)
    assert "already holds shards written with other settings" in message and "--overwrite" not in message
    assert f"delete {tmp_path / 'data' / 'shapes-32' / 'train'} to write it anew" in message
    assert "data.synthetic.dir" in message
    assert ShardIndex.load(tmp_path / "data" / "shapes-32" / "train").total == 10  # untouched
    # the shard writer's own command line names its own flags
    with pytest.raises(SystemExit, match="pass --overwrite to replace them, or choose another --out"):
        write_main(["synthetic", "--out", str(tmp_path / "data" / "shapes-32" / "train"), "--n", "4", "--quiet"])


def test_debug_counts_over_real_data_are_refused_not_written(tmp_path):
    """debug=tiny shrinks the synthetic data; over data=shards its counts name no folder to write."""
    cfg = compose("train", ["experiment=toy/ae_kl", "data=shards", "data.train_urls=mine", *TINY_RUN],
                  tmp_path / "run", tmp_path / "data")
    with pytest.raises(Exception, match="but no dir.*data.synthetic=null"):
        instantiate(cfg.data, _convert_="all")


def test_the_progress_bar_flag_alone_turns_the_bar_off(tmp_path):
    out = tmp_path / "run"
    cfg = compose("train", ["experiment=toy/ae_kl", *TINY_RUN, "trainer.enable_progress_bar=false"], out,
                  tmp_path / "data")
    assert cfg.callbacks.progress is not None  # the default progress callback stays configured
    train(cfg)
    assert json.loads((out / "metrics.json").read_text())["global_step"] > 0
