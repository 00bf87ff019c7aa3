#!/usr/bin/env bash
# From a fresh clone: install, write the built-in shapes shards and train the toy experiment on
# the CPU. Extra arguments are Hydra overrides (e.g. trainer=gpu).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1
RUN_DIR="runs/quickstart/$(date +%Y-%m-%d_%H-%M-%S)"
.venv/bin/python train.py experiment=toy/ae_kl task_name=quickstart hydra.run.dir="$RUN_DIR" "$@"
echo
echo "run folder:   $RUN_DIR"
echo "checkpoints:  $RUN_DIR/checkpoints/last.ckpt"
echo "grids:        $(ls -1 "$RUN_DIR"/images/*.png 2>/dev/null | tail -n 1)"
echo "metrics:      $RUN_DIR/metrics.json"
