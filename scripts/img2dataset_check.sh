#!/usr/bin/env bash
# Real img2dataset output into our real train.py, as a user would run them (tests/test_img2dataset.py,
# marker `slow`). img2dataset 1.47 requires webdataset<0.3 and we pin webdataset 1.0.2, so it lives in
# its own venv under $WORK, never in ours:
#   1. $WORK/img2dataset-venv: `pip install img2dataset==1.47.0` from PyPI (kept: a rerun reuses it);
#   2. 300 generated 64 px PNGs (the built-in shapes) and their captions, served by a loopback
#      `python -m http.server`; the URL list (CSV url,caption) adds one URL that answers 404;
#   3. img2dataset --output_format webdataset (32 px centre crops, 100 per shard) into $WORK/shards;
#   4. train.py experiment=toy/ae_kl on that folder as it is (tars + .parquet + _stats.json) for a
#      few steps, then check the run's metrics.json.
#   bash scripts/img2dataset_check.sh                 # WORK=/tmp/img2dataset_check
# Environment: WORK (scratch folder), PY (the interpreter of the img2dataset venv, default python3),
# LDM_PYTHON (our venv's interpreter, default .venv/bin/python), STEPS (training steps, default 5).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-/tmp/img2dataset_check}
PY=${PY:-python3}
LDM_PYTHON=${LDM_PYTHON:-.venv/bin/python}
STEPS=${STEPS:-5}
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline
export NO_ALBUMENTATIONS_UPDATE=1  # albumentations would look for a newer version online
t0=$(date +%s)

VENV=$WORK/img2dataset-venv
if ! "$VENV/bin/python" -c "import img2dataset" 2>/dev/null; then
  echo "== installing img2dataset==1.47.0 into $VENV (pandas, pyarrow, opencv, albumentations: minutes)"
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check img2dataset==1.47.0
fi
echo "== img2dataset $("$VENV/bin/pip" show img2dataset | sed -n 's/^Version: //p') ready after $(( $(date +%s) - t0 )) s"

rm -rf "$WORK/site" "$WORK/shards" "$WORK/run"
PORT=$("$LDM_PYTHON" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
"$LDM_PYTHON" - "$WORK" "$PORT" <<'EOF'
import csv, sys
from pathlib import Path
from ldm.data.synthetic import ShapesGenerator
work, port = Path(sys.argv[1]), sys.argv[2]
(work / "site").mkdir()
gen = ShapesGenerator(64, seed=7)
with open(work / "urls.csv", "w", newline="") as fh:
    rows = csv.writer(fh)
    rows.writerow(["url", "caption"])
    for i in range(300):
        s = gen[i]
        s.image.save(work / "site" / f"{i:04d}.png")
        rows.writerow([f"http://127.0.0.1:{port}/{i:04d}.png", s.caption])
    rows.writerow([f"http://127.0.0.1:{port}/missing.png", "a URL that answers 404"])
EOF
"$LDM_PYTHON" -m http.server "$PORT" --bind 127.0.0.1 --directory "$WORK/site" >"$WORK/http.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 50); do
  "$LDM_PYTHON" -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$PORT/0000.png')" 2>/dev/null && break
  sleep 0.2
done

echo "== img2dataset: 301 URLs from http://127.0.0.1:$PORT"
t1=$(date +%s)
"$VENV/bin/img2dataset" --url_list "$WORK/urls.csv" --input_format csv --url_col url --caption_col caption \
  --output_format webdataset --output_folder "$WORK/shards" --image_size 32 --resize_mode center_crop \
  --number_sample_per_shard 100 --processes_count 1 --thread_count 8 --distributor multiprocessing \
  --enable_wandb False --retries 0
echo "== img2dataset took $(( $(date +%s) - t1 )) s; its folder: $(cd "$WORK/shards" && ls | tr '\n' ' ')"

echo "== train.py experiment=toy/ae_kl data.train_urls=$WORK/shards ($STEPS steps)"
t2=$(date +%s)
"$LDM_PYTHON" train.py experiment=toy/ae_kl data=shards data.train_urls="$WORK/shards" \
  data.val_urls="$WORK/shards" data.image_size=32 data.batch_size=8 data.batches_per_epoch="$STEPS" \
  data.num_workers=2 data.val_max_samples=16 trainer.max_epochs=1 trainer.enable_progress_bar=false \
  hydra.run.dir="$WORK/run"
"$LDM_PYTHON" - "$WORK" "$STEPS" <<'EOF'
import json, sys
from pathlib import Path
work, steps = Path(sys.argv[1]), int(sys.argv[2])
stats = [json.loads(p.read_text()) for p in sorted((work / "shards").glob("*_stats.json"))]
downloaded = sum(s["successes"] for s in stats)
failed = sum(s["failed_to_download"] for s in stats)
assert (downloaded, failed) == (300, 1), (downloaded, failed)
metrics = json.loads((work / "run" / "metrics.json").read_text())
assert metrics["global_step"] == steps and metrics["train/rec_loss"] > 0, metrics
print(f"== img2dataset: {downloaded} images in {len(stats)} shards, {failed} URL failed; "
      f"train.py: {metrics['global_step']} steps, val/rec_loss {metrics['val/rec_loss']:.3f}")
EOF
echo "== train.py took $(( $(date +%s) - t2 )) s; all done in $(( $(date +%s) - t0 )) s"
