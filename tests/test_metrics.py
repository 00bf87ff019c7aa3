"""ldm.metrics: FID / KID / IS / precision-recall against their formulas, independent
implementations (scipy, brute-force numpy, torch-fidelity) and under 2-process DDP;
reconstruction metrics on known images; the feature extractors and LPIPS without downloads."""
from __future__ import annotations

import io
import math
import socket

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torchvision
from torch_fidelity import feature_extractor_inceptionv3 as tf_inception
from torch_fidelity.feature_extractor_vgg16 import FeatureExtractorVGG16
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric

from helpers import make_random_inception
from ldm.metrics.collection import FID, IS, KID, batch_rows, build_metrics, update_from_rows
from ldm.metrics.features import (
    InceptionV3Features,
    PrecomputedFeatures,
    ToyFeatures,
    VGG16Features,
    images_to_uint8,
)
from ldm.metrics.fid import (
    ExtractorMismatchError,
    FeatureStatistics,
    feature_statistics,
    fid_from_statistics,
    frechet_distance,
    load_statistics,
    save_statistics,
)
from ldm.metrics.inception_score import inception_score
from ldm.metrics.kid import kernel_inception_distance
from ldm.metrics.lpips import LINEAR_WEIGHTS, build_lpips
from ldm.metrics.precision_recall import PrecisionRecall, knn_radii, precision_recall
from ldm.metrics.reconstruction import psnr, ssim
from ldm.utils.checkpoint import CheckpointMismatchError, save_safetensors

pytestmark = pytest.mark.filterwarnings("ignore:Metric `.*` will save all extracted features")


def correlated_features(n: int, d: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) / d ** 0.5
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ mix + shift


def precomputed(d: int, name: str = "test-features") -> PrecomputedFeatures:
    return PrecomputedFeatures(d, name, {"layer": "given"})


# ---------------------------------------------------------------- FID


