"""The Hydra app end to end: the embedded default run, a sweep, and the errors a user sees."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

SHORT = ["max_steps=2", "eval_every=0", "eval_batches=1", "progress=false", "data.seq_len=128", "batch_size=2"]


def mft_train(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    exe = shutil.which("mft-train")
    cmd = [exe] if exe else [sys.executable, "-m", "mft.train"]
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(cmd + list(args), cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_default_run_halves_validation_loss(tmp_path):
    result = mft_train("progress=false", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_metrics(tmp_path / "run")
    valid = [r["valid_loss"] for r in records if "valid_loss" in r and not r.get("summary")]
    assert records[0]["step"] == 0 and len(valid) >= 2
    assert valid[-1] <= 0.5 * valid[0], valid
    final = [r for r in records if "valid_mean_token_accuracy" in r][-1]
    assert 0.0 <= final["valid_mean_token_accuracy"] <= 1.0
    adapter = tmp_path / "run" / "checkpoints" / "step_000150"
    assert (adapter / "adapter.safetensors").is_file() and (adapter / "adapter_config.json").is_file()
    assert str(adapter) in result.stdout
    assert (tmp_path / "run" / "resolved_config.yaml").is_file()


def test_sweep_gives_one_run_dir_per_point(tmp_path):
    result = mft_train("-m", "optim.lr=1e-3,3e-3", *SHORT, f"hydra.sweep.dir={tmp_path}/sweep", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lrs = []
    for point in ("0", "1"):
        run_dir = tmp_path / "sweep" / point
        records = read_metrics(run_dir)
        assert records[-1]["summary"] and records[-1]["step"] == 2
        lrs.append(OmegaConf.load(run_dir / "resolved_config.yaml").optim.lr)
    assert lrs == [1e-3, 3e-3]


@pytest.mark.parametrize(
    "override, expected",
    [
        ("optim.lr=abc", "optim.lr"),
        ("model=nope", "model/nope"),
        ("model.dimm=3", "dimm"),
        ("data.train_files=[/no/such/train.jsonl]", "/no/such/train.jsonl"),
    ],
)
def test_bad_input_is_one_clear_message(tmp_path, override, expected):
    result = mft_train(override, *SHORT, f"hydra.run.dir={tmp_path}/run", cwd=tmp_path, timeout=300)
    assert result.returncode != 0
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 15, result.stderr
