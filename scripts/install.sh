#!/usr/bin/env bash
# Install the project into a virtual environment ($VENV, default .venv) from this repository's
# files: pinned versions from constraints.txt. EXTRAS=test adds the test dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
# torch's CUDA build unpacks to about 5.6 GB: say so before pip fails half-way with ENOSPC.
mkdir -p "$(dirname "$VENV")"
free_gb=$(df -P -BG "$(dirname "$VENV")" | awk 'NR==2 {sub("G", "", $4); print $4}')
if [ ! -x "$VENV/bin/python" ] && [ "$free_gb" -lt 7 ]; then
    echo "error: $free_gb GB free under $(dirname "$VENV"); installing torch needs about 7 GB." >&2
    echo "Free some space (old runs/, /tmp/pytest-of-*) or set VENV to a roomier path." >&2
    exit 1
fi
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet --no-compile -c constraints.txt torch torchvision
"$VENV/bin/python" -m pip install --quiet --no-compile -c constraints.txt -e ".${EXTRAS:+[$EXTRAS]}"
# --no-compile above skips byte-compiling every file of torch (about 45 s of the install). This
# compiles what the project imports instead, once, even where PYTHONDONTWRITEBYTECODE is set
# (otherwise every run would recompile it: importing the CLI stack takes ~24 s instead of ~10 s).
env -u PYTHONDONTWRITEBYTECODE "$VENV/bin/python" -c "
import importlib, pkgutil, ldm
for module in pkgutil.walk_packages(ldm.__path__, 'ldm.'):
    importlib.import_module(module.name)
"
echo "installed into $VENV"
