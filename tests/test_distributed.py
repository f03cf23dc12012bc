"""FSDP2 under torchrun on CPU (gloo, 2 processes): same losses as one process, exact resume,
SIGTERM checkpoints, and the torchrun Hydra launcher."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mft.checkpoint.train_state import latest_checkpoint

BASE = ["eval_every=0", "eval_batches=1", "progress=false", "data.seq_len=64", "logger.log_every=1",
        "model.n_layers=2", "optim.warmup_steps=1", "peft.dropout=0.0"]
pytestmark = pytest.mark.slow


def run(args, cwd, torchrun=False):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone"] if torchrun else [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(launcher + ["-m", "mft.train", *args], cwd=cwd, capture_output=True, text=True,
                            env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def records(run_dir: Path, key: str) -> dict[int, dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in lines if key in r and not r.get("summary")}


def train_losses(run_dir: Path) -> dict[int, float]:
    return {step: r["train_loss"] for step, r in records(run_dir, "train_loss").items()}


# Every family feature at once: interleaved full / windowed layers, YaRN, the query scale, a tied
# head (under FSDP2 one parameter used by the embedding and the head).
FAMILY = ["model.sliding_window=[null,16]", "model.yarn.factor=4.0", "model.yarn.original_max_position_embeddings=16",
          "model.query_scaling.beta=0.5", "model.query_scaling.original_max_position_embeddings=16",
          "model.tied_embeddings=true"]


# Full fine-tuning of the plain model on two ranks is the bf16-masters test's below.
@pytest.mark.parametrize("peft,family", [("lora", False), ("none", True)], ids=["lora", "full-family-features"])
def test_two_ranks_match_one_process(tmp_path, peft, family):
    # The whole validation set: 49 batches of 2 at seq_len 64, so one rank repeats a batch and drops it.
    args = [*BASE, f"peft={peft}", "max_steps=4", "eval_batches=null", *(FAMILY if family else [])]
    run([*args, "batch_size=4", f"hydra.run.dir={tmp_path}/single"], tmp_path)
    # The sharded run also checkpoints every block selectively (torch's selective checkpointing:
    # matmul outputs kept, the rest recomputed; the wrapper goes on before fully_shard) and
    # takes the head + loss in chunks of 16 supervised tokens inside FSDP's root forward (the
    # gathered head weight); the single process does neither.
    run([*args, "batch_size=2", "activation_checkpointing=selective", "loss_chunk_tokens=16",
         f"hydra.run.dir={tmp_path}/fsdp"], tmp_path, torchrun=True)
    single, sharded = train_losses(tmp_path / "single"), train_losses(tmp_path / "fsdp")
    assert list(single) == [1, 2, 3, 4] and single.keys() == sharded.keys()
    for step in single:
        assert sharded[step] == pytest.approx(single[step], rel=1e-5), (step, single, sharded)
    # Evaluation is split over the ranks and summed: the same metrics as one process.
    single_eval, sharded_eval = records(tmp_path / "single", "valid_loss"), records(tmp_path / "fsdp", "valid_loss")
    assert list(single_eval) == [0, 4] and single_eval.keys() == sharded_eval.keys()
    for step, r in single_eval.items():
        assert sharded_eval[step]["valid_tokens"] == r["valid_tokens"]
        assert sharded_eval[step]["valid_loss"] == pytest.approx(r["valid_loss"], rel=1e-5)
        assert sharded_eval[step]["valid_mean_token_accuracy"] == pytest.approx(r["valid_mean_token_accuracy"], abs=1e-9)
    assert (tmp_path / "fsdp" / ".hydra" / "config.yaml").is_file()
    assert [p.name for p in tmp_path.iterdir()] and not (tmp_path / "outputs").exists()  # one run dir, no stray ones


def test_full_fine_tuning_in_bf16_keeps_fp32_masters_in_one_process_as_on_two_ranks(tmp_path):
    """bf16 compute, lr 1e-5: each step moves a weight by ~1e-5, below bf16's spacing near the
    init scale (~8e-5). One process (autocast over fp32 parameters) and two ranks (FSDP2's mixed
    precision over fp32 shards) both apply those updates, and the same ones."""
    from safetensors.torch import load_file

    from mft.build import Runtime, build_model
    from mft.compose import compose, to_dataclass
    from mft.config import register_configs
    from mft.model.names import canonical_name
    from mft.train.setup import model_spec

    args = [*BASE, "peft=none", "precision=bf16", "max_steps=3", "optim.lr=1e-5", "optim.warmup_steps=0",
            "optim.schedule=constant"]
    run([*args, "batch_size=4", f"hydra.run.dir={tmp_path}/single"], tmp_path)
    run([*args, "batch_size=2", f"hydra.run.dir={tmp_path}/fsdp"], tmp_path, torchrun=True)
    single, sharded = train_losses(tmp_path / "single"), train_losses(tmp_path / "fsdp")
    for step in single:
        assert sharded[step] == pytest.approx(single[step], rel=1e-3), (step, single, sharded)

    # Full fine-tuning keeps no base_model/ (its checkpoints hold every weight): the seed's draw, again.
    register_configs()
    drawn = build_model(model_spec(to_dataclass(compose("train", args))), Runtime(device="cpu", dtype=torch.float32))
    before = {canonical_name(n): p.detach() for n, p in drawn.named_parameters()}

    def update(run_name):
        after = load_file(str(tmp_path / run_name / "checkpoints" / "step_000003" / "consolidated.safetensors"))
        assert after["layers.0.attention.wq.weight"].dtype == torch.float32  # the masters, as trained
        return torch.cat([(after[k] - before[k]).flatten() for k in after if k.startswith("layers.")])

    single_update, sharded_update = update("single"), update("fsdp")
    moved = single_update.abs()
    assert (moved > 1e-6).float().mean() > 0.9 and moved.max() < 4e-5  # ~1e-5 a step, 3 steps, not rounded away
    assert torch.nn.functional.cosine_similarity(single_update, sharded_update, dim=0) > 0.99


def test_qlora_two_ranks_match_one_process(tmp_path, quant="nf4"):
    """QLoRA under FSDP2 (the 4-bit base whole on every rank, the LoRA factors sharded): the
    losses equal one process's and the adapter records the quantised base. One format: what FSDP2
    does with the 4-bit buffers does not depend on it (int4 trains in test_qlora_train.py)."""
    args = [*BASE, f"quant={quant}", "model.dim=128", "model.head_dim=32", "model.hidden_dim=256", "max_steps=3"]
    run([*args, "batch_size=4", f"hydra.run.dir={tmp_path}/single"], tmp_path)
    run([*args, "batch_size=2", "activation_checkpointing=full", f"hydra.run.dir={tmp_path}/fsdp"], tmp_path,
        torchrun=True)
    single, sharded = train_losses(tmp_path / "single"), train_losses(tmp_path / "fsdp")
    assert list(single) == [1, 2, 3] and single.keys() == sharded.keys()
    for step in single:
        assert sharded[step] == pytest.approx(single[step], rel=1e-5), (step, single, sharded)
    config = json.loads((tmp_path / "fsdp" / "checkpoints" / "step_000003" / "adapter_config.json").read_text())
    assert config["base_model"]["quant"]["format"] == quant


def test_resume_sees_the_batches_of_an_uninterrupted_run(tmp_path):
    args = [*BASE, "max_steps=4", "save_every=2", "batch_size=2", "peft.dropout=0.1"]
    run([*args, f"hydra.run.dir={tmp_path}/full"], tmp_path, torchrun=True)
    checkpoint = tmp_path / "full" / "checkpoints" / "step_000002"
    run([*args, f"resume={checkpoint}", f"hydra.run.dir={tmp_path}/resumed"], tmp_path, torchrun=True)
    full, resumed = train_losses(tmp_path / "full"), train_losses(tmp_path / "resumed")
    assert list(resumed) == [3, 4]
    for step in resumed:  # same data position, weights, AdamW state, schedule and dropout RNG
        assert resumed[step] == pytest.approx(full[step], rel=1e-5)

    # The sharded checkpoint also resumes in one process (DCP re-shards on load).
    run([*args, f"resume={checkpoint}", f"hydra.run.dir={tmp_path}/one"], tmp_path)
    assert list(train_losses(tmp_path / "one")) == [3, 4]


def wait_for_training(proc: subprocess.Popen, run_dir: Path) -> None:
    """Until the first train loss is logged (no time limit: a loaded machine may be slow)."""
    metrics = run_dir / "metrics.jsonl"
    while not (metrics.is_file() and "train_loss" in metrics.read_text()):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_a_checkpoint_and_prints_the_resume_command(tmp_path, sig):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "mft.train", *BASE, "max_steps=100000", "batch_size=1", f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_training(proc, run_dir)
    proc.send_signal(sig)
    out, err = proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err
    checkpoint = latest_checkpoint(run_dir)
    resume = next(line for line in out.splitlines() if line.startswith("Resume with: "))
    assert resume.removeprefix("Resume with: ").split()[:3] == ["python", "-m", "mft.train"]
    assert f"hydra.run.dir={run_dir}" in resume and resume.endswith("resume=auto")
    assert f"Stopped by {sig.name} at step {int(checkpoint.name[5:])}" in out


def test_sigterm_to_the_launch_script_saves_and_exits_cleanly_under_torchrun(tmp_path):
    run_dir = tmp_path / "run"
    script = Path(__file__).resolve().parents[1] / "launch" / "torchrun.sh"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NPROC_PER_NODE": "2"}
    proc = subprocess.Popen([str(script), *BASE, "max_steps=100000", "batch_size=1", f"hydra.run.dir={run_dir}"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    wait_for_training(proc, run_dir)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err and latest_checkpoint(run_dir) is not None
    resume = next(line for line in out.splitlines() if line.startswith("Resume with: "))
    assert resume.split()[2] == "torchrun" and "--nproc-per-node 2" in resume and "-m mft.train" in resume


def test_torchrun_launcher_runs_a_two_point_sweep(tmp_path):
    run(["-m", "hydra/launcher=torchrun", "hydra.launcher.nproc_per_node=2", "optim.lr=1e-3,3e-3", *BASE,
         "max_steps=2", "batch_size=1", f"hydra.sweep.dir={tmp_path}/sweep"], tmp_path)
    for point in ("0", "1"):
        assert train_losses(tmp_path / "sweep" / point).keys() == {1, 2}
