"""Checking a `_target_` config that came from someone else before Hydra builds it.

A config that `hydra.utils.instantiate` builds is code: any importable callable may be named,
with any arguments. A checkpoint or run folder from a stranger therefore gets its stored config
built only when every `_target_` in it is on an allow-list of this project's own classes, with
none of the extras that could bring in anything else (positional `_args_`, `_partial_` callables,
`${...}` interpolations, which `oc.create` turns into new config nodes).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

REFUSED_KEYS = ("_args_", "_partial_")


class UntrustedConfigError(ValueError):
    """A stored config would build something outside the allow-list. `refused` lists each
    offending entry as '<config path>: <what>'."""

    def __init__(self, source: str, refused: list[str]):
        self.refused = refused
        shown = "\n  ".join(refused)
        super().__init__(
            f"{source} stores a config that would build more than this project's own model classes:\n  {shown}\n"
            "Building it could read files, run commands or import any code. Only load it if you trust where it "
            "comes from: trust_config=true for sample.py / evaluate.py, trust_config=True for "
            "ldm.modules.loading.load_module (docs/resume.md, 'Checkpoints from others').")


def refused_entries(config: Any, allowed: Iterable[str], where: str = "") -> list[str]:
    """'<config path>: <what>' for every `_target_` of `config` (dicts and lists, any depth) that
    is not in `allowed`, every `_args_` / `_partial_` key and every string with an interpolation."""
    allowed = frozenset(allowed)
    here = where or "(top level)"
    refused: list[str] = []
    if isinstance(config, Mapping):
        if "_target_" in config and (not isinstance(config["_target_"], str) or config["_target_"] not in allowed):
            refused.append(f"{here}: {config['_target_']}")
        refused += [f"{here}: {key}" for key in REFUSED_KEYS if key in config]
        for key, value in config.items():
            if key != "_target_":
                refused += refused_entries(value, allowed, f"{where}.{key}" if where else str(key))
    elif isinstance(config, (list, tuple)):
        for i, value in enumerate(config):
            refused += refused_entries(value, allowed, f"{where}[{i}]")
    elif isinstance(config, str) and "${" in config:
        refused.append(f"{here}: interpolation {config!r}")
    return refused


def check_trusted(config: Any, allowed: Iterable[str], source: str) -> None:
    """Raise UntrustedConfigError naming everything in `config` outside `allowed` (see
    refused_entries); return quietly when there is nothing."""
    refused = refused_entries(config, allowed)
    if refused:
        raise UntrustedConfigError(source, refused)
