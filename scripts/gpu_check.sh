#!/usr/bin/env bash
# One GPU window, under 8 minutes on an H100/H200: the CUDA tests, real runs through the entry
# points, the open benchmark rows and a profile of one SD-1 training step. Each phase has its own
# time limit (and the whole script a budget), so one slow phase cannot eat the rest; everything
# goes to $OUT, with summary.txt / summary.json saying pass / fail / skipped per phase.
#
#   OUT=/some/dir bash scripts/gpu_check.sh            # on the GPU machine, from the repo root
#   OUT=/some/dir bash scripts/gpu_check.sh --smoke    # every phase on the CPU at tiny size (CI runs this)
#   OUT=... bash scripts/gpu_check.sh --only bench,profile   # a second window for the benchmarks
#
# Phases: setup (device, versions, wheels), tests (pytest -m gpu: tests/test_gpu.py), e2e
# (train.py toy autoencoder + text LDM with trainer=gpu, sample.py, evaluate.py), bench
# (benchmarks/unet.py --suite gpu, then the kl-f8 encoder rate), profile (benchmarks/profile_step.py:
# SD-1 bf16 training step, eager then compiled).
# The machine needs torch (+ CUDA); the packages it lacks come from the wheels in .whl
# (git-ignored): fill it with `bash scripts/fill_wheels.sh` beforehand and carry it.
# Environment: PY (interpreter, default python3), GPU_CHECK_BUDGET_S (default 470;
# --smoke: 4 times every limit), WORK (scratch
# folder for data and runs, default /tmp/gpu_check; only small results are copied to $OUT),
# BENCH_TIME_LIMIT (unet.py --time-limit, default 100) and GPU_CHECK_BENCH_S (the bench phase's
# limit, default 200). A window for the compiled rows alone:
#   GPU_CHECK_BENCH_S=450 BENCH_TIME_LIMIT=330 OUT=... bash scripts/gpu_check.sh --only bench
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to the output folder}
OUT=$(mkdir -p "$OUT" && cd "$OUT" && pwd)
PY=${PY:-python3}
WORK=${WORK:-/tmp/gpu_check}
SMOKE=${SMOKE:-0}
ONLY=setup,tests,e2e,bench,profile
IN_PHASE=
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) SMOKE=1 ;;
    --only) ONLY="setup,$2"; shift ;;
    --in-phase) IN_PHASE=$2; shift ;;  # internal: run one phase's function (under `timeout`)
    *) echo "unknown argument $1 (use --smoke, --only PHASES)" >&2; exit 2 ;;
  esac
  shift
done
export OUT PY WORK SMOKE HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline PYTHONUNBUFFERED=1

# phase NAME LIMIT_S: runs the function NAME in its own process under min(LIMIT_S, what the budget leaves), output in
# $OUT/NAME.log; records pass / fail (exit code) / timeout / skipped.
phase() {
  local name=$1 limit=$(( $2 * SLACK ))
  if [[ ",$ONLY," != *",$name,"* ]]; then
    return 0
  fi
  local left=$(( BUDGET - (SECONDS - START) ))
  (( limit > left )) && limit=$left
  if (( limit < 15 )); then
    printf '%-8s skipped  %4ds  budget spent\n' "$name" 0 | tee -a "$OUT/summary.txt"
    return 0
  fi
  echo "== $name (limit ${limit}s, $(( SECONDS - START ))s elapsed)"
  local begin=$SECONDS rc
  timeout --kill-after=10 "$limit" bash "$0" --in-phase "$name" > "$OUT/$name.log" 2>&1
  rc=$?
  local status=pass
  (( rc == 124 || rc == 137 )) && status=timeout
  (( rc != 0 && rc != 124 && rc != 137 )) && status=fail
  printf '%-8s %-8s %4ds  exit %d, log %s.log\n' "$name" "$status" $(( SECONDS - begin )) "$rc" "$name" \
    | tee -a "$OUT/summary.txt"
  tail -n 15 "$OUT/$name.log"
}

