"""The Hydra callback that ends `mft-train -m ...` with the sweep's table (conf/train.yaml lists it).

Hydra builds the callbacks of every mft-train start, sweep or not, so this module imports only
Hydra's base class; the report code is imported when a sweep ends.
"""

from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

# The points of the sweep that just ended that did not finish (failed, preempted, or killed without
# a summary); mft-train exits 1 when there are any, after Hydra returns.
unfinished_points: List[str] = []
# Points that failed in this process, by run dir: (the error, the point's overrides). They are
# failed whatever their folder holds: an earlier run's finished summary, or nothing at all (a
# torchrun point that died before Hydra wrote its .hydra/).
failed_here: Dict[str, Tuple[str, Dict[str, str]]] = {}


def record_failed_point(run_dir: Path, error: str, overrides: Sequence[str]) -> None:
    """A sweep point that failed: shown as failed in the sweep's table (see failed_here)."""
    pairs = (o.lstrip("+~").split("=", 1) for o in overrides if "=" in o and not o.startswith("hydra"))
    failed_here[str(run_dir)] = (error, {key: value for key, value in pairs})


class SweepReport(Callback):
    """At the end of a multirun: print the table of its points and write report.md and report.png into the sweep dir."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Every point has returned: the table of all of them, and unfinished_points for mft-train's exit status."""
        from mft.report.cli import print_report
        from mft.train.metrics import RunStatus
        from mft.utils.errors import MftError

        sweep_dir = Path(str(config.hydra.sweep.dir))
        print(f"\nSweep: {sweep_dir}")
        try:
            runs = print_report([sweep_dir], sweep_dir / "report.png", failed_here)
        except MftError as e:
            print(f"mft-train: no sweep report: {e}")
            unfinished_points[:] = list(failed_here)
            return
        unfinished_points[:] = [str(run.path) for run in runs if run.status != RunStatus.finished]
