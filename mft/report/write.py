"""The report files: a run's report.md and curves.png, and a table of several runs with their plot.

Each file is written whole or not at all (a temporary file, then one rename), so a reader never
sees half a report, and a report rewritten while someone reads the old one replaces it cleanly.
"""

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

from mft.report.markdown import (
    markdown_table,
    run_labels,
    run_markdown,
    sweep_markdown,
    sweep_notes,
    sweep_rows,
)
from mft.report.plot import plot_run, plot_runs
from mft.report.run import Run, read_run
from mft.utils.atomic import atomic_file

RUN_REPORT = "report.md"
RUN_CURVES = "curves.png"


def _write_text(path: Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def write_run_report(run_dir: Path, resume_command: Optional[str] = None) -> Path:
    """<run dir>/report.md and curves.png (text only, with a one-line note, without matplotlib)."""
    run_dir = Path(run_dir)
    run = read_run(run_dir)
    note = plot_run(run, run_dir / RUN_CURVES)
    report = run_dir / RUN_REPORT
    _write_text(report, run_markdown(run, plot=None if note else RUN_CURVES, note=note, resume_command=resume_command))
    return report


@dataclass(frozen=True)
class RunsTable:
    """The table across runs as printed, and what became of the plot."""

    table: str  # the table across runs (padded markdown)
    notes: List[str]  # a line for each run that did not finish
    plot_note: Optional[str]  # why there is no plot; None when it was drawn


def runs_table(runs: Sequence[Run]) -> RunsTable:
    """The table and notes alone, nothing written."""
    header, rows = sweep_rows(runs)
    return RunsTable(markdown_table(header, rows), sweep_notes(runs), None)


def write_sweep_report(runs: Sequence[Run], plot: Path, title: str) -> RunsTable:
    """The overlaid valid_loss curves at `plot` (a .png) and the table beside it, as <plot stem>.md."""
    plot = Path(plot)
    note = plot_runs(runs, run_labels(runs), plot)
    _write_text(plot.with_suffix(".md"), sweep_markdown(runs, title, plot=None if note else plot.name, note=note))
    return dataclasses.replace(runs_table(runs), plot_note=note)
