"""Inception Score (Salimans et al. 2016) from classifier logits, as torch-fidelity computes it.

IS = exp(E_x KL(p(y|x) || p(y))) per split, with p(y) the mean prediction within the split;
the reported numbers are the mean and population std over `splits` splits. The logits are
shuffled with numpy RandomState(seed).permutation first and split at i * N // splits, exactly as
torch-fidelity does, so equal seeds give equal numbers. The standard IS uses the 1008 logits of
the TF Inception-v3 without bias (InceptionV3Features(output='logits')).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def inception_score(logits: Tensor, splits: int = 10, seed: int = 2020) -> tuple[float, float]:
    """(mean, std) of the Inception Score of (N, C) logits over `splits` splits, in float64."""
    logits = torch.as_tensor(logits)
    if logits.ndim != 2 or len(logits) < splits or splits < 1:
        raise ValueError(f"need logits (N, C) with N >= splits >= 1, got shape {tuple(logits.shape)} "
                         f"and splits={splits}")
    n = len(logits)
    order = torch.from_numpy(np.random.RandomState(seed).permutation(n)).to(logits.device)
    logits = logits[order].to(torch.float64)
    log_p = logits.log_softmax(dim=1)
    scores = []
    for i in range(splits):
        chunk = log_p[i * n // splits:(i + 1) * n // splits]
        log_marginal = chunk.exp().mean(dim=0).log()
        kl = (chunk.exp() * (chunk - log_marginal)).sum(dim=1).mean()
        scores.append(kl.exp())
    values = torch.stack(scores)
    return float(values.mean()), float(values.std(correction=0))
