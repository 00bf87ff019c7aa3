"""ldm.diffusion.loss.DiffusionLoss against the formulas, written out by hand: the l1/l2 error of
the parameterisation's target on q_sample's x_t, min-SNR weights, log-variance weighting, the VLB
log and the timestep focus."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ldm.diffusion.loss import DiffusionLoss
from ldm.diffusion.schedule import DiffusionSchedule, make_betas

SCHEDULE = DiffusionSchedule(make_betas("linear", 1000, 0.00085, 0.012))


class Scaled(nn.Module):
    """A denoiser whose output is 0.5 x_t + 0.1 t / T, and which records what it was called with."""

    def forward(self, x, t, cond):
        self.seen = (x, t, cond)
        return 0.5 * x + 0.1 * t.view(-1, 1, 1, 1) / 1000


def _by_hand(x0, noise, t, parameterization, loss_type):
    abar = SCHEDULE.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    out = 0.5 * x_t + 0.1 * t.view(-1, 1, 1, 1) / 1000
    target = {"eps": noise, "x0": x0, "v": abar.sqrt() * noise - (1 - abar).sqrt() * x0}[parameterization]
    err = (out - target) ** 2 if loss_type == "l2" else (out - target).abs()
    return x_t, err.flatten(1).mean(1), abar.flatten()


@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
@pytest.mark.parametrize("loss_type", ["l2", "l1"])
def test_loss_is_the_parameterisations_error_on_q_sample(parameterization, loss_type):
    torch.manual_seed(0)
    x0, noise, t = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4), torch.tensor([5, 400, 990])
    net = Scaled()
    loss, logs = DiffusionLoss(SCHEDULE, parameterization, loss_type)(net, x0, "c", t, noise, torch.zeros(1000))
    x_t, per_sample, _ = _by_hand(x0, noise, t, parameterization, loss_type)
    torch.testing.assert_close(net.seen[0], x_t)
    assert torch.equal(net.seen[1], t) and net.seen[2] == "c"
    assert loss.item() == pytest.approx(per_sample.mean().item(), rel=1e-5)
    assert logs["loss"] is loss and logs["loss_simple"].item() == pytest.approx(loss.item(), rel=1e-6)
    assert "logvar" not in logs  # a fixed log-variance is not logged


def test_min_snr_weights_logvar_and_vlb_log():
    x0, noise, t = torch.randn(4, 2, 4, 4), torch.randn(4, 2, 4, 4), torch.tensor([0, 200, 600, 999])
    logvar = nn.Parameter(torch.zeros(1000))
    with torch.no_grad():
        logvar[600] = 0.7
    fn = DiffusionLoss(SCHEDULE, "eps", "l2", min_snr_gamma=5.0)
    loss, logs = fn(Scaled(), x0, None, t, noise, logvar)
    _, per_sample, abar = _by_hand(x0, noise, t, "eps", "l2")
    snr = abar / (1 - abar)
    weighted = per_sample * snr.clamp(max=5.0) / snr  # eps error = x0 error x SNR
    weighted[2] = weighted[2] / math.exp(0.7) + 0.7
    assert loss.item() == pytest.approx(weighted.mean().item(), rel=1e-5)
    assert logs["loss_simple"].item() == pytest.approx(per_sample.mean().item(), rel=1e-5)  # unweighted
    vlb = (fn.lvlb_weights[t] * per_sample).mean()
    assert logs["loss_vlb"].item() == pytest.approx(vlb.item(), rel=1e-5)
    assert logs["logvar"].item() == pytest.approx(0.7 / 1000)  # a learned log-variance is logged
    loss.backward()
    assert logvar.grad[600].item() != 0 and logvar.grad[1].item() == 0


def test_timestep_focus_and_bad_settings():
    fn = DiffusionLoss(SCHEDULE, timestep_focus={"low": 990, "high": 1000, "share": 1.0})
    assert int(fn.timesteps(64).min()) >= 990
    half = DiffusionLoss(SCHEDULE, timestep_focus={"low": 100, "high": 200, "share": 0.5})
    # (level over [0, T), whether from the band, level in the band): 0.9 >= share: 0.5 x T
    assert half.timesteps(1, uniforms=torch.tensor([[0.5, 0.9, 0.0]])).item() == 500
    assert half.timesteps(1, uniforms=torch.tensor([[0.5, 0.1, 0.5]])).item() == 150
    with pytest.raises(ValueError, match="min_snr_gamma must be positive"):
        DiffusionLoss(SCHEDULE, min_snr_gamma=0)
    with pytest.raises(ValueError, match="loss_type"):
        DiffusionLoss(SCHEDULE, loss_type="huber")
    with pytest.raises(ValueError, match="parameterization"):
        DiffusionLoss(SCHEDULE, parameterization="score")
    with pytest.raises(ValueError, match="high <= 1000"):
        DiffusionLoss(SCHEDULE, timestep_focus={"low": 500, "high": 2000})
