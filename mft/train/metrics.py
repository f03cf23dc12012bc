"""Where metrics go: metrics.jsonl in the run dir always, W&B when logger=wandb.

metrics.jsonl holds one JSON object a line: {"step": N, ...metrics} every log_every steps and at
every evaluation, and a last record {"step": N, "summary": true, "status": ..., ...}: how the run
ended (RunStatus), written by the loop when it finishes or a signal stops it, and by mft-train
(record_failure) when it fails after its run dir existed. No summary: the run is still going, or
was killed before it could write one. mft/report reads this file.

A train record holds train_loss, lr, grad_norm and the speeds (mft/train/loop.py, StepWindow), and
for a mixture of experts the routers' statistics over the same steps (mft/train/routing.py,
RoutingWindow.record): expert_tokens (a list, one count per expert), expert_load_max and
router_aux_loss. W&B gets a list as one series per item (expert_tokens/0, expert_tokens/1, ...).
The summary also holds parameters, active_parameters (per token) and trainable_parameters.
"""

import json
import math
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

from mft.config import LoggerConfig, LoggerName, WandbMode
from mft.utils.choice import Choice
from mft.utils.errors import MftError

METRICS_FILE = "metrics.jsonl"


class RunStatus(Choice):
    """How a run ended, as its summary record says."""

    finished = "finished"  # trained all its steps
    preempted = "preempted"  # a signal (SIGTERM, Ctrl-C) stopped it after saving a checkpoint: resume=auto continues
    failed = "failed"  # an error stopped it; the summary's "error" holds its message


class StartupTimes:
    """Where the time from the start of train() to the end of its first optimizer step goes.

    Each `phase` adds its wall time under its name; what no phase covers (config checks, the
    optimizer, ...) is "other". The summary gets `startup_s` and the parts in `startup_parts_s`.
    """

    def __init__(self, started: float) -> None:
        self.started = started
        self.parts: Dict[str, float] = {}
        self.total: Optional[float] = None  # set by `finish`, after the first step

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        begin = time.perf_counter()
        try:
            yield
        finally:
            self.parts[name] = self.parts.get(name, 0.0) + time.perf_counter() - begin

    def finish(self) -> None:
        self.total = time.perf_counter() - self.started
        self.parts["other"] = max(0.0, self.total - sum(self.parts.values()))

    def line(self) -> str:
        """"time to first step 12.3 s: data 1.2 s, model build 8.0 s, ...", for the log."""
        return f"time to first step {self.total:.1f} s: " + ", ".join(f"{name} {s:.1f} s" for name, s in self.parts.items())

    def record(self) -> Dict[str, Any]:
        """The summary's fields; none before the first step ended."""
        if self.total is None:
            return {}
        return {"startup_s": self.total, "startup_parts_s": dict(self.parts)}


class MetricsLogger:
    """Appends one JSON object per record to <run_dir>/metrics.jsonl and mirrors it to W&B."""

    def __init__(self, run_dir: Path, cfg: LoggerConfig, resolved_config: Dict[str, Any], enabled: bool = True,
                 start_step: int = 0):
        """`enabled=False` (ranks other than 0 under torchrun) records nothing. A run resumed at
        `start_step` keeps the records up to that step and drops the rest (what an interrupted start
        logged after its checkpoint, and its summary), so the file reads as one run."""
        self.enabled = enabled
        self.path = Path(run_dir) / METRICS_FILE
        # A resumed run's summary counts the wall time of its earlier starts too.
        self.earlier_wall_time_s = _keep_records_up_to(self.path, start_step) if enabled else 0.0
        self._wandb = _start_wandb(run_dir, cfg, resolved_config) if enabled and cfg.name == LoggerName.wandb else None
        self._file = open(self.path, "a", buffering=1) if enabled else None

    def log(self, step: int, metrics: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._write({"step": step, **metrics})
        if self._wandb is not None:
            self._wandb.log(_series(metrics), step=step)

    def summary(self, values: Dict[str, Any]) -> None:
        """The run's outcome: one last record in metrics.jsonl, W&B's run summary (not charts)."""
        if not self.enabled:
            return
        self._write({"step": values.get("step", 0), "summary": True, **values})
        if self._wandb is not None:
            self._wandb.summary.update(values)

    def _write(self, record: Dict[str, Any]) -> None:
        self._file.write(json.dumps(_finite(record), allow_nan=False) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._wandb is not None:
            self._wandb.finish()


def failure_message(error: BaseException) -> str:
    """What stopped a run, in one line, for its summary."""
    if isinstance(error, MftError):
        return str(error)
    if isinstance(error, KeyboardInterrupt):
        return "interrupted (a second Ctrl-C, or one before training began): nothing more was saved"
    if isinstance(error, OSError) and error.strerror:
        return f"{error.strerror.lower()} ({error.filename})" if error.filename else error.strerror.lower()
    return f"{type(error).__name__}: {next(iter(str(error).splitlines()), '')}"


def record_failure(run_dir: Path, error: BaseException, wall_time_s: float) -> None:
    """Append the summary of a run that failed before the loop could record it: status failed, the
    error's message (failure_message), and the last step metrics.jsonl holds (0 when it holds none)."""
    path = Path(run_dir) / METRICS_FILE
    step = 0
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                step = record["step"]
    record = {"step": step, "summary": True, "status": RunStatus.failed.value, "error": failure_message(error),
              "wall_time_s": wall_time_s}
    with open(path, "a") as f:
        f.write(json.dumps(_finite(record), allow_nan=False) + "\n")


def _series(metrics: Dict[str, Any]) -> Dict[str, Any]:
    """A list of numbers as one W&B series per item (key/0, key/1, ...): W&B charts no lists."""
    flat: Dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, list):
            flat.update((f"{key}/{i}", item) for i, item in enumerate(value))
        else:
            flat[key] = value
    return flat


def _finite(value: Any) -> Any:
    """NaN and inf as null: JSON has no such numbers (json.dumps would write bare NaN, invalid JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _keep_records_up_to(path: Path, step: int) -> float:
    """Rewrite metrics.jsonl with only the records of steps <= `step` (none for a fresh start),
    summaries dropped; returns the wall time the kept part took (the last dropped summary's, which
    counts every earlier start; 0 for a fresh start)."""
    if not path.is_file():
        return 0.0
    kept, wall_time = [], 0.0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
        if not isinstance(record, dict) or not 0 < step:
            continue
        if record.get("summary"):
            wall_time = float(record.get("wall_time_s") or 0.0) if record.get("step", 0) <= step else wall_time
        elif record.get("step", 0) <= step:
            kept.append(line + "\n")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)
    return wall_time


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
