"""Label maps and inpainting masks: the synthetic scenes' exact maps, the writer's seg.png / mask.png
members, and a pipeline that keeps them aligned with the image through resize, crop and flip."""
from __future__ import annotations

import io
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data.datamodule import ShardDataModule
from ldm.data.pipeline import LabelRangeError, SampleDecoder, ShardStream, make_loader
from ldm.data.sources import FolderSource, SyntheticSource
from ldm.data.synthetic import BACKGROUNDS, COLORS, NUM_LABEL_IDS, ShapesGenerator, label_id
from ldm.data.transforms import ImageTransform, MapSizeError, to_uint8
from ldm.data.write import main as write_main
from ldm.data.write import write_shards


def test_synthetic_label_map_matches_the_drawn_pixels():
    """Away from edges (a pixel whose 5x5 neighbourhood has one id) each pixel has the colour of
    what its id says, the background or an object of that shape, to 8 levels: the image's
    antialiasing filter blends (and rings) up to two pixels from an edge, the map does not."""
    g = ShapesGenerator(64, seed=3)
    checked = 0
    for i in range(20):
        s = g[i]
        ids, image = g.label_map(s), np.asarray(s.image).astype(int)
        assert ids.shape == (64, 64) and ids.dtype == np.uint8
        assert set(np.unique(ids)) == {0} | {label_id(o.shape) for o in s.objects}
        padded = np.pad(ids, 2, mode="edge")
        window = np.stack([padded[y:y + 64, x:x + 64] for y in range(5) for x in range(5)])
        inner = (window == ids).all(0)
        for y, x in zip(*np.nonzero(inner)):
            k = ids[y, x]
            colours = [BACKGROUNDS[s.background]] if k == 0 else [COLORS[o.color] for o in s.objects
                                                                   if label_id(o.shape) == k]
            assert min(np.abs(image[y, x] - c).max() for c in colours) <= 8, (i, y, x)
            checked += 1
    assert checked > 20 * 64 * 64 * 0.75 and NUM_LABEL_IDS == 7


