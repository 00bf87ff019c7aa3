"""What the denoiser predicts and how its error is scored.

The network output is one of three parameterisations of the same prediction: the noise `eps`,
the clean sample `x0`, or the velocity `v = sqrt(abar) eps - sqrt(1 - abar) x0`. Given x_t and
the coefficients a = sqrt(abar_t), s = sqrt(1 - abar_t) (floats or tensors broadcasting
against x_t), each converts exactly into the others because a^2 + s^2 = 1.
"""
from __future__ import annotations

import torch

from ldm.diffusion.schedule import DiffusionSchedule

PARAMETERIZATIONS = ("eps", "x0", "v")
LOSS_TYPES = ("l1", "l2")

Coef = float | torch.Tensor


def check_parameterization(parameterization: str) -> str:
    """Return `parameterization` if it is known, else raise a ValueError naming the choices."""
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(f"unknown parameterization {parameterization!r}; choose one of "
                         f"{', '.join(PARAMETERIZATIONS)}")
    return parameterization


def eps_x0_from_output(parameterization: str, output: torch.Tensor, x_t: torch.Tensor,
                       sqrt_abar: Coef, sqrt_one_minus_abar: Coef) -> tuple[torch.Tensor, torch.Tensor]:
    """The (eps, x0) pair that a network output in `parameterization` stands for at x_t."""
    a, s = sqrt_abar, sqrt_one_minus_abar
    if check_parameterization(parameterization) == "eps":
        return output, (x_t - s * output) / a
    if parameterization == "x0":
        return (x_t - a * output) / s, output
    return s * x_t + a * output, a * x_t - s * output


def output_from_eps_x0(parameterization: str, eps: torch.Tensor, x0: torch.Tensor,
                       sqrt_abar: Coef, sqrt_one_minus_abar: Coef) -> torch.Tensor:
    """What a network in `parameterization` should output for the pair (eps, x0)."""
    if check_parameterization(parameterization) == "eps":
        return eps
    if parameterization == "x0":
        return x0
    return sqrt_abar * eps - sqrt_one_minus_abar * x0


def training_target(parameterization: str, schedule: DiffusionSchedule, x0: torch.Tensor,
                    noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The regression target for x_t = q_sample(x0, t, noise): noise, x0 or v."""
    return output_from_eps_x0(parameterization, noise, x0,
                              schedule.gather("sqrt_alphas_cumprod", t, x0),
                              schedule.gather("sqrt_one_minus_alphas_cumprod", t, x0))


def loss_simple(output: torch.Tensor, target: torch.Tensor, loss_type: str = "l2") -> torch.Tensor:
    """Per-sample mean over all non-batch dims of (target - output)^2 (l2) or |.| (l1): shape (B,)."""
    if loss_type == "l2":
        err = (target - output) ** 2
    elif loss_type == "l1":
        err = (target - output).abs()
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")
    return err.reshape(err.shape[0], -1).mean(dim=1)


def min_snr_weight(parameterization: str, alphas_cumprod: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023) for timesteps with the given abar values.

    In x0 terms the weight is min(SNR, gamma) with SNR = abar / (1 - abar): low-noise steps, whose
    SNR is huge, no longer dominate the gradient, which the paper reports converges about 3x faster.
    An eps error is an x0 error times SNR and a v error an x0 error times (SNR + 1), so those
    parameterisations get min(SNR, gamma) / SNR and min(SNR, gamma) / (SNR + 1).
    """
    if gamma <= 0:
        raise ValueError(f"min-SNR gamma must be positive, got {gamma}")
    snr = alphas_cumprod / (1 - alphas_cumprod)
    clipped = snr.clamp(max=gamma)
    if check_parameterization(parameterization) == "eps":
        return clipped / snr
    if parameterization == "x0":
        return clipped
    return clipped / (snr + 1)


def logvar_weighted(per_sample_loss: torch.Tensor, logvar: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """loss / exp(logvar[t]) + logvar[t]: the reference's (optionally learned) per-timestep
    log-variance weighting; with logvar = 0 it is the loss itself. Shape (B,)."""
    logvar_t = logvar[t.to(logvar.device).long()].to(per_sample_loss.device, per_sample_loss.dtype)
    return per_sample_loss / logvar_t.exp() + logvar_t


def lvlb_weights(schedule: DiffusionSchedule, parameterization: str = "eps",
                 compat: bool = False) -> torch.Tensor:
    """Per-timestep weights (float32, length T) that turn loss_simple into the VLB term
    KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) for an l2 loss.

    t = 0 copies t = 1 (the true weight is infinite there), as in the reference.
    compat=True gives the reference's x0 weights, 0.5 sqrt(abar) / (2 - abar), which are not the
    VLB weights (an operator-precedence slip); otherwise x0 and v get the exact ones.
    """
    check_parameterization(parameterization)
    sc = schedule
    if parameterization == "eps":
        w = sc.betas**2 / (2 * sc.posterior_variance * sc.alphas * (1 - sc.alphas_cumprod))
    elif compat and parameterization == "x0":
        w = 0.5 * sc.alphas_cumprod.sqrt() / (2 - sc.alphas_cumprod)
    elif compat:
        raise ValueError("the reference has no v parameterization: use compat=False for v")
    else:
        # mean error = coef1 * (x0 error) and x0 error = sqrt(1 - abar) * (v error).
        w = sc.posterior_mean_coef1**2 / (2 * sc.posterior_variance)
        if parameterization == "v":
            w = w * (1 - sc.alphas_cumprod)
    w = w.clone()
    if w.numel() > 1:
        w[0] = w[1]
    return w.float()


def vlb_term(per_sample_loss: torch.Tensor, weights: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """mean_b weights[t_b] * loss_b: the (logged) VLB term of a batch."""
    w = weights.to(per_sample_loss.device, per_sample_loss.dtype)[t.to(per_sample_loss.device).long()]
    return (w * per_sample_loss).mean()
