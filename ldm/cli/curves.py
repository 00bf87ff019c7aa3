"""Plot logged metrics of runs against training steps: `python -m ldm.cli.curves RUN [RUN ...]
--metric train/loss_simple --out curve.png` (reads each run's csv/metrics.csv)."""
from __future__ import annotations

import argparse
import csv
from collections.abc import Sequence
from pathlib import Path

from ldm.utils.plots import plot_curves


def read_metric(run: str | Path, metric: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `metric` in a run's CSV log, in step order."""
    path = Path(run) / "csv" / "metrics.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: pass a run folder written by train.py")
    steps, values = [], []
    with path.open(newline="") as fh:
        for row in csv.DictReader(fh):
            if row.get(metric) not in (None, ""):
                steps.append(int(row["step"]))
                values.append(float(row[metric]))
    if not steps:
        raise ValueError(f"{path} has no values of {metric!r}")
    return steps, values


def smooth(values: Sequence[float], window: int) -> list[float]:
    """Trailing moving average over `window` points (1: unchanged)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m ldm.cli.curves", description=__doc__)
    p.add_argument("runs", nargs="+", help="run folders")
    p.add_argument("--metric", default="train/loss_simple", help="a column of csv/metrics.csv")
    p.add_argument("--smooth", type=int, default=1, help="moving-average window in logged points")
    p.add_argument("--logy", action="store_true", help="logarithmic y axis")
    p.add_argument("--out", required=True, help="PNG to write")
    args = p.parse_args(argv)
    curves = []
    for run in args.runs:
        steps, values = read_metric(run, args.metric)
        curves.append((Path(run).name, steps, smooth(values, args.smooth)))
    plot_curves(curves, args.out, "training step", args.metric, args.metric, logy=args.logy)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
