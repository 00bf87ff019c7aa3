#!/usr/bin/env bash
# From a fresh clone: install, write the built-in shapes shards, train a toy KL-f4 autoencoder,
# train a toy text-conditional LDM on its latents, sample a grid for a few prompts and evaluate
# the LDM (FID against the data with the toy features; prompt accuracy: does a shape classifier,
# assets/classifiers/shapes-32-large, find the prompted shapes and colours in the samples).
# Budget: 15 minutes in all, install included. The LDM trains for the time the budget leaves after
# the install and the autoencoder, less what sampling and evaluation take, and for at most the
# config's trainer.max_steps (configs/experiment/toy/*_quickstart.yaml): a faster machine trains it
# for more steps. Stage times and results per machine are in docs/reproduction.md.
# Extra arguments are Hydra overrides for both training stages (e.g. trainer=gpu);
# QUICKSTART_LDM_ARGS holds overrides for the LDM stage only; the environment:
#   QUICKSTART_BUDGET_S=1800 bash scripts/quickstart.sh     # a 30-minute budget: more LDM steps, up to the cap
#   QUICKSTART_LDM_ARGS="trainer.max_time=null trainer.max_steps=2200" bash scripts/quickstart.sh   # a fixed step count instead
#   QUICKSTART_DIR=<folder>   where the run goes (default runs/quickstart/<date_time>)
#   PY=<python>               use this interpreter and skip the install
set -euo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS
BUDGET=${QUICKSTART_BUDGET_S:-900}
# Kept back from the LDM's training for its start-up (latent cache), its last validation and
# checkpoint, the sample grid and evaluate.py: about 100 s on the slowest two-core machine measured.
AFTER_TRAINING_S=150
stage() { echo "[quickstart $(( SECONDS - START ))s] $*"; }
if [ -z "${PY:-}" ]; then
  stage "install"
  bash scripts/install.sh
  PY=.venv/bin/python
fi
export HF_HUB_OFFLINE=1
read -r -a LDM_ARGS <<< "${QUICKSTART_LDM_ARGS:-}"
RUN=${QUICKSTART_DIR:-runs/quickstart/$(date +%Y-%m-%d_%H-%M-%S)}
AE="$RUN/autoencoder"
LDM="$RUN/ldm"
SAMPLES="$RUN/samples"
EVAL="$RUN/eval"
stage "autoencoder -> $AE (writes the shards first, once)"
$PY train.py experiment=toy/ae_kl_quickstart hydra.run.dir="$AE" "$@"
LDM_S=$(( BUDGET - (SECONDS - START) - AFTER_TRAINING_S ))
if (( LDM_S < 60 )); then
  echo "warning: the ${BUDGET} s budget is nearly spent before the LDM; it trains for 60 s, past the budget" >&2
  LDM_S=60
fi
MAX_TIME=$(printf '00:%02d:%02d:%02d' $(( LDM_S / 3600 )) $(( LDM_S % 3600 / 60 )) $(( LDM_S % 60 )))
stage "text LDM -> $LDM (trains for at most $MAX_TIME, what the ${BUDGET} s budget leaves)"
$PY train.py experiment=toy/ldm_text_quickstart hydra.run.dir="$LDM" first_stage.path="$AE" \
  trainer.max_time="$MAX_TIME" "$@" "${LDM_ARGS[@]}"
STEPS=$($PY -c "import json; print(json.load(open('$LDM/metrics.json'))['global_step'])")
stage "text LDM trained for $STEPS steps"
stage "samples -> $SAMPLES"
$PY sample.py ckpt="$LDM" hydra.run.dir="$SAMPLES" n=8 steps=50 guidance=2.0 \
  'prompt=["a large red circle on a grey background","a large blue square on a beige background","a large yellow star on a dark blue background","a large green triangle on a grey background"]'
stage "evaluate -> $EVAL"
REAL=$($PY -c "from omegaconf import OmegaConf; print(OmegaConf.load('$AE/config.yaml').data.val_urls)")
$PY evaluate.py ckpt="$LDM" real="$REAL" features=toy n=128 steps=20 guidance=2.0 \
  'metrics=[fid,precision_recall,prompt_accuracy]' classifier=assets/classifiers/shapes-32-large hydra.run.dir="$EVAL"
stage "done"
echo
echo "autoencoder:  $AE (checkpoints/last.ckpt, images/ reconstructions, metrics.json)"
echo "ldm:          $LDM (checkpoints/last.ckpt, images/ samples, metrics.json; $STEPS steps)"
echo "grid:         $SAMPLES/grid_captioned.png  (settings: $SAMPLES/samples.json)"
echo "metrics:      $EVAL/metrics.json  (FID with the toy features, precision/recall, prompt accuracy)"
