#!/usr/bin/env bash
# Fill .whl (git-ignored) with the wheels scripts/gpu_check.sh installs on a GPU machine that has
# torch but not the rest (scripts/gpu_wheels.txt), at the versions of constraints.txt. Run it on
# a machine with the package index, then carry .whl with the working tree (about 7 MB):
#   bash scripts/fill_wheels.sh              # uses .venv/bin/python (or $PY)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
pins=()
while read -r dist _; do
  [[ -z "$dist" || "$dist" == \#* ]] && continue
  pin=$(grep -i -E "^${dist//[-_]/[-_]}==" constraints.txt || true)
  [ -n "$pin" ] || { echo "error: $dist has no pin in constraints.txt" >&2; exit 1; }
  pins+=("$pin")
done < scripts/gpu_wheels.txt
mkdir -p .whl
# pip wheel takes published wheels as they are and builds the one sdist (antlr4) into a pure-Python wheel.
"$PY" -m pip wheel --quiet --no-deps -w .whl "${pins[@]}"
ls -1 .whl
du -sh .whl
