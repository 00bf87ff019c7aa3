"""The house rules of docs/architecture.md: which package may import which, and the console
scripts of pyproject.toml."""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ldm"

# package -> packages of ldm it must never import (docs/architecture.md, "What may import what")
FORBIDDEN = {
    "data": {"modules", "callbacks", "cli", "evaluation"},           # data knows no model
    "nets": {"data", "modules", "callbacks", "cli", "evaluation"},    # networks know no data format
    "metrics": {"modules", "callbacks", "cli", "evaluation"},         # metrics score tensors
    "diffusion": {"nets", "modules", "callbacks", "cli", "data"},     # samplers take any denoiser
    "first_stage": {"modules", "callbacks", "cli", "data"},
    "modules": {"callbacks", "cli", "evaluation"},
    "evaluation": {"callbacks", "cli"},                               # the protocol the callback and evaluate.py share
    "utils": {"modules", "callbacks", "cli"},
}


def imported_packages(path: Path) -> set[str]:
    """The ldm sub-packages a file imports (top level and inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else []
        found |= {n.split(".")[1] for n in names if n.startswith("ldm.") and n.count(".") >= 1}
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_layers_import_downwards_only(package):
    broken = {f"{path.relative_to(ROOT)} imports ldm.{name}"
              for path in (PACKAGE / package).rglob("*.py") for name in imported_packages(path) & FORBIDDEN[package]}
    assert not broken, sorted(broken)


def test_every_console_script_resolves_to_a_main():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert len(scripts) >= 8
    for name, target in scripts.items():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), name
