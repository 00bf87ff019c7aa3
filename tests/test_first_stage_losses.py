"""First-stage losses and the PatchGAN discriminator, against hand-computed values, manual
recomputations of the reference formulas (REFERENCE.md section 6) and the reference layout."""
import math

import pytest
import torch
from torch import nn

from ldm.first_stage.distributions import DiagonalGaussian
from ldm.first_stage.losses import (
    KLAutoencoderLoss,
    VQAutoencoderLoss,
    adopt_weight,
    calculate_adaptive_weight,
    generator_adversarial_loss,
    hinge_d_loss,
    kl_term,
    vanilla_d_loss,
)
from ldm.nets.discriminator import NLayerDiscriminator, weights_init
from ldm.utils.checkpoint import load_strict


class TinyPerceptual(nn.Module):
    """Stand-in for LPIPS: same call signature and (B, 1, 1, 1) output, with its own weights
    and a dropout (LPIPS has one) to see that the loss keeps it in eval mode."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.drop = nn.Dropout(0.5)

    def forward(self, x, y):
        return self.drop(self.conv(x) - self.conv(y)).pow(2).mean(dim=(1, 2, 3), keepdim=True)


def _batch(seed=0, b=2, size=32):
    """Images x in [-1, 1] and a stand-in decoder tail: x_rec = tanh(last(h)), so x_rec depends
    on last.weight the way a real reconstruction depends on the decoder's last conv."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 3, size, size, generator=g) * 2 - 1
    h = torch.randn(b, 4, size, size, generator=g)
    last = nn.Conv2d(4, 3, 3, padding=1)
    return x, torch.tanh(last(h)), last.weight


def _posterior(seed=1, b=2):
    g = torch.Generator().manual_seed(seed)
    return DiagonalGaussian(torch.randn(b, 8, 4, 4, generator=g))


def _kl_loss(**kw):
    torch.manual_seed(0)
    args = dict(perceptual=TinyPerceptual(), disc_start=100, logvar_init=0.3, kl_weight=1e-2,
                perceptual_weight=0.7, disc_ndf=16, disc_factor=0.8, disc_weight=0.5)
    args.update(kw)
    return KLAutoencoderLoss(**args)


def _vq_loss(**kw):
    torch.manual_seed(0)
    args = dict(perceptual=TinyPerceptual(), disc_start=100, codebook_weight=1.5, perceptual_weight=0.7,
                disc_ndf=16, disc_factor=0.8, disc_weight=0.6)
    args.update(kw)
    return VQAutoencoderLoss(**args)


# ---------------------------------------------------------------- pure functions

def test_hinge_d_loss_hand_values():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 1.0])
    # relu(1 - real) = 0, 0.5, 2 -> mean 5/6; relu(1 + fake) = 0, 1, 2 -> mean 1
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (5 / 6 + 1.0))


def test_vanilla_d_loss_hand_values():
    real = torch.tensor([0.0, math.log(3.0)])
    fake = torch.tensor([0.0, math.log(3.0)])
    # softplus(-real) = log 2, log(4/3); softplus(fake) = log 2, log 4
    expected = 0.5 * ((math.log(2) + math.log(4 / 3)) / 2 + (math.log(2) + math.log(4)) / 2)
    assert vanilla_d_loss(real, fake).item() == pytest.approx(expected)


def test_generator_adversarial_loss_is_minus_mean_logits():
    assert generator_adversarial_loss(torch.tensor([[1.0, 3.0], [-2.0, 6.0]])).item() == pytest.approx(-2.0)


def test_adopt_weight_switches_on_at_disc_start():
    assert adopt_weight(0.7, 0, 50001) == 0.0
    assert adopt_weight(0.7, 50000, 50001) == 0.0
    assert adopt_weight(0.7, 50001, 50001) == 0.7
    assert adopt_weight(0.7, 90000, 50001) == 0.7