def scipy_fid(f1: np.ndarray, f2: np.ndarray) -> float:
    """pytorch-fid's recipe: np.cov and scipy.linalg.sqrtm of the covariance product."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_feature_statistics_are_mean_and_unbiased_covariance():
    f = correlated_features(50, 6, seed=0)
    mu, sigma = feature_statistics(f.float())
    assert mu.dtype == sigma.dtype == torch.float64
    np.testing.assert_allclose(mu.numpy(), f.float().double().numpy().mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma.numpy(), np.cov(f.float().double().numpy(), rowvar=False), rtol=1e-10, atol=1e-14)


def test_frechet_distance_equals_scipy_sqrtm():
    real, fake = correlated_features(400, 24, seed=1), correlated_features(300, 24, seed=2, shift=0.3)
    ours = frechet_distance(*feature_statistics(real), *feature_statistics(fake))
    assert ours == pytest.approx(scipy_fid(real.numpy(), fake.numpy()), rel=1e-8)
    assert ours > 1.0
    assert frechet_distance(*feature_statistics(real), *feature_statistics(real)) == pytest.approx(0, abs=1e-9)


def test_frechet_distance_of_diagonal_gaussians_has_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    v1, v2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    expected = ((mu1 - mu2) ** 2).sum() + (v1 + v2 - 2 * np.sqrt(v1 * v2)).sum()
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-12)


def test_fid_metric_equals_pure_function():
    real, fake = correlated_features(90, 10, seed=3), correlated_features(70, 10, seed=4, shift=0.5)
    metric = FID(precomputed(10))
    for chunk in real.split(32):
        metric.update(chunk.float(), real=True)
    for chunk in fake.split(25):
        metric.update(chunk.float(), real=False)
    expected = frechet_distance(*feature_statistics(real.float()), *feature_statistics(fake.float()))
    assert metric.compute().item() == pytest.approx(expected, rel=1e-9)


def test_statistics_cache_round_trip_and_extractor_mismatch(tmp_path):
    real, fake = correlated_features(60, 8, seed=5), correlated_features(60, 8, seed=6, shift=1.0)
    settings = {"layer": "pool", "resize": [32, 32]}
    stats = FeatureStatistics.from_features(real, "toy-random-conv", settings)
    save_statistics(tmp_path / "ref.npz", stats)
    loaded = load_statistics(tmp_path / "ref.npz")
    np.testing.assert_array_equal(loaded.mu, stats.mu)
    np.testing.assert_array_equal(loaded.sigma, stats.sigma)
    assert (loaded.n, loaded.extractor, loaded.settings) == (60, "toy-random-conv", settings)

    same = FeatureStatistics.from_features(fake, "toy-random-conv", settings)
    assert fid_from_statistics(loaded, same) == pytest.approx(scipy_fid(real.numpy(), fake.numpy()), rel=1e-8)
    with pytest.raises(ExtractorMismatchError, match="'toy-random-conv' vs 'inception"):
        fid_from_statistics(loaded, FeatureStatistics.from_features(fake, "inception-v3-tf-2015-12-05", settings))
    with pytest.raises(ExtractorMismatchError, match=r"settings differ in \['layer'\]"):
        fid_from_statistics(loaded, FeatureStatistics.from_features(fake, "toy-random-conv",
                                                                    {**settings, "layer": "logits"}))

    np.savez(tmp_path / "plain.npz", mu=stats.mu, sigma=stats.sigma)  # a pytorch-fid style file
    with pytest.raises(ValueError, match="lacks"):
        load_statistics(tmp_path / "plain.npz")


def test_fid_metric_exports_and_loads_reference_statistics(tmp_path):
    real, fake = correlated_features(80, 6, seed=7), correlated_features(50, 6, seed=8, shift=0.2)
    extractor = precomputed(6)
    source = FID(extractor)
    source.update(real.float(), real=True)
    save_statistics(tmp_path / "real.npz", source.real_statistics())

    target = FID(extractor, reset_real_features=False)
    target.load_real_statistics(load_statistics(tmp_path / "real.npz"))
    target.update(fake.float(), real=False)
    expected = frechet_distance(*feature_statistics(real.float()), *feature_statistics(fake.float()))
    assert target.compute().item() == pytest.approx(expected, rel=1e-9)
    target.reset()  # the loaded reference survives a reset
    target.update(fake.float(), real=False)
    assert target.compute().item() == pytest.approx(expected, rel=1e-9)

    other = FID(precomputed(6, name="another-extractor"))
    with pytest.raises(ExtractorMismatchError):
        other.load_real_statistics(load_statistics(tmp_path / "real.npz"))


# ---------------------------------------------------------------- precision / recall


def brute_force_precision_recall(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    def dist(a, b):
        return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))

    def radii(x):
        d = dist(x, x)
        np.fill_diagonal(d, np.inf)
        return np.sort(d, axis=1)[:, k - 1]

    def share_inside(queries, points, r):
        return float((dist(queries, points) <= r[None, :]).any(axis=1).mean())

    return share_inside(fake, real, radii(real)), share_inside(real, fake, radii(fake))


@pytest.mark.parametrize("k", [1, 3, 5])
def test_precision_recall_equals_brute_force_on_random_features(k):
    real, fake = correlated_features(57, 5, seed=10), correlated_features(43, 5, seed=11, shift=0.4)
    expected = brute_force_precision_recall(real.numpy(), fake.numpy(), k)
    assert precision_recall(real, fake, k=k, block_size=16) == pytest.approx(expected, abs=1e-12)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1  # the data exercise both outcomes


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_precision_recall_with_exact_ties_and_duplicates(k, dtype):
    # Integer features on a small grid: many duplicates (radius 0) and exactly tied distances,
    # which integer arithmetic makes exact in either dtype.
    g = torch.Generator().manual_seed(12)
    real = torch.randint(0, 3, (60, 3), generator=g).float()
    fake = torch.randint(0, 4, (45, 3), generator=g).float()
    expected = brute_force_precision_recall(real.double().numpy(), fake.double().numpy(), k)
    assert precision_recall(real, fake, k=k, block_size=7, dtype=dtype) == pytest.approx(expected, abs=1e-12)


def test_knn_radius_excludes_self_but_counts_duplicates():
    x = torch.tensor([[0.0], [0.0], [1.0], [3.0]])
    assert knn_radii(x, k=1, block_size=3).tolist() == [0.0, 0.0, 1.0, 2.0]
    assert knn_radii(x, k=2, block_size=2).tolist() == [1.0, 1.0, 1.0, 3.0]
    with pytest.raises(ValueError, match="more than k samples"):
        knn_radii(x, k=4)


def test_precision_recall_matches_torch_fidelity():
    real, fake = correlated_features(64, 6, seed=13), correlated_features(48, 6, seed=14, shift=0.3)
    ref = prc_features_to_metric(fake, real, prc_neighborhood=3, prc_batch_size=20, save_cpu_ram=True, verbose=False)
    # torch-fidelity averages in float32; one sample more or less would move the share by 1/48.
    expected = (ref["precision"], ref["recall"])
    assert precision_recall(real, fake, k=3, block_size=20) == pytest.approx(expected, abs=1e-6)


@pytest.mark.filterwarnings("ignore:The ``compute`` method of metric PrecisionRecall was called before")
def test_precision_recall_metric_equals_function_and_can_keep_reals():
    real, fake = correlated_features(40, 4, seed=15), correlated_features(30, 4, seed=16, shift=0.5)
    metric = PrecisionRecall(precomputed(4), k=3, block_size=9, reset_real_features=False)
    for chunk in real.split(16):
        metric.update(chunk, real=True)
    metric.update(fake, real=False)
    expected = precision_recall(real.float(), fake.float(), k=3)
    result = metric.compute()
    assert (result["precision"].item(), result["recall"].item()) == pytest.approx(expected, abs=1e-12)
    metric.reset()
    with pytest.raises(RuntimeError, match="needs more than 3 real and generated"):
        metric.compute()
    metric.update(fake, real=False)
    assert metric.compute()["recall"].item() == pytest.approx(expected[1], abs=1e-12)


# ---------------------------------------------------------------- KID and IS


def kid_formula(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased within-set sums (i != j), all m^2 cross terms; k(a, b) = (a.b / d + 1)^3."""
    m, d = len(x), x.shape[1]

    def k(a, b):
        return (a @ b / d + 1) ** 3

    within = sum(k(x[i], x[j]) + k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    cross = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
    return within / (m * (m - 1)) - 2 * cross / m ** 2


def test_kid_matches_formula_and_torch_fidelity():
    real, fake = correlated_features(40, 8, seed=20), correlated_features(40, 8, seed=21, shift=0.3)
    # One subset holding every sample: the subset draw does not matter.
    mean, std = kernel_inception_distance(real, fake, subsets=1, subset_size=40)
    assert mean == pytest.approx(kid_formula(real.numpy(), fake.numpy()), rel=1e-10)
    assert std == 0

    real, fake = correlated_features(70, 8, seed=22), correlated_features(60, 8, seed=23, shift=0.3)
    ours = kernel_inception_distance(real, fake, subsets=7, subset_size=25, seed=5)
    ref = kid_features_to_metric(real, fake, kid_subsets=7, kid_subset_size=25, rng_seed=5, verbose=False)
    expected = (ref["kernel_inception_distance_mean"], ref["kernel_inception_distance_std"])
    assert ours == pytest.approx(expected, rel=1e-10)
    with pytest.raises(ValueError, match="subset_size 100 is larger"):
        kernel_inception_distance(real, fake, subset_size=100)


def test_kid_metric_equals_pure_function():
    real, fake = correlated_features(50, 6, seed=24), correlated_features(45, 6, seed=25, shift=0.2)
    metric = KID(precomputed(6), subsets=5, subset_size=20, seed=3)
    metric.update(real.float(), real=True)
    metric.update(fake.float(), real=False)
    result = metric.compute()
    expected = kernel_inception_distance(real.float(), fake.float(), subsets=5, subset_size=20, seed=3)
    assert (result["kid_mean"].item(), result["kid_std"].item()) == pytest.approx(expected, rel=1e-9)


def is_formula(logits: np.ndarray) -> float:
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    marginal = p.mean(0)
    return float(np.exp(np.mean([(pi * (np.log(pi) - np.log(marginal))).sum() for pi in p])))


def test_inception_score_matches_formula_known_values_and_torch_fidelity():
    g = torch.Generator().manual_seed(30)
    logits = torch.randn(60, 7, generator=g, dtype=torch.float64) * 2
    mean, std = inception_score(logits, splits=1)
    assert mean == pytest.approx(is_formula(logits.numpy()), rel=1e-12) and std == 0
    # Confident, evenly spread predictions over C classes score C; identical predictions score 1.
    confident = 100 * torch.eye(5).repeat(4, 1)
    assert inception_score(confident, splits=1)[0] == pytest.approx(5, rel=1e-9)
    assert inception_score(torch.zeros(20, 5), splits=2)[0] == pytest.approx(1, rel=1e-12)

    ref = isc_features_to_metric(logits, splits=10, shuffle=True, rng_seed=7)
    assert inception_score(logits, splits=10, seed=7) == pytest.approx(
        (ref["inception_score_mean"], ref["inception_score_std"]), rel=1e-12)


def test_is_metric_ignores_real_batches_and_equals_pure_function():
    g = torch.Generator().manual_seed(31)
    logits = torch.randn(40, 6, generator=g)
    metric = IS(precomputed(6), splits=4, seed=1)
    metric.update(torch.randn(10, 6, generator=g) * 5, real=True)
    metric.update(logits[:25], real=False)
    metric.update(logits[25:], real=False)
    result = metric.compute()
    assert (result["is_mean"].item(), result["is_std"].item()) == pytest.approx(
        inception_score(logits, splits=4, seed=1), rel=1e-6)


def test_build_metrics_returns_flat_results_and_checks_names():
    real, fake = correlated_features(40, 5, seed=32), correlated_features(40, 5, seed=33, shift=0.3)
    collection = build_metrics(["fid", "kid", "is", "precision_recall"], precomputed(5), precomputed(5),
                               kid_subsets=3, kid_subset_size=20, is_splits=2)
    collection.update(real.float(), real=True)
    collection.update(fake.float(), real=False)
    results = collection.compute()
    assert sorted(results) == ["fid", "is_mean", "is_std", "kid_mean", "kid_std", "precision", "recall"]
    assert results["fid"].item() == pytest.approx(scipy_fid(real.float().double().numpy(),
                                                            fake.float().double().numpy()), rel=1e-6)
    with pytest.raises(ValueError, match="unknown"):
        build_metrics(["fid", "lpips"], precomputed(5))
    with pytest.raises(ValueError, match="logits_extractor"):
        build_metrics(["is"], precomputed(5))
    with pytest.raises(TypeError, match="FeatureExtractor"):
        build_metrics(["fid"], torch.nn.Identity())


def test_rows_computed_once_give_the_numbers_of_the_images():
    # What evaluate.py stores per chunk: each network's per-image outputs, added later.
    gen = torch.Generator().manual_seed(3)
    images = [torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=gen) for _ in range(4)]
    settings = {"kid_subsets": 3, "kid_subset_size": 6, "is_splits": 2}
    names = ["fid", "kid", "is", "precision_recall"]
    direct = build_metrics(names, ToyFeatures(), ToyFeatures(output="logits"), **settings)
    by_rows = build_metrics(names, ToyFeatures(), ToyFeatures(output="logits"), **settings)
    for i, batch in enumerate(images):
        real = i < 2
        direct.update(batch, real=real)
        rows = batch_rows(by_rows, batch, real=real)
        assert sorted(rows) == (["features"] if real else ["features", "logits"])  # IS has no real side
        update_from_rows(by_rows, rows, real=real)
    assert {k: v.item() for k, v in by_rows.compute().items()} == {k: v.item() for k, v in direct.compute().items()}

    shared = build_metrics(["fid", "kid"], ToyFeatures(), kid_subsets=3, kid_subset_size=6)
    shared["kid"].inception = ToyFeatures(seed=1)  # not what build_metrics makes
    with pytest.raises(ValueError, match="must use one extractor"):
        batch_rows(shared, images[0], real=True)


