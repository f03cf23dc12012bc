"""Hardening of checkpoints, resume and the step loop: nothing in a checkpoint runs code, NaN is
never applied or saved, a damaged or mismatched checkpoint is a clear error, and metrics.jsonl
reads as one run across resumes. Tiny runs in this process (a few seconds each)."""

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file

import mft.checkpoint.train_state as train_state
from mft.compose import compose, to_dataclass
from mft.config import register_configs
from mft.train.loop import check_finite_weights, train
from mft.utils.errors import MftError

FAST = ["progress=false", "data.seq_len=64", "eval_every=0", "eval_batches=1", "batch_size=2",
        "logger.log_every=2", "peft.dropout=0.1"]


def config(*overrides: str):
    register_configs()
    return to_dataclass(compose("train", [*FAST, *overrides]))


def run(run_dir: Path, *overrides: str):
    return train(config(*overrides), run_dir)


def train_records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line, parse_constant=lambda name: pytest.fail(f"bare {name} in metrics.jsonl")) for line in lines]
    return [r for r in records if "train_loss" in r and not r.get("summary")]


def step_folder(run_dir: Path, step: int) -> Path:
    return train_state.step_dir(run_dir, step)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A 4-step run with checkpoints at steps 2 and 4 (copied by the tests that damage it)."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    run(run_dir, "max_steps=4", "save_every=2")
    return run_dir


def copy_run(trained: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(trained, tmp_path / "run"))


class RunsCode:
    """Unpickling it would create `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_index_is_refused_without_running_it(trained, tmp_path):
    run_dir = copy_run(trained, tmp_path)
    marker = tmp_path / "pwned"
    (step_folder(run_dir, 4) / "train_state" / ".metadata").write_bytes(pickle.dumps(RunsCode(marker)))
    with pytest.raises(MftError, match=r"\.metadata is not a checkpoint index .*system"):
        run(run_dir, "max_steps=6", "resume=auto")
    assert not marker.exists()


@pytest.mark.parametrize("target", [b"cpathlib\nPosixPath\n", b"ctorch.distributed.checkpoint.metadata\nMetadata\n"])
def test_an_index_that_rewires_an_allowed_class_is_refused(trained, tmp_path, target):
    """pickle's BUILD on an allowed class would change it for the whole process (every Path, say)."""
    run_dir = copy_run(trained, tmp_path)
    index = step_folder(run_dir, 4) / "train_state" / ".metadata"
    real = index.read_bytes()
    attribute = b"X\x04\x00\x00\x00_str" if b"pathlib" in target else b"X\x07\x00\x00\x00__doc__"
    index.write_bytes(b"\x80\x04" + target + b"N}" + attribute + b"X\x01\x00\x00\x00xs\x86b0" + real[2:])
    with pytest.raises(MftError, match=r"\.metadata is not a checkpoint index .*sets attributes"):
        run(run_dir, "max_steps=6", "resume=auto")
    assert str(Path("/a") / "b") == "/a/b"


def test_a_pickled_entry_in_the_shards_is_refused_without_running_it(trained, tmp_path):
    run_dir = copy_run(trained, tmp_path)
    marker = tmp_path / "pwned"
    state_dir = step_folder(run_dir, 4) / "train_state"
    first_key = next(iter(train_state._SafeReader(str(state_dir)).read_metadata().state_dict_metadata))
    shutil.rmtree(state_dir)
    name = first_key.split(".", 1)[1]
    dcp.save({"model": {name: RunsCode(marker)}}, checkpoint_id=str(state_dir), no_dist=True)
    shutil.copy(step_folder(trained, 4) / "train_state" / "trainer.json", state_dir)
    with pytest.raises(MftError, match="not a tensor"):
        run(run_dir, "max_steps=6", "resume=auto")
    assert not marker.exists()


def test_nan_updates_are_skipped_counted_and_stop_the_run_before_anything_is_saved(tmp_path):
    with pytest.raises(MftError, match=r"step \d+: .*NaN or inf in 2 steps in a row.*optim.lr=1e\+06"):
        run(tmp_path / "run", "optim.lr=1e6", "max_steps=20", "save_every=1", "max_nonfinite_steps=2",
            "logger.log_every=1")
    for adapter in (tmp_path / "run" / "checkpoints").glob("step_*/adapter.safetensors"):  # step 1's, if any
        assert all(torch.isfinite(t).all() for t in load_file(str(adapter)).values())
    records = train_records(tmp_path / "run")  # strict JSON: NaN is written as null
    assert any(r.get("skipped_steps") for r in records)
    assert all(r["train_loss"] is None or r["train_loss"] == r["train_loss"] for r in records)


