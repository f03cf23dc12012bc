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


def check_run_dir(run_dir: Path, resuming: bool, resume_from: Optional[Path]) -> None:
    """A run never mixes its files into another run's (or replaces its base_model/)."""
    existing = [name + "/" for name in ("checkpoints", "base_model") if (run_dir / name).exists()]
    if existing and not resuming:
        raise MftError(
            f"the run dir {run_dir} already holds a run ({', '.join(existing)}). Continue it with resume=auto, or "
            "start this run in a new folder (leave hydra.run.dir at its default)."
        )
    if existing and resume_from is not None and Path(run_dir).resolve() not in resume_from.resolve().parents:
        raise MftError(
            f"resume from {resume_from}: that is another run's checkpoint, and the run dir {run_dir} already holds a "
            f"run of its own ({', '.join(existing)}). Continue the other run in a new folder (leave hydra.run.dir at "
            "its default), or this one with resume=auto."
        )


def check_resume_fits(trainer: TrainerState, cfg: TrainConfig, folder: Path) -> None:
    """The resumed run must train on the kind of base the checkpoint trained on; a new seed changes nothing."""
    if trainer.seed is None:
        return  # written before mft recorded seed and base
    base = cfg.model.checkpoint
    if trainer.random_base != (base is None):
        trained_on = "a random base (model.checkpoint=null)" if trainer.random_base else trainer.base
        raise MftError(f"resume from {folder}: it was trained on {trained_on}, this run sets model.checkpoint={base}. "
                       "Resume with the base it was trained on.")
    if base is not None and trainer.base is not None and Path(base).resolve() != Path(trainer.base):
        log.warning("resume from %s: it was trained on the base %s, this run loads %s; continuing on the "
                    "assumption that they hold the same weights.", folder, trainer.base, base)
    if trainer.seed != cfg.seed:
        log.warning("resume from %s: seed=%d is ignored; the run continues with the checkpoint's random state "
                    "(seed=%d) and base.", folder, cfg.seed, trainer.seed)


def random_base_to_resume(cfg: TrainConfig, run_dir: Path, resume_from: Optional[Path],
                          trainer: Optional[TrainerState]) -> Optional[Path]:
    """The random base a resumed LoRA run trains on again: the folder its checkpoint recorded (also
    when that is another run's), else the checkpoint's own run's base_model/ (a run dir that was
    moved, or a checkpoint from before the folder was recorded). None: draw one (a fresh start, or
    full fine-tuning, whose checkpoint holds every weight)."""
    if cfg.model.checkpoint is not None or not cfg.resume or cfg.peft.method == "none":
        return None
    if resume_from is None:  # resume=auto before the first checkpoint: a base saved by an earlier start
        own = run_dir / "base_model"
        return own if own.is_dir() else None
    if trainer is not None and trainer.random_base and trainer.seed is not None and trainer.base is None:
        raise MftError(f"resume from {resume_from}: its run trained on a random base that it did not keep "
                       "(save_random_base=false), so its adapters cannot be continued. Start a new run; keep "
                       "save_random_base=true (the default) for a run you may want to resume.")
    recorded = Path(trainer.base) if trainer is not None and trainer.random_base and trainer.base else None
    beside = resume_from.parents[1] / "base_model"
    folder = recorded if recorded is not None and recorded.is_dir() else beside
    if not folder.is_dir():
        raise MftError(f"resume from {resume_from}: its run trained on a random base, but {recorded or beside} is "
                       "missing; without it the adapters cannot be continued.")
    if recorded is not None and folder != recorded:
        log.warning("resume from %s: its base %s is gone; using %s beside the checkpoint.", resume_from, recorded,
                    folder)
    return folder