def _stripes(w: int, h: int) -> np.ndarray:
    """An RGB image whose red channel is a map of ids 0..(w // 4): 4 px wide columns, and whose
    green channel rows differ, so a crop offset or a flip cannot go unseen."""
    pixels = np.zeros((h, w, 3), np.uint8)
    pixels[..., 0] = (np.arange(w) // 4)[None, :]
    pixels[..., 1] = (np.arange(h) * 3)[:, None]
    return pixels


def test_random_crop_and_flip_keep_a_map_made_from_the_image_aligned():
    pixels = _stripes(48, 40)  # shorter side 40 = size: crop and flip only, no resize
    transform = ImageTransform(40, crop="random", flip=True)
    data = Image.fromarray(pixels)
    buf = io.BytesIO()
    data.save(buf, format="PNG")
    rng, seen = random.Random(0), set()
    for _ in range(20):
        image, maps = transform.decode_aligned(buf.getvalue(), {"seg": pixels[..., 0].astype(np.int64)}, rng)
        red = to_uint8(image)[0].long()
        assert maps["seg"].dtype == torch.int64 and torch.equal(maps["seg"], red)
        seen.add((int(red[0, 0]), int(red[0, -1])))
    assert len(seen) > 4  # crops at several offsets, flipped and not
    # the same draws as an image alone: decode() is decode_aligned without maps
    alone = ImageTransform(40, crop="random", flip=True).decode(buf.getvalue(), random.Random(0))
    first, _ = ImageTransform(40, crop="random", flip=True).decode_aligned(buf.getvalue(), {}, random.Random(0))
    assert torch.equal(alone, first)


def test_resize_takes_nearest_neighbour_ids_and_the_image_box():
    pixels = np.repeat((np.arange(72) // 12 * 40).astype(np.uint8)[None, :], 48, 0)  # ids 0, 40, .. 200
    image = np.stack([pixels, pixels, pixels], -1)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    out, maps = ImageTransform(32, crop="center").decode_aligned(buf.getvalue(), {"seg": pixels.astype(np.int64)})
    seg = maps["seg"]
    assert seg.shape == (32, 32) and set(seg.unique().tolist()) <= set(np.unique(pixels).tolist())  # no blends
    red = to_uint8(out)[0].long()
    # 72x48 -> 48x32 then the centre 32 columns; ids change every 8 px, and bicubic keeps the
    # pixels two or more away from a change exact
    inner = torch.tensor([(x + 8) % 8 not in (0, 1, 6, 7) for x in range(32)])
    assert torch.equal(seg[:, inner], red[:, inner])
    with pytest.raises(MapSizeError, match="must have its image's size"):
        ImageTransform(32).decode_aligned(buf.getvalue(), {"seg": pixels[:, :-1].astype(np.int64)})


def _folder_with_maps(tmp_path: Path, n: int = 6) -> tuple[Path, Path, Path]:
    src, seg, masks = tmp_path / "images", tmp_path / "seg", tmp_path / "masks"
    for folder in (src / "a", seg / "a", masks / "a"):
        folder.mkdir(parents=True)
    for i in range(n):
        pixels = _stripes(48, 40)
        pixels[..., 2] = i
        Image.fromarray(pixels).save(src / "a" / f"{i}.jpg" if i == 0 else src / "a" / f"{i}.png")
        Image.fromarray(pixels[..., 0]).save(seg / "a" / f"{i}.png")
        Image.fromarray(((pixels[..., 1] > 60) * 255).astype(np.uint8)).save(masks / "a" / f"{i}.png")
    return src, seg, masks


def test_writer_stores_label_maps_and_masks_losslessly_and_the_stream_keeps_them_aligned(tmp_path):
    src, seg, masks = _folder_with_maps(tmp_path)
    write_main(["folder", "--src", str(src), "--label-maps", str(seg), "--masks", str(masks), "--out",
                str(tmp_path / "out"), "--per-shard", "3", "--quiet"])
    with tarfile.open(tmp_path / "out" / "shard-000000.tar") as tar:
        names = tar.getnames()
        stored = np.asarray(Image.open(tar.extractfile("000000001.seg.png")))
        mask = np.asarray(Image.open(tar.extractfile("000000001.mask.png")))
    assert {"000000000.jpg", "000000000.seg.png", "000000000.mask.png"} <= set(names)
    assert np.array_equal(stored, _stripes(48, 40)[..., 0]) and set(np.unique(mask)) == {0, 255}

    decoder = SampleDecoder(ImageTransform(40, crop="random", flip=True),
                            label_maps={"segmentation": "seg.png", "stored_mask": "mask.png"},
                            label_classes={"segmentation": 12})
    stream = ShardStream(str(tmp_path / "out"), 3, decoder, train=True, batches_per_epoch=4, seed=1)
    crops = set()
    for batch in make_loader(stream, 0):
        labels, kept = batch["segmentation"], batch["stored_mask"]
        assert labels.shape == (3, 40, 40) and labels.dtype == torch.int64
        png = [b for b in range(3) if batch["__key__"][b] != "000000000"]  # the JPEG's red channel is lossy
        red, green = (to_uint8(batch["image"])[:, c].long() for c in (0, 1))
        assert torch.equal(labels[png], red[png])
        assert torch.equal(kept[png], (green[png] > 60).long() * 255)
        crops.update(int(row[0]) for row in labels[:, 0])
    assert len(crops) > 2


def test_writer_refuses_missing_mismatched_and_colour_maps(tmp_path):
    src, seg, masks = _folder_with_maps(tmp_path)
    out = ["--out", str(tmp_path / "out"), "--quiet"]
    (seg / "a" / "2.png").unlink()
    with pytest.raises(SystemExit, match=r"1 of 6 images have no --label-maps file, e.g. .*2.png needs"):
        write_main(["folder", "--src", str(src), "--label-maps", str(seg), *out])
    Image.new("L", (48, 39)).save(seg / "a" / "2.png")
    with pytest.raises(SystemExit, match=r"2.png is 48x39 px but its image .* is 48x40 px: .* nearest-neighbour"):
        write_main(["folder", "--src", str(src), "--label-maps", str(seg), *out])
    Image.new("RGB", (48, 40)).save(seg / "a" / "2.png")
    with pytest.raises(SystemExit, match="is a RGB image; --label-maps files are one channel of ids"):
        write_main(["folder", "--src", str(src), "--label-maps", str(seg), *out])
    Image.new("L", (48, 40), 128).save(masks / "a" / "4.png")
    with pytest.raises(ValueError, match="a mask is binary: 0 for the hole to fill, 255"):
        write_shards(FolderSource(src, masks=masks), tmp_path / "m", per_shard=2, progress=False)
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_synthetic_shards_carry_label_maps_and_the_datamodule_checks_their_ids(tmp_path):
    write_main(["synthetic", "--out", str(tmp_path / "s"), "--n", "8", "--resolution", "32", "--per-shard", "4",
                "--label-maps", "--quiet"])
    g = ShapesGenerator(32)
    with tarfile.open(tmp_path / "s" / "shard-000001.tar") as tar:
        stored = np.asarray(Image.open(tar.extractfile("000000005.seg.png")))
    assert np.array_equal(stored, g.label_map(g[5]))
    assert SyntheticSource(8, 32, label_maps=True).settings()["label_maps"] is True
    assert "label_maps" not in SyntheticSource(8, 32).settings()  # folders written before still match

    def stream(classes: int) -> ShardStream:
        decoder = SampleDecoder(ImageTransform(32), label_maps={"segmentation": "seg.png"},
                                label_classes={"segmentation": classes})
        return ShardStream(str(tmp_path / "s"), 4, decoder, train=False)

    batch = next(iter(make_loader(stream(NUM_LABEL_IDS), 0)))
    assert int(batch["segmentation"].max()) < NUM_LABEL_IDS
    with pytest.raises(LabelRangeError, match=r"holds ids 0\.\.\d, but the run takes 2 classes .* cond.n_classes"):
        next(iter(make_loader(stream(2), 0)))  # not skipped and counted: every sample would be
    with pytest.raises(ValueError, match="label_classes names .*'seg'.*which data.label_maps does not read"):
        SampleDecoder(ImageTransform(32), label_maps={"segmentation": "seg.png"}, label_classes={"seg": 3})
    with pytest.raises(ValueError, match="data.label_maps .* latent cache does not hold"):
        ShardDataModule(str(tmp_path / "s"), image_size=32, crop="center", label_maps={"segmentation": "seg.png"},
                        latent_cache={"first_stage": str(tmp_path / "ae")})


def test_a_map_of_another_size_in_the_shards_stops_the_stream(tmp_path):
    src, _, _ = _folder_with_maps(tmp_path, n=2)
    # a shard written elsewhere, whose maps are half the image size
    small = io.BytesIO()
    Image.new("L", (24, 20)).save(small, format="PNG")
    (tmp_path / "out").mkdir()
    with tarfile.open(tmp_path / "out" / "x.tar", "w") as tar:
        for key in ("000000000", "000000001"):
            for ext, data in (("png", (src / "a" / "1.png").read_bytes()), ("seg.png", small.getvalue())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    decoder = SampleDecoder(ImageTransform(40), label_maps={"segmentation": "seg.png"})
    with pytest.raises(MapSizeError, match=r"x.tar: sample 000000000: segmentation is 24x20 px but its "
                                           r"image 48x40 px"):
        next(iter(make_loader(ShardStream(str(tmp_path / "out"), 2, decoder, train=False), 0)))


def test_inpainting_takes_the_shards_masks_with_stored_key(tmp_path):
    from ldm.data.degradations import InpaintingDegradation

    src, _, masks = _folder_with_maps(tmp_path, n=4)
    write_shards(FolderSource(src, masks=masks), tmp_path / "out", per_shard=2, progress=False)
    decoder = SampleDecoder(ImageTransform(40, crop="random", flip=True), label_maps={"stored_mask": "mask.png"})
    stream = ShardStream(str(tmp_path / "out"), 2, decoder, train=True, batches_per_epoch=2,
                         batch_transforms=[InpaintingDegradation(stored_key="stored_mask")])
    for batch in make_loader(stream, 0):
        png = [b for b in range(2) if batch["__key__"][b] != "000000000"]  # the JPEG's green channel is lossy
        green = to_uint8(batch["image"])[png, 1].long()
        assert torch.equal(batch["mask"][png, 0], (green > 60).float())  # the rows > 20 are kept
        assert torch.equal(batch["masked_image"], batch["image"] * batch["mask"])
    with pytest.raises(ValueError, match="exactly one of them"):
        InpaintingDegradation()
