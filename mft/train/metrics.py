"""Where metrics go: metrics.jsonl in the run dir always, W&B when logger=wandb."""

import json
import os
from pathlib import Path
from typing import Any, Dict, Optional

from mft.config import LoggerConfig, LoggerName, WandbMode
from mft.utils.errors import MftError


class MetricsLogger:
    """Appends one JSON object per record to <run_dir>/metrics.jsonl and mirrors it to W&B."""

    def __init__(self, run_dir: Path, cfg: LoggerConfig, resolved_config: Dict[str, Any], enabled: bool = True):
        """`enabled=False` (ranks other than 0 under torchrun) records nothing."""
        self.enabled = enabled
        self._wandb = _start_wandb(run_dir, cfg, resolved_config) if enabled and cfg.name == LoggerName.wandb else None
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file = open(self.path, "a", buffering=1) if enabled else None

    def log(self, step: int, metrics: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps({"step": step, **metrics}) + "\n")
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def summary(self, values: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.log(values.get("step", 0), {"summary": True, **values})
        if self._wandb is not None:
            self._wandb.summary.update(values)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._wandb is not None:
            self._wandb.finish()


def _wandb_mode(mode: WandbMode) -> str:
    if mode != WandbMode.auto:
        return mode.value
    netrc = Path.home() / ".netrc"
    has_key = bool(os.environ.get("WANDB_API_KEY")) or (netrc.is_file() and "api.wandb.ai" in netrc.read_text())
    return "online" if has_key else "offline"


def _start_wandb(run_dir: Path, cfg: LoggerConfig, resolved_config: Dict[str, Any]) -> Optional[Any]:
    try:
        import wandb
    except ImportError:
        raise MftError('logger=wandb needs the wandb package: pip install -e ".[wandb]"') from None
    return wandb.init(
        project=cfg.project, entity=cfg.entity, dir=str(run_dir), config=resolved_config, mode=_wandb_mode(cfg.mode),
        name=Path(run_dir).name,
    )
