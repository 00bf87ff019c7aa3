"""The paper's tables and its FID-over-training figure from the results of many runs.

    python -m ldm.cli.tables runs/<sweep folder> [more folders] [--out docs/results]

Looks below the given folders for
- metrics.json written by evaluate.py (an LDM's FID / IS / precision / recall / samples/s, an
  autoencoder's rFID / PSNR / SSIM), each tied to its training run through the checkpoint;
- <run>/metrics/eval.jsonl written by the evaluation callback (one line per evaluation);
- each run's config.yaml, for what the results do not say themselves: f, first-stage kind,
  conditioning, and which autoencoder run an LDM was trained on (`first_stage.path`).

Prints three markdown tables and writes them (tables.md, one CSV each) with fid_vs_steps.png
(and fid_vs_time.png where the curves carry training time) into --out:
- compression: the trade-off over f (paper Fig. 6 / Tab. 8): per LDM run its f, its first
  stage's rFID, PSNR, SSIM and LPIPS, and its FID with the bootstrap interval of evaluate.py's
  `fid_bootstrap`, IS, precision, recall, prompt accuracy (text models on the shapes data),
  sampling speed and training speed (steps per second of training, evaluations left out);
  autoencoder runs no LDM uses get a row of their own;
- unconditional (paper Tab. 1): FID, precision, recall with the sampling protocol;
- text-conditional (paper Tab. 2): FID, IS, prompt accuracy and CLIP score with the guidance scale.
An LDM's numbers come from its evaluate.py record at the highest step (the newest if several),
else from the last line of its eval.jsonl. The figure plots every eval.jsonl (or, for runs without
one, their evaluate.py records) as FID against training steps, one line per run, labelled by f.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
from ldm.utils.plots import plot_curves
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

_FIRST_STAGE_KINDS = {"autoencoder_kl": "kl", "autoencoder_vq": "vq", "identity": "identity"}
# What results say about their run (ldm.evaluation.describe.describe_model).
_DESCRIPTION = ("f", "first_stage", "conditioning", "cond_key")


@dataclass
class Run:
    """Everything found about one training run."""

    path: Path
    kind: str | None = None  # 'ldm' or 'autoencoder'
    info: dict[str, Any] = field(default_factory=dict)  # f, first_stage, conditioning, cond_key
    first_stage_run: Path | None = None  # the autoencoder run an LDM was trained on
    evaluations: list[dict] = field(default_factory=list)  # evaluate.py records
    curve: list[dict] = field(default_factory=list)  # eval.jsonl lines

    def best_evaluation(self) -> dict | None:
        """The evaluate.py record at the highest step, the newest among equals."""
        if not self.evaluations:
            return None
        return max(self.evaluations, key=lambda r: (r["run"].get("global_step") or -1, r.get("written", "")))

    def train_steps_per_s(self) -> float | None:
        """Training steps per second of wall-clock training (evaluations left out), from the last
        eval.jsonl line that carries `train_seconds` (ldm.callbacks.evaluation)."""
        timed = [x for x in self.curve if x.get("train_seconds")]
        if not timed:
            return None
        line = max(timed, key=lambda x: x["global_step"])
        return line["global_step"] / line["train_seconds"]

    def results(self) -> dict[str, Any]:
        """Metrics and protocol of the run's headline evaluation (see the module docstring)."""
        record = self.best_evaluation()
        if record is not None:
            s = record["settings"]
            return {**record["metrics"], "step": record["run"].get("global_step"), "n": record.get("n"),
                    "samples_per_s": record.get("samples_per_s"), "sampler": s.get("sampler"),
                    "steps": s.get("steps"), "eta": s.get("eta"), "guidance": s.get("guidance")}
        if self.curve:
            line = max(self.curve, key=lambda x: x["global_step"])
            return {**line["metrics"], "step": line["global_step"], "n": line.get("n"),
                    "samples_per_s": line.get("samples_per_s"), "sampler": line.get("sampler"),
                    "steps": line.get("steps"), "eta": line.get("eta"), "guidance": line.get("guidance")}
        return {}


