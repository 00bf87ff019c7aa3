"""Which noise levels a training batch sees.

The reference draws every training timestep uniformly from [0, T). A `TimestepFocus` draws a
share of the batch uniformly from a band [low, high) instead, the rest still from [0, T): more
updates where a task is decided (the quickstart's shapes are decided at mid-to-high noise) while
every level keeps being trained. This reweights the loss over t, like the non-uniform timestep
densities of Esser et al. 2024 (SD3), without changing the per-sample loss.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

import torch


@dataclass(frozen=True)
class TimestepFocus:
    """Draw `share` of the timesteps uniformly from [low, high), the rest from [0, T)."""

    low: int
    high: int
    share: float = 0.5

    @classmethod
    def from_config(cls, cfg: Mapping) -> TimestepFocus:
        """Build from a config mapping {low, high, share (optional)}; other keys are refused."""
        names = {f.name for f in fields(cls)}
        if not {"low", "high"} <= set(cfg) <= names:
            raise ValueError(f"timestep_focus takes {{low, high, share}} (share optional), got {dict(cfg)}")
        return cls(**{k: cfg[k] for k in cfg})

    def check(self, num_timesteps: int) -> TimestepFocus:
        """Return self if it fits a schedule of `num_timesteps` steps, else raise a ValueError."""
        if not 0 <= self.low < self.high <= num_timesteps:
            raise ValueError(f"timestep_focus needs 0 <= low < high <= {num_timesteps} (the schedule's steps), "
                             f"got low={self.low}, high={self.high}")
        if not 0.0 < self.share <= 1.0:
            raise ValueError(f"timestep_focus.share must be in (0, 1], got {self.share}")
        return self


def sample_timesteps(n: int, num_timesteps: int, focus: TimestepFocus | None = None,
                     device: torch.device | str | None = None, uniforms: torch.Tensor | None = None) -> torch.Tensor:
    """`n` training timesteps (long): uniform over [0, num_timesteps), or with `focus` a share of
    them uniform over its band.

    uniforms: (n, 3) numbers in [0, 1) to take them from (the level over [0, T), whether it is
    drawn from the band, the level in the band), e.g. each sample's from its own generator;
    None draws them from the global RNG.
    """
    u = torch.rand(n, 3, dtype=torch.float64, device=device) if uniforms is None else uniforms.to(device, torch.float64)
    if u.shape != (n, 3):
        raise ValueError(f"uniforms must have shape ({n}, 3), got {tuple(u.shape)}")
    t = (u[:, 0] * num_timesteps).long().clamp_max(num_timesteps - 1)
    if focus is None:
        return t
    width = focus.high - focus.low
    band = focus.low + (u[:, 2] * width).long().clamp_max(width - 1)
    return torch.where(u[:, 1] < focus.share, band, t)
