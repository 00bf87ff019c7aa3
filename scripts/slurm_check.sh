#!/usr/bin/env bash
# The SLURM checks (tests/test_slurm.py, marker `slurm`, not in the default run): start a one-node
# cluster on this machine (scripts/slurm_local.sh: installs slurm-wlm and munge if missing; needs
# root) and run the tests against it. About 12 minutes on two CPU cores. Extra args go to pytest.
#   bash scripts/slurm_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/slurm_local.sh start
export SLURM_CONF=${LDM_SLURM_DIR:-/tmp/ldm-slurm}/slurm.conf
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline
"${VENV:-.venv}/bin/python" -m pytest -q -m slurm tests/test_slurm.py "$@"
