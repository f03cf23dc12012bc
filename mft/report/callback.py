"""The Hydra callback that ends `mft-train -m ...` with the sweep's table (conf/train.yaml lists it).

Hydra builds the callbacks of every mft-train start, sweep or not, so this module imports only
Hydra's base class; the report code is imported when a sweep ends.
"""

from pathlib import Path
from typing import Any, List

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

# The points of the sweep that just ended that did not finish (failed, or killed without a summary);
# mft-train exits 1 when there are any, after Hydra returns.
unfinished_points: List[str] = []


class SweepReport(Callback):
    """At the end of a multirun: print the table of its points and write report.md and report.png into the sweep dir."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Every point has returned: the table of all of them, and unfinished_points for mft-train's exit status."""
        from mft.report.cli import print_report
        from mft.report.run import RUNNING
        from mft.train.metrics import RunStatus
        from mft.utils.errors import MftError

        sweep_dir = Path(str(config.hydra.sweep.dir))
        print(f"\nSweep: {sweep_dir}")
        try:
            runs = print_report([sweep_dir], sweep_dir / "report.png")
        except MftError as e:
            print(f"mft-train: no sweep report: {e}")
            return
        unfinished_points[:] = [str(run.path) for run in runs if run.status in (RunStatus.failed, RUNNING)]
