"""Damaged or mismatched model files through the public commands, and the permissions of what mft writes.

Every case must end in one `<command>: error:` paragraph naming the file, exit status 1 and no
traceback: a weights file cut short, emptied, overwritten with random bytes or deleted; a JSON file
likewise, nested too deeply, or with a value of the wrong type; tensors of the wrong shape or dtype.
Bases go through mft-quantize (which reads any dense folder), adapters and quantised checkpoints
through mft-export, and one case each through mft-train and mft-generate as subprocesses.
"""

import json
import os
import random
import shutil
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from conftest import build, tiny_args
from safetensors.torch import load_file, save_file

from mft.checkpoint.adapter import save_adapter
from mft.checkpoint.consolidated import save_consolidated
from mft.checkpoint.hf import mft_to_hf_name
from mft.checkpoint.quantized import save_quantized
from mft.cli.export import main as mft_export
from mft.cli.quantize import main as mft_quantize
from mft.peft.lora import LoRASettings, apply_lora
from mft.quant.formats import QuantSpec
from mft.utils.errors import MftError

# Widths divisible by nf4's block of 64, so the same shapes serve the quantised checkpoint.
ARGS = tiny_args(dim=64, head_dim=16, hidden_dim=128, vocab_size=128, sliding_window=None)
LORA = LoRASettings(r=2, alpha=4.0, target_modules=["wq", "wv"])
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
DAMAGES = ("truncated", "empty", "random", "deleted")
SHORT_RUN = ["max_steps=1", "eval_every=0", "eval_batches=1", "progress=false", "data.seq_len=128", "batch_size=2"]


