"""Latent diffusion training end to end: a toy first stage, then LDMs with each conditioning."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from helpers import TINY_RUN, compose
from ldm.cli.train import train
from ldm.data.transforms import to_uint8
from ldm.nets.tokenizer import CaptionTokenizer
from ldm.diffusion.guidance import drop_conditions
from ldm.modules.latent_diffusion import LatentDiffusion
from ldm.modules.loading import load_first_stage, load_module


@pytest.fixture(scope="module")
def first_stage_run(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny trained KL-f4 autoencoder run (32 px, z = 4) and the data folder it used."""
    root = tmp_path_factory.mktemp("ae")
    train(compose("train", ["experiment=toy/ae_kl", *TINY_RUN], root / "run", root / "data"))
    return root / "run", root / "data"


@pytest.mark.parametrize("cond", ["uncond", "class", "text", "sr", "inpaint", "semantic"])
def test_toy_ldm_trains_samples_and_reloads(tmp_path, first_stage_run, cond):
    ae_run, data = first_stage_run
    out = tmp_path / "run"
    train(compose("train", [f"experiment=toy/ldm_{cond}", *TINY_RUN, f"first_stage.path={ae_run}"], out, data))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_step"] == 3 and metrics["val/loss"] > 0
    assert list((out / "images").glob("val_samples_step*.png"))
    if cond == "text":
        assert (out / "tokenizer.json").is_file()

    model = load_module(out)  # rebuilds from the checkpoint alone (first stage included)
    assert isinstance(model, LatentDiffusion) and model.scale_factor.item() != 1.0
    batch = {"uncond": None,
             "class": {"class_label": torch.tensor([0, 5])},
             "text": {"caption": ["a small red circle on a grey background", "a large blue star on a beige background"]},
             "sr": {"lowres": torch.zeros(2, 3, 8, 8)},
             "inpaint": {"masked_image": torch.zeros(2, 3, 32, 32), "mask": torch.ones(2, 1, 32, 32)},
             "semantic": {"segmentation": torch.randint(0, 7, (2, 32, 32))}}[cond]
    guidance = 2.0 if cond in ("class", "text") else 1.0
    images = model.sample(batch, n=2, num_steps=3, guidance_scale=guidance, image_size=32, progress=False)
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
    if cond == "semantic":
        assert sorted(p.name for p in (data / "shapes-32-seg").iterdir()) == ["train", "val"]
        _sample_py_draws_from_a_label_map_png(out, tmp_path)


def _sample_py_draws_from_a_label_map_png(run: Path, tmp_path: Path) -> None:
    """sample.py draws from a synthetic scene's label map saved as a PNG and refuses maps with ids
    beyond the toy semantic model's 7 classes or of another size than image_size."""
    import numpy as np
    from PIL import Image

    from ldm.cli.sample import sample
    from ldm.data.synthetic import ShapesGenerator

    generator = ShapesGenerator(32, seed=5)
    Image.fromarray(generator.label_map(generator[0])).save(tmp_path / "seg.png")
    out = tmp_path / "samples"
    args = [f"ckpt={run}", "steps=2", "n=2", f"out_dir={out}"]
    sample(compose("sample", [*args, f"segmentation={tmp_path / 'seg.png'}"], tmp_path / "s"))
    images = [np.asarray(Image.open(out / "samples" / f"0000{i}.png")) for i in range(2)]
    assert images[0].shape == (32, 32, 3) and not np.array_equal(images[0], images[1])
    Image.fromarray(np.full((32, 32), 7, np.uint8)).save(tmp_path / "ids.png")
    with pytest.raises(ValueError, match=r"label ids must lie in \[0, 7\) .* holds 7\.\.7"):
        sample(compose("sample", [*args, f"segmentation={tmp_path / 'ids.png'}"], tmp_path / "s"))
    with pytest.raises(ValueError, match="the label map is 32 px, image_size=64"):
        sample(compose("sample", [*args, f"segmentation={tmp_path / 'seg.png'}", "image_size=64"], tmp_path / "s"))