def test_kl_term_matches_closed_form():
    # sample 0: mu (1, 0), logvar (0, log 2) -> 0.5 (1 + 1 - 1 - 0 + 0 + 2 - 1 - log 2) = 1 - log(2)/2
    # sample 1: mu (0, 2), logvar (log .5, 0) -> 0.5 (0 + .5 - 1 + log 2 + 4 + 1 - 1 - 0) = 1.75 + log(2)/2
    mean = torch.tensor([[1.0, 0.0], [0.0, 2.0]]).view(2, 1, 1, 2)
    logvar = torch.tensor([[0.0, math.log(2.0)], [math.log(0.5), 0.0]]).view(2, 1, 1, 2)
    posterior = DiagonalGaussian(torch.cat([mean, logvar], dim=1))
    assert kl_term(posterior).item() == pytest.approx((1.0 + 1.75) / 2)


def test_adaptive_weight_matches_manual_gradients():
    w = torch.tensor([0.5, -1.0, 2.0], requires_grad=True)
    a, b = torch.tensor([3.0, 0.0, 4.0]), torch.tensor([1.0, 2.0, 2.0])
    nll, g = (w * a).sum() ** 2, (w * b).sum()
    # d nll / dw = 2 (w.a) a = 2 * 9.5 * a, norm 95; d g / dw = b, norm 3
    d_weight = calculate_adaptive_weight(nll, g, w, disc_weight=0.5)
    assert d_weight.item() == pytest.approx(95.0 / (3.0 + 1e-4) * 0.5)
    assert not d_weight.requires_grad
    (nll + g).backward()  # the graph was retained for the real backward pass
    assert w.grad is not None


def test_adaptive_weight_is_clamped_to_1e4():
    w = torch.tensor([1.0, 1.0], requires_grad=True)
    nll = (w * torch.tensor([30.0, 40.0])).sum()
    g = (w * torch.tensor([1e-6, 0.0])).sum()  # ratio 50 / 1e-4 = 5e5 before the clamp
    assert calculate_adaptive_weight(nll, g, w, disc_weight=0.75).item() == pytest.approx(1e4 * 0.75)


# ---------------------------------------------------------------- KL loss

def test_kl_loss_generator_step_matches_manual_recomputation():
    loss_fn = _kl_loss()
    x, xr, last = _batch()
    posterior = _posterior()
    loss, log = loss_fn(x, xr, posterior, 0, global_step=100, last_layer=last)

    p = loss_fn.perceptual_loss(x, xr)
    rec = (x - xr).abs() + 0.7 * p
    lv = torch.tensor(0.3)
    nll = (rec / lv.exp() + lv).sum() / 2
    kl = 0.5 * (posterior.mean ** 2 + posterior.var - 1 - posterior.logvar).sum() / 2
    g = -loss_fn.discriminator(xr).mean()
    d_weight = 0.5 * torch.autograd.grad(nll, last, retain_graph=True)[0].norm() / (
        torch.autograd.grad(g, last, retain_graph=True)[0].norm() + 1e-4)
    expected = nll + 1e-2 * kl + d_weight * 0.8 * g

    torch.testing.assert_close(loss, expected)
    assert set(log) == {f"train/{k}" for k in
                        ("total_loss", "logvar", "kl_loss", "nll_loss", "rec_loss", "d_weight", "disc_factor",
                         "g_loss")}
    torch.testing.assert_close(log["train/total_loss"], expected.detach())
    torch.testing.assert_close(log["train/nll_loss"], nll.detach())
    torch.testing.assert_close(log["train/kl_loss"], kl.detach())
    torch.testing.assert_close(log["train/rec_loss"], rec.mean().detach())
    torch.testing.assert_close(log["train/d_weight"], d_weight.detach())
    torch.testing.assert_close(log["train/g_loss"], g.detach())
    assert log["train/disc_factor"].item() == pytest.approx(0.8)
    assert log["train/logvar"].item() == pytest.approx(0.3)
    assert d_weight.item() > 0 and g.abs().item() > 0  # the GAN term really contributes


