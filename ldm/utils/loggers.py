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


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing metrics.csv; this one keeps its rows and header."""

    def _check_log_dir_exists(self) -> None:  # called by __init__ before anything is written
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as fh:
                self.metrics_keys = next(csv.reader(fh), [])


class AppendingCSVLogger(CSVLogger):
    """CSVLogger that appends to the metrics.csv of a run resumed in its folder instead of
    replacing it (new columns are merged into the header)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment
