"""Hold a SIGUSR1 that arrives during start-up, before the Preemption callback exists.

SLURM sends SIGUSR1 as its `--signal` warning; Python's default for it ends the process, so a
warning during start-up (imports, the latent cache) would lose the job: no checkpoint, no requeue.
Standard library only, so train.py can install it before its heavy imports.
"""
from __future__ import annotations

import signal

_noted: set[int] = set()


def hold_early_sigusr1() -> None:
    """Note a SIGUSR1 from now on, for ldm.callbacks.preemption.Preemption to act on once training runs.

    Only SIGUSR1: a SIGTERM during start-up (torchrun stopping the workers of a failed node, a
    user's kill) still ends the process at once, as there is nothing to save yet."""
    if hasattr(signal, "SIGUSR1"):
        signal.signal(signal.SIGUSR1, lambda signum, frame: _noted.add(signum))


def take_early_signals() -> set[int]:
    """The signals noted so far (then forgotten)."""
    noted = set(_noted)
    _noted.clear()
    return noted
