"""`mft-train`, `python -m mft.train` and `torchrun -m mft.train`: the Hydra entry point.

Thin on purpose: join the process group when launched by torchrun (before Hydra, so that all
ranks agree on one run dir), compose the config (conf/train.yaml, typed by mft.config), convert
it once into the TrainConfig dataclass, check it (mft.train.checks) and hand it to
mft.train.loop.train, and turn user errors (MftError) into one paragraph and exit 1, removing the
run dir Hydra made for this job when nothing was written into it (mft.train.run_dir).

Every run that ends with its run dir in place gets report.md and curves.png (mft.report) from rank
0, and a failure is recorded in metrics.jsonl as the run's summary (status failed, the message).
In a sweep (`mft-train -m`) a point that fails keeps its run dir and the sweep goes on to the next
point (a signal stops the point it reaches, as a checkpoint; Hydra then starts the next one); the
sweep ends with the table of its points (mft.report.callback) and exits 1 when any point did not
finish (failed, preempted, or killed).

Composing and checking need neither torch nor mistral-common: the training loop, and with it
both, is imported only once the config is good, and torch.distributed only under several
processes, so `--help` and a config error answer in about a second.
"""

import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from mft.compose import CONFIG_PATH, to_dataclass
from mft.config import TrainConfig, register_configs
from mft.report.callback import record_failed_point, unfinished_points
from mft.report.run import RUNNING, read_run
from mft.report.write import write_run_report
from mft.train.checks import check_config
from mft.train.metrics import RunStatus, failure_message, record_failure
from mft.train.run_dir import is_new_run_dir, remove_unused_run_dir
from mft.utils.errors import MftError
from mft.utils.world import World, quiet_overrides, world_from_env

if TYPE_CHECKING:
    from mft.train.loop import RunResult

log = logging.getLogger(__name__)

# The deepest folder of the run dir's path that existed before Hydra ran (set by main()); a config
# error removes only what Hydra made below it. None (the app run some other way): remove nothing.
_EXISTED: Optional[Path] = None


def _join(world: World) -> None:
    """Join the process group; one process has none (and does not import torch.distributed here)."""
    if world.distributed:
        from mft.utils.distributed import init_distributed

        init_distributed(world)


