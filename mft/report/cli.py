"""`mft-report`: one table across run dirs and sweep points, and their valid_loss curves on one plot.

    mft-report multirun/2026-11-23/18-30-00           # a sweep: every point, running ones included
    mft-report outputs/2026-11-23/18-30-00 outputs/2026-11-24/09-00-00
    mft-report multirun/2026-11-23/18-30-00 --out lr_sweep.png

The table has a row per run: the overrides whose values differ between the runs, the status
(finished, preempted, failed, or running or killed: no summary yet), the step reached, the final
and best valid_loss, the final valid token accuracy, the median tokens/s and the wall time. A line
of metrics.jsonl that cannot be read is reported as file:line and the rest is still shown.
"""

import argparse
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from mft.report.run import Run, is_run_dir, read_runs, with_failures
from mft.report.write import runs_table, write_sweep_report
from mft.utils.errors import MftError


def default_plot(first: Path) -> Path:
    """A sweep dir's report.png, or compare.png in the first run dir (its report.md is the run's own)."""
    return first / ("compare.png" if is_run_dir(first) else "report.png")


def print_report(dirs: List[Path], plot: Path, failed: Optional[Dict[str, Tuple[str, Dict[str, str]]]] = None) -> List[Run]:
    """Read the runs, print their table and write it with the plot (see main); returns the runs.
    `failed`: run dirs known to have failed (mft.report.callback.failed_here), shown as failed."""
    runs = with_failures(read_runs(dirs), failed or {})
    if not runs:
        raise MftError(f"{', '.join(map(str, dirs))}: no runs yet (a sweep dir's points appear once they start).")
    for problem in (p for run in runs for p in run.problems):
        print(f"mft-report: warning: {problem}", file=sys.stderr)
    title = "Report: " + ", ".join(map(str, dirs))
    try:
        report = write_sweep_report(runs, plot, title)
        written = f"Report: {plot.with_suffix('.md')}" + (f"; {report.plot_note}" if report.plot_note else
                                                          f", plot: {plot}")
    except OSError as e:  # a read-only sweep dir: the table is still worth printing
        report = runs_table(runs)
        written = f"Report not written: {(e.strerror or str(e)).lower()} ({e.filename or plot})"
    print(report.table)
    for note in report.notes:
        print(f"- {note}")
    print(written)
    return runs


def main(argv: Optional[List[str]] = None) -> int:
    """mft-report's command line; returns the exit status (1: a folder that is not a run or sweep dir)."""
    parser = argparse.ArgumentParser(prog="mft-report", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("dirs", nargs="+", type=Path, metavar="RUN_OR_SWEEP_DIR",
                        help="run dirs of mft-train, or sweep dirs of mft-train -m (each point is a row)")
    parser.add_argument("--out", type=Path, metavar="PNG",
                        help="where the valid_loss plot goes; the table goes beside it as the same name with .md "
                             "(default: report.png in the first dir when it is a sweep dir, else compare.png in the "
                             "first run dir)")
    args = parser.parse_args(argv)
    try:
        print_report(args.dirs, args.out or default_plot(args.dirs[0]))
    except MftError as e:
        print(f"mft-report: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
