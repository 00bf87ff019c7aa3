#!/usr/bin/env bash
# Install with test extras and run the default test suite (CPU, offline). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline
EXTRAS=test bash scripts/install.sh
"${VENV:-.venv}/bin/python" -m pytest -q "$@"