def _leave(world: World) -> None:
    if world.distributed:
        from mft.utils.distributed import shutdown

        shutdown()


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def _run(composed: DictConfig) -> None:
    world = world_from_env()
    _join(world)  # joined already in main(), except for SLURM tasks started by submitit, say
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    # This job made the run dir: a failure is recorded in it. A sweep point's stays whatever happens,
    # so that the sweep's table shows it failed, not missing; a single run's goes if it holds nothing.
    fresh = world.is_main and is_new_run_dir(run_dir)
    in_sweep = HydraConfig.get().mode == RunMode.MULTIRUN
    removable = fresh and not in_sweep and _EXISTED is not None
    started = time.perf_counter()
    try:
        cfg: TrainConfig = to_dataclass(composed)
        check_config(cfg)
        if world.is_main:
            (run_dir / "resolved_config.yaml").write_text(OmegaConf.to_yaml(cfg))
        # torch, mistral-common and the model, now that the config is good
        from mft.train.loop import train

        result = train(cfg, run_dir, world)
    except MftError as e:
        if removable:
            remove_unused_run_dir(run_dir, _EXISTED)
        _failed(run_dir, world, fresh, e, str(e), started, in_sweep)
        return
    except OSError as e:  # a full disk, a read-only run dir: the file and the reason, not a traceback
        _failed(run_dir, world, fresh, e,
                f"{(e.strerror or str(e)).lower()} ({e.filename or f'writing in the run dir {run_dir}'})",
                started, in_sweep)
        return
    except KeyboardInterrupt as e:
        _record(run_dir, world, fresh, e, started)
        print(f"mft-train: {failure_message(e)}; the run dir is {run_dir}", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # a bug or a device error: recorded, then its traceback
        _record(run_dir, world, fresh, e, started)
        if not in_sweep:
            raise
        log.exception("sweep point %s failed; the sweep goes on", run_dir)
        record_failed_point(run_dir, failure_message(e), HydraConfig.get().overrides.task)
        return
    if world.is_main:
        resume = resume_command(run_dir) if result.stopped_by else None
        _write_report(run_dir, resume)
        _report(result, resume)


def _fail(message: str) -> None:
    print(f"mft-train: error: {message}", file=sys.stderr)
    sys.exit(1)


def _failed(run_dir: Path, world: World, fresh: bool, error: BaseException, message: str, started: float,
            in_sweep: bool) -> None:
    """A run stopped by a user error: recorded (_record), then its message; a single run exits 1, a
    sweep goes on to its next point."""
    _record(run_dir, world, fresh, error, started)
    print(f"mft-train: error: {message}", file=sys.stderr)
    if not in_sweep:
        sys.exit(1)
    record_failed_point(run_dir, message, HydraConfig.get().overrides.task)


def _record(run_dir: Path, world: World, fresh: bool, error: BaseException, started: float) -> None:
    """See that the run's summary says it failed, and write its report (rank 0, when the run dir is
    still there). The loop records a failure once it has begun the run's metrics; before that, only
    a run dir this job made gets the record: an earlier run's dir that this start never wrote to
    (a resume that failed on its config, say) stays as it was."""
    if not world.is_main or not run_dir.is_dir():
        return
    status = read_run(run_dir).status
    if fresh and status == RUNNING:
        try:
            record_failure(run_dir, error, time.perf_counter() - started)
        except OSError:  # the full disk or read-only folder that stopped the run: its message still reaches the user
            return
        status = RunStatus.failed
    if status == RunStatus.failed:
        _write_report(run_dir, None)


def _write_report(run_dir: Path, resume: Optional[str]) -> None:
    """report.md and curves.png (mft.report); `resume` is the command that continues a preempted run."""
    try:
        write_run_report(run_dir, resume)
    except Exception as e:  # the run's outcome is saved already: a report that cannot be made is only a warning
        log.warning("no report written in %s: %s: %s", run_dir, type(e).__name__, e)


def launch_command() -> List[str]:
    """How this process was started, up to the overrides: mft-train, python -m mft.train, or the
    torchrun command line that started it (read from the launcher's /proc entry where there is one)."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        try:
            parent = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode().split("\0")
            program = parent[parent.index("mft.train")] if "mft.train" in parent else None
        except (OSError, UnicodeDecodeError):
            program = None
        if program is not None:
            launcher = parent[: parent.index(program) + 1]
            tool = next((i for i, arg in enumerate(launcher) if Path(arg).name in ("torchrun", "torch.distributed.run")), 0)
            return ["torchrun", *launcher[tool + 1:]]
        nodes = int(os.environ.get("WORLD_SIZE", "1")) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        return ["torchrun", f"--nnodes={nodes}", f"--nproc-per-node={os.environ.get('LOCAL_WORLD_SIZE', '1')}",
                "-m", "mft.train"]
    if Path(sys.argv[0]).name == "mft-train":
        return ["mft-train"]
    return ["python", "-m", "mft.train"]


def resume_command(run_dir: Path) -> str:
    """The command that continues this run: as it was launched, its overrides, its run dir, resume=auto."""
    overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith(("hydra.run.dir=", "resume="))]
    return shlex.join([*launch_command(), *overrides, f"hydra.run.dir={run_dir}", "resume=auto"])


def _report(result: "RunResult", resume: Optional[str]) -> None:
    run_dir = result.run_dir
    print(f"\nRun dir: {run_dir}")
    print(f"Metrics: {run_dir / 'metrics.jsonl'}")
    print(f"Report: {run_dir / 'report.md'}")
    if result.stopped_by:
        print(f"Stopped by {result.stopped_by} at step {result.metrics['step']}; checkpoint: {result.checkpoint}")
        print(f"Resume with: {resume}")
        return
    if result.first_valid_loss is not None and "valid_loss" in result.metrics:
        print(f"valid_loss: {result.first_valid_loss:.4f} at step 0 -> {result.metrics['valid_loss']:.4f} "
              f"at step {result.metrics['step']} (mean token accuracy "
              f"{result.metrics['valid_mean_token_accuracy']:.3f})")
    kind = "Adapter" if result.is_adapter else "Model (Mistral consolidated format)"
    print(f"{kind}: {result.checkpoint}")
    if result.base_kept:
        print(f"Chat with it: mft-generate run_dir={shlex.quote(str(run_dir))}")
    else:
        print("Its random base was not kept (save_random_base=false): mft-generate and mft-export cannot use it.")


def check_output_dir(argv: List[str]) -> Path:
    """Fail in one line where Hydra would fail with a traceback: its run (or sweep) dir cannot be
    created or written. The folder is hydra.run.dir / hydra.sweep.dir when given, else under the
    working directory. Returns the deepest of its folders that exists now (before Hydra runs)."""
    sweep = "-m" in argv or "--multirun" in argv
    key = "hydra.sweep.dir=" if sweep else "hydra.run.dir="
    given = [arg.split("=", 1)[1] for arg in argv if arg.startswith(key)]
    folder = Path(given[-1]) if given else Path.cwd() / "outputs"
    existing = next(p for p in [folder, *folder.parents] if os.path.lexists(p))
    if not existing.is_dir():
        _fail(f"cannot create the run dir {folder}: {existing} is a file, not a folder.")
    if not os.access(existing, os.W_OK | os.X_OK):
        _fail(f"cannot write the run dir {folder}: {existing} is not writable (permissions or a read-only file "
              "system). Choose another folder with hydra.run.dir=...")
    return existing


def main() -> None:
    world = world_from_env()
    _join(world)
    global _EXISTED
    _EXISTED = check_output_dir(sys.argv[1:])
    logging.raiseExceptions = False  # a full disk must not turn every log line into a traceback
    sys.argv += quiet_overrides(world)
    register_configs()
    try:
        _run()
    finally:
        _leave(world)
    if unfinished_points:
        _fail(f"{len(unfinished_points)} point(s) of the sweep did not finish: {', '.join(unfinished_points)} "
              "(the table above says why; a preempted point resumes with resume=auto in its run dir).")
