"""Logger construction that never blocks a run on a missing account."""
from __future__ import annotations

import os
from pathlib import Path

from pytorch_lightning.loggers import WandbLogger


def wandb_has_credentials() -> bool:
    """True when an API key is in the environment or a `wandb login` left one in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def wandb_logger(save_dir: str, project: str = "ldm", name: str | None = None, tags: list[str] | None = None,
                 offline: bool | None = None, id: str | None = None, **kwargs) -> WandbLogger:
    """A WandbLogger that is offline unless told otherwise or credentials exist.

    WANDB_MODE=offline in the environment always wins. `id` continues an earlier run.
    """
    if offline is None:
        offline = os.environ.get("WANDB_MODE") == "offline" or not wandb_has_credentials()
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    return WandbLogger(save_dir=save_dir, project=project, name=name, tags=list(tags or []),
                       offline=offline, id=id, **kwargs)