def hf_config(args=ARGS) -> dict:
    return {"model_type": "mistral", "hidden_size": args.dim, "num_hidden_layers": args.n_layers,
            "num_attention_heads": args.n_heads, "num_key_value_heads": args.n_kv_heads, "head_dim": args.head_dim,
            "intermediate_size": args.hidden_dim, "vocab_size": args.vocab_size, "rms_norm_eps": args.norm_eps,
            "rope_theta": args.rope_theta, "sliding_window": args.sliding_window, "tie_word_embeddings": False}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """Whole folders of every kind mft reads: consolidated, hf, hf sharded, quantized, adapter."""
    root = tmp_path_factory.mktemp("pristine")
    model = build(ARGS)
    save_consolidated(model, root / "consolidated")
    # The rotary permutation of HF's wq/wk does not matter here: only reading is tested.
    tensors = {mft_to_hf_name(name): t.contiguous() for name, t in model.state_dict().items()}
    (root / "hf").mkdir()
    save_file(tensors, str(root / "hf" / "model.safetensors"))
    (root / "hf" / "config.json").write_text(json.dumps(hf_config()))
    (root / "sharded").mkdir()
    names = sorted(tensors)
    halves = {SHARDS[0]: names[: len(names) // 2], SHARDS[1]: names[len(names) // 2:]}
    for shard, keys in halves.items():
        save_file({k: tensors[k] for k in keys}, str(root / "sharded" / shard))
    index = {"metadata": {}, "weight_map": {k: shard for shard, keys in halves.items() for k in keys}}
    (root / "sharded" / "model.safetensors.index.json").write_text(json.dumps(index))
    (root / "sharded" / "config.json").write_text(json.dumps(hf_config()))
    save_quantized(build(ARGS, quant=QuantSpec("nf4", 64)), root / "quantized")
    apply_lora(model, LORA)
    base = {"name": "tiny", "checkpoint": str(root / "consolidated"), "tokenizer": "v3", "args": asdict(ARGS)}
    save_adapter(model, root / "adapter", LORA, base)
    return root


def copy_of(pristine: Path, kind: str, tmp_path: Path) -> Path:
    folder = tmp_path / kind
    shutil.copytree(pristine / kind, folder)
    if kind == "adapter":  # its config names the pristine base; keep the copy's base beside it
        shutil.copytree(pristine / "consolidated", tmp_path / "consolidated")
    return folder


def damage(path: Path, how: str) -> None:
    if how == "truncated":
        size = path.stat().st_size
        with open(path, "r+b") as f:
            f.truncate(size // 2)
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "random":
        path.write_bytes(random.Random(0).randbytes(4096))
    elif how == "deep":  # valid JSON nested past Python's recursion limit
        path.write_text("[" * 100_000 + "]" * 100_000)
    elif how == "deleted":
        path.unlink()


def edit_json(path: Path, changes: dict) -> None:
    """Set dotted keys ("base_model.args.dim") of the JSON object in `path`."""
    data = json.loads(path.read_text())
    for dotted, value in changes.items():
        *parents, leaf = dotted.split(".")
        node = data
        for key in parents:
            node = node[key]
        node[leaf] = value
    path.write_text(json.dumps(data))


def edit_tensor(path: Path, name: str, new) -> None:
    tensors = load_file(str(path))
    tensors[name] = new(tensors[name])
    save_file(tensors, str(path))


def run_command(kind: str, folder: Path, tmp_path: Path, capsys) -> str:
    """The command that reads `folder` (mft-quantize for dense bases, mft-export for the rest):
    it must fail with exit status 1; returns its stderr."""
    out = str(tmp_path / "out")
    if kind in ("consolidated", "hf", "sharded"):
        status = mft_quantize([str(folder), out, "--device", "cpu"])
    elif kind == "adapter":
        status = mft_export(["peft", str(folder), out])
    else:
        status = mft_export(["consolidated", str(folder), out, "--tokenizer", "none"])
    err = capsys.readouterr().err
    assert status == 1, err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 6, err
    assert not Path(out).exists()
    return err


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("kind, file", [
    ("consolidated", "consolidated.safetensors"),
    ("hf", "model.safetensors"),
    ("sharded", SHARDS[1]),
    ("quantized", "model.safetensors"),
    ("adapter", "adapter.safetensors"),
])
def test_damaged_weights_file_is_one_message_naming_it(pristine, tmp_path, capsys, kind, file, how):
    folder = copy_of(pristine, kind, tmp_path)
    damage(folder / file, how)
    err = run_command(kind, folder, tmp_path, capsys)
    assert file in err
    if how == "deleted":
        assert "missing" in err, err
    else:
        assert "truncated or not a safetensors file" in err, err


@pytest.mark.parametrize("how", [*DAMAGES, "deep"])
@pytest.mark.parametrize("kind, file", [
    ("consolidated", "params.json"),
    ("hf", "config.json"),
    ("sharded", "model.safetensors.index.json"),
    ("quantized", "quant_config.json"),
    ("quantized", "params.json"),
    ("adapter", "adapter_config.json"),
])
def test_damaged_json_file_is_one_message_naming_it(pristine, tmp_path, capsys, kind, file, how):
    folder = copy_of(pristine, kind, tmp_path)
    damage(folder / file, how)
    err = run_command(kind, folder, tmp_path, capsys)
    assert file in err


@pytest.mark.parametrize("kind, file, changes, expected", [
    ("consolidated", "params.json", {"dim": "64"}, "'dim' must be a positive integer"),
    ("consolidated", "params.json", {"n_layers": 2.5}, "'n_layers' must be a positive integer"),
    ("consolidated", "params.json", {"rope_theta": "1e6"}, "'rope_theta' must be a positive number"),
    ("hf", "config.json", {"hidden_size": "64"}, "'hidden_size' must be a positive integer"),
    ("hf", "config.json", {"rope_scaling": "linear"}, "'rope_scaling' must be a JSON object"),
    ("hf", "config.json", {"tie_word_embeddings": "no"}, "'tie_word_embeddings' must be true or false"),
    ("sharded", "model.safetensors.index.json", {"weight_map": ["a"]}, "'weight_map'"),
    ("sharded", "model.safetensors.index.json", {"weight_map": {"lm_head.weight": "../hf/model.safetensors"}}, "'weight_map'"),
    ("quantized", "quant_config.json", {"quant.block_size": "64"}, "'quant.block_size' must be a positive integer"),
    ("quantized", "quant_config.json", {"modules": "wq"}, "'modules' must be a list of strings"),
    ("adapter", "adapter_config.json", {"r": "2"}, "'r' must be a positive integer"),
    ("adapter", "adapter_config.json", {"target_modules": "wq"}, "'target_modules' must be a list of strings"),
    ("adapter", "adapter_config.json", {"base_model.args.dim": None}, "'base_model.args.dim' is missing"),
    ("adapter", "adapter_config.json", {"base_model.args.n_heads": True}, "'base_model.args.n_heads' must be"),
])
def test_wrong_typed_json_value_names_file_and_key(pristine, tmp_path, capsys, kind, file, changes, expected):
    folder = copy_of(pristine, kind, tmp_path)
    edit_json(folder / file, changes)
    err = run_command(kind, folder, tmp_path, capsys)
    assert file in err and expected in err, err


@pytest.mark.parametrize("kind, file, name, new, expected", [
    ("consolidated", "consolidated.safetensors", "norm.weight", lambda t: t.to(torch.int32), "norm.weight I32"),
    ("consolidated", "consolidated.safetensors", "norm.weight", lambda t: t[:-1], "norm.weight [63]"),
    ("hf", "model.safetensors", "model.norm.weight", lambda t: t.to(torch.uint8), "model.norm.weight U8"),
    ("quantized", "model.safetensors", "layers.0.attention.wq.weight_q", lambda t: t.to(torch.int8),
     "layers.0.attention.wq.weight_q I8"),
    ("quantized", "model.safetensors", "norm.weight", lambda t: t.to(torch.int64), "norm.weight I64"),
    ("adapter", "adapter.safetensors", "layers.0.attention.wq.lora_a", lambda t: t.to(torch.int64),
     "layers.0.attention.wq.lora_a I64"),
    ("adapter", "adapter.safetensors", "layers.0.attention.wq.lora_a", lambda t: t[:1], "layers.0.attention.wq.lora_a"),
])
def test_tensor_of_wrong_shape_or_dtype_is_named(pristine, tmp_path, capsys, kind, file, name, new, expected):
    folder = copy_of(pristine, kind, tmp_path)
    edit_tensor(folder / file, name, new)
    if kind == "adapter":  # the peft export reads names only; a merge reads the tensors into the model
        status = mft_export(["consolidated", str(folder), str(tmp_path / "out"), "--merge", "--tokenizer", "none"])
        err = capsys.readouterr().err
        assert status == 1 and "Traceback" not in err, err
    else:
        err = run_command(kind, folder, tmp_path, capsys)
    assert folder.name in err and expected in err, err


# -- the Hydra commands, as subprocesses ----------------------------------------------------------
@contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def command(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True, env=env,
                          check=False)


def assert_one_error(result: subprocess.CompletedProcess, command_name: str, *fragments: str) -> None:
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"{command_name}: error: " in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr[-3000:]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A one-step mft-train run (random base saved in base_model/, one adapter checkpoint), under umask 027."""
    root = tmp_path_factory.mktemp("run")
    with umask(0o027):
        result = command("mft.train", *SHORT_RUN, f"hydra.run.dir={root / 'run'}", cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "run"


def test_train_from_a_truncated_base_is_one_message(tiny_run, tmp_path):
    base = shutil.copytree(tiny_run / "base_model", tmp_path / "base")
    damage(base / "consolidated.safetensors", "truncated")
    result = command("mft.train", *SHORT_RUN, f"model.checkpoint={base}", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert_one_error(result, "mft-train", str(base / "consolidated.safetensors"), "truncated")


def test_generate_from_a_run_with_a_truncated_adapter_is_one_message(tiny_run, tmp_path):
    run = shutil.copytree(tiny_run, tmp_path / "run")
    adapter = run / "checkpoints" / "step_000001" / "adapter.safetensors"
    damage(adapter, "truncated")
    result = command("mft.generate", f"run_dir={run}", "prompt=hi", "max_new_tokens=2", "device=cpu", cwd=tmp_path)
    assert_one_error(result, "mft-generate", str(adapter), "truncated")


def test_generate_with_a_deleted_extra_adapter_is_one_message(pristine, tmp_path):
    adapter = copy_of(pristine, "adapter", tmp_path)
    damage(adapter / "adapter.safetensors", "deleted")
    result = command("mft.generate", f"base={pristine / 'consolidated'}", f"adapters=[{{path: {adapter}}}]",
                     "prompt=hi", "tokenizer=v3", "device=cpu", cwd=tmp_path)
    assert_one_error(result, "mft-generate", str(adapter / "adapter.safetensors"), "missing")


# -- permissions -----------------------------------------------------------------------------------
def test_written_files_follow_the_umask(tiny_run, tmp_path):
    """Weights, configs and folders of a run, its exports and a quantised copy are 0640 / 0750 under
    umask 027, as open() and mkdir() make them: not owner-only (0600 / 0700)."""
    with umask(0o027):
        assert mft_export(["peft", str(tiny_run), str(tmp_path / "peft")]) == 0
        assert mft_export(["consolidated", str(tiny_run), str(tmp_path / "merged"), "--merge"]) == 0
        assert mft_quantize([str(tiny_run / "base_model"), str(tmp_path / "nf4"), "--device", "cpu"]) == 0
    wrong = []
    for top in (tiny_run, tmp_path / "peft", tmp_path / "merged", tmp_path / "nf4"):
        for path in [top, *top.rglob("*")]:
            mode = path.stat().st_mode & 0o777
            if mode != (0o750 if path.is_dir() else 0o640):
                wrong.append(f"{oct(mode)} {path}")
    assert not wrong, "\n".join(wrong)
    assert (tiny_run / "checkpoints" / "step_000001" / "adapter.safetensors").is_file()
    assert (tiny_run / "base_model" / "consolidated.safetensors").is_file()


@pytest.mark.parametrize("name", ["tekken.json", "tokenizer.model.v3"])
def test_a_truncated_tokenizer_file_is_one_message_naming_it(tmp_path, name):
    from mft.data.tokenizer import BUILTIN, load_tokenizer

    source = BUILTIN["v3-tekken" if name == "tekken.json" else "v3"]
    (tmp_path / name).write_bytes(source.read_bytes()[:3000])
    with pytest.raises(MftError, match=rf"cannot load tokenizer .*{name}: the file is damaged"):
        load_tokenizer(tmp_path)
