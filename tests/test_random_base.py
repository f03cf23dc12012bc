"""A random base: written with a LoRA run's first checkpoint (not before its first step), streamed
tensor by tensor into files equal to safetensors' own, or not kept at all (save_random_base=false),
and then generate, export and resume say so. Tiny runs in this process."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import build, tiny_args
from safetensors.torch import load_file, save_file

import mft.train.loop as loop
import mft.utils.tensorfile as tensorfile
from mft.build import Runtime, build_model
from mft.checkpoint.consolidated import expected_shapes, save_consolidated
from mft.checkpoint.quantized import expected_tensors, save_quantized
from mft.checkpoint.train_state import step_dir
from mft.cli.export import main as mft_export
from mft.compose import compose, to_dataclass
from mft.config import register_configs
from mft.generate.load import resolve_source
from mft.model.names import canonical_name
from mft.quant.formats import QuantSpec
from mft.train.setup import model_spec
from mft.utils.atomic import normal_mode
from mft.utils.errors import MftError

FAST = ["progress=false", "data.seq_len=64", "eval_every=0", "eval_batches=1", "batch_size=2", "logger.log_every=1",
        "eval_at_start=false"]


def config(*overrides: str):
    register_configs()
    return to_dataclass(compose("train", [*FAST, *overrides]))


def run(run_dir: Path, *overrides: str):
    return loop.train(config(*overrides), run_dir)


def base_present_at_each_step(monkeypatch, run_dir: Path) -> list[bool]:
    """Whether run_dir/base_model exists when each optimizer step begins (filled as the run goes)."""
    seen, accumulate = [], loop.accumulate_gradients

    def watching(*args, **kwargs):
        seen.append((run_dir / "base_model").exists())
        return accumulate(*args, **kwargs)

    monkeypatch.setattr(loop, "accumulate_gradients", watching)
    return seen


def test_a_lora_run_writes_its_random_base_with_its_first_checkpoint(tmp_path, monkeypatch, caplog):
    run_dir = tmp_path / "run"
    seen = base_present_at_each_step(monkeypatch, run_dir)
    caplog.set_level("INFO", logger="mft.train.loop")
    result = run(run_dir, "max_steps=3", "save_every=2")
    assert seen == [False, False, True]  # steps 1 and 2 ran before it; the checkpoint at step 2 wrote it
    drawn = build_model(model_spec(config("max_steps=3")), Runtime(device="cpu", dtype=torch.float32))
    saved = load_file(str(run_dir / "base_model" / "consolidated.safetensors"))
    reference = {canonical_name(n): p for n, p in drawn.named_parameters()}
    assert saved.keys() == set(expected_shapes(drawn.args))
    assert all(torch.equal(saved[name], reference[name]) for name in saved)  # the untrained draw
    adapter = json.loads((result.checkpoint / "adapter_config.json").read_text())["base_model"]
    assert Path(adapter["checkpoint"]) == run_dir / "base_model"
    assert adapter["random_draw"] == {"seed": 0, "saved": True}
    assert resolve_source(run_dir=str(run_dir)).base == run_dir / "base_model"
    assert sum("saved the random base" in r.getMessage() for r in caplog.records) == 1


def test_the_summary_and_log_break_down_the_time_to_the_first_step(tmp_path, caplog):
    caplog.set_level("INFO", logger="mft.train.loop")
    result = run(tmp_path / "run", "max_steps=2", "eval_at_start=true")
    summary = result.metrics
    assert set(summary["startup_parts_s"]) == {"data", "model build", "evaluation", "first step", "other"}
    assert sum(summary["startup_parts_s"].values()) == pytest.approx(summary["startup_s"])
    assert 0 < summary["startup_s"] <= summary["wall_time_s"]
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("time to first step")]
    assert len(lines) == 1 and "model build" in lines[0] and "first step" in lines[0]
    written = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert written["startup_s"] == summary["startup_s"]


def test_without_save_random_base_nothing_is_kept_and_every_user_of_the_base_says_why(tmp_path, capsys):
    run_dir = tmp_path / "run"
    result = run(run_dir, "max_steps=2", "save_every=1", "save_random_base=false")
    assert not (run_dir / "base_model").exists()
    adapter = json.loads((result.checkpoint / "adapter_config.json").read_text())["base_model"]
    assert adapter["checkpoint"] is None and adapter["random_draw"] == {"seed": 0, "saved": False}
    with pytest.raises(MftError, match=r"random base that its run did not keep \(save_random_base=false\)"):
        resolve_source(run_dir=str(run_dir))
    assert mft_export(["hf", str(run_dir), str(tmp_path / "out")]) == 1
    assert "save_random_base=false" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    with pytest.raises(MftError, match=r"resume from .*step_000002: .*did not keep \(save_random_base=false\)"):
        run(run_dir, "max_steps=4", "save_random_base=false", "resume=auto")


def test_full_fine_tuning_on_a_random_base_saves_no_base_and_resumes_exactly(tmp_path):
    whole = tmp_path / "whole"
    run(whole, "peft=none", "max_steps=2", "save_every=1")
    assert not (whole / "base_model").exists()
    run_dir = Path(shutil.copytree(whole, tmp_path / "run"))
    shutil.rmtree(step_dir(run_dir, 2))
    run(run_dir, "peft=none", "max_steps=2", "save_every=1", "resume=auto", "seed=5")  # the checkpoint holds every weight
    assert not (run_dir / "base_model").exists()
    resumed = load_file(str(step_dir(run_dir, 2) / "consolidated.safetensors"))
    uninterrupted = load_file(str(step_dir(whole, 2) / "consolidated.safetensors"))
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.allclose(resumed[name], uninterrupted[name], atol=1e-6) for name in resumed)


def test_a_run_saved_before_this_change_resumes_on_its_early_base_model(tmp_path, monkeypatch):
    """Runs of earlier versions wrote base_model/ before their first step: resume=auto reads it, even
    when that start stopped before its first checkpoint, and never writes it again."""
    run_dir = tmp_path / "run"
    first = run(run_dir, "max_steps=1")
    shutil.rmtree(run_dir / "checkpoints")
    base_file = run_dir / "base_model" / "consolidated.safetensors"
    before = base_file.read_bytes()
    writes = []
    monkeypatch.setattr(loop, "save_base_model", lambda *args: writes.append(args))
    again = run(run_dir, "max_steps=1", "resume=auto")
    assert writes == [] and base_file.read_bytes() == before
    assert again.metrics["train_loss"] == pytest.approx(first.metrics["train_loss"], rel=1e-6)


ARGS = tiny_args(dim=128, head_dim=32, hidden_dim=256, vocab_size=96, sliding_window=None)


def state_file(tensors: dict[str, torch.Tensor], path: Path) -> bytes:
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path.read_bytes()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_streamed_consolidated_file_is_safetensors_own_byte_for_byte(tmp_path, dtype):
    model = build(ARGS, dtype=dtype)
    params = {canonical_name(n): p.detach() for n, p in model.named_parameters()}
    reference = state_file({name: params[name] for name in expected_shapes(ARGS)}, tmp_path / "reference.safetensors")
    written = save_consolidated(model, tmp_path / "base") / "consolidated.safetensors"
    assert written.read_bytes() == reference
    assert all(torch.equal(t, params[name]) for name, t in load_file(str(written)).items())
    assert written.stat().st_mode & 0o777 == normal_mode(is_dir=False)  # not safetensors' 0600


def test_a_streamed_quantized_file_is_safetensors_own_byte_for_byte(tmp_path):
    model = build(ARGS, quant=QuantSpec("nf4", 64, double_quant=True), dtype=torch.bfloat16)
    state = {canonical_name(n): t for n, t in model.state_dict().items()}
    names = expected_tensors(ARGS, QuantSpec("nf4", 64, double_quant=True), ["wq", "wk", "wv", "wo", "w1", "w2", "w3"])
    assert len({state[name].dtype for name in names}) > 2  # packed uint8 codes, fp32 constants, bf16 dense tensors
    reference = state_file({name: state[name] for name in names}, tmp_path / "reference.safetensors")
    written = save_quantized(model, tmp_path / "base", source="random init") / "model.safetensors"
    assert written.read_bytes() == reference


def test_streaming_leaves_the_parameters_storage_resizable(tmp_path):
    """FSDP2 frees a parameter's unsharded storage by resizing it: writing it must not pin it
    (Tensor.numpy() would)."""
    model = build(ARGS)
    save_consolidated(model, tmp_path / "base")
    for p in model.parameters():
        storage = p.detach().untyped_storage()
        storage.resize_(storage.nbytes())


def test_a_failed_stream_leaves_no_folder(tmp_path):
    model = build(ARGS)

    def no_space(*args):
        raise OSError(28, "No space left on device")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tensorfile._BackgroundWriter, "put", no_space)
        with pytest.raises(OSError, match="No space"):
            save_consolidated(model, tmp_path / "base")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_cuda_model_streams_through_pinned_chunks_into_the_same_file(tmp_path, monkeypatch):
    monkeypatch.setattr(tensorfile, "_CHUNK_BYTES", 4096)  # every tensor in several chunks, both buffers reused
    model = build(ARGS, device="cuda", dtype=torch.bfloat16)
    params = {canonical_name(n): p.detach().cpu() for n, p in model.named_parameters()}
    reference = state_file({name: params[name] for name in expected_shapes(ARGS)}, tmp_path / "reference.safetensors")
    written = save_consolidated(model, tmp_path / "base") / "consolidated.safetensors"
    assert written.read_bytes() == reference


def test_a_base_that_cannot_be_written_stops_the_run_before_its_checkpoint(tmp_path, monkeypatch):
    def no_space(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(loop, "save_base_model", no_space)
    with pytest.raises(MftError, match=r"step 1: writing the random base .*save_random_base=false"):
        run(tmp_path / "run", "max_steps=2", "save_every=1")
    assert not (tmp_path / "run" / "checkpoints").exists()
