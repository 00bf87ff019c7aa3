#!/usr/bin/env bash
# Install the project into a virtual environment ($VENV, default .venv) from this repository's
# files: pinned versions from constraints.txt. EXTRAS=test adds the test dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet -c constraints.txt torch torchvision
"$VENV/bin/python" -m pip install --quiet -c constraints.txt -e ".${EXTRAS:+[$EXTRAS]}"
echo "installed into $VENV"
