#!/usr/bin/env bash
# One GPU benchmark session, sized for a short device lease (under 8 minutes):
#   1. benchmarks/unet.py --suite gpu: SD-1 b32 bf16 eager, CelebA-HQ LDM-4 b48 eager, SD-1
#      training with gradient checkpointing (our fast paths and diffusers in each), then SD-1
#      compiled training, SD-1 with only the attention blocks compiled, and compiled inference,
#      cut by a time limit;
#   2. benchmarks/data.py: the kl-f8 encoder rate (b32, bf16).
# JSON lines go to $OUT/gpu.jsonl, logs and the device description beside them.
#
#   OUT=/some/dir bash benchmarks/gpu_session.sh          # on the GPU machine, from the repo root
#   OUT=/tmp/smoke bash benchmarks/gpu_session.sh --smoke # the same steps, small config on the CPU
#
# diffusers is installed from the wheels in .whl (git-ignored; carry it to the device) when the
# environment lacks it. Fill it beforehand on a machine with the package index:
#   pip download diffusers==0.42.1 --no-deps -d .whl
set -uo pipefail
OUT=${OUT:?set OUT to the output folder}
mkdir -p "$OUT"
SMOKE=${1:-}

if ! python -c "import diffusers" 2>/dev/null; then
  if compgen -G ".whl/*.whl" > /dev/null; then
    pip install --quiet --no-deps --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
  else
    echo "diffusers is missing and .whl holds no wheel: measuring ours only" \
      "(pip download diffusers==0.42.1 --no-deps -d .whl, then carry .whl)"
  fi
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}

{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  python -c "import importlib.metadata as m, platform, torch; print('torch', torch.__version__, 'cuda', \
torch.version.cuda, 'diffusers', m.version('diffusers') if m.packages_distributions().get('diffusers') else 'absent', \
'python', platform.python_version())"
} > "$OUT/device.txt" 2>&1
cat "$OUT/device.txt"

if [ "$SMOKE" = "--smoke" ]; then
  unet=(--config small --batch 2 --precision bf16 --ours base,fast --steps 1 --warmup 1 --device cpu)
  encode=(--device cpu --encode-batch 1 --encode-steps 1 --encode-warmup 0)
else
  unet=(--suite gpu --time-limit 250)
  encode=(--device cuda --precision bf16)
fi

# No phase starts after 250 s (a compiled SD-1 training phase takes about 2 minutes); the hard
# limits leave room for the last phase and the encoder, so the whole script ends within 440 s.
timeout 400 python benchmarks/unet.py "${unet[@]}" --out "$OUT/gpu.jsonl" 2> "$OUT/unet.log" > "$OUT/unet.out"
echo "unet.py exit $?"; tail -n 25 "$OUT/unet.out"; tail -n 5 "$OUT/unet.log"

timeout 40 python benchmarks/data.py --skip-loading "${encode[@]}" --out "$OUT/gpu.jsonl" \
  2> "$OUT/encode.log" > "$OUT/encode.out"
echo "data.py exit $?"; tail -n 6 "$OUT/encode.out"; tail -n 3 "$OUT/encode.log"
