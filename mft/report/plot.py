"""The pictures: a run's curves.png and the valid_loss curves of several runs on one plot.

matplotlib is an optional extra (pip install "mft[report]"): without it nothing is drawn and the
functions return a one-line note for the report instead. Figures are drawn through matplotlib's
object API (no pyplot), so nothing global changes (backend, open figures) in the caller's process.
"""

from pathlib import Path
from typing import Any, List, Optional, Sequence

from mft.report.run import Run, evaluations, tokens_per_step
from mft.train.metrics import METRICS_FILE
from mft.utils.atomic import atomic_file

NO_MATPLOTLIB = 'No plot: matplotlib is not installed (pip install "mft[report]" adds it).'


def _figure(**kwargs: Any) -> Optional[Any]:
    """A new matplotlib Figure, or None without matplotlib."""
    try:
        import matplotlib  # noqa: F401  (first, so that a missing or blocked matplotlib fails here)
        from matplotlib.figure import Figure
    except ImportError:
        return None
    return Figure(**kwargs)


def _save(figure: Any, path: Path) -> None:
    with atomic_file(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)


def _series(records: Sequence[dict], key: str) -> tuple[List[int], List[float]]:
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [s for s, _ in points], [v for _, v in points]


def _panel(ax: Any, title: Optional[str], ylabel: str, curves: Sequence[tuple[str, List[int], List[float], str]],
           legend: bool = False) -> None:
    """One axes: each (label, steps, values, line style) curve that has points; a legend when several
    are drawn or `legend` asks for one."""
    if title:
        ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.locator_params(axis="x", integer=True)
    drawn = [c for c in curves if c[1]]
    for label, steps, values, style in drawn:
        ax.plot(steps, values, style, label=label)
    if drawn and (legend or len(drawn) > 1):
        ax.legend()
    if not drawn:
        ax.text(0.5, 0.5, "no records", ha="center", va="center", transform=ax.transAxes)


def plot_run(run: Run, path: Path) -> Optional[str]:
    """curves.png: train and valid loss, valid token accuracy, lr and tokens/s against step (loss
    also against tokens, on the top axis). Returns None, or a note saying why nothing was drawn."""
    if not run.records:
        return f"No curves: {run.path / METRICS_FILE} holds no step records."
    figure = _figure(figsize=(11, 7.5), layout="constrained")
    if figure is None:
        return NO_MATPLOTLIB
    evals = evaluations(run)
    (loss, accuracy), (lr, speed) = figure.subplots(2, 2)
    # No title on the loss panel: the tokens axis takes its place.
    _panel(loss, None, "loss", [("train_loss", *_series(run.records, "train_loss"), "-"),
                                ("valid_loss", *_series(evals, "valid_loss"), "o-")])
    per_step = tokens_per_step(run)
    if per_step:
        top = loss.secondary_xaxis("top", functions=(lambda s: s * per_step / 1e6, lambda t: t * 1e6 / per_step))
        top.set_xlabel("tokens (millions)")
    _panel(accuracy, "valid mean token accuracy", "accuracy",
           [("valid_mean_token_accuracy", *_series(evals, "valid_mean_token_accuracy"), "o-")])
    _panel(lr, "learning rate", "lr", [("lr", *_series(run.records, "lr"), "-")])
    _panel(speed, "throughput", "tokens/s", [("tokens_per_s", *_series(run.records, "tokens_per_s"), "-")])
    figure.suptitle(f"{Path(*run.path.parts[-2:])} ({run.status})")  # outputs/<date>/<time>: date and time
    _save(figure, path)
    return None


def plot_runs(runs: Sequence[Run], labels: Sequence[str], path: Path) -> Optional[str]:
    """The valid_loss curve of each run on one plot, labelled `labels`. Returns None, or a note saying
    why nothing was drawn."""
    figure = _figure(figsize=(9, 5.5), layout="constrained")
    if figure is None:
        return NO_MATPLOTLIB
    ax = figure.subplots()
    _panel(ax, "valid_loss", "valid_loss",
           [(f"{label} ({run.status})", *_series(evaluations(run), "valid_loss"), "o-") for label, run in zip(labels, runs)],
           legend=True)
    _save(figure, path)
    return None
