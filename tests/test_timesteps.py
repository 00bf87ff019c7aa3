"""Training timestep distributions (ldm.diffusion.timesteps)."""
from __future__ import annotations

import pytest
import torch

from ldm.diffusion.timesteps import TimestepFocus, sample_timesteps


def test_uniform_without_focus():
    torch.manual_seed(0)
    t = sample_timesteps(200_000, 1000)
    assert t.dtype == torch.long and int(t.min()) == 0 and int(t.max()) == 999
    counts = torch.bincount(t // 100, minlength=10).float() / t.numel()  # ten bands of 100 steps
    assert torch.allclose(counts, torch.full((10,), 0.1), atol=0.005)


def test_focus_puts_its_share_into_the_band_and_keeps_every_level():
    torch.manual_seed(0)
    focus = TimestepFocus(300, 800, share=0.5)
    t = sample_timesteps(200_000, 1000, focus)
    assert int(t.min()) == 0 and int(t.max()) == 999  # the uniform half still reaches both ends
    in_band = ((t >= 300) & (t < 800)).float().mean().item()
    assert in_band == pytest.approx(0.5 + 0.5 * 0.5, abs=0.005)  # the share, plus the uniform half's 50%
    # inside the band the density is flat: (0.5 / 500 + 0.5 / 1000) per step, outside 0.5 / 1000
    inside, outside = (t == 500).float().mean().item(), (t == 100).float().mean().item()
    assert inside / outside == pytest.approx(3.0, rel=0.15)
    only = sample_timesteps(10_000, 1000, TimestepFocus(10, 20, share=1.0))
    assert int(only.min()) >= 10 and int(only.max()) < 20


@pytest.mark.parametrize("cfg, message", [
    ({"low": 800, "high": 300}, "0 <= low < high <= 1000"),
    ({"low": 0, "high": 1001}, "0 <= low < high <= 1000"),
    ({"low": 0, "high": 10, "share": 0.0}, "share must be in"),
    ({"low": 0, "high": 10, "share": 1.5}, "share must be in"),
    ({"low": 0}, "takes {low, high, share}"),
    ({"low": 0, "high": 10, "weight": 2}, "takes {low, high, share}"),
])
def test_bad_focus_is_refused_with_what_it_takes(cfg, message):
    with pytest.raises(ValueError, match=message):
        TimestepFocus.from_config(cfg).check(1000)
