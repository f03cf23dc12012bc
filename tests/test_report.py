"""Run and sweep reports: report.md and curves.png at the end of a run, the table at the end of a
sweep, and mft-report on run dirs as they are (finished, failed, stopped, running, damaged)."""

import json
import sys
from pathlib import Path

import pytest
import yaml
from test_cli import SHORT, mft_train

from mft.report.cli import main as mft_report
from mft.report.plot import NO_MATPLOTLIB
from mft.report.run import RUNNING
from mft.report.write import write_run_report


def table_rows(text: str) -> list[dict]:
    """The rows of the first markdown table in `text`, as {column: cell}."""
    all_lines = text.splitlines()
    start = next(i for i, line in enumerate(all_lines) if line.startswith("|"))
    end = next((i for i in range(start, len(all_lines)) if not all_lines[i].startswith("|")), len(all_lines))
    lines = all_lines[start:end]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    return [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))) for line in lines[2:]]


def assert_png_image(path: Path) -> None:
    image = pytest.importorskip("matplotlib.image").imread(path)
    assert image.shape[0] > 100 and image.shape[1] > 100
    assert image.max() > image.min()  # something is drawn on it


def make_run(folder: Path, records: list, overrides=(), config=None, checkpoints=(), lines=()) -> Path:
    """A run dir as mft-train leaves it: its overrides, config, metrics.jsonl (records, then raw `lines`)."""
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(list(overrides)))
    if config is not None:
        (folder / "resolved_config.yaml").write_text(yaml.safe_dump(config))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + "".join(lines))
    for step in checkpoints:
        (folder / "checkpoints" / f"step_{step:06d}").mkdir(parents=True)
    return folder


def evals(*losses: float, every: int = 10) -> list:
    return [{"step": i * every, "valid_loss": loss, "valid_perplexity": 2.0 ** loss,
             "valid_mean_token_accuracy": 0.1 * i} for i, loss in enumerate(losses)]


FINISHED = {"step": 20, "summary": True, "status": "finished", "total_steps": 20, "wall_time_s": 75.0}


def test_a_run_writes_its_report_and_curves(tmp_path):
    result = mft_train(*SHORT, f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    assert f"Report: {run / 'report.md'}" in result.stdout
    report = (run / "report.md").read_text()
    assert report.startswith(f"# Run report: {run}\n") and "**finished** at step 2 of 2" in report
    evaluations = table_rows(report[report.index("## Evaluations"):])
    assert [row["step"] for row in evaluations] == ["0", "2"]
    summary = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert summary["status"] == "finished" and summary["train_data"]["skipped_by_reason"] == {}
    assert f"{summary['valid_loss']:.4f}" == evaluations[-1]["valid_loss"]
    assert "| train | 2000 " in report  # the bundled data's 2000 training samples
    assert f"`mft-generate run_dir={run}`" in report and "- last: `checkpoints/step_000002` (step 2)" in report
    assert "![Training curves](curves.png)" in report
    assert_png_image(run / "curves.png")
    # Throughput three ways: every position, those holding data (no packing padding), trained targets.
    train = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "train_loss" in r
             and not r.get("summary")]
    assert train and all(0 < r["supervised_tokens_per_s"] < r["real_tokens_per_s"] <= r["tokens_per_s"] for r in train)