def test_a_checkpoint_of_non_finite_weights_is_never_written(tiny_model):
    with torch.no_grad():
        tiny_model.layers[0].attention.wq.weight[0, 0] = float("nan")
    with pytest.raises(MftError, match="NaN or inf, so no checkpoint was written"):
        check_finite_weights(tiny_model, torch.device("cpu"), step=7)


def test_resume_refuses_a_newest_checkpoint_without_trainer_json(trained, tmp_path):
    run_dir = copy_run(trained, tmp_path)
    (step_folder(run_dir, 4) / "train_state" / "trainer.json").unlink()
    with pytest.raises(MftError, match=r"newest checkpoint .*step_000004 is damaged.*trainer.json.*step_000002"):
        run(run_dir, "max_steps=6", "resume=auto")


def test_resume_refuses_a_missing_random_state(trained, tmp_path):
    run_dir = copy_run(trained, tmp_path)
    (step_folder(run_dir, 4) / "train_state" / "rng_0.safetensors").unlink()
    with pytest.raises(MftError, match=r"rng_0.safetensors is missing"):
        run(run_dir, "max_steps=6", "resume=auto")


def trainer_of(state_dir: Path) -> dict:
    return json.loads((state_dir / "trainer.json").read_text())


def edit_trainer(state_dir: Path, **changes) -> None:
    (state_dir / "trainer.json").write_text(json.dumps({**trainer_of(state_dir), **changes}))


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "rng_0.safetensors").write_bytes(b"garbage" * 10), r"rng_0.safetensors is not a random state"),
    (lambda d: (d / "trainer.json").write_text('{"step": "four"}'), r"trainer.json: 'step' should be int"),
    (lambda d: (d / "trainer.json").write_text("[1, 2"), r"trainer.json"),
    (lambda d: edit_trainer(d, scheduler={"last_epoch": "x"}), r"trainer.json holds a schedule or data position"),
    (lambda d: edit_trainer(d, data=[]), r"data a non-empty list"),
    (lambda d: edit_trainer(d, data=[{**trainer_of(d)["data"][0], "position": -5}]), r"not a valid one"),
    (lambda d: edit_trainer(d, data=[{**trainer_of(d)["data"][0], "position": 10**9}]), r"lies past the epoch"),
    (lambda d: (d / "__0_0.distcp").write_bytes((d / "__0_0.distcp").read_bytes()[:1000]), r"are damaged"),
    (lambda d: (d / ".metadata").write_bytes(b"\x80\x04garbage"), r"\.metadata is not a checkpoint index"),
])
def test_a_damaged_train_state_names_the_file(trained, tmp_path, damage, message):
    run_dir = copy_run(trained, tmp_path)
    damage(step_folder(run_dir, 4) / "train_state")
    with pytest.raises(MftError, match=message):
        run(run_dir, "max_steps=6", "resume=auto")


def test_a_checkpoint_of_another_model_does_not_fit(trained, tmp_path):
    with pytest.raises(MftError, match=r"does not fit this run .*lora_a.* has shape"):
        run(tmp_path / "other", "max_steps=6", f"resume={trained}", "peft.r=4")


def test_resume_with_another_seed_keeps_the_base_and_continues_the_run_exactly(trained, tmp_path):
    run_dir = copy_run(trained, tmp_path)
    base_file = run_dir / "base_model" / "consolidated.safetensors"
    before = hashlib.sha256(base_file.read_bytes()).hexdigest()
    shutil.rmtree(step_folder(run_dir, 4))
    run(run_dir, "max_steps=4", "save_every=2", "resume=auto", "seed=7")
    assert hashlib.sha256(base_file.read_bytes()).hexdigest() == before
    resumed = {r["step"]: r["train_loss"] for r in train_records(run_dir)}
    uninterrupted = {r["step"]: r["train_loss"] for r in train_records(trained)}
    assert resumed.keys() == uninterrupted.keys() == {2, 4}  # each step once, though 3 and 4 ran twice
    assert resumed[4] == pytest.approx(uninterrupted[4], rel=1e-6)


