"""Super-resolution downsampling and inpainting masks."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data.degradations import (
    MASK_KINDS,
    InpaintingDegradation,
    MaskGenerator,
    SRDegradation,
    bicubic_downsample,
    hole_fraction,
    in_coverage_bucket,
    stable_index,
)


def _images(b: int = 2, h: int = 32, w: int = 48, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g) * 2 - 1


# ---- super-resolution ---------------------------------------------------------------------------

def test_bicubic_downsample_matches_pil_bicubic():
    images = _images()
    small = bicubic_downsample(images, 4)
    assert small.shape == (2, 3, 8, 12) and small.dtype == images.dtype
    for b in range(2):
        for c in range(3):
            pil = Image.fromarray(images[b, c].numpy(), mode="F").resize((12, 8), Image.Resampling.BICUBIC)
            expected = np.clip(np.asarray(pil), -1, 1)
            np.testing.assert_allclose(small[b, c].numpy(), expected, atol=1e-5)


def test_bicubic_downsample_hand_computed_and_bounds():
    # A constant stays constant (the filter weights sum to 1).
    assert torch.allclose(bicubic_downsample(torch.full((1, 3, 16, 16), 0.3), 4), torch.tensor(0.3), atol=1e-6)
    # Columns alternating -1, +1 at factor 2. The filter is Keys' cubic (a = -0.5) stretched by 2:
    # taps at distances 0.5, 1.5, 2.5, 3.5 from an output centre weigh 0.8671875, 0.2265625,
    # -0.0703125, -0.0234375 on both sides, so interior outputs pair -1 with +1 and are 0. The
    # first output sees only input pixels 0..4 (-1, 1, -1, 1, -1), weights renormalised:
    # (-0.8671875 + 0.8671875 - 0.2265625 - 0.0703125 + 0.0234375) / 1.8671875 = -35/239.
    stripes = torch.tensor([-1.0, 1.0]).repeat(8).expand(1, 1, 16, 16)
    small = bicubic_downsample(stripes, 2)
    assert small[..., 2:-2].abs().max() < 1e-6
    torch.testing.assert_close(small[..., 0], torch.full((1, 1, 8), -35 / 239))
    torch.testing.assert_close(small[..., -1], torch.full((1, 1, 8), 35 / 239))
    # Bicubic rings past a sharp edge; the result is clamped to the image range.
    edge = torch.cat([torch.full((1, 1, 8, 4), -1.0), torch.full((1, 1, 8, 4), 1.0)], dim=-1)
    assert bicubic_downsample(edge, 2).abs().max() <= 1.0
    # bf16 inputs come back in bf16, computed in float32.
    assert bicubic_downsample(_images().bfloat16(), 2).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="not divisible by the downsampling factor 4"):
        bicubic_downsample(_images(h=30), 4)
    with pytest.raises(ValueError, match=r"float tensor \(B, C, H, W\)"):
        bicubic_downsample(torch.zeros(3, 8, 8), 2)


def test_sr_degradation_adds_lowres():
    batch = {"image": _images(), "caption": ["a", "b"]}
    out = SRDegradation(factor=4)(batch)
    assert set(out) == {"image", "caption", "lowres"} and set(batch) == {"image", "caption"}
    assert out["image"] is batch["image"]
    assert torch.equal(out["lowres"], bicubic_downsample(batch["image"], 4))
    assert torch.equal(SRDegradation(4)(batch)["lowres"], out["lowres"])  # deterministic
    with pytest.raises(KeyError, match="no 'image' entry"):
        SRDegradation(4)({"lowres": batch["image"]})


# ---- masks --------------------------------------------------------------------------------------

def _boundary_share(mask: torch.Tensor) -> float:
    """Share of hole pixels that touch a kept pixel (4-neighbourhood): high for thin strokes."""
    hole = np.pad(mask[0].numpy() == 0, 1, mode="edge")
    inner = hole[1:-1, 1:-1]
    touches = ~hole[:-2, 1:-1] | ~hole[2:, 1:-1] | ~hole[1:-1, :-2] | ~hole[1:-1, 2:]
    return float((inner & touches).sum() / max(inner.sum(), 1))


def _edge_columns(mask: torch.Tensor) -> int:
    """Distinct x positions where the mask changes along a row: at most 8 for 1-4 boxes."""
    m = mask[0].numpy()
    return len(np.unique(np.nonzero(m[:, 1:] != m[:, :-1])[1]))


def test_masks_are_deterministic_binary_and_follow_the_convention():
    gen = MaskGenerator("mixed", seed=3)
    a = gen(7, 48, 64)
    assert a.shape == (1, 48, 64) and a.dtype == torch.float32
    assert set(a.unique().tolist()) <= {0.0, 1.0} and 0 < hole_fraction(a) < 1
    assert torch.equal(a, MaskGenerator("mixed", seed=3)(7, 48, 64))
    assert not torch.equal(a, gen(8, 48, 64))
    assert not torch.equal(a, MaskGenerator("mixed", seed=4)(7, 48, 64))
    assert torch.equal(gen.batch([7, 8], 48, 64), torch.stack([a, gen(8, 48, 64)]))
    # hole_fraction counts the zeros (holes), not the ones.
    half = torch.ones(1, 10, 10)
    half[:, :4] = 0
    assert hole_fraction(half).item() == pytest.approx(0.4)


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_mask_coverage_within_bounds(kind):
    gen = MaskGenerator(kind, min_coverage=0.1, max_coverage=0.25, seed=0)
    coverage = hole_fraction(gen.batch(range(20), 64, 64))
    assert ((coverage >= 0.1) & (coverage < 0.25)).all()
    free = hole_fraction(MaskGenerator(kind, seed=0).batch(range(40), 64, 64))
    assert not ((free >= 0.1) & (free < 0.25)).all()  # the bounds did constrain something


def test_mask_kinds_differ():
    n = 30
    masks = {kind: MaskGenerator(kind, seed=1).batch(range(n), 64, 64) for kind in MASK_KINDS}
    boundary = {kind: np.mean([_boundary_share(m) for m in masks[kind]]) for kind in ("thick", "thin")}
    assert boundary["thin"] > 2 * boundary["thick"]
    assert all(_edge_columns(m) <= 8 for m in masks["box"])  # unions of axis-aligned rectangles
    assert sum(_edge_columns(m) > 8 for m in masks["thick"]) > n * 0.8
    boxy = [_edge_columns(m) <= 8 for m in masks["mixed"]]
    assert 0 < sum(boxy) < n  # mixed draws boxes and strokes
    assert not torch.equal(masks["thick"], masks["thin"])


def test_mask_generator_errors():
    with pytest.raises(ValueError, match="unknown mask kind 'blob'"):
        MaskGenerator("blob")
    with pytest.raises(ValueError, match="min_coverage < max_coverage"):
        MaskGenerator("box", 0.5, 0.4)
    with pytest.raises(ValueError, match=">= 0"):
        MaskGenerator("box")(-1, 8, 8)
    with pytest.raises(RuntimeError, match="widen the bounds"):
        MaskGenerator("thin", 0.9, 1.0)(0, 16, 16)


def test_coverage_bucket_filter_is_half_open():
    masks = torch.ones(3, 1, 20, 20)
    masks[0, :, :8] = 0  # 40 % holes
    masks[1, :, :9] = 0  # 45 %
    masks[2, :, :10] = 0  # 50 %: belongs to the next bucket
    assert in_coverage_bucket(masks, 0.4, 0.5).tolist() == [True, True, False]
    assert in_coverage_bucket(masks, 0.5, 0.6).tolist() == [False, False, True]
    lama = MaskGenerator("thick", 0.4, 0.5, seed=0).batch(range(5), 64, 64)
    assert in_coverage_bucket(lama, 0.4, 0.5).all()


# ---- inpainting degradation ---------------------------------------------------------------------

def test_inpainting_degradation_masks_the_image():
    images = _images(b=3, h=32, w=32)
    batch = {"image": images, "__key__": ["a/000001", "a/000002", "a/000003"]}
    masks = MaskGenerator("mixed", 0.1, 0.6, seed=5)
    out = InpaintingDegradation(masks)(batch)
    assert set(batch) == {"image", "__key__"}
    mask, masked = out["mask"], out["masked_image"]
    assert mask.shape == (3, 1, 32, 32) and mask.dtype == images.dtype
    assert torch.equal(masked, images * mask)
    # 1 keeps the known pixel, 0 blanks the hole (REFERENCE.md section 3's masked sampling).
    keep = mask.expand_as(images) == 1
    assert torch.equal(masked[keep], images[keep]) and (masked[~keep] == 0).all()
    # Masks follow each sample's key, whatever its position in the batch.
    assert torch.equal(mask[1], masks(stable_index("a/000002"), 32, 32))
    swapped = InpaintingDegradation(masks)({"image": images[[1, 0]], "__key__": ["a/000002", "a/000001"]})
    assert torch.equal(swapped["mask"], mask[[1, 0]])
    assert not torch.equal(mask[0], mask[1])
    assert stable_index("a/000002") == 17925815226090958001  # the same in every process


def test_inpainting_degradation_explicit_indices_and_errors():
    images = _images(b=2, h=16, w=16)
    masks = MaskGenerator("box", seed=0)
    out = InpaintingDegradation(masks)({"image": images}, indices=torch.tensor([4, 9]))
    assert torch.equal(out["mask"], masks.batch([4, 9], 16, 16))
    with pytest.raises(KeyError, match="pass indices"):
        InpaintingDegradation(masks)({"image": images})
    with pytest.raises(ValueError, match="3 mask indices for a batch of 2"):
        InpaintingDegradation(masks)({"image": images}, indices=[1, 2, 3])
