"""The latent diffusion training loss as one callable, in the style of NVlabs/edm's `loss(net, x0, cond)`.

`DiffusionLoss` holds the choices that define the objective (parameterisation, l1/l2, min-SNR
weights, which timesteps are trained) and is otherwise pure: the randomness (timesteps, noise)
and the per-timestep log-variance come from the caller, so a LightningModule keeps its own RNG
order and its `logvar` parameter (a checkpoint key of the reference layout).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from ldm.diffusion.objective import (LOSS_TYPES, check_parameterization, logvar_weighted, loss_simple, lvlb_weights,
                                     min_snr_weight, training_target, vlb_term)
from ldm.diffusion.schedule import DiffusionSchedule, q_sample
from ldm.diffusion.timesteps import TimestepFocus, sample_timesteps

Denoiser = Callable[[torch.Tensor, torch.Tensor, object], torch.Tensor]


class DiffusionLoss:
    """loss = mean_b [w_b loss_simple_b / exp(logvar[t_b]) + logvar[t_b]] on x_t = q_sample(x0, t, noise).

    parameterization: what the denoiser predicts (eps, x0 or v; ldm.diffusion.objective).
    loss_type: l2 or l1 per-sample error (mean over all non-batch dims).
    min_snr_gamma: None (w = 1, as the reference) or gamma of the min-SNR-gamma weights w_b.
    timestep_focus: None (training timesteps uniform over [0, T), as the reference) or
        {low, high, share}: that share of them drawn from [low, high) (ldm.diffusion.timesteps).
    The logged VLB term uses the reference's weights for eps and x0 and the exact ones for v (the
    reference has no v); they are computed once from `schedule`.
    """

    def __init__(self, schedule: DiffusionSchedule, parameterization: str = "eps", loss_type: str = "l2",
                 min_snr_gamma: float | None = None, timestep_focus: Mapping | None = None):
        if min_snr_gamma is not None and min_snr_gamma <= 0:
            raise ValueError(f"min_snr_gamma must be positive (e.g. 5) or null for uniform weights, "
                             f"got {min_snr_gamma}")
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")
        self.schedule = schedule  # the module replaces it by a checkpoint's schedule when one is loaded
        self.parameterization = check_parameterization(parameterization)
        self.loss_type = loss_type
        self.min_snr_gamma = min_snr_gamma
        self.timestep_focus = (TimestepFocus.from_config(timestep_focus).check(schedule.num_timesteps)
                               if timestep_focus else None)
        self.lvlb_weights = lvlb_weights(schedule, parameterization, compat=parameterization != "v")

    def timesteps(self, n: int, device: torch.device | str | None = None,
                  uniforms: torch.Tensor | None = None) -> torch.Tensor:
        """`n` training timesteps under the timestep focus, from `uniforms` ((n, 3) in [0, 1)) or the global RNG."""
        return sample_timesteps(n, self.schedule.num_timesteps, self.timestep_focus, device, uniforms=uniforms)

    def __call__(self, denoiser: Denoiser, x0: torch.Tensor, cond, t: torch.Tensor, noise: torch.Tensor,
                 logvar: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of `denoiser(x_t, t, cond)` on clean samples x0 with this noise at these
        timesteps, and its logs: loss_simple (unweighted), loss_vlb, loss, and logvar (its mean)
        when `logvar` is learned (requires grad)."""
        out = denoiser(q_sample(self.schedule, x0, t, noise), t, cond)
        target = training_target(self.parameterization, self.schedule, x0, noise, t)
        per_sample = loss_simple(out.float(), target.float(), self.loss_type)
        weighted = per_sample
        if self.min_snr_gamma is not None:
            abar = self.schedule.gather("alphas_cumprod", t, per_sample)
            weighted = per_sample * min_snr_weight(self.parameterization, abar, self.min_snr_gamma)
        loss = logvar_weighted(weighted, logvar, t).mean()
        logs = {"loss_simple": per_sample.mean(), "loss_vlb": vlb_term(per_sample, self.lvlb_weights, t), "loss": loss}
        if logvar.requires_grad:
            logs["logvar"] = logvar.mean()
        return loss, logs
