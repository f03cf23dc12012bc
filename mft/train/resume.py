"""Resuming a run safely: a fresh run never lands on another run's files, a resume trains on the
base its checkpoint trained on (a random base is loaded from the run's base_model/, never drawn
or written again), and what the checkpoint recorded is checked against this run's config."""

import logging
from pathlib import Path
from typing import Optional

from mft.checkpoint.train_state import TrainerState
from mft.config import TrainConfig
from mft.utils.errors import MftError

log = logging.getLogger(__name__)


def check_run_dir(run_dir: Path, resuming: bool) -> None:
    """A fresh run must not mix its files into another run's (or replace its base_model/)."""
    existing = [name for name in ("checkpoints", "base_model") if (run_dir / name).exists()]
    if existing and not resuming:
        raise MftError(
            f"the run dir {run_dir} already holds a run ({', '.join(n + '/' for n in existing)}). Continue it with "
            "resume=auto, or start this run in a new folder (leave hydra.run.dir at its default)."
        )


def base_weights(cfg: TrainConfig, run_dir: Path, resume_from: Optional[Path]) -> Optional[Path]:
    """The random base an earlier start of this run drew and saved, which a resume must train on again."""
    if cfg.model.checkpoint is not None or not cfg.resume:
        return None
    source = resume_from.parents[1] if resume_from is not None else run_dir
    folder = source / "base_model"
    if resume_from is not None and not folder.is_dir():
        raise MftError(f"resume from {resume_from}: its run trained on a random base, but {folder} is missing; "
                       "without it the adapters cannot be continued.")
    return folder if folder.is_dir() else None


def check_resume_fits(trainer: TrainerState, cfg: TrainConfig, folder: Path) -> None:
    """The resumed run must train on the base the checkpoint trained on; a new seed changes nothing."""
    base = cfg.model.checkpoint
    if trainer.seed is None:
        return  # written before mft recorded seed and base
    if (trainer.base is None) != (base is None):
        raise MftError(f"resume from {folder}: it was trained on {trainer.base or 'a random base (model.checkpoint=null)'}"
                       f", this run sets model.checkpoint={base}. Resume with the base it was trained on.")
    if base is not None and Path(base).resolve() != Path(trainer.base).resolve():
        log.warning("resume from %s: it was trained on the base %s, this run loads %s; continuing on the "
                    "assumption that they hold the same weights.", folder, trainer.base, base)
    if trainer.seed != cfg.seed:
        log.warning("resume from %s: seed=%d is ignored; the run continues with the checkpoint's random state "
                    "(seed=%d) and base.", folder, cfg.seed, trainer.seed)