def describe_from_config(run: Path) -> tuple[str | None, dict[str, Any], Path | None]:
    """(kind, {f, first_stage, conditioning, cond_key}, autoencoder run) read from run/config.yaml."""
    path = run / "config.yaml"
    if not path.is_file():
        return None, {}, None
    cfg = OmegaConf.to_container(OmegaConf.load(path))
    target = str((cfg.get("model") or {}).get("_target_", ""))
    kind = "ldm" if target.endswith("LatentDiffusion") else ("autoencoder" if target.endswith("AutoencoderModule")
                                                             else None)
    stage = cfg.get("first_stage") or {}
    stage_target = str(stage.get("_target_", "")).rsplit(".", 1)[-1]
    info: dict[str, Any] = {}
    ae_run = None
    if stage_target == "load_first_stage" and stage.get("path"):
        ae_run = Path(stage["path"])
        ae_run = ae_run.parent.parent if ae_run.suffix == ".ckpt" else ae_run
        info = {k: v for k, v in describe_from_config(ae_run)[1].items() if k in ("f", "first_stage")}
    elif stage_target in _FIRST_STAGE_KINDS:
        info = {"f": stage.get("f", 1), "first_stage": _FIRST_STAGE_KINDS[stage_target]}
    if kind == "ldm":
        cond = cfg.get("cond") or {}
        info.update(conditioning=cond.get("conditioning_key"), cond_key=cond.get("key"))
    return kind, info, ae_run


def _run_dir(record: dict) -> Path | None:
    run = record.get("run") or {}
    if run.get("run_dir"):
        return Path(run["run_dir"])
    ckpt = Path(run["ckpt"]) if run.get("ckpt") else None
    return None if ckpt is None else (ckpt if ckpt.is_dir() else ckpt.parent.parent)


def collect(roots: Sequence[str | Path]) -> dict[Path, Run]:
    """Every run with results below `roots`, keyed by its resolved folder."""
    runs: dict[Path, Run] = {}

    def get(path: Path) -> Run:
        key = path.resolve()
        return runs.setdefault(key, Run(key))

    for root in map(Path, roots):
        if not root.is_dir():
            raise FileNotFoundError(f"{root} is not a folder; pass run or sweep folders")
        for path in sorted(root.rglob("metrics.json")):
            record = json.loads(path.read_text())
            if record.get("kind") in ("ldm", "autoencoder") and _run_dir(record) is not None:
                get(_run_dir(record)).evaluations.append(record)
        for path in sorted(root.rglob("eval.jsonl")):
            if path.parent.name == "metrics":
                lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
                get(path.parent.parent).curve.extend(lines)
    for run in runs.values():
        kind, info, run.first_stage_run = describe_from_config(run.path)
        record = run.best_evaluation()
        if record is not None:  # what the loaded model said beats the config
            kind = record["kind"]
            info.update({k: v for k, v in record["run"].items() if k in _DESCRIPTION})
        elif run.curve:
            kind = "ldm"
            info.update({k: run.curve[-1][k] for k in _DESCRIPTION if k in run.curve[-1]})
        run.kind, run.info = kind, info
        if run.first_stage_run is not None:
            run.first_stage_run = run.first_stage_run.resolve()
    return runs


def _name(run: Run, roots: Sequence[Path]) -> str:
    for root in roots:
        try:
            return str(run.path.relative_to(root.resolve())) or run.path.name
        except ValueError:
            continue
    return str(run.path)


COMPRESSION = ["run", "f", "first_stage", "rFID", "PSNR", "SSIM", "LPIPS", "FID", "FID 95%", "IS", "precision", "recall",
               "prompt acc", "samples/s", "train steps/s", "step"]