def test_another_runs_checkpoint_is_not_resumed_into_a_run_dir_holding_a_run(trained, tmp_path):
    own = tmp_path / "own"
    run(own, "max_steps=2", "seed=1")
    with pytest.raises(MftError, match=r"another run's checkpoint, and the run dir .* already holds a run"):
        run(own, "max_steps=6", f"resume={step_folder(trained, 2)}")


def test_a_run_continued_from_another_runs_checkpoint_keeps_that_runs_base(trained, tmp_path):
    continued = tmp_path / "continued"
    run(continued, "max_steps=6", "save_every=5", f"resume={step_folder(trained, 4)}")
    assert not (continued / "base_model").exists()
    run(continued, "max_steps=8", "resume=auto")  # and again, from its own checkpoint
    adapter = json.loads((step_folder(continued, 8) / "adapter_config.json").read_text())
    assert Path(adapter["base_model"]["checkpoint"]).resolve() == (trained / "base_model").resolve()


def test_a_fresh_run_will_not_overwrite_another_run(trained, tmp_path):
    run_dir = copy_run(trained, tmp_path)
    with pytest.raises(MftError, match=r"already holds a run .*resume=auto"):
        run(run_dir, "max_steps=2")


def test_a_stop_off_the_log_grid_keeps_the_steps_before_it(tmp_path):
    run(tmp_path / "run", "max_steps=3", "save_every=3", "logger.log_every=2")
    assert [r["step"] for r in train_records(tmp_path / "run")] == [2, 3]


@pytest.mark.parametrize("step", [1, 2])
def test_a_full_disk_during_a_checkpoint_is_one_message_and_leaves_no_partial_folder(tmp_path, monkeypatch, step):
    """safetensors reports a full disk as its own error type; the adapter or the RNG file meets it."""
    from safetensors import SafetensorError

    import mft.utils.tensorfile as tensorfile

    real_save, calls = tensorfile.save_file, []

    def fills_up(tensors, path, metadata=None):
        calls.append(path)
        if "step_000002" in path and len([c for c in calls if "step_000002" in c]) == step:
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(tensorfile, "save_file", fills_up)
    with pytest.raises(MftError, match=r"checkpoint .*step_000002 failed: no space left on device .*step_000001"):
        run(tmp_path / "run", "max_steps=2", "save_every=1")
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step_000001"]


def test_an_unwritable_run_dir_is_one_message(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    result = subprocess.run([sys.executable, "-m", "mft.train", "max_steps=1", f"hydra.run.dir={blocker}/run"],
                            cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and str(blocker) in result.stderr, result.stderr


class FakeWandb:
    def __init__(self):
        self.logged, self.summary = [], {}

    def log(self, values, step):
        self.logged.append((step, values))

    def finish(self):
        pass


def test_wandb_gets_the_summary_as_its_run_summary_not_as_charts(tmp_path, monkeypatch):
    from mft.train import metrics as metrics_module

    fake = FakeWandb()
    monkeypatch.setattr(metrics_module, "_start_wandb", lambda *args: fake)
    run(tmp_path / "run", "max_steps=2", "logger=wandb")
    assert fake.summary["step"] == 2 and "train_data" in fake.summary
    assert all("summary" not in values and "train_data" not in values for _, values in fake.logged)
    assert any("train_loss" in values for _, values in fake.logged)


def test_a_second_ctrl_c_aborts_and_sigterm_never_does():
    import signal

    from mft.train.loop import StopSignals

    signals = StopSignals()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.received == "SIGTERM"
        os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C after a SIGTERM only asks to stop
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        signals.restore()


@pytest.mark.parametrize("lr", ["1e30", "1e38"])
def test_weights_that_diverge_but_stay_finite_are_not_saved(tmp_path, lr):
    """The update itself is finite, the model it makes is not usable: its validation loss says so."""
    with pytest.raises(MftError, match=r"step \d: the (validation loss is nan|AdamW update overflowed)"):
        run(tmp_path / "run", "max_steps=2", f"optim.lr={lr}", "optim.warmup_steps=0", "max_grad_norm=0",
            "eval_every=2")
    assert not (tmp_path / "run" / "checkpoints").exists()