# ---------------------------------------------------------------- DDP


def _ddp_data() -> dict[str, torch.Tensor]:
    return {"real": correlated_features(83, 6, seed=40).float(),
            "fake": correlated_features(71, 6, seed=41, shift=0.3).float()}


# Uneven shards in batches of 15: rank 0 gets the first rows in 3 batches each, rank 1 the rest in
# 4 and 3 (different batch counts per rank); torchmetrics gathers in rank order.
_SPLIT = {"real": 37, "fake": 40}


def _ddp_metrics() -> torch.nn.Module:
    # IS reads the same 6-d features as logits: any (N, C) scores do for checking the sync.
    return build_metrics(["fid", "kid", "is", "precision_recall"], precomputed(6), precomputed(6),
                         kid_subsets=4, kid_subset_size=30, is_splits=3, pr_block_size=16)


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        data, metrics = _ddp_data(), _ddp_metrics()
        cached = FID(precomputed(6), reset_real_features=False)
        cached.load_real_statistics(load_statistics(f"{out_dir}/real.npz"))  # on rank 0 only, in effect
        for kind in ("real", "fake"):
            shard = data[kind][:_SPLIT[kind]] if rank == 0 else data[kind][_SPLIT[kind]:]
            for chunk in shard.split(15):
                metrics.update(chunk, real=kind == "real")
                if kind == "fake":
                    cached.update(chunk, real=False)
        results = {k: v.item() for k, v in metrics.compute().items()}
        results["fid_from_cached_reals"] = cached.compute().item()
        results["real_mu"] = metrics["fid"].real_statistics().mu
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_metrics_synchronise_over_two_ddp_ranks(tmp_path):
    data = _ddp_data()
    reals = FeatureStatistics.from_features(data["real"], "test-features", {"layer": "given"})
    save_statistics(tmp_path / "real.npz", reals)
    mp.spawn(_ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)

    single = _ddp_metrics()
    single.update(data["real"], real=True)
    single.update(data["fake"], real=False)
    expected = {k: v.item() for k, v in single.compute().items()}
    assert 0 < expected["precision"] < 1 and 0 < expected["recall"] < 1
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        for key in expected:
            assert got[key] == pytest.approx(expected[key], rel=1e-6, abs=1e-9), key
        # Reference statistics loaded on every rank count once, not once per rank.
        assert got["fid_from_cached_reals"] == pytest.approx(expected["fid"], rel=1e-6)
        np.testing.assert_allclose(got["real_mu"], reals.mu, rtol=1e-6)


