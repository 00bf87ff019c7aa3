#!/usr/bin/env bash
# Sampler x steps against quality on a trained LDM run: evaluate.py once per combination, then a
# markdown table. Usage: bash scripts/sampler_table.sh <ldm run> <val shards> [extra evaluate.py overrides]
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=$1; REAL=$2; shift 2
OUT=${OUT:-runs/sampler_table/$(date +%Y-%m-%d_%H-%M-%S)}
PY=${PY:-.venv/bin/python}
for combo in ddim:10 ddim:25 ddim:50 plms:10 plms:25 dpmpp_2m:10 dpmpp_2m:20; do
  sampler=${combo%%:*}; steps=${combo##*:}
  $PY evaluate.py ckpt="$RUN" real="$REAL" sampler="$sampler" steps="$steps" hydra.run.dir="$OUT/$sampler-$steps" "$@"
done
$PY - "$OUT" <<'PY'
import json, sys
from pathlib import Path
rows = []
for path in sorted(Path(sys.argv[1]).glob("*/metrics.json")):
    m = json.loads(path.read_text())
    metrics, settings = m.get("metrics", m), m.get("settings", m)
    rows.append((settings.get("sampler"), settings.get("steps"), metrics))
keys = [k for k in ("fid", "kid_mean", "precision", "recall") if any(k in r[2] for r in rows)]
print("| sampler | steps | " + " | ".join(keys) + " |")
print("|---|---|" + "---|" * len(keys))
for sampler, steps, metrics in sorted(rows, key=lambda r: (r[0], int(r[1]))):
    print(f"| {sampler} | {steps} | " + " | ".join(f"{metrics[k]:.4g}" if k in metrics else "-" for k in keys) + " |")
PY
