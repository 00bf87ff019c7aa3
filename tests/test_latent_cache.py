"""The latent cache: image shards encoded once by a trained first stage, and LDM training from it."""
from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from helpers import TINY_RUN, compose
from ldm.cli.encode_latents import encode_shards, main
from ldm.cli.train import train
from ldm.data.datamodule import default_cache_dir
from ldm.data.index import ShardIndex
from ldm.data.latents import cached_posterior
from ldm.data.pipeline import SampleDecoder, ShardStream
from ldm.data.transforms import ImageTransform
from ldm.first_stage.distributions import DeterministicLatent
from ldm.first_stage.identity import IdentityFirstStage
from ldm.first_stage.kl import AutoencoderKL
from ldm.first_stage.moments import posterior_from_moments
from ldm.modules.latent_diffusion import LatentDiffusion
from ldm.modules.loading import load_first_stage

QUIET = {"device": "cpu", "workers": 0, "progress": False}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Tiny KL and VQ first-stage runs (32 px, f = 4, z = 4), their image shards (48 train, 8 val)
    and latent caches: KL train in float16, KL val in float32, VQ val in float16."""
    root = tmp_path_factory.mktemp("latent_cache")
    data = root / "data"
    for kind in ("kl", "vq"):
        train(compose("train", [f"experiment=toy/ae_{kind}", *TINY_RUN], root / f"ae_{kind}", data))
    images = data / "shapes-32"
    encode_shards(root / "ae_kl", str(images / "train"), root / "kl_train", per_shard=10, batch_size=16, **QUIET)
    encode_shards(root / "ae_kl", str(images / "val"), root / "kl_val", dtype="float32", per_shard=5, **QUIET)
    encode_shards(root / "ae_vq", str(images / "val"), root / "vq_val", per_shard=5, batch_size=3, **QUIET)
    return {"root": root, "images": images}


def first_batch(urls, n: int = 64) -> dict:
    """The first n samples of shards in order, centre-cropped at 32 px (as the cache encodes)."""
    decoder = SampleDecoder(ImageTransform(32, "center", False), {"meta": "json"})
    return next(iter(ShardStream(urls, n, decoder, train=False)))


def tar_members(folder: Path) -> dict[str, bytes]:
    out = {}
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            out.update({m.name: tar.extractfile(m).read() for m in tar.getmembers()})
    return out


def assert_same_cache(a: dict[str, bytes], b: dict[str, bytes]) -> None:
    """Same members; moments equal up to one float16 rounding step (batched convolutions differ in
    the last float32 bits with the batch composition)."""
    assert a.keys() == b.keys()
    for name in a:
        if name.endswith(".moments.npy"):
            x, y = (torch.from_numpy(np.load(io.BytesIO(m))).float() for m in (a[name], b[name]))
            torch.testing.assert_close(x, y, atol=1e-3, rtol=2e-3)
        else:
            assert a[name] == b[name], name


@pytest.mark.parametrize("kind, cache, split, dtype", [("kl", "kl_train", "train", torch.float16),
                                                       ("kl", "kl_val", "val", torch.float32),
                                                       ("vq", "vq_val", "val", torch.float16)])
def test_cached_moments_are_the_first_stage_posterior(runs, kind, cache, split, dtype):
    root, images = runs["root"], runs["images"]
    index = ShardIndex.load(root / cache)
    s = index.settings
    assert index.total == s["n"] == (48 if split == "train" else 8) and s["skipped"] == 0
    assert (s["kind"], s["f"], s["latent_channels"], s["image_size"]) == (
        "kl" if kind == "kl" else "deterministic", 4, 4, 32)
    assert s["dtype"] == str(dtype).removeprefix("torch.")
    assert s["first_stage"] == str((root / f"ae_{kind}" / "checkpoints" / "last.ckpt").resolve())

    cached, originals = first_batch(str(root / cache)), first_batch(str(images / split))
    assert "image" not in cached and cached["moments"].dtype == dtype
    assert cached["__key__"] == originals["__key__"] and cached["caption"] == originals["caption"]
    assert torch.equal(cached["class_label"], originals["class_label"]) and cached["meta"] == originals["meta"]

    posterior = load_first_stage(root / f"ae_{kind}").encode(originals["image"])
    tol = {"atol": 2e-3, "rtol": 2e-3} if dtype == torch.float16 else {"atol": 1e-5, "rtol": 1e-5}
    if kind == "kl":
        assert cached["moments"].shape == (len(cached["moments"]), 8, 8, 8)
        mean, logvar = cached["moments"].float().chunk(2, dim=1)
        torch.testing.assert_close(mean, posterior.mean, **tol)
        torch.testing.assert_close(logvar, posterior.logvar, **tol)
    else:
        assert isinstance(posterior, DeterministicLatent) and cached["moments"].shape[1:] == (4, 8, 8)
        torch.testing.assert_close(cached["moments"].float(), posterior.latent, **tol)

    # the text members are the input's bytes; the image is gone
    src, out = tar_members(images / split), tar_members(root / cache)
    assert {n for n in out if not n.endswith(".moments.npy")} == {n for n in src if not n.endswith(".png")}
    assert all(out[n] == src[n] for n in out if not n.endswith(".moments.npy"))


def test_rerun_is_a_noop_and_an_interrupted_job_resumes_where_it_stopped(runs, tmp_path):
    root, images = runs["root"], runs["images"]
    cache = tmp_path / "cache"
    shutil.copytree(root / "kl_train", cache)
    before = tar_members(cache)
    mtimes = {p.name: p.stat().st_mtime_ns for p in cache.glob("*.tar")}
    encode_shards(root / "ae_kl", str(images / "train"), cache, per_shard=10, batch_size=16, **QUIET)
    assert {p.name: p.stat().st_mtime_ns for p in cache.glob("*.tar")} == mtimes

    # a job killed after 3 of 5 shards (output shard 3 starts inside input shard 2)
    index = ShardIndex.load(cache)
    for name in ("shard-000003.tar", "shard-000004.tar"):
        del index.shards[name]
        (cache / name).unlink()
    index.save(cache)
    (cache / "shard-000003.tar.tmp").write_bytes(b"partial")
    encode_shards(root / "ae_kl", str(images / "train"), cache, per_shard=10, batch_size=7,
                  **{**QUIET, "workers": 2})  # decoding processes and another batching: same samples
    assert_same_cache(tar_members(cache), before)
    assert ShardIndex.load(cache).shards == ShardIndex.load(root / "kl_train").shards
    assert all((cache / n).stat().st_mtime_ns == mtimes[n] for n in ("shard-000000.tar", "shard-000002.tar"))

    with pytest.raises(FileExistsError, match="dtype"):
        encode_shards(root / "ae_kl", str(images / "train"), cache, per_shard=10, dtype="float32", **QUIET)
    with pytest.raises(ValueError, match="already a latent cache"):
        encode_shards(root / "ae_kl", str(cache), tmp_path / "again", **QUIET)


def test_the_command_line_encodes_at_the_first_stage_training_resolution(runs, tmp_path, capsys):
    """ldm-encode-latents: the run folder's checkpoint and config.yaml give the encoder and the
    crop size; the cache equals the one encode_shards wrote from Python."""
    root, images = runs["root"], runs["images"]
    main(["--first-stage", str(root / "ae_kl"), "--shards", str(images / "val"), "--out", str(tmp_path / "cli"),
          "--dtype", "float32", "--per-shard", "5", "--workers", "0", "--device", "cpu", "--quiet"])
    assert "8 samples in 2 shards" in capsys.readouterr().out
    assert ShardIndex.load(tmp_path / "cli").settings["image_size"] == 32
    assert_same_cache(tar_members(tmp_path / "cli"), tar_members(root / "kl_val"))
    with pytest.raises(SystemExit, match="pass --overwrite"):
        main(["--first-stage", str(root / "ae_kl"), "--shards", str(images / "val"), "--out", str(tmp_path / "cli"),
              "--per-shard", "5", "--workers", "0", "--device", "cpu", "--quiet"])  # float16 into a float32 cache


def test_an_unreadable_image_is_skipped_and_counted_without_shifting_the_others(runs, tmp_path):
    root, images = runs["root"], runs["images"]
    src = tmp_path / "images"
    src.mkdir()
    with tarfile.open(images / "val" / "shard-000000.tar") as tar, tarfile.open(src / "shard-000000.tar", "w") as out:
        for member in tar.getmembers():
            data = b"not a png" if member.name == "000000003.png" else tar.extractfile(member).read()
            member.size = len(data)
            out.addfile(member, io.BytesIO(data))
    encode_shards(root / "ae_kl", str(src / "shard-000000.tar"), tmp_path / "cache", dtype="float32",
                  per_shard=5, batch_size=3, **QUIET)
    index = ShardIndex.load(tmp_path / "cache")
    assert index.settings["skipped"] == 1 and index.shards == {"shard-000000.tar": 4, "shard-000001.tar": 3}
    full, holed = tar_members(root / "kl_val"), tar_members(tmp_path / "cache")
    assert not any(name.startswith("000000003.") for name in holed)
    assert_same_cache(holed, {name: data for name, data in full.items() if not name.startswith("000000003.")})


def ldm_config(runs, out: Path, *extra: str):
    root = runs["root"]
    return compose("train", ["experiment=toy/ldm_class", *TINY_RUN, f"first_stage.path={root / 'ae_kl'}",
                             f"data.train_urls={root / 'kl_train'}", f"data.val_urls={root / 'kl_val'}",
                             "data.synthetic=null", "data.image_size=32", "data.latent_cache.first_stage=null",
                             "model.val_sampler.num_steps=2", "model.log_images=2", *extra], out)


def test_configured_cache_is_encoded_once_and_training_reads_it(runs, tmp_path, monkeypatch):
    """data.latent_cache (on in toy/ldm_class): the first run encodes the train shards into the
    first-stage run folder, training steps see moments, a second run reuses the cache untouched."""
    ae = tmp_path / "ae"
    shutil.copytree(runs["root"] / "ae_kl", ae)
    images = runs["images"]
    seen: list[bool] = []
    original = LatentDiffusion.first_stage_latents

    def spy(self, batch, generator=None):
        if self.training:
            seen.append("moments" in batch and "image" not in batch)
        return original(self, batch, generator)

    monkeypatch.setattr(LatentDiffusion, "first_stage_latents", spy)

    def run(name: str) -> None:
        train(compose("train", ["experiment=toy/ldm_class", *TINY_RUN, f"first_stage.path={ae}",
                                f"data.train_urls={images / 'train'}", f"data.val_urls={images / 'val'}",
                                "data.synthetic=null", "data.image_size=32", "data.latent_cache.per_shard=20",
                                "model.val_sampler.num_steps=2", "model.log_images=2"], tmp_path / name))

    run("first")
    (cache,) = (ae / "latent-cache").glob("train-32px-*")
    index = ShardIndex.load(cache)
    assert index.settings["source"] == "latents" and index.settings["kind"] == "kl"
    assert index.total == 48 and len(list(cache.glob("*.tar"))) == 3  # 48 images, 20 per shard
    calls = len(seen)  # 3 steps and the scale_by_std estimate
    assert calls >= 3 and all(seen)
    mtimes = {p.name: p.stat().st_mtime_ns for p in cache.glob("*.tar")}
    run("second")
    assert {p.name: p.stat().st_mtime_ns for p in cache.glob("*.tar")} == mtimes  # not re-encoded
    assert len(seen) == 2 * calls and all(seen)

    # the autoencoder changed since the cache was written: refused, with what to do
    ckpt = torch.load(ae / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    ckpt["global_step"] += 1
    torch.save(ckpt, ae / "checkpoints" / "last.ckpt")
    with pytest.raises(FileExistsError, match=r"delete .*latent-cache/train-32px-\w{8} to re-encode"):
        run("third")


@pytest.mark.parametrize("override, message", [
    ("data.flip=true", r"centre crops without flips, but data.crop=center and data.flip=True"),
    ("data.crop=random", r"data.crop=random"),
    ("+data.latent_cache.workers=2", r"takes first_stage and .*got \['workers'\]"),
    ("data.latent_cache.load=null", r"data.latent_cache.load must turn data.latent_cache.first_stage into a first stage"),
])
def test_latent_cache_refuses_what_it_cannot_store(override, message, tmp_path):
    cfg = compose("train", ["experiment=toy/ldm_text", "first_stage.path=/some/ae", override], tmp_path)
    with pytest.raises(InstantiationException, match=message):
        instantiate(cfg.data, _convert_="all")


def test_latent_cache_is_off_without_an_encoder_and_for_image_degradations(tmp_path):
    pixels = compose("train", ["experiment=toy/ldm_text", "first_stage=identity"], tmp_path)
    assert instantiate(pixels.data, _convert_="all").latent_cache is None  # pixel space: nothing to skip
    cfg = compose("train", ["experiment=toy/ldm_sr", "first_stage.path=/some/ae",
                            "data.latent_cache.first_stage=/some/ae"], tmp_path)
    with pytest.raises(InstantiationException, match=r"batch_transforms degrade images"):
        instantiate(cfg.data, _convert_="all")
    # one folder per encoder, dataset and size; a .ckpt stands for its run folder
    dirs = {Path(instantiate(compose("train", ["experiment=toy/ldm_text", *o], tmp_path).data,
                             _convert_="all").latent_cache["dir"])
            for o in (["first_stage.path=/runs/ae"], ["first_stage.path=/runs/ae/checkpoints/last.ckpt"])}
    assert len(dirs) == 1 and dirs.pop().parent == Path("/runs/ae/latent-cache")
    a, b, c = (default_cache_dir("/runs/ae", urls, size) for urls, size in
               (("/data/a/train", 32), ("/data/b/train", 32), ("/data/a/train", 64)))
    assert a.name.startswith("train-32px-") and len({a, b, c}) == 3


def test_ldm_trains_from_the_cache_without_the_encoder(runs, tmp_path, monkeypatch):
    def no_encoder(self, x):
        raise AssertionError("the encoder ran although the batches hold cached moments")

    monkeypatch.setattr(AutoencoderKL, "encode", no_encoder)
    out = tmp_path / "run"
    train(ldm_config(runs, out))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_step"] == 3 and metrics["val/loss"] > 0 and np.isfinite(metrics["train/loss"])
    assert list((out / "images").glob("val_samples_step*.png"))  # a samples-only grid: no images in the cache
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["state_dict"]["scale_factor"].item() != 1.0  # scale_by_std ran on the cached latents


def test_step_from_cache_equals_step_from_images(runs, tmp_path):
    model = instantiate(ldm_config(runs, tmp_path / "run").model, _convert_="all")
    model.scale_factor.fill_(0.7)
    for cache, split, tol in (("kl_val", "val", 1e-5), ("kl_train", "train", 3e-3)):  # float32, float16
        images, cached = first_batch(str(runs["images"] / split), 8), first_batch(str(runs["root"] / cache), 8)
        # identical posterior sample (same generator seed), timesteps and noise
        z = [model.scale_factor * model.first_stage_latents(batch, torch.Generator().manual_seed(1))
             for batch in (images, cached)]
        torch.testing.assert_close(z[1], z[0], atol=tol, rtol=tol)
        t = torch.arange(len(z[0])) * 97
        noise = torch.randn(z[0].shape, generator=torch.Generator().manual_seed(2))
        cond = model.condition(images, tuple(z[0].shape[-2:]))
        losses = [model.diffusion_loss(zi, cond, t=t, noise=noise)[0] for zi in z]
        torch.testing.assert_close(losses[1], losses[0], atol=tol, rtol=tol)
        assert losses[0].item() > 0
        # the whole training step agrees too (posterior sample, t and noise from the global RNG)
        steps = []
        for batch in (images, cached):
            torch.manual_seed(3)
            steps.append(model._step(batch, "train", drop=False))
        torch.testing.assert_close(steps[1], steps[0], atol=tol, rtol=tol)


def test_moments_that_do_not_fit_the_first_stage_are_refused(runs, tmp_path):
    root = runs["root"]
    first_stage = load_first_stage(root / "ae_kl")
    cached = first_batch(str(root / "vq_val"))  # deterministic: 4 channels where KL needs 8
    with pytest.raises(ValueError, match=r"latent cache .*vq_val was encoded by the first stage .*ae_vq.*"
                                         r"'deterministic'.*AutoencoderKL \(kind kl, f = 4, 4 latent channels"):
        cached_posterior(cached["moments"].float(), first_stage, cached["__url__"])
    with pytest.raises(ValueError, match=r"holds moments of shape \(4, 8, 8\).*so 8 moment channels"):
        cached_posterior(cached["moments"].float(), first_stage)  # no index to read: the shape tells

    # same channel count, another f: only the cache's index tells
    other = tmp_path / "kl_f8"
    shutil.copytree(root / "kl_val", other)
    index = ShardIndex.load(other)
    index.settings["f"] = 8
    index.save(other)
    cached = first_batch(str(other))
    with pytest.raises(ValueError, match=r"kl_f8 was encoded by the first stage .*ae_kl.*'f': 8.*f = 4"):
        cached_posterior(cached["moments"], first_stage, cached["__url__"])

    # identity / VQ first stages: the moments are the latent itself
    x = torch.randn(2, 3, 4, 4)
    posterior = posterior_from_moments(x, IdentityFirstStage(3))
    assert isinstance(posterior, DeterministicLatent) and torch.equal(posterior.sample(), x)
    with pytest.raises(ValueError, match=r"shape \(6, 4, 4\).*IdentityFirstStage.*so 3 moment channels"):
        posterior_from_moments(torch.randn(2, 6, 4, 4), IdentityFirstStage(3))


def test_moments_only_samples_decode_and_image_samples_are_unchanged(runs):
    decoder = SampleDecoder(ImageTransform(32, "random", True))
    buf = io.BytesIO()
    np.save(buf, np.arange(8, dtype=np.float16).reshape(2, 2, 2))
    sample = decoder({"moments.npy": buf.getvalue(), "cls": b"5", "__key__": "k", "__url__": "/c/s.tar"}, None)
    assert set(sample) == {"moments", "__url__", "caption", "class_label", "__key__"}
    assert sample["moments"].dtype == torch.float16 and sample["moments"].flatten().tolist() == list(range(8))
    with pytest.raises(ValueError, match="no image member"):
        decoder({"txt": b"x", "__key__": "k"}, None)
