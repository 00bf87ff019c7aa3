"""FID that can tell models apart on the shapes data: the shape classifier's features
(ldm.metrics.shape_classifier.ShapeFeatures) and a bootstrap interval (ldm.metrics.bootstrap)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ldm.data.synthetic import ShapesGenerator
from ldm.metrics.bootstrap import bootstrap_fid
from ldm.metrics.features import ToyFeatures
from ldm.metrics.fid import feature_statistics, frechet_distance
from ldm.metrics.shape_classifier import ShapeFeatures

ROOT = Path(__file__).resolve().parents[1]
CLASSIFIER = ROOT / "assets" / "classifiers" / "shapes-64"


def _images(seed: int, n: int) -> torch.Tensor:
    """n single-object 64 px scenes (the f-sweep's data) as uint8 (N, 3, 64, 64)."""
    gen = ShapesGenerator(64, seed=seed, max_objects=1)
    return torch.from_numpy(np.stack([np.asarray(gen[i].image) for i in range(n)])).permute(0, 3, 1, 2).contiguous()


def _fid(a: torch.Tensor, b: torch.Tensor) -> float:
    return frechet_distance(*feature_statistics(a), *feature_statistics(b))


def _blur(images: torch.Tensor, factor: int) -> torch.Tensor:
    """Detail lost as a first stage of downsampling factor `factor` loses it: down, then up again."""
    x = images.float() / 127.5 - 1
    small = F.interpolate(x, scale_factor=1 / factor, mode="area")
    return F.interpolate(small, size=x.shape[-2:], mode="bilinear", align_corners=False).clamp(-1, 1)


@pytest.fixture(scope="module")
def features():
    return ShapeFeatures(CLASSIFIER)


@pytest.fixture(scope="module")
def real(features):
    with torch.no_grad():
        return features(_images(0, 500)), _images(1, 500)


def test_shape_features_rank_lost_detail_and_wrong_content_as_worse(features, real):
    reference, other = real
    with torch.no_grad():
        same = _fid(reference, features(other))
        blurred = [_fid(reference, features(_blur(other, k))) for k in (2, 4, 8, 16)]
        swapped = features(other[:, [2, 0, 1]])  # the right shapes in the wrong colours
    assert features.num_features == 128 and reference.shape == (500, 128)
    # another draw of the same data is closest (13 at n = 500: FID's small-sample bias); each
    # halving of the detail is clearly worse than the last (23, 123, 350, 563 measured)
    assert same < 0.7 * blurred[0]
    assert all(1.5 * a < b for a, b in zip(blurred, blurred[1:])), blurred
    assert _fid(reference, swapped) > 10 * same


def test_random_conv_features_cannot_see_what_f_loses(real):
    # Why the f-sweep scores with the classifier's features: the random-conv toy features give
    # another real draw and the same images at half the detail the same FID (0.02 and 0.02)
    toy = ToyFeatures()
    a, b = _images(0, 500), real[1]
    with torch.no_grad():
        reference = toy(a)
        same, blurred = _fid(reference, toy(b)), _fid(reference, toy(_blur(b, 2)))
    assert blurred < 1.5 * same


def test_shape_features_refuse_another_resolution_and_say_which_classifier_to_train(features):
    with pytest.raises(ValueError, match="--resolution 32"):
        features(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))


def test_bootstrap_interval_covers_the_fid_and_separates_models_that_differ(features, real):
    reference, other = real
    mu, sigma = feature_statistics(reference)
    with torch.no_grad():
        good, bad = features(other), features(_blur(other, 4))
    a = bootstrap_fid(good, mu, sigma, resamples=100, seed=0)
    assert a == bootstrap_fid(good, mu, sigma, resamples=100, seed=0)  # seeded
    b = bootstrap_fid(bad, mu, sigma, resamples=100, seed=0)
    fid_good = frechet_distance(mu, sigma, *feature_statistics(good))
    # FID's bootstrap distribution lies above the point value (FID is biased upwards in n); the
    # interval is a few points wide at n = 500 and the two models' intervals do not overlap
    assert a.low < a.high and a.std > 0 and a.high > fid_good
    assert a.high < b.low
    both = bootstrap_fid(good, mu, sigma, real=reference, resamples=100, seed=0)
    assert both.high - both.low > a.high - a.low  # the real side's noise adds to the width


def test_bootstrap_refuses_bad_settings():
    x = torch.randn(10, 3)
    mu, sigma = feature_statistics(x)
    for kwargs, message in (({"resamples": 1}, "at least 2"), ({"level": 1.5}, "coverage")):
        with pytest.raises(ValueError, match=message):
            bootstrap_fid(x, mu, sigma, **kwargs)