def test_kl_loss_before_disc_start_is_nll_plus_kl():
    loss_fn = _kl_loss()
    x, xr, last = _batch()
    posterior = _posterior()
    loss, log = loss_fn(x, xr, posterior, 0, global_step=99, last_layer=last)
    torch.testing.assert_close(loss, log["train/nll_loss"] + 1e-2 * log["train/kl_loss"])
    assert log["train/disc_factor"].item() == 0.0
    # the GAN term is off: neither the discriminator nor the gradient norms are evaluated
    assert log["train/d_weight"].item() == 0.0 and log["train/g_loss"].item() == 0.0


def test_kl_loss_l2_and_weights():
    loss_fn = _kl_loss(pixel_loss="l2", perceptual_weight=0.0, perceptual=None, logvar_init=0.0)
    x, xr, last = _batch()
    posterior = _posterior()
    weights = torch.tensor([2.0, 0.5]).view(2, 1, 1, 1)
    loss, log = loss_fn(x, xr, posterior, 0, global_step=0, last_layer=last, weights=weights)
    se = (x - xr).pow(2)
    torch.testing.assert_close(log["train/nll_loss"], se.sum().detach() / 2)
    torch.testing.assert_close(loss, (weights * se).sum() / 2 + 1e-2 * kl_term(posterior))


def test_kl_loss_discriminator_step_matches_manual_hinge_and_vanilla():
    x, xr, last = _batch()
    for name, d_loss in (("hinge", hinge_d_loss), ("vanilla", vanilla_d_loss)):
        loss_fn = _kl_loss(disc_loss=name).eval()  # eval: BatchNorm uses fixed statistics
        loss, log = loss_fn(x, xr, _posterior(), 1, global_step=100, last_layer=last, split="val")
        real, fake = loss_fn.discriminator(x), loss_fn.discriminator(xr)
        torch.testing.assert_close(loss, 0.8 * d_loss(real, fake))
        assert set(log) == {"val/disc_loss", "val/logits_real", "val/logits_fake"}
        torch.testing.assert_close(log["val/logits_real"], real.mean().detach())
        torch.testing.assert_close(log["val/logits_fake"], fake.mean().detach())
        loss.backward()
        assert last.grad is None  # the discriminator step does not reach the autoencoder
        assert loss_fn.discriminator.main[0].weight.grad is not None
    assert _kl_loss()(x, xr, _posterior(), 1, global_step=99)[0].item() == 0.0


def test_kl_loss_validation_without_grad_uses_zero_d_weight():
    loss_fn = _kl_loss().eval()
    x, xr, last = _batch()
    with torch.no_grad():
        loss, log = loss_fn(x, xr, _posterior(), 0, global_step=100, last_layer=last, split="val")
    assert log["val/d_weight"].item() == 0.0
    torch.testing.assert_close(loss, log["val/nll_loss"] + 1e-2 * log["val/kl_loss"])
    loss_fn.train()
    with torch.no_grad(), pytest.raises(RuntimeError, match="needs gradients"):
        loss_fn(x, xr, _posterior(), 0, global_step=100, last_layer=last)
    with pytest.raises(RuntimeError, match="last_layer"):
        loss_fn(*_batch()[:2], _posterior(), 0, global_step=100)


def test_kl_loss_parameters_logvar_and_frozen_perceptual():
    x, xr, last = _batch()
    fixed = _kl_loss()
    assert isinstance(fixed.logvar, nn.Parameter) and not fixed.logvar.requires_grad
    assert "logvar" in fixed.state_dict() and "discriminator.main.0.weight" in fixed.state_dict()
    fixed(x, xr, _posterior(), 0, global_step=100, last_layer=last)[0].backward()
    assert fixed.logvar.grad is None
    assert all(p.grad is None for p in fixed.perceptual_loss.parameters())
    fixed.train()
    assert fixed.discriminator.training and not fixed.perceptual_loss.training

    learned = _kl_loss(learn_logvar=True)
    x, xr, last = _batch()
    learned(x, xr, _posterior(), 0, global_step=100, last_layer=last)[0].backward()
    assert learned.logvar.grad is not None and learned.logvar.grad.item() != 0.0


