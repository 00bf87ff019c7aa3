"""ImageTransform: decoding encoded bytes (torchvision fast path) gives exactly the pixels of the
PIL path, for every mode, format, crop and flip the pipeline meets."""
import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data.synthetic import ShapesGenerator
from ldm.data.transforms import ImageTransform, to_float, to_uint8


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _via_pil(transform: ImageTransform, data: bytes, seed: int) -> torch.Tensor:
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return transform(img, random.Random(seed))


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    """A 48 x 40 RGB image with shapes and noise (edges and texture for JPEG and resampling)."""
    base = np.asarray(ShapesGenerator(64, seed=3)[0].image.resize((48, 40)), dtype=np.int16)
    noise = np.random.default_rng(0).integers(-20, 21, base.shape)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def _writable(fmt: str, mode: str) -> bool:
    try:
        _encode(Image.new(mode, (2, 2)), fmt)
    except (OSError, ValueError):
        return False
    return True


# every image mode each format can hold (as PIL writes it): JPEG has no alpha or palette, BMP no LA / CMYK
FORMAT_MODES = [(fmt, mode) for fmt in ("PNG", "JPEG", "BMP", "WEBP")
                for mode in ("RGB", "L", "RGBA", "P", "LA", "CMYK") if _writable(fmt, mode)]


@pytest.mark.parametrize("fmt,mode", FORMAT_MODES)
@pytest.mark.parametrize("size,crop,flip", [(40, "center", False), (40, "random", True), (24, "random", True),
                                            (64, "center", False)])
def test_decode_equals_the_pil_path(photo, fmt, mode, size, crop, flip):
    data = _encode(photo.convert(mode), fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    transform = ImageTransform(size, crop, flip)
    for seed in range(4):  # crops and flips drawn from the same rng in the same order
        fast = transform.decode(data, random.Random(seed))
        assert fast.dtype == torch.float32 and fast.shape == (3, size, size) and fast.is_contiguous()
        assert torch.equal(fast, _via_pil(transform, data, seed))


def test_decode_16_bit_png_falls_back_to_pil():
    gray16 = Image.fromarray(np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 60)
    data = _encode(gray16, "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    transform = ImageTransform(32)
    assert torch.equal(transform.decode(data), _via_pil(transform, data, 0))


def test_decode_rejects_damaged_bytes(photo):
    data = _encode(photo, "PNG")
    with pytest.raises(Exception):
        ImageTransform(40).decode(data[: len(data) // 2])
    with pytest.raises(Exception):
        ImageTransform(40).decode(b"not an image")


def test_to_float_and_to_uint8_round_trip():
    pixels = torch.arange(256, dtype=torch.uint8).reshape(1, 16, 16)
    x = to_float(pixels)
    assert x.dtype == torch.float32 and x.min() == -1 and x.max() == 1
    assert torch.equal(x, pixels.float() / 127.5 - 1)
    assert torch.equal(to_uint8(x), pixels)
