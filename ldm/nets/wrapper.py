"""Routes a condition dict into the UNet: the reference's DiffusionWrapper.

A condition is None or a dict with any of
  concat    (B, C, h, w) channels appended to the noisy latent (SR low-res image, inpainting mask
            and masked image, semantic map),
  crossattn (B, L, D) context for the spatial transformers (text, class embeddings),
  y         (B,) class ids or (B, D) vectors for the UNet's label embedding (adm style).

`crossattn_pooled` takes both a context and a vector y (the context's mean over its positions,
see LatentDiffusion.condition): the text reaches every residual block through the timestep
embedding as well as the attention layers, as SDXL's pooled text embedding does.
"""
from __future__ import annotations

import torch
from torch import nn

CONDITIONING_KEYS = (None, "concat", "crossattn", "hybrid", "adm", "crossattn_pooled")
_EXPECTED = {None: set(), "concat": {"concat"}, "crossattn": {"crossattn"}, "hybrid": {"concat", "crossattn"},
             "adm": {"y"}, "crossattn_pooled": {"crossattn", "y"}}
# The keys that feed the UNet's cross-attention a context from the cond_stage encoder.
CONTEXT_KEYS = tuple(key for key, entries in _EXPECTED.items() if "crossattn" in entries)


class DiffusionWrapper(nn.Module):
    """Holds the UNet as `diffusion_model` (the reference's parameter prefix) and feeds it a
    condition dict according to `conditioning_key`."""

    def __init__(self, diffusion_model: nn.Module, conditioning_key: str | None = None):
        super().__init__()
        if conditioning_key not in CONDITIONING_KEYS:
            raise ValueError(f"conditioning_key must be one of {CONDITIONING_KEYS}, got {conditioning_key!r}")
        self.diffusion_model = diffusion_model
        self.conditioning_key = conditioning_key

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: dict | None = None) -> torch.Tensor:
        cond = cond or {}
        given, wanted = {k for k, v in cond.items() if v is not None}, _EXPECTED[self.conditioning_key]
        if given != wanted:
            raise ValueError(f"a model with conditioning_key={self.conditioning_key!r} takes the condition "
                             f"entries {sorted(wanted)}, got {sorted(given)}")
        if "concat" in cond:
            x = torch.cat([x, cond["concat"].to(x.dtype)], dim=1)
        return self.diffusion_model(x, t, context=cond.get("crossattn"), y=cond.get("y"))
