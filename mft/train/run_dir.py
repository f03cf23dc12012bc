"""A run dir that a failed start leaves behind, and removing it.

Hydra creates the run dir (outputs/<date>/<time>/ by default) with .hydra/ and train.log before
mft-train's task function runs. When the config turns out to be wrong, that folder holds nothing
of use; left there, every typo adds one. So the task function notes at its start whether the run
dir is one this job has just made (nothing but Hydra's files and an empty log), and on an error
before the run has written anything else it removes that folder. A run dir that held anything
before, such as an earlier run being resumed, is never touched, nor is any folder that existed
before Hydra ran (mft-train notes the deepest one before it starts Hydra).
"""

from pathlib import Path

# What Hydra writes into a fresh run dir before the task function runs.
_HYDRA_FILES = {".hydra", "train.log"}
_HYDRA_CONFIGS = {"config.yaml", "hydra.yaml", "overrides.yaml"}
# ... and what mft-train writes before training produces anything (metrics, checkpoints, a base model).
_BEFORE_TRAINING = _HYDRA_FILES | {"resolved_config.yaml"}


def _holds_only(folder: Path, names: set[str]) -> bool:
    hydra = folder / ".hydra"
    return ({p.name for p in folder.iterdir()} <= names
            and (not hydra.exists() or (hydra.is_dir() and {p.name for p in hydra.iterdir()} <= _HYDRA_CONFIGS)))


def is_new_run_dir(folder: Path) -> bool:
    """True when `folder` holds nothing but what Hydra has just written for this job (an empty log)."""
    log = folder / "train.log"
    return folder.is_dir() and _holds_only(folder, _HYDRA_FILES) and (not log.exists() or log.stat().st_size == 0)


def remove_unused_run_dir(folder: Path, existed: Path) -> None:
    """Remove a run dir that was new at the start (is_new_run_dir) and still holds nothing a run
    produced, then its parents that this leaves empty, up to `existed`: the deepest of the run
    dir's folders that existed before Hydra made any (a folder the user made is never removed)."""
    folder, existed = folder.resolve(), existed.resolve()
    if folder == existed or existed not in folder.parents:
        return
    if not folder.is_dir() or not _holds_only(folder, _BEFORE_TRAINING):
        return
    for name in _BEFORE_TRAINING:
        path = folder / name
        if path.is_dir():
            for config in path.iterdir():
                config.unlink()
            path.rmdir()
        elif path.exists():
            path.unlink()
    folder.rmdir()
    for parent in folder.parents:
        if parent == existed or any(parent.iterdir()):
            break
        parent.rmdir()