setup() {
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  local missing=() dist module
  while read -r dist module; do
    [[ -z "$dist" || "$dist" == \#* ]] && continue
    "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$module') is None)" || missing+=("$dist")
  done < scripts/gpu_wheels.txt
  if [ ${#missing[@]} -gt 0 ]; then
    echo "missing here: ${missing[*]}"
    local wheels=()
    for dist in "${missing[@]}"; do
      wheels+=($(ls .whl/"${dist//-/_}"-*.whl .whl/"$dist"-*.whl 2>/dev/null | head -n 1))
    done
    if [ ${#wheels[@]} -ne ${#missing[@]} ]; then
      echo "error: .whl lacks wheels for some of them: run 'bash scripts/fill_wheels.sh' and carry .whl"
      return 1
    fi
    "$PY" -m pip install --quiet --no-deps --no-index --target "$WORK/site" "${wheels[@]}" || return 1
  fi
  "$PY" - <<'PYEOF'
import importlib.metadata as md, platform, torch
names = ["pytorch-lightning", "torchmetrics", "transformers", "hydra-core", "webdataset", "torch-fidelity", "diffusers"]
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "cudnn", torch.backends.cudnn.version(), "device", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
print(", ".join(f"{n} {md.version(n)}" for n in names))
import ldm.cli.train, ldm.cli.sample, ldm.cli.evaluate  # noqa: F401  (the whole stack imports)
PYEOF
}

tests() {
  "$PY" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider --junitxml="$OUT/tests.xml" --basetemp="$WORK/pytest"
}

e2e() {
  local data="$WORK/data" runs="$WORK/runs" gpu=(trainer=gpu) size=() ldm_steps=(trainer.max_steps=3000 trainer.max_time=00:00:01:15)
  local n=128 steps=20
  if (( SMOKE )); then
    gpu=(trainer=gpu trainer.accelerator=cpu)
    size=(debug=tiny)
    ldm_steps=()
    n=8 steps=3
  fi
  local common=("${gpu[@]}" logger=csv "paths.data_dir=$data" "${size[@]}")
  set -e
  "$PY" train.py experiment=toy/ae_kl_quickstart "${common[@]}" hydra.run.dir="$runs/ae"
  "$PY" train.py experiment=toy/ldm_text_quickstart "${common[@]}" hydra.run.dir="$runs/ldm" first_stage.path="$runs/ae" \
    "${ldm_steps[@]}"
  "$PY" sample.py ckpt="$runs/ldm" hydra.run.dir="$runs/samples" n=8 steps=$steps guidance=2.0 device=auto \
    'prompt=["a large red circle on a grey background","a large blue square on a beige background","a large yellow star on a dark blue background","a large green triangle on a grey background"]'
  local real
  real=$("$PY" -c "from omegaconf import OmegaConf; print(OmegaConf.load('$runs/ae/config.yaml').data.val_urls)")
  "$PY" evaluate.py ckpt="$runs/ldm" real="$real" features=toy n=$n steps=$steps guidance=2.0 device=auto \
    'metrics=[fid,precision_recall,prompt_accuracy]' classifier=assets/classifiers/shapes-32-large hydra.run.dir="$runs/eval"
  set +e
  mkdir -p "$OUT/e2e"
  cp "$runs/ae/metrics.json" "$OUT/e2e/ae_metrics.json"
  cp "$runs/ldm/metrics.json" "$OUT/e2e/ldm_metrics.json"
  cp "$runs/samples/grid_captioned.png" "$runs/samples/samples.json" "$OUT/e2e/"
  cp "$runs/eval/metrics.json" "$OUT/e2e/eval_metrics.json"
  "$PY" -c "import json; m = json.load(open('$runs/ldm/metrics.json')); print('LDM steps', m['global_step'])"
}

bench() {
  local unet=(--suite gpu --time-limit "${BENCH_TIME_LIMIT:-100}") encode=(--device cuda --precision bf16)
  if (( SMOKE )); then
    unet=(--config small --batch 2 --precision bf16 --ours base,fast --steps 1 --warmup 1 --device cpu)
    encode=(--device cpu --encode-batch 1 --encode-steps 1 --encode-warmup 0)
  fi
  # The UNet rows stop starting at the time limit; the encoder gets the rest of the phase.
  timeout $(( (${BENCH_TIME_LIMIT:-100} + 60) * SLACK )) "$PY" benchmarks/unet.py "${unet[@]}" --out "$OUT/bench.jsonl"
  echo "unet.py exit $?"
  timeout $(( 40 * SLACK )) "$PY" benchmarks/data.py --skip-loading "${encode[@]}" --out "$OUT/bench.jsonl"
  echo "data.py exit $?"
}

profile() {
  if (( SMOKE )); then  # eager only: inductor compiles for minutes on the CPU
    "$PY" benchmarks/profile_step.py --config small --batch 2 --precision bf16 --device cpu --out "$OUT/profile.md"
    return
  fi
  local args=(--config sd1 --batch 32 --precision bf16 --device cuda)
  "$PY" benchmarks/profile_step.py "${args[@]}" --out "$OUT/profile.md" && \
    "$PY" benchmarks/profile_step.py "${args[@]}" --compile --out "$OUT/profile.md"
}

# The limits are the GPU machine's; the CPU rehearsal only checks that every phase works, on a
# machine that may be slow or busy: it gets four times the time.
SLACK=1
(( SMOKE )) && SLACK=4
export SLACK
# Wheels installed by setup; the CUDA tests rehearse on the CPU in smoke mode.
export PYTHONPATH=$PWD:$WORK/site${PYTHONPATH:+:$PYTHONPATH}
(( SMOKE )) && export LDM_GPU_TESTS_ON_CPU=1
if [ -n "$IN_PHASE" ]; then
  "$IN_PHASE"
  exit $?
fi

BUDGET=${GPU_CHECK_BUDGET_S:-$(( 470 * SLACK ))}
START=$SECONDS
rm -rf "$WORK" && mkdir -p "$WORK"
: > "$OUT/summary.txt"
phase setup 60
phase tests 150
phase e2e 170
phase bench "${GPU_CHECK_BENCH_S:-200}"
phase profile 120

"$PY" - "$OUT/summary.txt" "$OUT/summary.json" "$SMOKE" "$(( SECONDS - START ))" <<'PYEOF'
import json, sys
rows = [line.split(None, 3) for line in open(sys.argv[1]) if line.strip()]
phases = {r[0]: {"status": r[1], "seconds": int(r[2].rstrip("s")), "detail": r[3].strip()} for r in rows}
json.dump({"smoke": sys.argv[3] == "1", "wall_s": int(sys.argv[4]), "phases": phases}, open(sys.argv[2], "w"), indent=1)
PYEOF
echo "== summary ($(( SECONDS - START ))s; $OUT/summary.txt)"
cat "$OUT/summary.txt"
! grep -q -E ' (fail|timeout) ' "$OUT/summary.txt"