def test_loss_rejects_bad_options():
    with pytest.raises(ValueError, match="disc_loss"):
        _kl_loss(disc_loss="wgan")
    with pytest.raises(ValueError, match="pixel_loss"):
        _vq_loss(pixel_loss="l3")
    with pytest.raises(ValueError, match="perceptual network"):
        _kl_loss(perceptual=None)
    x, xr, last = _batch()
    with pytest.raises(ValueError, match="optimizer_idx"):
        _kl_loss()(x, xr, _posterior(), 2, global_step=0, last_layer=last)


# ---------------------------------------------------------------- VQ loss

def test_vq_loss_generator_step_matches_manual_recomputation():
    loss_fn = _vq_loss()
    x, xr, last = _batch()
    codebook_loss = torch.tensor(0.25)
    loss, log = loss_fn(x, xr, codebook_loss, 0, global_step=100, last_layer=last)

    p = loss_fn.perceptual_loss(x, xr)
    rec = (x - xr).abs() + 0.7 * p
    nll = rec.mean()
    g = -loss_fn.discriminator(xr).mean()
    d_weight = 0.6 * torch.autograd.grad(nll, last, retain_graph=True)[0].norm() / (
        torch.autograd.grad(g, last, retain_graph=True)[0].norm() + 1e-4)
    expected = nll + d_weight * 0.8 * g + 1.5 * 0.25

    torch.testing.assert_close(loss, expected)
    assert set(log) == {f"train/{k}" for k in
                        ("total_loss", "quant_loss", "nll_loss", "rec_loss", "p_loss", "d_weight", "disc_factor",
                         "g_loss")}
    torch.testing.assert_close(log["train/nll_loss"], nll.detach())
    torch.testing.assert_close(log["train/p_loss"], p.mean().detach())
    torch.testing.assert_close(log["train/d_weight"], d_weight.detach())
    assert log["train/quant_loss"].item() == pytest.approx(0.25)

    before, log = loss_fn(x, xr, None, 0, global_step=99, last_layer=last)
    torch.testing.assert_close(before, nll)
    assert log["train/quant_loss"].item() == 0.0


def test_vq_loss_discriminator_step():
    loss_fn = _vq_loss(disc_loss="vanilla").eval()
    x, xr, _ = _batch()
    loss, log = loss_fn(x, xr, torch.tensor(0.1), 1, global_step=100)
    torch.testing.assert_close(loss, 0.8 * vanilla_d_loss(loss_fn.discriminator(x), loss_fn.discriminator(xr)))
    assert set(log) == {"train/disc_loss", "train/logits_real", "train/logits_fake"}


# lpips passes torchvision the deprecated `pretrained=` argument
@pytest.mark.filterwarnings("ignore::UserWarning:torchvision")
def test_kl_loss_with_lpips_random_backbone():
    """The real LPIPS module (random trunk, packaged linear heads: nothing is downloaded) fits
    the perceptual slot: it is frozen and stays in eval mode."""
    lpips = pytest.importorskip("lpips")
    net = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False)
    loss_fn = _kl_loss(perceptual=net).train()
    x, xr, last = _batch(size=64)
    loss, log = loss_fn(x, xr, _posterior(), 0, global_step=0, last_layer=last)
    p = net(x, xr)
    expected = ((x - xr).abs() + 0.7 * p) / math.exp(0.3) + 0.3
    torch.testing.assert_close(log["train/nll_loss"], expected.sum().detach() / 2)
    assert not net.training and not any(q.requires_grad for q in net.parameters())


# ---------------------------------------------------------------- discriminator