def test_condition_dropout_rate_and_null_values():
    torch.manual_seed(0)
    drop = torch.rand(20000) < 0.1
    assert drop.float().mean().item() == pytest.approx(0.1, abs=0.01)
    captions = drop_conditions(["a"] * 4, torch.tensor([True, False, True, False]), "")
    assert captions == ["", "a", "", "a"]
    labels = drop_conditions(torch.tensor([3, 4, 5]), torch.tensor([False, True, False]), 48)
    assert labels.tolist() == [3, 48, 5]


def test_training_drops_conditions_at_p_uncond(tmp_path, first_stage_run):
    ae_run, data = first_stage_run
    cfg = compose("train", ["experiment=toy/ldm_class", *TINY_RUN, f"first_stage.path={ae_run}",
                            "cond.p_uncond=0.5"], tmp_path / "run", data)
    from hydra.utils import instantiate

    model = instantiate(cfg.model, _convert_="all")
    seen = []
    model.encode_condition = lambda labels: (seen.append(labels.clone()), model.cond_stage_model(labels))[1]
    batch = {"image": torch.zeros(4000, 3, 32, 32), "class_label": torch.zeros(4000, dtype=torch.long)}
    model.first_stage_model.encode = lambda x: type("P", (), {"sample": lambda self, g=None: torch.zeros(len(x), 4, 8, 8),
                                                            "mode": lambda self: torch.zeros(len(x), 4, 8, 8)})()
    model.model.forward = lambda x, t, c: torch.zeros_like(x)  # the rate, not the network, is tested
    model._step(batch, "train", drop=True)
    assert (seen[0] == 48).float().mean().item() == pytest.approx(0.5, abs=0.03)


class ScaleRecorder(pl.Callback):
    """Writes, per rank, the first batch's latent sums and the scale_factor the model ends with."""

    def __init__(self, out: str):
        self.out, self.stats = out, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.stats is None:
            z = pl_module.first_stage_model.encode(batch["image"]).mode().double()
            self.stats = [z.numel(), z.sum().item(), (z * z).sum().item()]

    def on_train_end(self, trainer, pl_module):
        Path(self.out, f"rank{trainer.global_rank}.json").write_text(
            json.dumps({"stats": self.stats, "scale": pl_module.scale_factor.item()}))


def test_scale_by_std_is_pooled_and_identical_on_both_ddp_ranks(tmp_path):
    cfg = compose("train", ["experiment=toy/ldm_uncond", "first_stage=identity", "unet.in_channels=3",
                            "unet.out_channels=3", "trainer=ddp_cpu", *TINY_RUN, "model.log_images=0",
                            "+callbacks.record._target_=test_train_ldm.ScaleRecorder", f"+callbacks.record.out={tmp_path}"],
                  tmp_path / "run", tmp_path / "data")
    train(cfg)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["scale"] == r1["scale"]
    n, s, ss = (a + b for a, b in zip(r0["stats"], r1["stats"]))
    pooled = 1 / ((ss - s * s / n) / (n - 1)) ** 0.5
    assert r0["scale"] == pytest.approx(pooled, rel=1e-5)
    n0, s0, ss0 = r0["stats"]
    assert abs(1 / ((ss0 - s0 * s0 / n0) / (n0 - 1)) ** 0.5 - pooled) > 1e-6  # rank 0 alone would differ


