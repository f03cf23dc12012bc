"""Reading run dirs and sweep dirs as they are now, finished or not.

A run dir (hydra.run.dir, or <sweep dir>/<N>/ for each point of `mft-train -m`) holds
.hydra/overrides.yaml (the command line's overrides), resolved_config.yaml, metrics.jsonl (its
records: mft/train/metrics.py) and checkpoints/step_N/. A run still going reads as far as it got;
a line of metrics.jsonl that cannot be read (cut short by a crash, garbled) becomes a problem
naming file:line, and the other lines still count.
"""

import json
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from mft.train.metrics import METRICS_FILE, RunStatus
from mft.utils.errors import MftError

RUNNING = "running or killed"  # no summary record yet: still going, or stopped without a chance to write one
CONFIG_FILE = "resolved_config.yaml"
OVERRIDES_FILE = Path(".hydra") / "overrides.yaml"
SWEEP_FILE = "multirun.yaml"  # what Hydra writes into a sweep dir


@dataclass(frozen=True)
class Run:
    """One run dir as read now."""

    path: Path
    overrides: Dict[str, str]  # key -> value as typed on the command line; Hydra's own keys left out
    config: Dict[str, Any]  # resolved_config.yaml; {} before the run wrote it
    records: List[Dict[str, Any]]  # metrics.jsonl's step records in order, the summary left out
    summary: Optional[Dict[str, Any]]  # the last summary record; None while there is none
    checkpoints: List[Tuple[int, Path]]  # (step, checkpoints/step_N) by step
    problems: List[str]  # "file:line: what is wrong" for what could not be read

    @property
    def status(self) -> str:
        """finished, preempted or failed (the summary says so), else RUNNING."""
        if self.summary is None:
            return RUNNING
        if "status" in self.summary:
            return str(self.summary["status"])
        return RunStatus.preempted.value if self.summary.get("stopped_by") else RunStatus.finished.value  # older runs


def is_run_dir(path: Path) -> bool:
    """A folder mft-train has run in: Hydra's .hydra/, the resolved config or the metrics."""
    return (path / ".hydra").is_dir() or (path / METRICS_FILE).is_file() or (path / CONFIG_FILE).is_file()


def sweep_points(path: Path) -> List[Path]:
    """The run dirs directly inside `path`, numbered points first, in their order."""
    points = [p for p in path.iterdir() if p.is_dir() and is_run_dir(p)] if path.is_dir() else []
    return sorted(points, key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name))


def is_sweep_dir(path: Path) -> bool:
    """A sweep dir of mft-train -m: Hydra's multirun.yaml, or run dirs inside."""
    return (path / SWEEP_FILE).is_file() or bool(sweep_points(path))


def read_runs(paths: Sequence[Path]) -> List[Run]:
    """Each path's run, or each point of a sweep dir; a path that is neither is an MftError."""
    runs: List[Run] = []
    for path in map(Path, paths):
        if not path.is_dir():
            what = "is a file, not a folder" if path.exists() else "no such folder"
            raise MftError(f"{path}: {what}; expected a run dir or a sweep dir of mft-train.")
        if is_run_dir(path):
            runs.append(read_run(path))
        elif is_sweep_dir(path):
            runs.extend(read_run(point) for point in sweep_points(path))
        else:
            raise MftError(f"{path} is neither a run dir of mft-train (it holds no {METRICS_FILE}, {CONFIG_FILE} or "
                           f".hydra/) nor a sweep dir (no {SWEEP_FILE}, no run dirs inside).")
    return runs


def read_run(path: Path) -> Run:
    """A run dir as it is now; what cannot be read is in Run.problems, never an exception."""
    problems: List[str] = []
    records, summary = _read_metrics(path / METRICS_FILE, problems)
    return Run(path=path, overrides=_read_overrides(path / OVERRIDES_FILE, problems),
               config=_read_yaml_mapping(path / CONFIG_FILE, problems), records=records, summary=summary,
               checkpoints=_checkpoints(path), problems=problems)


def _read_metrics(path: Path, problems: List[str]) -> Tuple[List[Dict[str, Any]], Optional[Dict[str, Any]]]:
    """(step records, last summary) of metrics.jsonl; a line that is not a record is a problem and skipped."""
    if not path.is_file():
        return [], None
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except OSError as e:
        problems.append(f"{path}: cannot be read ({e.strerror or e}); no metrics shown")
        return [], None
    records, summary = [], None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"{path}:{number}: not a JSON record ({e.msg}, column {e.colno}); line skipped")
            continue
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            problems.append(f'{path}:{number}: expected a JSON object with an integer "step"; line skipped')
        elif record.get("summary"):
            summary = record
        else:
            records.append(record)
    return records, summary


def _read_yaml(path: Path, problems: List[str]) -> Any:
    if not path.is_file():
        return None
    try:
        return yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError, OSError) as e:
        problems.append(f"{path}: not readable YAML ({type(e).__name__}); ignored")
        return None