# The reference NLayerDiscriminator (ndf 64, 3 layers, BatchNorm): key -> shape.
REFERENCE_DISC_LAYOUT = {
    "main.0.weight": (64, 3, 4, 4), "main.0.bias": (64,),
    "main.2.weight": (128, 64, 4, 4),
    "main.3.weight": (128,), "main.3.bias": (128,), "main.3.running_mean": (128,),
    "main.3.running_var": (128,), "main.3.num_batches_tracked": (),
    "main.5.weight": (256, 128, 4, 4),
    "main.6.weight": (256,), "main.6.bias": (256,), "main.6.running_mean": (256,),
    "main.6.running_var": (256,), "main.6.num_batches_tracked": (),
    "main.8.weight": (512, 256, 4, 4),
    "main.9.weight": (512,), "main.9.bias": (512,), "main.9.running_mean": (512,),
    "main.9.running_var": (512,), "main.9.num_batches_tracked": (),
    "main.11.weight": (1, 512, 4, 4), "main.11.bias": (1,),
}


@pytest.mark.parametrize("norm", ["batch", "sync_batch"])
def test_discriminator_state_dict_matches_reference_layout(norm):
    disc = NLayerDiscriminator(norm=norm)
    assert {k: tuple(v.shape) for k, v in disc.state_dict().items()} == REFERENCE_DISC_LAYOUT
    reference_like = {k: torch.randn(s) if s else torch.tensor(3) for k, s in REFERENCE_DISC_LAYOUT.items()}
    load_strict(disc, reference_like)
    torch.testing.assert_close(disc.main[8].weight, reference_like["main.8.weight"])


@pytest.mark.parametrize("size, patches", [(32, 2), (64, 6), (256, 30)])
def test_discriminator_patch_map_shape(size, patches):
    disc = NLayerDiscriminator().eval()
    with torch.no_grad():
        assert disc(torch.randn(1, 3, size, size)).shape == (1, 1, patches, patches)


def test_discriminator_init_and_norm_variants():
    torch.manual_seed(0)
    disc = NLayerDiscriminator()
    assert abs(disc.main[8].weight.std().item() - 0.02) < 5e-4 and abs(disc.main[8].weight.mean().item()) < 1e-3
    assert abs(disc.main[9].weight.mean().item() - 1.0) < 5e-3 and abs(disc.main[9].weight.std().item() - 0.02) < 5e-3
    assert torch.count_nonzero(disc.main[9].bias) == 0
    norm = nn.GroupNorm(2, 8)
    nn.init.constant_(norm.bias, 3.0)
    conv = nn.Conv2d(8, 8, 3)
    nn.init.constant_(conv.bias, 3.0)
    nn.Sequential(norm, conv).apply(weights_init)
    assert torch.count_nonzero(norm.bias) == 0 and (conv.bias == 3.0).all()  # conv biases keep their init

    group = NLayerDiscriminator(ndf=32, norm="group")
    assert [type(group.main[i]) for i in (3, 6, 9)] == [nn.GroupNorm] * 3
    assert not any("running" in k for k in group.state_dict())
    assert torch.count_nonzero(group.main[6].bias) == 0 and abs(group.main[9].weight.mean().item() - 1) < 1e-2
    assert isinstance(NLayerDiscriminator(norm="sync_batch").main[3], nn.SyncBatchNorm)
    assert NLayerDiscriminator(ndf=8, n_layers=2).main[-1].weight.shape == (1, 32, 4, 4)
    with pytest.raises(ValueError, match="norm"):
        NLayerDiscriminator(norm="instance")
    with pytest.raises(ValueError, match="multiple of 16"):
        NLayerDiscriminator(ndf=8, norm="group")


def test_group_norm_has_no_batch_coupling_unlike_batch_norm():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    group = NLayerDiscriminator(ndf=16, norm="group").train()
    torch.testing.assert_close(group(x)[1:2], group(x[1:2]))
    batch = NLayerDiscriminator(ndf=16, norm="batch").train()
    assert not torch.allclose(batch(x)[1:2], batch(x[1:2]), atol=1e-3)
