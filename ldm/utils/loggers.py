"""Logger construction that never blocks a run on a missing account, and that continues the logs
of a run resumed in its own folder (CSV rows appended, the same wandb run)."""
from __future__ import annotations

import csv
import os
import uuid
from pathlib import Path

from pytorch_lightning.loggers import CSVLogger, WandbLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.loggers.logger import rank_zero_experiment
from pytorch_lightning.utilities import rank_zero_info

WANDB_ID_FILE = "run_id"  # in <save_dir>/wandb/


def wandb_has_credentials() -> bool:
    """True when an API key is in the environment or a `wandb login` left one in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def wandb_logger(save_dir: str, project: str = "ldm", name: str | None = None, tags: list[str] | None = None,
                 offline: bool | None = None, id: str | None = None, **kwargs) -> WandbLogger:
    """A WandbLogger that is offline unless told otherwise or credentials exist.

    WANDB_MODE=offline in the environment always wins. The run id is kept in
    <save_dir>/wandb/run_id, so a run resumed in the same folder logs into the same wandb run;
    `id` names another run to continue.
    """
    if offline is None:
        offline = os.environ.get("WANDB_MODE") == "offline" or not wandb_has_credentials()
    id_file = Path(save_dir) / "wandb" / WANDB_ID_FILE
    id_file.parent.mkdir(parents=True, exist_ok=True)
    if id is None:
        id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:8]
    id_file.write_text(id)
    return WandbLogger(save_dir=save_dir, project=project, name=name, tags=list(tags or []),
                       offline=offline, id=id, resume="allow", **kwargs)


def _step(row: dict) -> int:
    return int(float(row["step"]))


def _filled(value) -> bool:
    """False for the empty cells of a CSV row."""
    return value not in ("", None)


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing metrics.csv; this one keeps its rows and header
    (`replace_from` drops those a resumed run logs again)."""

    def _check_log_dir_exists(self) -> None:  # called by __init__ before anything is written
        self._earlier_rows = 0  # rows in the file from earlier attempts
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as fh:
                reader = csv.DictReader(fh)
                self.metrics_keys = list(reader.fieldnames or [])
                self._earlier_rows = sum(1 for _ in reader)

    def replace_from(self, step: int) -> None:
        """Remove the earlier attempts' rows of steps >= `step`: this run logs those steps again.
        Of this run's own rows from before `step` (logged while it set up, e.g. lr/effective at
        step 0) the metrics an earlier attempt already logged at that step are left out."""
        if not self._earlier_rows:
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as fh:
            rows = list(csv.DictReader(fh))
        earlier, own = rows[:self._earlier_rows], rows[self._earlier_rows:]
        kept = [row for row in earlier if _step(row) < step]
        logged = {(_step(row), key) for row in kept for key, value in row.items() if _filled(value)}

        def new_only(row: dict) -> dict | None:
            if _step(row) >= step:
                return row
            fresh = {k: v for k, v in row.items()
                     if k in ("step", "epoch") or (_filled(v) and (_step(row), k) not in logged)}
            return fresh if set(fresh) - {"step", "epoch"} else None

        kept_own = [r for r in map(new_only, own) if r is not None]
        self.metrics = [r for r in map(new_only, self.metrics) if r is not None]
        if len(kept) < len(earlier):
            rank_zero_info(f"{self.metrics_file_path}: {len(earlier) - len(kept)} row(s) of steps {step} and later, "
                           "logged by an earlier attempt after its last checkpoint, replaced by this run's")
        tmp = f"{self.metrics_file_path}.tmp"
        with self._fs.open(tmp, "w", newline="") as fh:  # a kill during the rewrite leaves the old file
            writer = csv.DictWriter(fh, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(kept + kept_own)
        self._fs.mv(tmp, self.metrics_file_path)
        self._earlier_rows = len(kept)


class AppendingCSVLogger(CSVLogger):
    """CSVLogger that appends to the metrics.csv of a run resumed in its folder instead of
    replacing it (new columns are merged into the header). `replace_from(step)` (called by
    ldm.callbacks.resumed_logs.ResumedLogs as training starts) drops what an earlier attempt
    logged from the step this run continues at, so no step is logged twice."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment

    def replace_from(self, step: int) -> None:
        """Drop the rows earlier attempts logged at steps >= `step` (see _AppendingWriter.replace_from)."""
        self.experiment.replace_from(step)