UNCONDITIONAL = ["run", "f", "first_stage", "step", "sampler", "steps", "eta", "n", "FID", "precision", "recall"]
TEXT = ["run", "f", "first_stage", "step", "sampler", "steps", "guidance", "n", "FID", "IS", "prompt acc", "CLIP score"]


def _first_stage_columns(res: dict[str, Any]) -> dict[str, Any]:
    return {"rFID": res.get("rfid"), "PSNR": res.get("psnr"), "SSIM": res.get("ssim"), "LPIPS": res.get("lpips")}


def _interval(low: float | None, high: float | None) -> str | None:
    return None if low is None or high is None else f"{low:.2f}-{high:.2f}"


def build_tables(runs: dict[Path, Run], roots: Sequence[Path]) -> dict[str, list[dict[str, Any]]]:
    """Rows of the compression, unconditional and text-conditional tables (column names as above)."""
    ldms = sorted((r for r in runs.values() if r.kind == "ldm"),
                  key=lambda r: (r.info.get("f") is None, r.info.get("f") or 0, _name(r, roots)))
    used = {r.first_stage_run for r in ldms}
    compression, unconditional, text = [], [], []
    for run in ldms:
        res = run.results()
        ae = runs.get(run.first_stage_run) if run.first_stage_run else None
        ae_res = ae.results() if ae is not None else {}
        base = {"run": _name(run, roots), "f": run.info.get("f"), "first_stage": run.info.get("first_stage")}
        compression.append({**base, **_first_stage_columns(ae_res), "FID": res.get("fid"),
                            "FID 95%": _interval(res.get("fid_low"), res.get("fid_high")),
                            "IS": res.get("is_mean"), "precision": res.get("precision"), "recall": res.get("recall"),
                            "prompt acc": res.get("prompt_accuracy"), "samples/s": res.get("samples_per_s"),
                            "train steps/s": run.train_steps_per_s(), "step": res.get("step")})
        protocol = {k: res.get(k) for k in ("step", "sampler", "steps", "n")}
        if run.info.get("conditioning") is None:
            unconditional.append({**base, **protocol, "eta": res.get("eta"), "FID": res.get("fid"),
                                  "precision": res.get("precision"), "recall": res.get("recall")})
        elif run.info.get("cond_key") == "caption":
            text.append({**base, **protocol, "guidance": res.get("guidance"), "FID": res.get("fid"),
                         "IS": res.get("is_mean"), "prompt acc": res.get("prompt_accuracy"),
                         "CLIP score": res.get("clip_score")})
    for run in sorted((r for r in runs.values() if r.kind == "autoencoder" and r.path not in used),
                      key=lambda r: (r.info.get("f") or 0, _name(r, roots))):
        res = run.results()
        compression.append({"run": _name(run, roots), "f": run.info.get("f"),
                            "first_stage": run.info.get("first_stage"), **_first_stage_columns(res),
                            "step": res.get("step")})
    return {"compression": compression, "unconditional": unconditional, "text": text}


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}" if math.isfinite(value) else str(value)
    return str(value)


def markdown(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    """A markdown table of `rows` (missing values as '-', floats to 2 decimals)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_csv(path: Path, rows: list[dict[str, Any]], columns: Sequence[str]) -> None:
    """`rows` as CSV with a header line; missing values are empty cells, numbers at full precision."""
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows({c: row.get(c) for c in columns} for row in rows)


def fid_curves(runs: dict[Path, Run], roots: Sequence[Path]) -> list[tuple[str, list[int], list[float]]]:
    """(label, steps, FIDs) per run: its eval.jsonl lines, or its evaluate.py records without one."""
    curves = []
    for run in sorted(runs.values(), key=lambda r: (r.info.get("f") or 0, _name(r, roots))):
        if run.kind != "ldm":
            continue
        points = [(x["global_step"], x["metrics"]["fid"]) for x in run.curve if "fid" in x["metrics"]] or \
                 [(r["run"]["global_step"], r["metrics"]["fid"]) for r in run.evaluations
                  if "fid" in r["metrics"] and r["run"].get("global_step") is not None]
        if points:
            points.sort()
            steps, fids = [p[0] for p in points], [p[1] for p in points]
            curves.append((f"f={run.info.get('f', '?')}", steps, fids, _name(run, roots)))
    counts: dict[str, int] = {}
    for label, *_ in curves:
        counts[label] = counts.get(label, 0) + 1
    # The run name goes into the label only where f alone does not tell the lines apart.
    return [(label if counts[label] == 1 else f"{label} ({name})", steps, fids) for label, steps, fids, name in curves]


def fid_time_curves(runs: dict[Path, Run], roots: Sequence[Path]) -> list[tuple[str, list[float], list[float]]]:
    """(label, training minutes, FIDs) per run, from its eval.jsonl lines that carry train_seconds."""
    curves = []
    for run in sorted(runs.values(), key=lambda r: (r.info.get("f") or 0, _name(r, roots))):
        points = sorted((x["train_seconds"] / 60, x["metrics"]["fid"]) for x in run.curve
                        if run.kind == "ldm" and x.get("train_seconds") is not None and "fid" in x["metrics"])
        if points:
            curves.append((f"f={run.info.get('f', '?')}", [p[0] for p in points], [p[1] for p in points]))
    return curves


def plot_fid_curves(curves: list[tuple[str, list[int], list[float]]], path: Path) -> None:
    """FID against training steps, one line per run (the paper's Fig. 6), as a PNG."""
    plot_curves(curves, path, "training steps", "FID", "FID over training per downsampling factor f")


def make_tables(roots: Sequence[str | Path], out: str | Path) -> str:
    """Collect the results below `roots`, write tables.md, the CSVs and fid_vs_steps.png into
    `out`, and return the markdown."""
    roots = [Path(r) for r in roots]
    runs = collect(roots)
    if not runs:
        raise FileNotFoundError(f"no results below {', '.join(map(str, roots))}: run evaluate.py (metrics.json) or "
                                "train with the evaluation callback (metrics/eval.jsonl) first")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tables = build_tables(runs, roots)
    titles = {"compression": ("Compression trade-off over f (paper Fig. 6, Tab. 8)", COMPRESSION),
              "unconditional": ("Unconditional image synthesis (paper Tab. 1)", UNCONDITIONAL),
              "text": ("Text-conditional image synthesis (paper Tab. 2)", TEXT)}
    parts = []
    for key, (title, columns) in titles.items():
        write_csv(out / f"{key}.csv", tables[key], columns)
        parts.append(f"## {title}\n\n" + (markdown(tables[key], columns) if tables[key] else "(no runs)"))
    curves = fid_curves(runs, roots)
    if curves:
        plot_fid_curves(curves, out / "fid_vs_steps.png")
        parts.append("![FID over training steps](fid_vs_steps.png)")
    else:
        parts.append("(no FID evaluations over training: no fid_vs_steps.png)")
    timed = fid_time_curves(runs, roots)
    if timed:  # the paper's efficiency view: quality against the compute spent
        plot_curves(timed, out / "fid_vs_time.png", "training time (min, evaluations left out)", "FID",
                    "FID against training time per downsampling factor f")
        parts.append("![FID against training time](fid_vs_time.png)")
    text = "\n\n".join(parts) + "\n"
    (out / "tables.md").write_text(text)
    return text


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: python -m ldm.cli.tables FOLDER [FOLDER ...] [--out DIR]."""
    parser = argparse.ArgumentParser(prog="python -m ldm.cli.tables", description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", help="run or sweep folders to search for results")
    parser.add_argument("--out", default=None, help="where tables.md, the CSVs and the figure go "
                                                    "(default: <first folder>/tables)")
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else Path(args.folders[0]) / "tables"
    try:
        print(make_tables(args.folders, out))
    except FileNotFoundError as err:
        parser.error(str(err))  # a usage error: message and exit status 2, no traceback
    print(f"written to {out}")


if __name__ == "__main__":
    main()