# ---------------------------------------------------------------- reconstruction metrics


def test_psnr_per_image_then_mean_on_known_images():
    x = torch.zeros(2, 3, 8, 8)
    y = x.clone()
    y[0] += 0.2  # [0, 1] difference 0.1 -> MSE 1e-2 -> 20 dB
    y[1] += 0.02  # -> 40 dB
    values = psnr(x, y)
    assert values.tolist() == pytest.approx([20.0, 40.0], abs=1e-4)
    assert values.mean().item() == pytest.approx(30.0, abs=1e-4)  # not the PSNR of the pooled MSE (~23 dB)
    assert math.isinf(psnr(x, x)[0].item())
    assert psnr(torch.full((1, 3, 4, 4), 1.5), torch.full((1, 3, 4, 4), 0.8)).item() == pytest.approx(
        10 * math.log10(1 / 0.1 ** 2), abs=1e-4)  # clamped to 1 first


def test_ssim_on_known_images():
    g = torch.Generator().manual_seed(50)
    x = torch.rand(2, 3, 24, 24, generator=g) * 2 - 1
    assert ssim(x, x).tolist() == pytest.approx([1.0, 1.0], abs=1e-6)
    # Constant images: no variance, so SSIM is the luminance term (2ab + C1) / (a^2 + b^2 + C1).
    a, b, c1 = 0.25, 0.75, 0.01 ** 2
    value = ssim(torch.full((1, 3, 16, 16), 2 * a - 1), torch.full((1, 3, 16, 16), 2 * b - 1)).item()
    assert value == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-5)
    assert ssim(x, -x).mean() < 0.5


