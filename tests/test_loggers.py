"""wandb runs offline without credentials and writes into the run folder."""
from __future__ import annotations

from ldm.utils.loggers import wandb_has_credentials, wandb_logger


def test_wandb_is_offline_without_a_key_and_logs_into_the_run_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    assert not wandb_has_credentials()
    logger = wandb_logger(save_dir=str(tmp_path / "run"), project="ldm-test", name="t", tags=["a"])
    logger.log_metrics({"train/loss": 1.5}, step=1)
    logger.experiment.finish()
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_has_credentials()
