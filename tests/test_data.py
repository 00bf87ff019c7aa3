"""Synthetic dataset, shard writer, shard reader and datamodule."""
from __future__ import annotations

import csv
import io
import json
import logging
import multiprocessing
import os
import re
import signal
import subprocess
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from pytorch_lightning.utilities.exceptions import SIGTERMException

from ldm.callbacks.data_health import DataHealth
from ldm.data.datamodule import ShardDataModule
from ldm.data.index import ShardIndex
from ldm.data.pipeline import (SampleDecoder, ShardStream, SkipLimitError, count_samples, expand_urls,
                               make_loader)
from ldm.data.sources import FolderSource, SyntheticSource, TarShardSource
from ldm.data.synthetic import BACKGROUNDS, NUM_CLASSES, SHAPES, ShapesGenerator, class_label, describe_class
from ldm.data.transforms import ImageTransform
from ldm.data.write import main as write_main
from ldm.data.write import write_shards
from ldm.metrics.prompts import parse_caption


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


def test_synthetic_is_deterministic_and_varied():
    a, b = ShapesGenerator(64, seed=3), ShapesGenerator(64, seed=3)
    for i in (0, 5, 123):
        assert np.array_equal(_pixels(a[i].image), _pixels(b[i].image))
        assert a[i].caption == b[i].caption
    other = ShapesGenerator(64, seed=4)
    assert not np.array_equal(_pixels(a[0].image), _pixels(other[0].image))
    captions = {a[i].caption for i in range(200)}
    assert len(captions) > 190
    counts = {a[i].labels["n_objects"] for i in range(200)}
    assert counts == {1, 2, 3}
    shapes_seen = {a[i].labels["shape"] for i in range(200)}
    assert shapes_seen == set(range(len(SHAPES)))


def test_synthetic_caption_matches_labels_and_resolutions():
    g = ShapesGenerator(32, seed=0)
    for i in range(50):
        s = g[i]
        first = s.objects[0]
        assert s.caption.startswith(f"a {first.size} {first.color} {first.shape}")
        assert s.caption.endswith(f"on a {s.background} background")
        assert s.labels["class_label"] == class_label(first.shape, first.color)
        assert describe_class(s.labels["class_label"]) == f"{first.color} {first.shape}"
        assert 0 <= s.labels["class_label"] < NUM_CLASSES
    assert ShapesGenerator(512, seed=0)[0].image.size == (512, 512)
    with pytest.raises(ValueError, match="resolution"):
        ShapesGenerator(16)


def test_objects_do_not_overlap():
    g = ShapesGenerator(64, seed=1)
    from ldm.data.synthetic import SIZES

    for i in range(300):
        objs = g[i].objects
        for j, o in enumerate(objs):
            for p in objs[j + 1:]:
                assert np.hypot(o.cx - p.cx, o.cy - p.cy) > SIZES[o.size] + SIZES[p.size]


def _read_all(urls, size=64, world=1, rank=0, batch=7, workers=0, extra_keys=None):
    decoder = SampleDecoder(ImageTransform(size), extra_keys or {})
    stream = ShardStream(urls, batch, decoder, train=False, rank=rank, world_size=world)
    return list(make_loader(stream, workers))


def test_write_and_read_back_exactly(tmp_path):
    index = write_shards(SyntheticSource(25, 64, seed=7), tmp_path / "s", per_shard=10, progress=False)
    assert index.shards == {"shard-000000.tar": 10, "shard-000001.tar": 10, "shard-000002.tar": 5}
    assert ShardIndex.load(tmp_path / "s").total == 25
    with tarfile.open(tmp_path / "s" / "shard-000000.tar") as tar:
        names = tar.getnames()
    assert names[:4] == ["000000000.png", "000000000.txt", "000000000.cls", "000000000.json"]
    batches = _read_all(str(tmp_path / "s"), extra_keys={"meta": "json"})
    assert [len(b["caption"]) for b in batches] == [7, 7, 7, 4]
    g = ShapesGenerator(64, seed=7)
    keys = [k for b in batches for k in b["__key__"]]
    assert keys == [f"{i:09d}" for i in range(25)]
    images = torch.cat([b["image"] for b in batches])
    for i in (0, 13, 24):
        expected = torch.from_numpy(_pixels(g[i].image).astype(np.float32)).permute(2, 0, 1) / 127.5 - 1
        assert torch.equal(images[i], expected)
    captions = [c for b in batches for c in b["caption"]]
    labels = torch.cat([b["class_label"] for b in batches])
    assert captions[13] == g[13].caption and labels[13].item() == g[13].labels["class_label"]
    assert batches[0]["meta"][0]["objects"][0]["shape"] == g[0].objects[0].shape