# ---------------------------------------------------------------- LPIPS


@pytest.fixture(scope="module")
def random_lpips():
    return build_lpips(random_backbone=True)


def test_lpips_random_backbone_is_zero_only_for_identical_images(random_lpips):
    g = torch.Generator().manual_seed(60)
    x = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    y = (x + 0.3 * torch.randn(3, 3, 32, 32, generator=g)).clamp(-1, 1)
    assert random_lpips(x, x).flatten().tolist() == [0.0, 0.0, 0.0]
    d = random_lpips(x, y)
    assert d.shape == (3, 1, 1, 1) and (d > 0).all()
    # The perceptual loss needs gradients w.r.t. the images, none for the frozen network.
    y.requires_grad_(True)
    random_lpips(x, y).sum().backward()
    assert y.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in random_lpips.parameters())
    random_lpips.train()
    assert not random_lpips.training and not random_lpips.lin0.training


def test_lpips_state_dict_layout_and_calibrated_linear_layers(random_lpips):
    keys = set(random_lpips.state_dict())
    assert {"scaling_layer.shift", "net.slice1.0.weight", "net.slice5.28.bias", "lin4.model.1.weight"} <= keys
    assert not any(k.startswith("lins.") for k in keys)
    package = torch.load(LINEAR_WEIGHTS, map_location="cpu", weights_only=True)
    for i in range(5):
        key = f"lin{i}.model.1.weight"
        torch.testing.assert_close(random_lpips.state_dict()[key], package[key])


