"""The text of the reports: a run's report.md, and the table across runs (markdown that reads as
plain text in a terminal: the columns are padded)."""

import os
import shlex
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from mft.report.run import (
    CONFIG_FILE,
    RUNNING,
    Run,
    best_checkpoint,
    best_evaluation,
    evaluations,
    final_evaluation,
    last_step,
    median_tokens_per_s,
    run_names,
)
from mft.train.metrics import RunStatus

NONE = "-"


def number(value: Any, digits: int = 4) -> str:
    """A metric with `digits` decimals, or NONE where there is none (null: not finite, or not logged)."""
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else NONE


def duration(seconds: Optional[float]) -> str:
    """12s, 3m05s, 2h07m."""
    if not isinstance(seconds, (int, float)):
        return NONE
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table with padded columns, so it reads the same in a terminal."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def generate_command(run_dir: Path, step: Optional[int] = None) -> str:
    """The mft-generate command that chats with the run's latest checkpoint, or the one of `step`."""
    return shlex.join(["mft-generate", f"run_dir={run_dir}", *([f"step={step}"] if step is not None else [])])


def status_line(run: Run, resume_command: Optional[str] = None) -> str:
    """What became of the run, in one sentence."""
    summary, step = run.summary or {}, last_step(run)
    of = f" of {summary['total_steps']}" if summary.get("total_steps") else ""
    wall = f" in {duration(summary['wall_time_s'])}" if "wall_time_s" in summary else ""
    status = run.status
    if status == RunStatus.finished:
        return f"**finished** at step {step}{of}{wall}."
    if status == RunStatus.preempted:
        resume = f" Resume with: `{resume_command}`" if resume_command else " Resume with `resume=auto` and the same overrides."
        return f"**preempted**: {summary.get('stopped_by') or 'a signal'} stopped it at step {step}{of}{wall}, " \
               f"after saving a checkpoint.{resume}"
    if status == RunStatus.failed:
        return f"**failed** at step {step}{of}{wall}: {summary.get('error') or 'no message recorded'}"
    if status == RUNNING:
        return f"**{RUNNING}**: no summary yet; the last record is at step {step if step is not None else NONE}."
    return f"**{status}** at step {step}."


def _setup(run: Run) -> str:
    """The settings that say what was trained, from resolved_config.yaml."""
    c = run.config
    if not c:
        return f"Config: no {CONFIG_FILE} (the run stopped before it was written, or it cannot be read)."
    model, peft, optim, data, quant = (c.get(k) or {} for k in ("model", "peft", "optim", "data", "quant"))
    method = peft.get("method", NONE)
    if method == "lora":
        method = f"LoRA r={peft.get('r', NONE)}"
    if quant.get("format") not in (None, "none"):
        method += f" on a {quant['format']} base"
    length = f"{c['max_steps']} steps" if c.get("max_steps") else f"{c.get('epochs', NONE)} epochs"
    return (f"Model `{model.get('name', NONE)}`, {method}, lr {optim.get('lr', NONE)} ({optim.get('schedule', NONE)}), "
            f"batch {c.get('batch_size', NONE)} x grad_accum {c.get('grad_accum', NONE)} x {data.get('seq_len', NONE)} "
            f"tokens, {length}.")


def _data_section(summary: Dict[str, Any]) -> List[str]:
    """The train and valid data as the loop's summary reports them (mft.train.loop.data_report)."""
    parts = [(name, summary.get(key)) for name, key in (("train", "train_data"), ("valid", "valid_data"))]
    parts = [(name, d) for name, d in parts if isinstance(d, dict)]
    if not parts:
        return ["Not known yet (the run's summary holds it)."]
    header = ["", "samples", "sequences", "tokens", "supervised", "padding", "skipped rows", "truncated", "dropped",
              "split", "unsupervised"]
    rows, reasons = [], []
    for name, d in parts:
        tokens, padding = d.get("tokens", 0), d.get("padding", 0)
        share = lambda part, whole: f"{part / whole:.1%}" if whole else NONE  # noqa: E731
        rows.append([name, str(d.get("samples", NONE)), str(d.get("sequences", NONE)), str(tokens),
                     share(d.get("supervised", 0), tokens), share(padding, tokens + padding),
                     str(d.get("skipped_rows", NONE)), *(str(d.get(k, NONE)) for k in
                                                          ("truncated", "dropped", "split", "unsupervised"))])
        by_reason = d.get("skipped_by_reason") or {}
        if by_reason:
            reasons.append(f"{name}: " + ", ".join(f"{code} x{n}" for code, n in by_reason.items()))
    lines = [markdown_table(header, rows), "",
             "Supervised: share of the tokens with a loss; padding: share of all positions."]
    if reasons:
        lines.append("Skipped rows by reason: " + "; ".join(reasons) + " (`mft-validate-data` lists each row).")
    return lines


