"""Checkpoint folders: detection, args, consolidated round trip, one clear error for bad files."""

import json

import pytest
import torch
from conftest import build, tiny_args
from safetensors.torch import load_file, save_file

from mft.checkpoint.hf import permute_rotary, unpermute_rotary
from mft.checkpoint.load import (
    detect_format,
    load_weights,
    read_model_args,
    save_consolidated,
)
from mft.model.args import ModelArgs
from mft.model.transformer import Transformer
from mft.utils.errors import MftError

ARGS = tiny_args(dim=32, head_dim=8, hidden_dim=48, vocab_size=64, rope_theta=1e6, sliding_window=6)


def random_model(args=ARGS, dtype=torch.float32, seed=0):
    model = build(args, device="cpu", dtype=dtype, seed=seed, std=0.2)
    return model


def hf_config(args=ARGS, **extra):
    return {
        "model_type": "mistral", "hidden_size": args.dim, "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads, "num_key_value_heads": args.n_kv_heads, "head_dim": args.head_dim,
        "intermediate_size": args.hidden_dim, "vocab_size": args.vocab_size, "rms_norm_eps": args.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": args.rope_theta},
        "sliding_window": args.sliding_window, **extra,
    }


def write_hf_folder(folder, model, **config_extra):
    """An HF-layout folder written with our own name map and permutation (the inverse of the loader's)."""
    from mft.checkpoint.hf import mft_to_hf_name

    tensors = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("attention.wq.weight"):
            tensor = permute_rotary(tensor, ARGS.n_heads)
        elif name.endswith("attention.wk.weight"):
            tensor = permute_rotary(tensor, ARGS.n_kv_heads)
        tensors[mft_to_hf_name(name)] = tensor.contiguous()
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(hf_config(**config_extra)))
    return tensors


def test_consolidated_round_trip(tmp_path):
    model = random_model()
    folder = save_consolidated(model, tmp_path / "ckpt")
    assert sorted(p.name for p in folder.iterdir()) == ["consolidated.safetensors", "params.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary folder left behind
    assert detect_format(folder) == "consolidated" and read_model_args(folder) == ARGS

    loaded = build(read_model_args(folder), device="cpu", dtype=torch.float32)
    load_weights(loaded, folder, dtype=torch.float32)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name

    half = build(ARGS, device="cpu", dtype=torch.bfloat16)
    load_weights(half, folder)  # cast per tensor to the parameter's dtype
    assert torch.equal(half.output.weight, model.output.weight.to(torch.bfloat16))


def test_hf_layout_loads_like_consolidated(tmp_path):
    model = random_model()
    write_hf_folder(tmp_path, model)
    loaded = build(read_model_args(tmp_path), device="cpu", dtype=torch.float32)
    load_weights(loaded, tmp_path)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_bad_keys_give_one_error_naming_all(tmp_path):
    model = random_model()
    tensors = write_hf_folder(tmp_path, model)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.0.self_attn.rotary_bias"] = torch.zeros(3)
    tensors["model.norm.weight"] = torch.ones(ARGS.dim + 1)
    save_file(tensors, str(tmp_path / "model.safetensors"))

    target = build(ARGS, device="cpu", dtype=torch.float32)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(MftError) as err:
        load_weights(target, tmp_path)
    message = str(err.value)
    assert str(tmp_path) in message
    assert "model.layers.1.mlp.up_proj.weight" in message
    assert "model.layers.0.self_attn.rotary_bias" in message
    assert f"model.norm.weight [{ARGS.dim + 1}]" in message and f"[{ARGS.dim}]" in message
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())  # nothing was read


def test_long_key_lists_are_truncated(tmp_path):
    write_hf_folder(tmp_path, random_model())
    bigger = ModelArgs(**{**ARGS.__dict__, "n_layers": 12})
    with pytest.raises(MftError, match=r"missing tensors \(90\): .*\.\.\. and 82 more"):
        load_weights(build(bigger, device="cpu", dtype=torch.float32), tmp_path)


def test_folder_without_config_or_params(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(MftError, match="config.json.*params.json"):
        read_model_args(tmp_path)
    with pytest.raises(MftError, match="does not exist"):
        read_model_args(tmp_path / "nowhere")


def test_unknown_attention_backend():
    with pytest.raises(MftError, match="'flash9'.*auto, flex, sdpa, triton, xformers"):
        Transformer(ARGS, attn_backend="flash9")


def test_params_json_defaults(tmp_path):
    (tmp_path / "params.json").write_text(json.dumps(
        {"dim": 64, "n_layers": 2, "n_heads": 4, "hidden_dim": 96, "vocab_size": 100, "norm_eps": 1e-5}))
    args = read_model_args(tmp_path)
    assert (args.head_dim, args.n_kv_heads, args.rope_theta, args.sliding_window) == (16, 4, 10000.0, None)


def test_transformers_4_style_config(tmp_path):
    """rope_theta at top level and head_dim null, as configs written by transformers 4 have them."""
    config = hf_config()
    del config["rope_parameters"]
    config.update(rope_theta=1e6, head_dim=None, hidden_size=64)
    (tmp_path / "config.json").write_text(json.dumps(config))
    args = read_model_args(tmp_path)
    assert (args.rope_theta, args.head_dim, args.dim) == (1e6, 16, 64)


def test_unsupported_rope_scaling_is_refused(tmp_path):
    config = hf_config(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0})
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(MftError, match="llama3"):
        read_model_args(tmp_path)


def test_missing_shard_and_pickle_only_folders(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(hf_config()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    model = build(ARGS, device="cpu", dtype=torch.float32)
    with pytest.raises(MftError, match="safetensors"):
        load_weights(model, tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(MftError, match="model-00002-of-00002.safetensors"):
        load_weights(model, tmp_path)


def test_native_layout_preferred_when_both_present(tmp_path):
    model = random_model()
    save_consolidated(model, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(hf_config()))
    assert detect_format(tmp_path / "ckpt") == "consolidated"


def test_rotary_permutation_round_trip():
    w = torch.randn(4 * 8, 32)
    assert torch.equal(unpermute_rotary(permute_rotary(w, 4), 4), w)
    # Per head, HF's first half holds the even members of our pairs, its second half the odd ones.
    hf = permute_rotary(w, 4)
    assert torch.equal(hf[:4], w[0:8:2]) and torch.equal(hf[4:8], w[1:8:2])


def test_saved_tensors_are_plain_safetensors(tmp_path):
    model = random_model(dtype=torch.bfloat16)
    folder = save_consolidated(model, tmp_path / "ckpt")
    tensors = load_file(str(folder / "consolidated.safetensors"))
    assert tensors.keys() == model.state_dict().keys() and tensors["norm.weight"].dtype == torch.bfloat16