def test_lpips_loads_a_local_vgg16_backbone(random_lpips, tmp_path):
    g = torch.Generator().manual_seed(61)
    trunk = {f"features.{k.split('.', 1)[1]}": v * (1 + 0.5 * torch.rand(v.shape, generator=g))
             for k, v in random_lpips.net.state_dict().items()}
    trunk["classifier.0.bias"] = torch.zeros(4096)  # a full torchvision file also holds the classifier
    save_safetensors(trunk, tmp_path / "vgg16.safetensors")
    rng = torch.random.get_rng_state()
    loaded = build_lpips(backbone_weights=tmp_path / "vgg16.safetensors")
    assert torch.equal(torch.random.get_rng_state(), rng)
    for k, v in loaded.net.state_dict().items():
        torch.testing.assert_close(v, trunk[f"features.{k.split('.', 1)[1]}"])
    x = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    assert loaded(x, -x).item() != pytest.approx(random_lpips(x, -x).item(), rel=1e-3)

    del trunk["features.0.weight"]
    save_safetensors(trunk, tmp_path / "broken.safetensors")
    with pytest.raises(CheckpointMismatchError, match=r"missing \(1\):\s+features.0.weight"):
        build_lpips(backbone_weights=tmp_path / "broken.safetensors")
    with pytest.raises(ValueError, match="either"):
        build_lpips(backbone_weights=tmp_path / "vgg16.safetensors", random_backbone=True)


# ---------------------------------------------------------------- feature extractors


def test_images_to_uint8_and_toy_features_are_deterministic():
    g = torch.Generator().manual_seed(70)
    images = torch.randint(0, 256, (4, 3, 20, 24), dtype=torch.uint8, generator=g)
    as_float = images.float() / 127.5 - 1
    assert torch.equal(images_to_uint8(as_float), images)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        images_to_uint8(images.float())
    with pytest.raises(ValueError, match="RGB"):
        images_to_uint8(torch.zeros(2, 1, 8, 8))

    rng = torch.random.get_rng_state()
    a, b = ToyFeatures(seed=3), ToyFeatures(seed=3)
    assert torch.equal(torch.random.get_rng_state(), rng)  # the caller's random stream is untouched
    assert a.settings == b.settings and a.settings != ToyFeatures(seed=4).settings
    assert torch.equal(a(images), b(as_float)) and a(images).shape == (4, a.num_features)
    logits = ToyFeatures(seed=3, output="logits", num_classes=7)
    assert logits(images).shape == (4, 7) and logits.settings["layer"] == "logits"
    a.train()
    assert not a.training


def test_inception_extractor_loads_a_local_weight_file(tmp_path, monkeypatch):
    state = torch.load(make_random_inception(tmp_path / "inception.pth"), weights_only=True)
    monkeypatch.setattr(tf_inception, "load_state_dict_from_url", lambda *a, **k: pytest.fail("tried to download"))

    rng = torch.random.get_rng_state()
    pool = InceptionV3Features(tmp_path / "inception.pth")
    assert torch.equal(torch.random.get_rng_state(), rng)
    logits = InceptionV3Features(tmp_path / "inception.pth", output="logits")
    images = torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(71)) * 2 - 1
    f, z = pool(images), logits(images)
    assert f.shape == (2, 2048) and z.shape == (2, 1008)
    torch.testing.assert_close(z, f @ state["fc.weight"].T, rtol=1e-4, atol=1e-4)  # unbiased logits
    assert pool.settings["weights"] == logits.settings["weights"] and pool.settings != logits.settings
    pool.train()
    assert not pool.net.training
    with pytest.raises(FileNotFoundError, match="download"):
        InceptionV3Features(tmp_path / "missing.pth")


@pytest.mark.slow  # ~10 s on 2 CPU cores: two full VGG16s (138M parameters each)
def test_vgg16_extractor_matches_torch_fidelity_fc7():
    g = torch.Generator().manual_seed(72)
    with torch.device("meta"):  # the layout only: no slow random init
        layout = torchvision.models.vgg16().state_dict()
    # He-uniform weights keep activations alive through the 15 layers.
    state = {k: torch.empty(v.shape).uniform_(-1, 1, generator=g) * (6.0 / v[0].numel()) ** 0.5 if v.ndim > 1
             else torch.zeros(v.shape) for k, v in layout.items()}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    reference = FeatureExtractorVGG16("vgg16", ["fc2_relu"], feature_extractor_weights_path=buffer)
    ours = VGG16Features(state)
    images = torch.randint(0, 256, (1, 3, 48, 40), dtype=torch.uint8, generator=g)
    expected = reference(images)[0]
    assert expected.abs().sum() > 0
    torch.testing.assert_close(ours(images), expected, rtol=1e-6, atol=1e-6)
    assert ours.num_features == 4096 and ours.settings["layer"] == "fc7_relu"