def _read_yaml_mapping(path: Path, problems: List[str]) -> Dict[str, Any]:
    data = _read_yaml(path, problems)
    return data if isinstance(data, dict) else {}


def _read_overrides(path: Path, problems: List[str]) -> Dict[str, str]:
    """`key=value` overrides as {key: value}; `~key` (a deletion) as {key: "~"}; Hydra's own keys left out."""
    data = _read_yaml(path, problems)
    overrides = {}
    for item in data if isinstance(data, list) else []:
        text = str(item)
        key, sep, value = text.lstrip("+~").partition("=")
        if key == "hydra" or key.startswith(("hydra.", "hydra/")):
            continue
        overrides[key] = value if sep else "~"
    return overrides


def _checkpoints(path: Path) -> List[Tuple[int, Path]]:
    """checkpoints/step_N folders (a save in progress has a dotted name and is not one)."""
    folders = (path / "checkpoints").glob("step_*")
    return sorted((int(p.name[5:]), p) for p in folders if p.is_dir() and p.name[5:].isdigit())


def run_names(runs: Sequence[Run]) -> List[str]:
    """Each run's path relative to the folder all share (a sweep's points: 0, 1, ...)."""
    if len(runs) == 1:
        return [runs[0].path.name or str(runs[0].path)]
    common = os.path.commonpath([str(run.path.resolve()) for run in runs])
    return [os.path.relpath(run.path.resolve(), common) for run in runs]


def evaluations(run: Run) -> List[Dict[str, Any]]:
    """The records of each evaluation, in order (valid_loss is None where it was not finite)."""
    return [r for r in run.records if "valid_loss" in r]


def best_evaluation(run: Run) -> Optional[Dict[str, Any]]:
    """The evaluation with the lowest finite valid_loss (the first of equals)."""
    scored = [r for r in evaluations(run) if isinstance(r["valid_loss"], (int, float))]
    return min(scored, key=lambda r: r["valid_loss"]) if scored else None


def final_evaluation(run: Run) -> Optional[Dict[str, Any]]:
    """The latest evaluation's record."""
    evals = evaluations(run)
    return evals[-1] if evals else None


def last_step(run: Run) -> Optional[int]:
    """The step the run has reached: its summary's, else its latest record's."""
    if run.summary is not None:
        return run.summary["step"]
    return max((r["step"] for r in run.records), default=None)


def median_tokens_per_s(run: Run) -> Optional[float]:
    """Over the train records: the median ignores the first window's warm-up (compilation, caches)."""
    speeds = [r["tokens_per_s"] for r in run.records if isinstance(r.get("tokens_per_s"), (int, float))]
    return statistics.median(speeds) if speeds else None


def best_checkpoint(run: Run) -> Optional[Tuple[int, Path, float]]:
    """(step, folder, valid_loss) of the saved checkpoint with the lowest valid_loss at its step, if any was evaluated."""
    losses = {r["step"]: r["valid_loss"] for r in evaluations(run) if isinstance(r["valid_loss"], (int, float))}
    scored = [(step, folder, losses[step]) for step, folder in run.checkpoints if step in losses]
    return min(scored, key=lambda c: c[2]) if scored else None


def tokens_per_step(run: Run) -> Optional[int]:
    """Input positions per optimizer step over all ranks (batch_size x grad_accum x seq_len x ranks: batches
    are packed to seq_len, so this is what tokens_per_s counts), when the config and summary say them."""
    config, summary = run.config, run.summary or {}
    values = [config.get("batch_size"), config.get("grad_accum"), (config.get("data") or {}).get("seq_len"),
              summary.get("world_size")]
    if not all(isinstance(v, int) and v > 0 for v in values):
        return None
    batch_size, grad_accum, seq_len, world_size = values
    return batch_size * grad_accum * seq_len * world_size


def with_failures(runs: List[Run], failed: Dict[str, Tuple[str, Dict[str, str]]]) -> List[Run]:
    """`runs` with each run dir of `failed` (path -> (error, overrides)) shown as that failure: a
    failed start in an earlier run's folder does not show the earlier run's results, and a point
    that failed before its folder held anything still gets its row."""
    shown = []
    for run in runs:
        if str(run.path) in failed and run.status != RunStatus.failed:  # its own failed summary says more
            run = failed_run(run.path, *failed[str(run.path)], overrides_read=run.overrides)
        shown.append(run)
    known = {str(run.path) for run in runs}
    shown += [failed_run(Path(path), error, overrides) for path, (error, overrides) in failed.items() if path not in known]
    return shown


def failed_run(path: Path, error: str, overrides: Dict[str, str], overrides_read: Optional[Dict[str, str]] = None) -> Run:
    """The row of a run that failed in this process, whatever its folder holds."""
    summary = {"step": 0, "summary": True, "status": RunStatus.failed.value, "error": error}
    return Run(path=path, overrides=overrides_read or overrides, config={}, records=[], summary=summary,
               checkpoints=[], problems=[])