def test_sample_py_end_to_end_and_bad_input(tmp_path, first_stage_run, caplog):
    import subprocess
    import sys

    import numpy as np
    from PIL import Image

    from ldm.cli.sample import sample

    ae_run, data = first_stage_run
    run = tmp_path / "ldm"
    train(compose("train", ["experiment=toy/ldm_text", *TINY_RUN, f"first_stage.path={ae_run}"], run, data))
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "samples"
    prompt = "prompt=a small red circle on a grey background"
    done = subprocess.run([sys.executable, "sample.py", f"ckpt={run}", f"hydra.run.dir={out}", prompt, "n=3",
                           "batch_size=2", "steps=4", "guidance=2.0"], cwd=root, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads((out / "samples.json").read_text())
    assert [r["seed"] for r in record["images"]] == [0, 1, 2]
    assert record["settings"]["guidance"] == 2.0 and record["images"][0]["prompt"].startswith("a small red")
    assert len(list((out / "samples").glob("*.png"))) == 3 and (out / "grid.png").is_file()
    assert Image.open(out / "grid_captioned.png").size[0] >= 3 * 64  # prompts written under the images

    def cfg(*args):
        return compose("sample", [f"ckpt={run}", f"out_dir={tmp_path / 'again'}", *args], tmp_path / "s")

    # image 2 depends on its seed only, not on the batch it was drawn in: equal up to one uint8
    # step (batched convolutions differ in their last float bits with the batch size)
    sample(cfg(prompt, "n=3", "batch_size=3", "steps=4", "guidance=2.0"))
    alone, batched = (np.asarray(Image.open(d / "samples" / "00002.png")).astype(int) for d in (out, tmp_path / "again"))
    other_seed = np.asarray(Image.open(out / "samples" / "00001.png")).astype(int)
    assert np.abs(alone - batched).max() <= 1 and np.abs(alone - other_seed).max() > 1
    # A prompt longer than the text encoder's 32 tokens: cut, with a warning, and the part used recorded.
    long = " ".join(["a large blue star above a small red circle on a beige background"] * 4)
    caplog.set_level(logging.WARNING, logger="ldm.cli.sample")
    sample(cfg(f"prompt={long}", "n=1", "steps=2"))
    used = json.loads((tmp_path / "again" / "samples.json").read_text())["images"][0]
    assert used["prompt"] == long and long.startswith(used["prompt_used"]) and len(used["prompt_used"]) < len(long)
    ids, mask = CaptionTokenizer.load(run / "tokenizer.json").encode_batch([used["prompt_used"]], 40)
    assert int(mask.sum()) == 32  # exactly what fits: [CLS], 30 tokens, [SEP]
    assert any(f"cut to {used['prompt_used']!r}" in r.getMessage() for r in caplog.records)
    assert "prompt_used" not in record["images"][0]  # a prompt that fits is used whole
    with pytest.raises(ValueError, match="not class-conditional"):
        sample(cfg("class_label=3"))
    with pytest.raises(ValueError, match="needs prompt="):
        sample(cfg())

    # img2img: strength 1 samples from the seeds' noise, strength 0 gives the image back through
    # the first stage, 0.5 lies in between; strength without an init image is refused.
    def pixels(folder):
        return np.asarray(Image.open(folder / "samples" / "00000.png")).astype(int)
    init = tmp_path / "init.png"
    Image.open(out / "samples" / "00001.png").save(init)
    common = (prompt, "n=1", "steps=4", "guidance=2.0", f"init_image={init}")
    sample(cfg(prompt, "n=1", "steps=4", "guidance=2.0"))
    from_noise = pixels(tmp_path / "again")
    sample(cfg(*common, "strength=1.0"))
    assert np.array_equal(pixels(tmp_path / "again"), from_noise)
    sample(cfg(*common, "strength=0.0"))
    model = load_module(run)
    image = torch.from_numpy(np.array(Image.open(init))).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        expected = model.decode_latents(model.encode_images(image, sample=False))
    assert np.abs(pixels(tmp_path / "again") - to_uint8(expected)[0].permute(1, 2, 0).numpy().astype(int)).max() <= 1
    assert json.loads((tmp_path / "again" / "samples.json").read_text())["settings"]["strength"] == 0.0
    sample(cfg(*common, "strength=0.5"))
    halfway = pixels(tmp_path / "again")
    assert not np.array_equal(halfway, from_noise)
    with pytest.raises(ValueError, match="strength= is img2img"):
        sample(cfg(prompt, "strength=0.5"))
    with pytest.raises(ValueError, match="strength must lie in"):
        sample(cfg(*common, "strength=1.5"))


def test_sample_py_inpaints_with_an_inpainting_model(tmp_path, first_stage_run):
    import numpy as np
    from PIL import Image

    from ldm.cli.sample import sample

    ae_run, data = first_stage_run
    run = tmp_path / "ldm"
    train(compose("train", ["experiment=toy/ldm_inpaint", *TINY_RUN, f"first_stage.path={ae_run}"], run, data))
    image = np.zeros((32, 32, 3), np.uint8)
    image[:, :16] = (200, 30, 30)
    mask = np.zeros((32, 32, 3), np.uint8)
    mask[:, :16] = 255  # keep the left half
    Image.fromarray(image).save(tmp_path / "init.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    out = tmp_path / "out"
    sample(compose("sample", [f"ckpt={run}", f"init_image={tmp_path / 'init.png'}", f"mask={tmp_path / 'mask.png'}",
                              "n=2", "steps=3", "guidance=1.0", f"out_dir={out}"], tmp_path / "s"))
    assert len(list((out / "samples").glob("*.png"))) == 2
    with pytest.raises(ValueError, match="needs both"):
        sample(compose("sample", [f"ckpt={run}", f"init_image={tmp_path / 'init.png'}", "n=1", f"out_dir={out}"],
                       tmp_path / "s"))


def test_text_ldm_run_folder_is_self_contained(tmp_path, first_stage_run):
    """A text LDM's run folder, moved elsewhere with its data and first-stage run out of reach,
    samples with the tokenizer stored in its checkpoint and writes nothing outside itself."""
    from ldm.cli.sample import sample

    ae_run, data = first_stage_run
    own_data, run = tmp_path / "data", tmp_path / "ldm"
    shutil.copytree(data / "shapes-32", own_data / "shapes-32")
    train(compose("train", ["experiment=toy/ldm_text", *TINY_RUN, f"first_stage.path={ae_run}",
                            "data.latent_cache.first_stage=null"], run, own_data))
    captions = ["a small red circle on a grey background", "a large blue star on a beige background"]
    tokens = CaptionTokenizer.load(run / "tokenizer.json").encode_batch(captions, 32)
    moved = tmp_path / "elsewhere" / "ldm"
    shutil.copytree(run, moved)
    shutil.rmtree(run)
    shutil.rmtree(own_data)

    model = load_module(moved)
    for got, want in zip(model.cond_stage_model.tokenize(captions), tokens):
        assert torch.equal(got, want)
    out = moved / "samples"
    sample(compose("sample", [f"ckpt={moved}", f"out_dir={out}", f"prompt={captions[0]}", "n=1", "steps=2"],
                   moved / "sample"))
    assert (out / "grid.png").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["elsewhere"]  # neither the old run folder nor the data came back
    assert [p.name for p in moved.parent.iterdir()] == ["ldm"]


def test_ldm_on_our_autoencoder_ckpt_with_first_stage_from_checkpoint(tmp_path, first_stage_run):
    """first_stage=from_checkpoint takes our autoencoder run's .ckpt; the LDM checkpoint then
    holds the first stage's architecture and loads without that file."""
    ae_run, data = first_stage_run
    arch = {"_target_": "ldm.first_stage.factory.autoencoder_kl", "f": 4, "ch": 32, "num_res_blocks": 1,
            "z_channels": 4, "attn_resolutions": [], "resolution": 32}  # the toy/ae_kl first stage
    model_override = "first_stage.model={" + ",".join(
        f"{k}:{json.dumps(v)}".replace('"', "") for k, v in arch.items()) + "}"
    out = tmp_path / "run"
    train(compose("train", ["experiment=toy/ldm_uncond", *TINY_RUN, "first_stage=from_checkpoint",
                            f"first_stage.path={ae_run / 'checkpoints' / 'last.ckpt'}", model_override,
                            "data.latent_cache.first_stage=null"], out, data))
    model = load_module(out)
    assert model.build_config["first_stage"] == arch
    expected = load_first_stage(ae_run).state_dict()
    for name, value in model.first_stage_model.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0, msg=name)


def test_a_semantic_run_with_fewer_classes_than_its_label_maps_stops_before_training(tmp_path, first_stage_run):
    from ldm.data.pipeline import LabelRangeError

    ae_run, data = first_stage_run
    cfg = compose("train", ["experiment=toy/ldm_semantic", *TINY_RUN, f"first_stage.path={ae_run}", "cond.n_classes=4"],
                  tmp_path / "run", data)
    with pytest.raises(LabelRangeError, match=r"seg.png holds ids 0\.\.\d, but the run takes 4 classes .* set "
                                              r"cond.n_classes to at least [5-7]"):
        train(cfg)
    assert not list((tmp_path / "run").glob("checkpoints/*.ckpt"))