def test_writer_resumes_after_a_kill_and_refuses_other_settings(tmp_path):
    out = tmp_path / "s"
    reference = write_shards(SyntheticSource(30, 32, seed=1), tmp_path / "ref", per_shard=10, progress=False)

    class Dying(SyntheticSource):
        def iter_from(self, start):
            for i, m in enumerate(super().iter_from(start)):
                if start + i == 24:
                    raise KeyboardInterrupt  # killed while writing the third shard
                yield m

    with pytest.raises(KeyboardInterrupt):
        write_shards(Dying(30, 32, seed=1), out, per_shard=10, progress=False)
    assert sorted(ShardIndex.load(out).shards) == ["shard-000000.tar", "shard-000001.tar"]
    first_mtime = (out / "shard-000000.tar").stat().st_mtime_ns
    index = write_shards(SyntheticSource(30, 32, seed=1), out, per_shard=10, progress=False)
    assert index.shards == reference.shards
    assert (out / "shard-000000.tar").stat().st_mtime_ns == first_mtime  # complete shards are skipped
    for name in reference.shards:
        assert (out / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()
    assert not list(out.glob("*.tmp"))

    with pytest.raises(FileExistsError, match="per_shard"):
        write_shards(SyntheticSource(30, 32, seed=1), out, per_shard=5, progress=False)
    index = write_shards(SyntheticSource(30, 32, seed=1), out, per_shard=5, overwrite=True, progress=False)
    assert len(index.shards) == 6 and not (out / "shard-000000.tar").read_bytes() == b""


def test_cli_synthetic(tmp_path, capsys):
    write_main(["synthetic", "--out", str(tmp_path / "c"), "--n", "12", "--per-shard", "5",
                "--resolution", "32", "--format", "jpg", "--quiet"])
    assert "12 samples in 3 shards" in capsys.readouterr().out
    with tarfile.open(tmp_path / "c" / "shard-000002.tar") as tar:
        assert "000000010.jpg" in tar.getnames()


def _png(color, size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def test_folder_source_with_labels_captions_and_a_corrupt_file(tmp_path):
    root = tmp_path / "imgs"
    for cls, color in (("cats", (200, 0, 0)), ("dogs", (0, 200, 0))):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            (root / cls / f"{i}.png").write_bytes(_png(color))
    (root / "cats" / "0.txt").write_text("a red cat\n")
    (root / "dogs" / "broken.png").write_bytes(b"not an image")
    table = tmp_path / "captions.csv"
    with table.open("w", newline="") as fh:
        csv.writer(fh).writerows([("file", "caption"), ("dogs/1.png", "a green dog")])
    src = FolderSource(root, captions=table, labels_from_folders=True)
    assert src.classes == ["cats", "dogs"] and len(src) == 7
    index = write_shards(src, tmp_path / "out", per_shard=4, progress=False)
    assert index.total == 6 and index.settings["skipped"] == 1 and index.classes == ["cats", "dogs"]
    batches = _read_all(str(tmp_path / "out"), size=24, batch=10, extra_keys={"meta": "json"})
    b = batches[0]
    by_file = {m["source_file"]: (c, int(lbl)) for m, c, lbl in zip(b["meta"], b["caption"], b["class_label"])}
    assert by_file["cats/0.png"] == ("a red cat", 0)
    assert by_file["dogs/1.png"] == ("a green dog", 1)
    assert by_file["dogs/2.png"] == ("", 1)
    assert b["image"].shape == (6, 3, 24, 24)

    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text(json.dumps({"file": "0.png", "caption": "by name"}) + "\n")
    assert FolderSource(root, captions=jsonl)._caption(root / "dogs" / "0.png") == "by name"
    bad = tmp_path / "bad.csv"
    bad.write_text("path,text\nx,y\n")
    with pytest.raises(ValueError, match="'file' and 'caption'"):
        FolderSource(root, captions=bad)


def test_img2dataset_shards_are_resharded_without_reencoding(tmp_path):
    src = tmp_path / "in-00000.tar"
    blobs = {}
    with tarfile.open(src, "w") as tar:
        for i in range(5):
            key = f"{i:09d}"
            blobs[key] = _png((i * 40, 10, 10))
            for ext, data in (("jpg", blobs[key]), ("txt", f"caption {i}".encode()),
                              ("json", json.dumps({"url": f"http://x/{i}", "width": 40}).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    index = write_shards(TarShardSource([str(src)]), tmp_path / "out", per_shard=2, progress=False)
    assert index.total == 5 and len(index.shards) == 3
    with tarfile.open(tmp_path / "out" / "shard-000001.tar") as tar:
        assert tar.extractfile("000000002.jpg").read() == blobs["000000002"]
    captions = [c for b in _read_all(str(tmp_path / "out"), size=16) for c in b["caption"]]
    assert captions == [f"caption {i}" for i in range(5)]


def _write_with_corrupt_member(path: Path, n: int, corrupt: set[int]) -> None:
    g = ShapesGenerator(32, seed=0)
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            buf = io.BytesIO()
            g[i].image.save(buf, format="PNG")
            data = b"\x89PNG garbage" if i in corrupt else buf.getvalue()
            for ext, blob in (("png", data), ("txt", g[i].caption.encode())):
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))


def test_corrupt_samples_are_skipped_and_counted(tmp_path):
    _write_with_corrupt_member(tmp_path / "a.tar", 10, corrupt={3, 7})
    batches = _read_all(str(tmp_path / "a.tar"), size=32, batch=4)
    assert sum(len(b["caption"]) for b in batches) == 8
    assert sum(int(b["skipped"]) for b in batches) == 2
    train = ShardStream(str(tmp_path / "a.tar"), 4, SampleDecoder(ImageTransform(32)), train=True,
                        batches_per_epoch=6, shuffle_buffer=5)
    got = list(make_loader(train, 0))
    assert len(got) == 6  # the stream keeps going past corrupt samples
    assert sum(int(b["skipped"]) for b in got) >= 2


def test_train_stream_is_seeded_per_epoch_and_pipe_urls_work(tmp_path):
    write_shards(SyntheticSource(40, 32, seed=0), tmp_path / "s", per_shard=10, progress=False)
    urls = expand_urls(str(tmp_path / "s"))
    assert len(urls) == 4 and count_samples(urls) == 40

    def keys(epoch, seed=0):
        stream = ShardStream(urls, 5, SampleDecoder(ImageTransform(32)), train=True, batches_per_epoch=4,
                             shuffle_buffer=20, seed=seed)
        loader = make_loader(stream, 0, start_epoch=epoch)
        return [k for b in loader for k in b["__key__"]]

    assert keys(0) == keys(0)
    assert keys(0) != keys(1)
    assert keys(0) != keys(0, seed=1)
    piped = [f"pipe:cat {u}" for u in urls]
    assert count_samples(piped) == 40
    assert sum(len(b["caption"]) for b in _read_all(piped, size=32)) == 40
    with pytest.raises(FileNotFoundError, match="ldm.data.write"):
        expand_urls(str(tmp_path / "s" / "shard-{000000..000009}.tar"))


def test_a_folder_of_tars_without_an_index_is_taken_as_img2dataset_writes_it(tmp_path):
    """img2dataset's output: 00000.tar, 00001.tar with their .parquet and _stats.json beside them."""
    write_shards(SyntheticSource(20, 32, seed=0), tmp_path / "s", per_shard=10, progress=False)
    folder = tmp_path / "img2dataset"
    folder.mkdir()
    for i, name in enumerate(sorted(p.name for p in (tmp_path / "s").glob("*.tar"))):
        (tmp_path / "s" / name).rename(folder / f"{i:05d}.tar")
        (folder / f"{i:05d}.parquet").write_bytes(b"PAR1")
        (folder / f"{i:05d}_stats.json").write_text(json.dumps({"successes": 10}))
    urls = expand_urls(str(folder))
    assert urls == [str(folder / "00000.tar"), str(folder / "00001.tar")] and count_samples(urls) == 20
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="without index.json or .tar shards"):
        expand_urls(str(empty))


def test_too_few_shards_for_workers_is_a_clear_error(tmp_path):
    write_shards(SyntheticSource(10, 32, seed=0), tmp_path / "s", per_shard=10, progress=False)
    stream = ShardStream(str(tmp_path / "s"), 2, SampleDecoder(ImageTransform(32)), train=True,
                         rank=1, world_size=2, batches_per_epoch=2)
    with pytest.raises(ValueError, match="resampled"):
        next(iter(make_loader(stream, 0)))
    stream.resampled = True
    assert len(list(make_loader(stream, 0))) == 2


def test_datamodule_writes_synthetic_shards(tmp_path):
    dm = ShardDataModule(str(tmp_path / "train"), str(tmp_path / "val"), image_size=32, batch_size=4,
                         num_workers=0, batches_per_epoch=3,
                         synthetic={"dir": str(tmp_path), "train_samples": 20, "val_samples": 6, "resolution": 32,
                                    "per_shard": 10})
    dm.prepare_data()
    assert ShardIndex.load(tmp_path / "train").total == 20
    assert ShardIndex.load(tmp_path / "val").total == 6
    train = list(dm.train_dataloader())
    assert len(train) == 3 and train[0]["image"].shape == (4, 3, 32, 32)
    assert [len(b["caption"]) for b in dm.val_dataloader()] == [4, 2]
    val_captions = {c for b in dm.val_dataloader() for c in b["caption"]}
    train_captions = {ShapesGenerator(32, seed=0)[i].caption for i in range(20)}
    assert not val_captions & train_captions


def test_datamodule_synthetic_max_objects(tmp_path):
    """data.synthetic.max_objects = 1 writes single-object scenes (the quickstart's data), and a folder
    written with other settings is refused rather than mixed."""
    spec = {"dir": str(tmp_path), "train_samples": 12, "val_samples": 4, "resolution": 32, "per_shard": 6}
    dm = ShardDataModule(str(tmp_path / "train"), str(tmp_path / "val"), image_size=32, batch_size=4,
                         num_workers=0, synthetic={**spec, "max_objects": 1})
    dm.prepare_data()
    captions = [c for b in dm.val_dataloader() for c in b["caption"]]
    assert ShardIndex.load(tmp_path / "train").settings["max_objects"] == 1
    assert len(captions) == 4 and all(len(parse_caption(c).shapes) == 1 and " and " not in c for c in captions)
    many = [ShapesGenerator(32, seed=0)[i].labels["n_objects"] for i in range(12)]
    assert max(many) > 1  # the default (3) would have written multi-object scenes here
    with pytest.raises(FileExistsError, match="max_objects"):
        ShardDataModule(str(tmp_path / "train"), str(tmp_path / "val"), image_size=32, batch_size=4, num_workers=0,
                        synthetic=spec).prepare_data()


def test_synthetic_sizes_set_the_object_radius_and_are_recorded(tmp_path):
    """data.synthetic.sizes (the quickstart's {large: 0.4}): every object gets a configured size word
    and radius, the default sizes give the same images as before the option existed, and a folder
    written with other sizes is refused."""
    default, explicit = ShapesGenerator(32, seed=2), ShapesGenerator(32, seed=2, sizes={"small": 0.16, "large": 0.30})
    assert all(np.array_equal(np.asarray(default[i].image), np.asarray(explicit[i].image)) for i in range(10))
    large = ShapesGenerator(32, seed=2, max_objects=1, sizes={"large": 0.4})
    for i in range(30):
        (obj,) = large[i].objects
        assert obj.size == "large" and 0.4 <= obj.cx <= 0.6 and 0.4 <= obj.cy <= 0.6
        assert large[i].caption.startswith("a large ")
    # the object covers about pi 0.4^2 = half the image (a square 0.64, a triangle or star less)
    background = np.array(BACKGROUNDS[large[0].background])
    share = (np.abs(np.asarray(large[0].image, dtype=int) - background).sum(axis=2) > 30).mean()
    assert 0.25 < share < 0.75
    crowded = ShapesGenerator(64, seed=0, max_objects=3, sizes={"big": 0.2, "tiny": 0.1})
    assert {o.size for i in range(40) for o in crowded[i].objects} == {"big", "tiny"}
    with pytest.raises(ValueError, match="radii in"):
        ShapesGenerator(32, sizes={"huge": 0.6})

    spec = {"dir": str(tmp_path), "train_samples": 6, "val_samples": 2, "resolution": 32, "per_shard": 6,
            "max_objects": 1}
    ShardDataModule(str(tmp_path / "train"), str(tmp_path / "val"), image_size=32, batch_size=2, num_workers=0,
                    synthetic={**spec, "sizes": {"large": 0.4}}).prepare_data()
    assert ShardIndex.load(tmp_path / "train").settings["sizes"] == {"large": 0.4}
    with pytest.raises(FileExistsError, match="sizes"):
        ShardDataModule(str(tmp_path / "train"), str(tmp_path / "val"), image_size=32, batch_size=2,
                        num_workers=0, synthetic=spec).prepare_data()
    write_main(["synthetic", "--out", str(tmp_path / "cli"), "--n", "6", "--per-shard", "6", "--resolution", "32",
                "--max-objects", "1", "--size", "large=0.4", "--quiet"])
    assert ShardIndex.load(tmp_path / "cli").settings["sizes"] == {"large": 0.4}
    with pytest.raises(SystemExit, match="WORD=RADIUS"):
        write_main(["synthetic", "--out", str(tmp_path / "bad"), "--n", "2", "--size", "large"])


class _Renamed:
    """A synthetic source whose PNG members are stored as `.tif`: images in a format the loader
    does not read."""

    classes = None

    def __init__(self, n: int):
        self.source = SyntheticSource(n, 32, seed=0)

    def __len__(self) -> int:
        return len(self.source)

    def settings(self) -> dict:
        return {**self.source.settings(), "renamed": "tif"}

    def iter_from(self, start: int):
        for members in self.source.iter_from(start):
            yield {("tif" if ext == "png" else ext): data for ext, data in members.items()}


class _StepCounter(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.steps = 0

    def training_step(self, batch, _):
        self.steps += 1
        return (self.w - batch["image"].mean()) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _trainer(**kwargs) -> pl.Trainer:
    return pl.Trainer(**{"accelerator": "cpu", "devices": 1, "max_epochs": 1, "logger": False,
                         "enable_checkpointing": False, "enable_progress_bar": False,
                         "enable_model_summary": False, **kwargs})


@pytest.mark.parametrize("size", [0, -4, 2.5])
def test_batch_size_is_refused_when_the_datamodule_is_built(tmp_path, size):
    with pytest.raises(ValueError, match=f"data.batch_size must be a positive integer, got {size}"):
        ShardDataModule(str(tmp_path / "train"), batch_size=size)
    with pytest.raises(ValueError, match="data.val_batch_size"):
        ShardDataModule(str(tmp_path / "train"), batch_size=2, val_batch_size=size)
    with pytest.raises(ValueError, match="data.batch_size"):
        ShardStream(str(tmp_path / "train"), size, SampleDecoder(ImageTransform(32)), train=False)


@pytest.mark.timeout(60)  # before the limit existed this stream spun for ever
@pytest.mark.parametrize("workers", [0, 1])
def test_a_stream_that_cannot_make_a_batch_stops_naming_the_shard_and_member(tmp_path, workers):
    write_shards(_Renamed(8), tmp_path / "tif", per_shard=4, progress=False)
    stream = ShardStream(str(tmp_path / "tif"), 2, SampleDecoder(ImageTransform(32)), train=True,
                         batches_per_epoch=3, shuffle_buffer=1, max_consecutive_skips=20)
    with pytest.raises(SkipLimitError) as err:
        next(iter(make_loader(stream, workers)))
    message = str(err.value)
    assert "20 samples or shards in a row were skipped (data.max_consecutive_skips=20)" in message
    assert re.search(r"shard-00000[01]\.tar: sample \d{9} has no image member", message)
    assert re.search(r"its members: \d{9}\.tif, \d{9}\.txt", message)


def _cut_inside(shard: Path, member: str) -> None:
    """Truncate `shard` in the padding after the data of `member` (a cut a .txt usually gets)."""
    with tarfile.open(shard) as tar:
        info = tar.getmember(member)
    shard.write_bytes(shard.read_bytes()[:info.offset_data + info.size + 10])


def test_a_cut_shard_counts_every_sample_it_lost_and_names_the_cut_one(tmp_path):
    write_shards(SyntheticSource(60, 32, seed=0), tmp_path / "s", per_shard=30, progress=False)
    cut = tmp_path / "s" / "shard-000000.tar"
    _cut_inside(cut, "000000005.txt")  # samples 0-4 whole, 5 loses its .txt tail, 6-29 are gone
    # the shards' index.json says 30 each: the 25 lost samples are all counted; a cut shard is one
    # skip in a row, however many samples it lost
    stream = ShardStream(str(tmp_path / "s"), 7, SampleDecoder(ImageTransform(32)), train=False,
                         max_consecutive_skips=2)
    batches = list(make_loader(stream, 0))
    keys = [k for b in batches for k in b["__key__"]]
    assert keys == [f"{i:09d}" for i in [*range(5), *range(30, 60)]]
    assert all(c for b in batches for c in b["caption"])  # no sample came out without its caption
    assert sum(b["skipped"] for b in batches) == 25
    (where,) = [w for b in batches for w in b["skipped_where"]]
    assert f"{cut}: 25 of its 30 samples (index.json) lost after 5" in where
    assert "while reading sample 000000005" in where and "000000005.txt" in where
    # without an index (a pipe) the number lost is unknown: the sample cut counts, and is dropped
    piped = ShardStream([f"pipe:cat {cut}"], 7, SampleDecoder(ImageTransform(32)), train=False)
    batches = list(make_loader(piped, 0))
    assert [k for b in batches for k in b["__key__"]] == [f"{i:09d}" for i in range(5)]
    assert sum(b["skipped"] for b in batches) == 1
    assert "an unknown number of samples lost after 5" in batches[-1]["skipped_where"][0]


def test_a_shard_that_ends_early_without_damage_counts_its_missing_samples(tmp_path):
    """A shard cut exactly between two samples reads as a whole tar; its index count tells."""
    write_shards(SyntheticSource(20, 32, seed=0), tmp_path / "s", per_shard=10, progress=False)
    shard = tmp_path / "s" / "shard-000001.tar"
    with tarfile.open(shard) as tar:
        end = tar.getmember("000000016.png").offset  # samples 10-15 whole, nothing of 16-19
    shard.write_bytes(shard.read_bytes()[:end])
    # 5 batches of 4: one pass over the 16 samples left, and 4 of the next
    stream = ShardStream(str(tmp_path / "s"), 4, SampleDecoder(ImageTransform(32)), train=True,
                         batches_per_epoch=5, shuffle_buffer=1)
    batches = list(make_loader(stream, 0))
    assert sum(b["skipped"] for b in batches) == 4
    (where,) = [w for b in batches for w in b["skipped_where"]]
    assert where == f"{shard}: 4 of its 10 samples (index.json) lost after 6: the tar stream ended early"


def test_too_few_shards_are_refused_before_the_first_training_step(tmp_path):
    write_shards(SyntheticSource(12, 32, seed=0), tmp_path / "s", per_shard=4, progress=False)  # 3 shards
    dm = ShardDataModule(str(tmp_path / "s"), image_size=32, batch_size=2, num_workers=4, batches_per_epoch=6,
                         shuffle_buffer=1, crop="center", resampled=False)
    model = _StepCounter()
    with pytest.raises(ValueError, match=r"3 shards cannot be split over 1 rank\(s\) x 4 worker\(s\)"):
        _trainer().fit(model, datamodule=dm)
    assert model.steps == 0


@pytest.mark.timeout(60)  # before the fix the run went on until killed
@pytest.mark.parametrize("workers", [0, 1])
def test_a_stop_signal_ends_a_run_that_gets_no_batch(tmp_path, workers):
    """SIGTERM reaches Lightning's handler, which only stops at the next batch boundary: a run
    waiting for a batch that never comes must stop too (here shards with no readable image, and a
    skip limit too high to end the run first)."""
    write_shards(_Renamed(8), tmp_path / "tif", per_shard=4, progress=False)
    dm = ShardDataModule(str(tmp_path / "tif"), image_size=32, batch_size=2, num_workers=workers,
                         batches_per_epoch=3, shuffle_buffer=1, max_consecutive_skips=10**12)
    def harmless(*_):  # SIGTERM's handler until Lightning installs its own in fit
        pass

    previous = signal.signal(signal.SIGTERM, harmless)

    def send_once_lightning_listens():
        while signal.getsignal(signal.SIGTERM) is harmless:  # fit installs Lightning's handler
            time.sleep(0.05)
        time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    sender = threading.Thread(target=send_once_lightning_listens, daemon=True)
    model = _StepCounter()
    started = time.monotonic()
    try:
        sender.start()
        with pytest.raises(SIGTERMException):
            _trainer().fit(model, datamodule=dm)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert model.steps == 0 and time.monotonic() - started < 30


def test_skipped_samples_are_logged_with_every_step_and_named_in_one_warning(tmp_path, caplog):
    """1 shard of 10 samples, 3 and 7 corrupt, read in order (shuffle_buffer 1) in batches of 2: the
    running total reaches data/skipped at every logged step, and the first skip is named (shard,
    sample, member) in a warning; later ones wait for the warning interval."""
    _write_with_corrupt_member(tmp_path / "a.tar", 10, corrupt={3, 7})
    dm = ShardDataModule(str(tmp_path / "a.tar"), image_size=32, batch_size=2, num_workers=0, batches_per_epoch=8,
                         shuffle_buffer=1, crop="center", resampled=True)
    logger = pl.loggers.CSVLogger(tmp_path, name="csv", version=0)
    trainer = _trainer(logger=logger, log_every_n_steps=1, callbacks=[DataHealth(warn_interval_s=3600)])
    with caplog.at_level(logging.WARNING, logger="ldm.callbacks.data_health"):
        trainer.fit(_StepCounter(), datamodule=dm)
    with (tmp_path / "csv" / "version_0" / "metrics.csv").open() as fh:
        rows = [row for row in csv.DictReader(fh) if row.get("data/skipped")]
    logged = [float(row["data/skipped"]) for row in rows]
    # 16 samples used: one pass (2 skipped) and 8 of the next (its two corrupt ones among them)
    assert len(logged) == 8 and logged == sorted(logged) and logged[0] == 0 and logged[-1] == 4
    assert 0 < logged[3] < 4  # counted as it happens, not only at the end of the epoch
    (warning,) = [r for r in caplog.records if r.name == "ldm.callbacks.data_health"]
    assert f"skipped 1 sample(s): {tmp_path / 'a.tar'}: member 000000003.png" in warning.getMessage()


class _SignalEveryProcess(pl.Callback):
    """After the second batch, SIGTERM to the loader workers and to this process from another
    process, as `timeout`, SLURM or a process-group kill deliver it."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == 1:
            workers = [p for p in multiprocessing.active_children() if p.pid != os.getpid()]
            assert workers, "the loader has a worker process"
            # sent by another process: torch's workers exit quietly only on a SIGTERM from their parent
            subprocess.run(["kill", "-TERM", *(str(w.pid) for w in workers), str(os.getpid())], check=True)
            time.sleep(2)  # the main process goes on a moment (its step, last.ckpt)


@pytest.mark.timeout(60)
def test_a_stop_signal_to_every_process_stops_at_the_batch_boundary(tmp_path):
    """A worker killed by the signal made torch raise "DataLoader worker ... is killed by signal"
    in the main process, mid-step, instead of the Trainer's clean stop (and last.ckpt)."""
    write_shards(SyntheticSource(8, 32, seed=0), tmp_path / "s", per_shard=4, progress=False)
    dm = ShardDataModule(str(tmp_path / "s"), image_size=32, batch_size=2, num_workers=1, batches_per_epoch=1000,
                         shuffle_buffer=1, crop="center")
    model = _StepCounter()
    with pytest.raises(SIGTERMException):
        _trainer(callbacks=[_SignalEveryProcess()]).fit(model, datamodule=dm)
    assert model.steps == 2
