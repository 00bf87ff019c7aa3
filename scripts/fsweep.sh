#!/usr/bin/env bash
# The paper's compression trade-off in small (docs/reproduction.md): for each downsampling factor
# f in {1, 2, 4, 8, 16, 32}, on the synthetic shapes,
#   1. a KL autoencoder (configs/experiment/fsweep/ae.yaml; f = 1 is the identity, no training),
#   2. a text-conditional LDM on its latents, the same UNet, batch and steps for every f, with the
#      evaluation callback scoring FID every few steps (configs/experiment/fsweep/ldm.yaml),
#   3. evaluate.py on every autoencoder (rFID, PSNR) and every LDM (FID, precision/recall, samples/s,
#      prompt accuracy with assets/classifiers/shapes-<px> or a classifier trained here),
#   4. the trade-off table and the FID-vs-steps plot (python -m ldm.cli.tables).
#
#   bash scripts/fsweep.sh [HYDRA OVERRIDES...]       # overrides go to every training job, e.g.
#   bash scripts/fsweep.sh trainer=gpu                 # on a GPU
#   bash scripts/fsweep.sh hydra/launcher=slurm        # training jobs as SLURM jobs (in parallel per stage)
#   FSWEEP_DIR=runs/fsweep/mine bash scripts/fsweep.sh # the output folder (default runs/fsweep/<time>)
#   FSWEEP_F="1 4" bash scripts/fsweep.sh              # the factors (default "1 2 4 8 16 32")
#   FSWEEP_LDM_ARGS="callbacks.evaluation.num_samples=8" bash scripts/fsweep.sh   # overrides for the LDM jobs only
#   FSWEEP_EVAL_N=512 bash scripts/fsweep.sh           # samples per LDM for evaluate.py (default 512)
#   FSWEEP_BOOTSTRAP=200 bash scripts/fsweep.sh        # bootstrap resamples of the FID interval (default 200)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=1
OUT=${FSWEEP_DIR:-runs/fsweep/$(date +%Y-%m-%d_%H-%M-%S)}
EVAL_N=${FSWEEP_EVAL_N:-512}
BOOT=${FSWEEP_BOOTSTRAP:-200}
read -r -a ALL_F <<< "${FSWEEP_F:-1 2 4 8 16 32}"
read -r -a LDM_ARGS <<< "${FSWEEP_LDM_ARGS:-}"
AE_F=()
for f in "${ALL_F[@]}"; do [ "$f" = 1 ] || AE_F+=("$f"); done
START=$SECONDS
stage() { echo "[fsweep $(( SECONDS - START ))s] $*"; }

if [ ${#AE_F[@]} -gt 0 ]; then
  stage "autoencoders f = ${AE_F[*]} -> $OUT/ae"
  $PY train.py -m experiment=fsweep/ae "first_stage.f=$(IFS=,; echo "${AE_F[*]}")" hydra.sweep.dir="$OUT/ae" "$@"
fi
if [[ " ${ALL_F[*]} " == *" 1 "* ]]; then
  stage "LDM f = 1 (pixel space) -> $OUT/ldm/f-1"
  $PY train.py -m experiment=fsweep/ldm fsweep.f=1 first_stage=identity fsweep.latent_channels=3 \
    hydra.sweep.dir="$OUT/ldm" "$@" "${LDM_ARGS[@]}"
fi
if [ ${#AE_F[@]} -gt 0 ]; then
  stage "LDMs f = ${AE_F[*]} on their autoencoders -> $OUT/ldm"
  $PY train.py -m experiment=fsweep/ldm "fsweep.f=$(IFS=,; echo "${AE_F[*]}")" \
    "first_stage.path=$OUT/ae/f-\${fsweep.f}" hydra.sweep.dir="$OUT/ldm" "$@" "${LDM_ARGS[@]}"
fi

# The real images are the runs' own validation shards (so overrides of the data reach evaluation).
REAL=$($PY -c "from omegaconf import OmegaConf; print(OmegaConf.load('$OUT/ldm/f-${ALL_F[0]}/config.yaml').data.val_urls)")
# Prompt accuracy (do the samples show the prompted shapes and colours?) needs a shape classifier
# for the image size: the committed one, else one trained here.
RES=$($PY -c "from omegaconf import OmegaConf; print(OmegaConf.load('$OUT/ldm/f-${ALL_F[0]}/config.yaml').data.image_size)")
CLS=assets/classifiers/shapes-$RES
if [ ! -f "$CLS/classifier.json" ]; then
  CLS=$OUT/classifier
  stage "shape classifier for prompt accuracy -> $CLS"
  $PY -m ldm.cli.train_classifier --resolution "$RES" --out "$CLS"
fi

for f in "${AE_F[@]}"; do
  stage "evaluate autoencoder f = $f"
  $PY evaluate.py ckpt="$OUT/ae/f-$f" real="$REAL" features=shapes n=null 'metrics=[fid]' fid_bootstrap="$BOOT" \
    hydra.run.dir="$OUT/ae/f-$f/eval"
done
for f in "${ALL_F[@]}"; do
  stage "evaluate LDM f = $f ($EVAL_N samples)"
  $PY evaluate.py ckpt="$OUT/ldm/f-$f" real="$REAL" features=shapes n="$EVAL_N" steps=20 guidance=3.0 fid_bootstrap="$BOOT" \
    'metrics=[fid,precision_recall,prompt_accuracy]' classifier="$CLS" hydra.run.dir="$OUT/ldm/f-$f/eval"
done

stage "tables"
$PY -m ldm.cli.tables "$OUT" --out "$OUT/tables"
stage "done"
echo "runs:   $OUT/ae/f-<f> (autoencoders), $OUT/ldm/f-<f> (LDMs; metrics/eval.jsonl: FID over training)"
echo "table:  $OUT/tables/tables.md (compression.csv)"
echo "plot:   $OUT/tables/fid_vs_steps.png"
