#!/usr/bin/env bash
# From a fresh clone: install, write the built-in shapes shards, train a toy KL-f4 autoencoder,
# train a toy text-conditional LDM on its latents, and sample a grid for a few prompts (CPU).
# Extra arguments are Hydra overrides for both training stages (e.g. trainer=gpu).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1
PY=.venv/bin/python
STAMP=$(date +%Y-%m-%d_%H-%M-%S)
AE="runs/quickstart/$STAMP/autoencoder"
LDM="runs/quickstart/$STAMP/ldm"
SAMPLES="runs/quickstart/$STAMP/samples"
$PY train.py experiment=toy/ae_kl task_name=quickstart hydra.run.dir="$AE" "$@"
$PY train.py experiment=toy/ldm_text task_name=quickstart hydra.run.dir="$LDM" first_stage.path="$AE" "$@"
$PY sample.py ckpt="$LDM" hydra.run.dir="$SAMPLES" n=8 steps=50 guidance=3.0 \
  'prompt=["a large red circle on a grey background","a small blue square on a beige background","a large yellow star on a dark blue background","a small green triangle on a grey background"]'
echo
echo "autoencoder:  $AE (checkpoints/last.ckpt, images/ reconstructions, metrics.json)"
echo "ldm:          $LDM (checkpoints/last.ckpt, images/ samples, metrics.json)"
echo "grid:         $SAMPLES/grid.png  (settings: $SAMPLES/samples.json)"
