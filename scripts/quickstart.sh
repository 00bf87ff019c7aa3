#!/usr/bin/env bash
# From a fresh clone: install, write the built-in shapes shards, train a toy KL-f4 autoencoder,
# train a toy text-conditional LDM on its latents, sample a grid for a few prompts and evaluate
# the LDM (FID against the data with the toy features; prompt accuracy: does a shape classifier,
# assets/classifiers/shapes-32-large, find the prompted shapes and colours in the samples).
# Budget: about 15 minutes on two idle CPU cores, install included
# (configs/experiment/toy/*_quickstart.yaml; stage times in docs/reproduction.md).
# Extra arguments are Hydra overrides for both training stages (e.g. trainer=gpu);
# QUICKSTART_LDM_ARGS holds overrides for the LDM stage only, e.g.
#   QUICKSTART_LDM_ARGS="trainer.max_steps=4400" bash scripts/quickstart.sh   # twice the diffusion steps (about 7 more minutes on two CPU cores)
set -euo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS
stage() { echo "[quickstart $(( SECONDS - START ))s] $*"; }
stage "install"
bash scripts/install.sh
export HF_HUB_OFFLINE=1
PY=.venv/bin/python
read -r -a LDM_ARGS <<< "${QUICKSTART_LDM_ARGS:-}"
STAMP=$(date +%Y-%m-%d_%H-%M-%S)
RUN="runs/quickstart/$STAMP"
AE="$RUN/autoencoder"
LDM="$RUN/ldm"
SAMPLES="$RUN/samples"
EVAL="$RUN/eval"
stage "autoencoder -> $AE (writes the shards data/shapes-32-large first, once)"
$PY train.py experiment=toy/ae_kl_quickstart hydra.run.dir="$AE" "$@"
stage "text LDM -> $LDM"
$PY train.py experiment=toy/ldm_text_quickstart hydra.run.dir="$LDM" first_stage.path="$AE" "$@" "${LDM_ARGS[@]}"
stage "samples -> $SAMPLES"
$PY sample.py ckpt="$LDM" hydra.run.dir="$SAMPLES" n=8 steps=50 guidance=3.0 \
  'prompt=["a large red circle on a grey background","a large blue square on a beige background","a large yellow star on a dark blue background","a large green triangle on a grey background"]'
stage "evaluate -> $EVAL"
$PY evaluate.py ckpt="$LDM" real=data/shapes-32-large/val features=toy n=128 steps=20 guidance=3.0 \
  'metrics=[fid,precision_recall,prompt_accuracy]' classifier=assets/classifiers/shapes-32-large hydra.run.dir="$EVAL"
stage "done"
echo
echo "autoencoder:  $AE (checkpoints/last.ckpt, images/ reconstructions, metrics.json)"
echo "ldm:          $LDM (checkpoints/last.ckpt, images/ samples, metrics.json)"
echo "grid:         $SAMPLES/grid_captioned.png  (settings: $SAMPLES/samples.json)"
echo "metrics:      $EVAL/metrics.json  (FID with the toy features, precision/recall, prompt accuracy)"
