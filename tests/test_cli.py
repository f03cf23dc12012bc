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


def mft_train(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("mft-train")
    cmd = [exe] if exe else [sys.executable, "-m", "mft.train"]
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(cmd + list(args), cwd=cwd, capture_output=True, text=True, env=env)


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
    assert f"Chat with it: mft-generate run_dir={tmp_path / 'run'}\n" in result.stdout
    assert (tmp_path / "run" / "resolved_config.yaml").is_file()
    report = (tmp_path / "run" / "report.md").read_text()
    assert "**finished** at step 150 of 150" in report and (tmp_path / "run" / "curves.png").stat().st_size > 0
    # Without the progress bar the train loss still reaches the console and train.log, every log_every steps.
    loss_lines = [line for line in (tmp_path / "run" / "train.log").read_text().splitlines() if "train_loss" in line]
    assert len(loss_lines) == 15 and "step 150: train_loss" in result.stdout + result.stderr
    assert "torch.distributed is disabled" not in result.stderr


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
        ("optim.schedule=cosin", "optim.schedule"),  # choices are Enums: Hydra lists the allowed values
        ("precision=bf61", "expected one of [auto, bf16, fp32]"),
        ("activation_checkpointing=true", "expected one of [none, full, selective, auto]"),  # a bool before issue 14
        ("peft.method=lora2", "peft.method"),
        ("model.attn_backend=tritn", "model.attn_backend"),
        ("quant.format=fp3", "quant.format"),
        ("data.train_files=[/no/such/train.jsonl]", "/no/such/train.jsonl"),
    ],
)
def test_bad_input_is_one_clear_message(tmp_path, override, expected):
    result = mft_train(override, *SHORT, f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert result.returncode == 1
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    # One message: Hydra's, which lists the options of a config group one per line.
    presets = len(list((Path(__file__).parent.parent / "conf" / "model").glob("*.yaml")))
    assert len(result.stderr.strip().splitlines()) <= 15 + presets, result.stderr


def test_full_fine_tuning_from_a_hugging_face_folder(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.MistralConfig(
        vocab_size=32768, hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-5, rope_theta=1e6, sliding_window=128,
        tie_word_embeddings=False,
    )
    transformers.MistralForCausalLM(config).save_pretrained(tmp_path / "hf")
    result = mft_train(f"model.checkpoint={tmp_path}/hf", "peft=none", *SHORT, f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = tmp_path / "run" / "checkpoints" / "step_000002"
    assert (saved / "consolidated.safetensors").is_file() and (saved / "params.json").is_file()
    assert not (tmp_path / "run" / "base_model").exists()

    mismatch = mft_train(f"model.checkpoint={tmp_path}/hf", "model.n_layers=2", *SHORT, cwd=tmp_path)
    assert mismatch.returncode == 1 and "n_layers: config 2 vs checkpoint 4" in mismatch.stderr
    assert "Traceback" not in mismatch.stderr


def test_wandb_logger_runs_offline(tmp_path):
    pytest.importorskip("wandb")
    env_run = mft_train("logger=wandb", "logger.mode=offline", *SHORT, f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert env_run.returncode == 0, env_run.stderr[-3000:]
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))
