"""Noise schedules of the discrete diffusion process and the closed forms built on them.

Everything is computed in float64 on the CPU once; callers ask for float32 copies on their
device. Buffer names follow the reference LDM code so its checkpoints' schedule buffers can be
compared with (and rebuilt into) a `DiffusionSchedule`.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch

BETA_SCHEDULES = ("linear", "sqrt_linear", "sqrt", "cosine")

# The reference registers exactly these buffers, in this order, on its diffusion module.
BUFFER_NAMES = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)


def make_betas(
    schedule: str,
    T: int = 1000,
    linear_start: float = 1e-4,
    linear_end: float = 2e-2,
    cosine_s: float = 8e-3,
) -> torch.Tensor:
    """The T betas (float64) of a named schedule, with the LDM code's names:
    `linear` is linear in sqrt(beta), `sqrt_linear` linear in beta, `sqrt` is sqrt of a linear
    ramp, `cosine` the improved-DDPM cosine schedule (offset `cosine_s`, betas clipped to 0.999).
    """
    if T < 1:
        raise ValueError(f"the number of diffusion timesteps must be positive, got T={T}")
    if schedule == "linear":
        return torch.linspace(linear_start**0.5, linear_end**0.5, T, dtype=torch.float64) ** 2
    if schedule == "sqrt_linear":
        return torch.linspace(linear_start, linear_end, T, dtype=torch.float64)
    if schedule == "sqrt":
        return torch.linspace(linear_start, linear_end, T, dtype=torch.float64) ** 0.5
    if schedule == "cosine":
        steps = torch.arange(T + 1, dtype=torch.float64) / T + cosine_s
        abar = torch.cos(steps / (1 + cosine_s) * math.pi / 2) ** 2
        abar = abar / abar[0]
        return (1 - abar[1:] / abar[:-1]).clamp(min=0, max=0.999)
    raise ValueError(f"unknown beta schedule {schedule!r}; choose one of {', '.join(BETA_SCHEDULES)}")


class DiffusionSchedule:
    """A discrete forward process q(x_t | x_0) given by its betas, with every derived table.

    Attributes named like `BUFFER_NAMES` (plus `alphas`) are float64 CPU tensors of length T.
    """

    def __init__(self, betas: torch.Tensor):
        betas = torch.as_tensor(betas).detach().to("cpu", torch.float64)
        if betas.ndim != 1 or betas.numel() == 0:
            raise ValueError(f"betas must be a non-empty 1-D tensor, got shape {tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("every beta must lie in (0, 1); got values from "
                             f"{betas.min().item():.3g} to {betas.max().item():.3g}")
        alphas = 1 - betas
        abar = torch.cumprod(alphas, 0)
        abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
        posterior_variance = betas * (1 - abar_prev) / (1 - abar)
        self.betas = betas
        self.alphas = alphas
        self.alphas_cumprod = abar
        self.alphas_cumprod_prev = abar_prev
        self.sqrt_alphas_cumprod = abar.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1 - abar).sqrt()
        self.log_one_minus_alphas_cumprod = (1 - abar).log()
        self.sqrt_recip_alphas_cumprod = (1 / abar).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1 / abar - 1).sqrt()
        self.posterior_variance = posterior_variance
        # The variance is 0 at t = 0; the clip keeps its log finite.
        self.posterior_log_variance_clipped = posterior_variance.clamp(min=1e-20).log()
        self.posterior_mean_coef1 = betas * abar_prev.sqrt() / (1 - abar)
        self.posterior_mean_coef2 = (1 - abar_prev) * alphas.sqrt() / (1 - abar)
        self._device_cache: dict[tuple[torch.device, torch.dtype, str], torch.Tensor] = {}

    @classmethod
    def from_name(
        cls,
        schedule: str = "linear",
        T: int = 1000,
        linear_start: float = 1e-4,
        linear_end: float = 2e-2,
        cosine_s: float = 8e-3,
    ) -> DiffusionSchedule:
        """The schedule `make_betas(schedule, T, linear_start, linear_end, cosine_s)`."""
        return cls(make_betas(schedule, T, linear_start, linear_end, cosine_s))

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor], prefix: str = "",
                        rtol: float = 1e-4, configured: DiffusionSchedule | None = None) -> DiffusionSchedule:
        """The schedule saved in a (reference) checkpoint: `configured` when the saved
        `{prefix}betas` are its betas in the saved dtype, else one rebuilt from them.

        Checkpoints store float32 betas; the tables derived from those in float64 differ from the
        configured float64 schedule's in the last float32 bit (a dozen of 1000 entries of
        sqrt_alphas_cumprod for the linear schedule), so rebuilding would change a resumed run.
        Every other schedule buffer present under `prefix` must agree with the returned schedule
        to `rtol`; a mismatch (e.g. a reference model trained with v_posterior != 0) raises.
        """
        key = prefix + "betas"
        if key not in state_dict:
            raise KeyError(f"no {key!r} in the state dict: it holds no diffusion schedule")
        # torch.clone: a plain tensor also from a lazily loaded checkpoint (Lightning's FSDP resume
        # hands over tensors that load when a torch function touches them)
        saved = torch.clone(state_dict[key]).detach().cpu()
        if configured is not None and torch.equal(saved, configured.betas.to(saved.dtype)):
            schedule = configured
        else:
            schedule = cls(saved)
        ours = schedule.buffers()
        for name in BUFFER_NAMES:
            saved = state_dict.get(prefix + name)
            if saved is None:
                continue
            saved = torch.clone(saved)
            if saved.shape != ours[name].shape or not torch.allclose(
                saved.float(), ours[name], rtol=rtol, atol=1e-6
            ):
                raise ValueError(f"checkpoint buffer {prefix + name} does not follow from its betas; "
                                 "this schedule variant is not supported")
        return schedule

    @property
    def num_timesteps(self) -> int:
        """T, the number of diffusion steps."""
        return self.betas.numel()

    def buffers(self, device: torch.device | str | None = None,
                dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """Fresh copies of the reference's schedule buffers (name -> tensor) on `device`."""
        return {name: getattr(self, name).to(device=device, dtype=dtype) for name in BUFFER_NAMES}

    def table(self, name: str, device: torch.device | str | None = None,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The table `name` cast to `dtype` on `device`, cached; do not modify it in place."""
        device = torch.device(device or "cpu")
        key = (device, dtype, name)
        if key not in self._device_cache:
            self._device_cache[key] = getattr(self, name).to(device=device, dtype=dtype)
        return self._device_cache[key]

    def gather(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """table[t] per batch element, shaped (B, 1, ..., 1) to broadcast against `like`."""
        values = self.table(name, like.device, like.dtype)[t.to(like.device).long()]
        return values.reshape(-1, *([1] * (like.ndim - 1)))


def q_sample(schedule: DiffusionSchedule, x0: torch.Tensor, t: torch.Tensor,
             noise: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, for per-sample integer timesteps t."""
    return (schedule.gather("sqrt_alphas_cumprod", t, x0) * x0
            + schedule.gather("sqrt_one_minus_alphas_cumprod", t, x0) * noise)


def posterior_mean_variance(
    schedule: DiffusionSchedule, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0); the latter two are
    shaped (B, 1, ..., 1) to broadcast against x_t."""
    mean = (schedule.gather("posterior_mean_coef1", t, x_t) * x0
            + schedule.gather("posterior_mean_coef2", t, x_t) * x_t)
    variance = schedule.gather("posterior_variance", t, x_t)
    log_variance = schedule.gather("posterior_log_variance_clipped", t, x_t)
    return mean, variance, log_variance