def test_a_sweep_ends_with_the_table_of_its_points_failed_ones_included(tmp_path):
    sweep = tmp_path / "sweep"
    result = mft_train("-m", "optim.lr=1e-3,-1,2e-3", *SHORT, f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    # The failed point does not stop the sweep, which ends with the table and exit status 1.
    assert result.returncode == 1, result.stderr[-3000:]
    assert "mft-train: error: optim.lr=-1.0: expected a positive learning rate." in result.stderr
    assert f"1 point(s) of the sweep did not finish: {sweep / '1'}" in result.stderr
    printed = table_rows(result.stdout[result.stdout.index(f"Sweep: {sweep}"):])
    assert [(row["run"], row["optim.lr"], row["status"], row["step"]) for row in printed] == [
        ("0", "0.001", "finished", "2"), ("1", "-1", "failed", "0"), ("2", "0.002", "finished", "2")]
    assert "max_steps" not in printed[0]  # the same in every point: not a column
    assert "- 1: failed at step 0" in result.stdout and "expected a positive learning rate" in result.stdout
    assert table_rows((sweep / "report.md").read_text()) == printed
    assert_png_image(sweep / "report.png")
    for point in ("0", "2"):
        finished = json.loads((sweep / point / "metrics.jsonl").read_text().splitlines()[-1])
        assert f"{finished['valid_loss']:.4f}" == printed[int(point)]["final valid_loss"]
    assert "Status: **failed** at step 0" in (sweep / "1" / "report.md").read_text()
    # Another sweep into the same folder: point 0 refuses a run dir that holds a finished run, and
    # the table shows it failed, not that run's results; point 1's folder held only a failed start,
    # so it trains. The sweep exits 1.
    again = mft_train("-m", "optim.lr=3e-3,4e-3", *SHORT, f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert again.returncode == 1, again.stderr[-3000:]
    rows = table_rows(again.stdout[again.stdout.index(f"Sweep: {sweep}"):])
    assert [(row["run"], row["optim.lr"], row["status"]) for row in rows][:2] == [("0", "0.003", "failed"),
                                                                                  ("1", "0.004", "finished")]
    assert f"1 point(s) of the sweep did not finish: {sweep / '0'}" in again.stderr


def test_a_resumed_run_counts_the_wall_time_of_every_start(tmp_path):
    from mft.config import LoggerConfig
    from mft.train.metrics import MetricsLogger

    records = [{"step": 5, "train_loss": 2.0}, {"step": 10, "train_loss": 1.0},
               {"step": 10, "summary": True, "status": "preempted", "wall_time_s": 12.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    logger = MetricsLogger(tmp_path, LoggerConfig(), {}, start_step=10)
    logger.close()
    assert logger.earlier_wall_time_s == 12.5
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [5, 10]
    (tmp_path / "new").mkdir()
    fresh = MetricsLogger(tmp_path / "new", LoggerConfig(), {})
    fresh.close()
    assert fresh.earlier_wall_time_s == 0.0


def test_mft_report_reads_a_damaged_metrics_line_and_renders_the_rest(tmp_path, capsys):
    run = make_run(tmp_path / "run", evals(3.0, 2.5), lines=['{"step": 15, "train_lo\n',
                                                             json.dumps(evals(3.0, 2.5, 2.25)[-1]) + "\n"])
    assert mft_report([str(run)]) == 0
    out, err = capsys.readouterr()
    assert f"mft-report: warning: {run / 'metrics.jsonl'}:3: not a JSON record" in err
    (row,) = table_rows(out)
    assert (row["status"], row["step"], row["final valid_loss"], row["best valid_loss (step)"]) == (
        RUNNING, "20", "2.2500", "2.2500 (20)")
    assert_png_image(run / "compare.png")
    assert f"{run / 'metrics.jsonl'}:3: not a JSON record" in (run / "compare.md").read_text()


def test_the_table_tells_how_each_run_ended(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    (tmp_path / "sweep").mkdir()
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    config = lambda lr: {"optim": {"lr": lr}, "max_steps": 20}  # noqa: E731
    make_run(sweep / "0", [*evals(3.0, 2.0, 2.5), FINISHED], ["optim.lr=1e-3", "max_steps=20"], config(0.001))
    make_run(sweep / "1", [*evals(3.0, 2.8), {**FINISHED, "step": 10, "status": "preempted", "stopped_by": "SIGTERM"}],
             ["optim.lr=2e-3", "max_steps=20"], config(0.002))
    make_run(sweep / "2", [*evals(3.0), {"step": 0, "summary": True, "status": "failed", "error": "NaN at step 1"}],
             ["optim.lr=1", "max_steps=20"], config(1.0))
    make_run(sweep / "10", evals(3.0, 2.9), ["max_steps=20"], config(0.003))  # no summary yet; lr from the config
    assert mft_report([str(sweep)]) == 0
    out, _ = capsys.readouterr()
    rows = table_rows(out)
    assert [(r["run"], r["optim.lr"], r["status"], r["final valid_loss"], r["best valid_loss (step)"]) for r in rows] == [
        ("0", "0.001", "finished", "2.5000", "2.0000 (10)"), ("1", "0.002", "preempted", "2.8000", "2.8000 (10)"),
        ("2", "1.0", "failed", "3.0000", "3.0000 (0)"), ("10", "0.003", RUNNING, "2.9000", "2.9000 (10)")]
    assert "max_steps" not in rows[0] and rows[0]["wall time"] == "1m15s"
    assert "- 1: preempted: SIGTERM stopped it at step 10 of 20" in out
    assert "- 2: failed at step 0: NaN at step 1" in out
    assert f"Report: {sweep / 'report.md'}, plot: {sweep / 'report.png'}" in out


def test_the_best_checkpoint_and_how_to_chat_with_it(tmp_path):
    run = make_run(tmp_path / "run", [*evals(3.0, 2.0, 2.5), FINISHED], checkpoints=(10, 20))
    report = write_run_report(run).read_text()
    assert "- last: `checkpoints/step_000020` (step 20)" in report
    assert "- best: `checkpoints/step_000010` (valid_loss 2.0000 at step 10)" in report
    assert f"Chat with the best: `mft-generate run_dir={run} step=10`" in report


def test_a_folder_that_is_no_run_is_one_clear_error(tmp_path, capsys):
    (tmp_path / "notes").mkdir()
    assert mft_report([str(tmp_path / "notes")]) == 1
    _, err = capsys.readouterr()
    assert err.count("\n") == 1 and err.startswith(f"mft-report: error: {tmp_path / 'notes'} is neither a run dir")


def test_without_matplotlib_the_report_is_text_with_a_note(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    run = make_run(tmp_path / "run", [*evals(3.0, 2.0), FINISHED])
    report = write_run_report(run).read_text()
    assert f"_{NO_MATPLOTLIB}_" in report and "curves.png" not in report
    assert not (run / "curves.png").exists()
    assert mft_report([str(run)]) == 0
    assert f"Report: {run / 'compare.md'}; {NO_MATPLOTLIB}" in capsys.readouterr().out
    assert not (run / "compare.png").exists()


def test_a_run_stopped_by_an_error_records_it_as_its_summary(tmp_path):
    from mft.compose import compose, to_dataclass
    from mft.config import register_configs
    from mft.train.loop import train
    from mft.utils.errors import MftError

    register_configs()
    cfg = to_dataclass(compose("train", ["progress=false", "data.seq_len=64", "eval_every=0", "eval_batches=1",
                                         "batch_size=2", "optim.lr=1e6", "max_steps=20", "max_nonfinite_steps=2",
                                         "logger.log_every=1"]))
    with pytest.raises(MftError) as stopped:
        train(cfg, tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert summary["summary"] and summary["status"] == "failed" and summary["error"] == str(stopped.value)
    report = write_run_report(tmp_path / "run").read_text()
    assert f"Status: **failed** at step {summary['step']} of 20" in report and str(stopped.value) in report
    assert table_rows(report[report.index("## Evaluations"):])[0]["step"] == "0"  # what it logged still shows


def test_eval_at_start_false_starts_training_at_once(tmp_path):
    result = mft_train(*SHORT, "eval_at_start=false", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "valid_loss" in r and not r.get("summary")] == [2]  # the end only
    assert "**finished** at step 2 of 2" in (tmp_path / "run" / "report.md").read_text()
