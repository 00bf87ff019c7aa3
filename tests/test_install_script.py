"""scripts/install.sh refuses to start an install that cannot fit on the disk."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _fake_df(bin_dir: Path, free_gb: int) -> None:
    df = bin_dir / "df"
    df.write_text("#!/bin/sh\n"
                  "echo 'Filesystem 1073741824-blocks Used Available Capacity Mounted on'\n"
                  f"echo '/dev/vda 252G 245G {free_gb}G 98% /'\n")
    df.chmod(0o755)


def test_install_refuses_with_too_little_disk_and_creates_nothing(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake_df(bin_dir, free_gb=3)
    venv = tmp_path / "envs" / "venv"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "VENV": str(venv)}
    result = subprocess.run(["bash", str(ROOT / "scripts" / "install.sh")], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "3 GB free" in result.stderr and "needs about 7 GB" in result.stderr
    assert not venv.exists()  # refused before python -m venv or pip ran
