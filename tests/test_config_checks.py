"""mft-train's config fails fast and completely: unknown `+` keys, the warmup defaults, every
check before tokenizing or building, no run dir left by a config error, and no torch import
for composing and checking a config."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mft.compose import compose, to_dataclass
from mft.config import register_configs
from mft.train.checks import model_args
from mft.train.optim import lr_multiplier
from mft.utils.errors import MftError

SHORT = ["max_steps=2", "eval_every=0", "eval_batches=1", "progress=false", "data.seq_len=128", "batch_size=2"]


def composed(*overrides: str):
    register_configs()
    return to_dataclass(compose("train", overrides))


def mft_train(*args: str, cwd: Path, python_flags: tuple = ()) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, *python_flags, "-m", "mft.train", *args], check=False, cwd=cwd,
                          capture_output=True, text=True, env=env)


@pytest.mark.parametrize(
    "override, key, hint",
    [
        ("+optim.lrr=1e-4", "optim.lrr", "did you mean 'optim.lr'?"),
        ("+model.foo=1", "model.foo", "n_kv_heads"),  # no near match: the keys of model are listed
        ("+data.bar=1", "data.bar", "train_files"),
        ("+foo=1", "foo", "batch_size"),
        ("+peft.alpah=4", "peft.alpah", "did you mean 'peft.alpha'?"),
    ],
)
def test_keys_added_with_plus_must_be_in_the_schema(override, key, hint):
    with pytest.raises(MftError, match=f"unknown key '{key}'") as e:
        composed(override)
    assert hint in str(e.value)


def test_open_entries_are_not_schema_keys():
    # train_files entries are free-form (List[Any]); the data layer checks their keys when it reads them.
    cfg = composed("data.train_files=[{file: a.jsonl, weight: 1, format: chat}]")
    assert cfg.data.train_files == [{"file": "a.jsonl", "weight": 1, "format": "chat"}]


def test_warmup_ratio_replaces_the_tiny_runs_warmup_steps():
    default = composed()
    assert (default.optim.warmup_steps, default.optim.warmup_ratio) == (20, None)  # the default run's 20 steps
    ratio = composed("optim.warmup_ratio=0.1")
    assert (ratio.optim.warmup_steps, ratio.optim.warmup_ratio) == (None, 0.1)
    f = lr_multiplier(ratio.optim, total_steps=100)  # 10 warmup steps
    assert [f(0), f(4), f(9)] == pytest.approx([0.1, 0.5, 1.0])
    seven_b = composed("model=mistral-7b-v0.3")  # no per-model file: the schema's unset defaults
    assert (seven_b.optim.warmup_steps, seven_b.optim.warmup_ratio) == (None, None)
    assert lr_multiplier(seven_b.optim, total_steps=100)(0) == 1.0


def test_warmup_steps_and_ratio_together_are_one_clear_error(tmp_path):
    result = mft_train("optim.warmup_steps=5", "optim.warmup_ratio=0.1", *SHORT, cwd=tmp_path)
    assert result.returncode == 1
    assert "optim.warmup_steps=5 and optim.warmup_ratio=0.1 are both set" in result.stderr


@pytest.mark.parametrize("window", ["0", "[]", "[128,-1]", "[null,128,128]"])
def test_a_window_that_is_not_a_layer_pattern_is_one_clear_error(window):
    with pytest.raises(MftError, match=r"model\.sliding_window=.*whose length divides n_layers=4"):
        model_args(composed(f"model.sliding_window={window}").model)


@pytest.mark.parametrize("overrides, key", [
    (["model.yarn.factor=4", "model.yarn.beta_fast=0"], "model.yarn.beta_fast=0.0"),
    (["model.yarn.factor=4", "model.yarn.beta_slow=-1"], "model.yarn.beta_slow=-1.0"),
    (["model.yarn.factor=0.5"], "model.yarn.factor=0.5"),
    (["model.yarn.factor=4", "model.rope_theta=1"], "model.rope_theta=1.0"),
    (["model.query_scaling.beta=0.1", "model.query_scaling.original_max_position_embeddings=0"],
     "model.query_scaling.original_max_position_embeddings=0"),
])
def test_rope_settings_that_cannot_work_are_one_clear_error(overrides, key):
    with pytest.raises(MftError, match=re.escape(key) + ": expected"):
        model_args(composed(*overrides).model)


def test_a_window_pattern_repeats_over_the_layers():
    args = model_args(composed("model.sliding_window=[null,128]").model)
    assert args.windows == [None, 128, None, 128]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["+optim.lrr=1e-4"], "unknown key 'optim.lrr'"),
        (["batch_size=0"], "batch_size=0: expected a positive"),
        (["optim.betas=[0.9]"], "optim.betas=[0.9]: expected two numbers"),
        (["peft.r=0"], "peft.r=0: expected a positive rank"),
        (["max_steps=-1"], "max_steps=-1"),
        (["model.n_kv_heads=3"], "model.n_kv_heads=3"),
        (["model.checkpoint=/no/such/model"], "model.checkpoint='/no/such/model'"),
        (["resume=/no/such/run"], "resume='/no/such/run'"),
        (["data.train_files=[/no/such/train.jsonl]"], "/no/such/train.jsonl"),
        (["data.seq_len=0"], "data.seq_len=0: expected a positive"),
        (["data.pack_buffer=0"], "data.pack_buffer=0: expected a positive number of open sequences"),
        (["data.valid_fraction=2"], "data.valid_fraction"),
        (["device=tpu"], "device='tpu'"),
    ],
)
def test_a_config_error_is_one_message_and_leaves_no_run_dir(tmp_path, overrides, message):
    result = mft_train(*SHORT, *overrides, cwd=tmp_path)
    assert result.returncode == 1, result.stdout[-2000:]
    assert result.stderr.startswith("mft-train: error: ") and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []  # Hydra's outputs/<date>/<time>/ is gone, parents too


def test_a_config_error_never_removes_an_existing_run_dir(tmp_path):
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / "train.log").write_text("an earlier run\n")
    (run / "metrics.jsonl").write_text("{}\n")
    before = {p.relative_to(run) for p in run.rglob("*")}
    result = mft_train(*SHORT, "batch_size=0", f"hydra.run.dir={run}", "resume=auto", cwd=tmp_path)
    assert result.returncode == 1 and "batch_size=0" in result.stderr
    assert set(before) <= {p.relative_to(run) for p in run.rglob("*")}  # Hydra rewrote .hydra/, nothing went
    assert (run / "train.log").read_text().startswith("an earlier run\n")


@pytest.mark.parametrize("run_dir", ["mine/sub", "."])
def test_a_config_error_never_removes_a_folder_the_user_made(tmp_path, run_dir):
    (tmp_path / "mine" / "sub").mkdir(parents=True)
    result = mft_train(*SHORT, "batch_size=0", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert (tmp_path / run_dir).is_dir() and (tmp_path / "mine" / "sub").is_dir()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["peft.r=0"], "peft.r"),
        (["peft.target_modules=[wq,embeddings]"], "peft.target_modules"),
        (["optim.betas=[0.9,0.95,0.99]"], "optim.betas"),
        (["optim.warmup_ratio=1.5"], "optim.warmup_ratio"),
        (["quant=nf4", "quant.modules=[wq,tok_embeddings]"], "tok_embeddings"),
    ],
)
def test_every_check_runs_before_tokenizing_or_building(tmp_path, monkeypatch, overrides, message):
    from mft.train import loop

    def too_late(*args, **kwargs):
        raise AssertionError("the config was checked only after the tokenizer or the model was used")

    for name in ("load_tokenizer", "build_datasets", "build_model"):
        monkeypatch.setattr(loop, name, too_late)
    with pytest.raises(MftError, match=message):
        loop.train(composed(*SHORT, *overrides), tmp_path / "run")


PROBE = """
import sys
from mft.train import cli
from mft.compose import compose, to_dataclass
from mft.config import register_configs
from mft.train.checks import check_config
register_configs()
check_config(to_dataclass(compose("train", ["optim.warmup_ratio=0.1"])))
heavy = sorted(m for m in ("torch", "mistral_common", "mft.train.loop") if m in sys.modules)
print("heavy:", heavy)
"""


def test_composing_and_checking_a_config_imports_neither_torch_nor_mistral_common(tmp_path):
    probe = subprocess.run([sys.executable, "-c", PROBE], check=False, capture_output=True, text=True, cwd=tmp_path)
    assert probe.returncode == 0, probe.stderr[-3000:]
    assert "heavy: []" in probe.stdout, probe.stdout
    # The public command, too: --help and a config error (python -X importtime lists every import).
    for args in (["--help"], ["+optim.lrr=1e-4"]):
        result = mft_train(*args, cwd=tmp_path, python_flags=("-X", "importtime"))
        imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if "|" in line}
        assert not imported & {"torch", "mistral_common"}, args