def run_markdown(run: Run, plot: Optional[str], note: Optional[str] = None, resume_command: Optional[str] = None) -> str:
    """report.md of one run: status, results, evaluations, data, checkpoints, curves (`plot`, a path
    relative to the report) or `note` saying why there is no plot."""
    summary = run.summary or {}
    evals, best, final = evaluations(run), best_evaluation(run), final_evaluation(run)
    overrides = " ".join(f"`{k}={v}`" for k, v in run.overrides.items()) or "none (the defaults)"
    lines = [f"# Run report: {run.path}", "", f"Status: {status_line(run, resume_command)}", "",
             _setup(run), "", f"Overrides: {overrides}", "", "## Results", ""]
    rows = [[name, str(r["step"]), number(r.get("valid_loss")), number(r.get("valid_perplexity"), 2),
             number(r.get("valid_mean_token_accuracy"), 3)]
            for name, r in (("first", evals[0] if evals else None), ("best", best), ("final", final)) if r]
    if rows:
        lines += [markdown_table(["", "step", "valid_loss", "perplexity", "token accuracy"], rows), ""]
    speed = median_tokens_per_s(run)
    lines += [f"- train_loss at the end: {number(summary.get('train_loss'))}",
              f"- tokens/s (median of the train records): {NONE if speed is None else f'{speed:.0f}'}",
              f"- wall time: {duration(summary.get('wall_time_s'))}"
              + (f" (every start; the last resumed at step {summary['start_step']})" if summary.get("start_step") else "")]
    if summary.get("skipped_nonfinite_steps"):
        lines.append(f"- steps skipped for a non-finite loss or gradient: {summary['skipped_nonfinite_steps']}")
    train_loss = {r["step"]: r["train_loss"] for r in run.records if "train_loss" in r}
    lines += ["", "## Evaluations", ""]
    if evals:
        lines.append(markdown_table(
            ["step", "train_loss", "valid_loss", "perplexity", "token accuracy"],
            [[str(r["step"]), number(train_loss.get(r["step"])), number(r.get("valid_loss")),
              number(r.get("valid_perplexity"), 2), number(r.get("valid_mean_token_accuracy"), 3)] for r in evals]))
    else:
        lines.append("None yet (no validation set, or none has run).")
    lines += ["", "## Data", "", *_data_section(summary), "", "## Checkpoints", ""]
    lines += _checkpoint_lines(run)
    lines += ["", "## Curves", "", f"![Training curves]({plot})" if plot else f"_{note}_"]
    if run.problems:
        lines += ["", "## Problems reading the run", "", *(f"- {p}" for p in run.problems)]
    return "\n".join(lines) + "\n"


def _checkpoint_lines(run: Run) -> List[str]:
    """The last and the best checkpoint, and the commands that chat with them."""
    if not run.checkpoints:
        return ["None saved."]
    last_step_, last = run.checkpoints[-1]
    lines = [f"- last: `{os.path.relpath(last, run.path)}` (step {last_step_})"]
    best = best_checkpoint(run)
    if best is not None:
        lines.append(f"- best: `{os.path.relpath(best[1], run.path)}` (valid_loss {best[2]:.4f} at step {best[0]})")
    lines += ["", f"Chat with the last: `{generate_command(run.path)}`"]
    if best is not None and best[0] != last_step_:
        lines.append(f"Chat with the best: `{generate_command(run.path, best[0])}`")
    return lines


def sweep_rows(runs: Sequence[Run]) -> tuple[List[str], List[List[str]]]:
    """The table across runs: a name, each override whose value differs between the runs, then results."""
    names, differing = run_names(runs), differing_overrides(runs)
    header = ["run", *differing, "status", "step", "final valid_loss", "best valid_loss (step)", "token accuracy",
              "tokens/s", "wall time"]
    rows = []
    for name, run in zip(names, runs):
        final, best, speed, step = final_evaluation(run), best_evaluation(run), median_tokens_per_s(run), last_step(run)
        rows.append([name, *(_value(run, k) for k in differing), run.status, NONE if step is None else str(step),
                     number(final and final.get("valid_loss")),
                     f"{best['valid_loss']:.4f} ({best['step']})" if best else NONE,
                     number(final and final.get("valid_mean_token_accuracy"), 3),
                     NONE if speed is None else f"{speed:.0f}", duration((run.summary or {}).get("wall_time_s"))])
    return header, rows


# Overrides that say how a run was started, not what it trains.
_NOT_SETTINGS = {"resume", "progress"}


def differing_overrides(runs: Sequence[Run]) -> List[str]:
    """The overridden settings whose values are not the same in every run."""
    keys = sorted({k for run in runs for k in run.overrides} - _NOT_SETTINGS)
    return [k for k in keys if len({_value(run, k) for run in runs}) > 1]


def run_labels(runs: Sequence[Run]) -> List[str]:
    """Each run's name and the values that set it apart, for a plot's legend: "1: optim.lr=0.002"."""
    differing = differing_overrides(runs)
    return [" ".join([f"{name}:" if differing else name, *(f"{k}={_value(run, k)}" for k in differing)])
            for name, run in zip(run_names(runs), runs)]


def sweep_notes(runs: Sequence[Run]) -> List[str]:
    """One line for each run that did not finish: the error, the signal, or that it has no summary yet."""
    notes = []
    for name, run in zip(run_names(runs), runs):
        if run.status != RunStatus.finished:
            notes.append(f"{name}: {status_line(run)}".replace("**", ""))
    return notes


def sweep_markdown(runs: Sequence[Run], title: str, plot: Optional[str], note: Optional[str]) -> str:
    """The sweep report: the table, a line for each run that did not finish, the overlaid valid_loss curves."""
    header, rows = sweep_rows(runs)
    notes = sweep_notes(runs)
    problems = [p for run in runs for p in run.problems]
    lines = [f"# {title}", "", markdown_table(header, rows), ""]
    lines += [f"- {n}" for n in notes] + ([""] if notes else [])
    lines += [f"![valid_loss of each run]({plot})" if plot else f"_{note}_"]
    if problems:
        lines += ["", "## Problems reading the runs", "", *(f"- {p}" for p in problems)]
    return "\n".join(lines) + "\n"


def _value(run: Run, key: str) -> str:
    """A run's value for an overridden key: its resolved config's (1e-3 and 0.001 read the same), else the
    override as typed (a config group such as model=tiny, or a run that has not written its config), else
    "(default)"."""
    value: Any = run.config
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if value is not None and not isinstance(value, (dict, list)):
        return str(value)
    return run.overrides.get(key, "(default)")
