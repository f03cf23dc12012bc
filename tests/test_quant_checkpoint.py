"""Quantised weights on disk: streaming quantisation, mft's quantised checkpoints, adapter interchange, merging."""

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from conftest import build, tiny_args

import mft.quant.linear as quant_linear
from mft.checkpoint.adapter import load_adapter, save_adapter
from mft.checkpoint.export import export_hf
from mft.checkpoint.load import detect_format, load_weights, read_model_args
from mft.checkpoint.quantized import save_quantized
from mft.cli.export import main as mft_export
from mft.cli.quantize import main as mft_quantize
from mft.data.tokenizer import BUILTIN, load_tokenizer
from mft.data.tokenizer_files import model_tokenizer
from mft.peft.lora import LoRASettings, apply_lora, lora_modules
from mft.quant.formats import QuantSpec
from mft.quant.linear import QuantizedLinear, dense_weight, quantized_layers
from mft.quant.model import quantize_model_
from mft.utils.errors import MftError

ARGS = tiny_args(dim=128, head_dim=32, hidden_dim=256, vocab_size=96, rope_theta=1e6, sliding_window=None)
NF4_DQ = QuantSpec("nf4", 64, double_quant=True)
INT4 = QuantSpec("int4", 128)
SPECS = {"nf4-dq": NF4_DQ, "int4": INT4, "nf4": QuantSpec("nf4", 64)}
REPO = str(Path(__file__).resolve().parents[1])


def inputs(n: int = 12):
    tokens = torch.randint(0, ARGS.vocab_size, (n,), generator=torch.Generator().manual_seed(1))
    return tokens, torch.arange(n), torch.tensor([0, n], dtype=torch.int32), n


def quantised_model(spec, seed=0, dtype=torch.float32, **kw):
    return build(ARGS, quant=spec, device="cpu", dtype=dtype, seed=seed, **kw)


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype and torch.equal(sa[name], sb[name]), name


def randomise_lora(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_b.copy_(torch.randn(m.lora_b.shape, generator=g) * 0.05)


@pytest.mark.parametrize("name", list(SPECS))
def test_random_quantised_model_equals_the_quantised_dense_model(name):
    torch.manual_seed(0)
    dense = build(ARGS, device="cpu", dtype=torch.float32)
    quantize_model_(dense, SPECS[name])
    assert_same_state(quantised_model(SPECS[name]), dense)


@pytest.mark.parametrize("name", ["nf4-dq", "int4"])
def test_quantised_checkpoint_reloads_bit_identically(tmp_path, name):
    model = quantised_model(SPECS[name], dtype=torch.bfloat16, quant_modules=("wq", "wk", "wv", "wo", "w1", "w2", "w3", "output"))
    folder = save_quantized(model, tmp_path / "q", source="test")
    assert sorted(p.name for p in folder.iterdir()) == ["model.safetensors", "params.json", "quant_config.json"]
    config = json.loads((folder / "quant_config.json").read_text())
    assert config["format"] == "mft-quantized" and config["quant"]["format"] == SPECS[name].format
    assert config["modules"] == ["wq", "wk", "wv", "wo", "w1", "w2", "w3", "output"]
    assert detect_format(folder) == "quantized" and read_model_args(folder) == ARGS
    fresh = build(ARGS, quant=SPECS[name], device="cpu", dtype=torch.bfloat16,
                  quant_modules=tuple(config["modules"]))
    load_weights(fresh, folder)
    assert_same_state(fresh, model)
    assert isinstance(fresh.output, QuantizedLinear)
    torch.testing.assert_close(fresh(*inputs()), model(*inputs()), rtol=0, atol=0)


def test_streaming_load_quantises_each_tensor_as_it_is_read(tmp_path, monkeypatch):
    torch.manual_seed(0)
    dense = build(ARGS, device="cpu", dtype=torch.bfloat16)
    hf_folder = export_hf(dense, tmp_path / "hf", dtype=torch.bfloat16)
    seen = []
    original = quant_linear.quantize

    def spy(weight, spec):  # one dense tensor at a time, already unpermuted, in the file's dtype
        seen.append((tuple(weight.shape), weight.dtype))
        return original(weight, spec)

    monkeypatch.setattr(quant_linear, "quantize", spy)
    model = build(ARGS, quant=NF4_DQ, device="cpu", dtype=torch.bfloat16, weights=hf_folder)
    assert not any(n.endswith(("wq.weight", "w1.weight")) for n in model.state_dict())
    assert len(seen) == 7 * ARGS.n_layers and all(dtype == torch.bfloat16 for _, dtype in seen)
    quantize_model_(dense, NF4_DQ)
    assert_same_state(model, dense)


def test_quantised_checkpoint_loads_into_a_dense_model_dequantised(tmp_path):
    model = quantised_model(INT4)
    folder = save_quantized(model, tmp_path / "q")
    dense = build(ARGS, device="cpu", dtype=torch.float32)
    load_weights(dense, folder)
    for name, layer in quantized_layers(model).items():
        assert torch.equal(dense.get_submodule(name).weight, layer.dequantize(torch.float32)), name
    torch.testing.assert_close(dense(*inputs()), model(*inputs()), rtol=1e-5, atol=1e-5)


def test_loading_a_checkpoint_quantised_differently_is_a_clear_error(tmp_path):
    folder = save_quantized(quantised_model(NF4_DQ), tmp_path / "q")
    other = build(ARGS, quant=INT4, device="cpu", dtype=torch.float32)
    with pytest.raises(MftError, match=r"holds nf4 .* set up for int4"):
        load_weights(other, folder)


def test_quantize_command_output_loads_with_no_dense_pass(tmp_path, monkeypatch):
    torch.manual_seed(0)
    dense = build(ARGS, device="cpu", dtype=torch.bfloat16)
    source = export_hf(dense, tmp_path / "hf", dtype=torch.bfloat16, tokenizer_file=BUILTIN["v3"])
    assert mft_quantize([str(source), str(tmp_path / "q"), "--format", "nf4", "--device", "cpu"]) == 0
    # The quantised folder keeps its source's tokenizer, so presets resolve it as the source's.
    assert load_tokenizer(tmp_path / "q").version == "v3" and model_tokenizer(tmp_path / "q", "v1") == str(tmp_path / "q")

    def no_quantize(*_):
        raise AssertionError("a quantised checkpoint must load without quantising")

    monkeypatch.setattr(quant_linear, "quantize", no_quantize)
    model = build(ARGS, quant=NF4_DQ, device="cpu", dtype=torch.bfloat16, weights=tmp_path / "q")
    monkeypatch.undo()
    quantize_model_(dense, NF4_DQ)
    assert_same_state(model, dense)


@pytest.mark.parametrize("spec", [NF4_DQ, INT4], ids=["nf4-dq", "int4"])
def test_adapters_move_between_quantised_and_dense_bases(tmp_path, spec):
    settings = LoRASettings(r=4, alpha=8)
    torch.manual_seed(0)
    dense = build(ARGS, device="cpu", dtype=torch.float32)
    qmodel = quantised_model(spec)  # the same seed: the quantised twin of `dense`
    apply_lora(qmodel, settings)
    randomise_lora(qmodel)
    save_adapter(qmodel, tmp_path / "from_q", settings, base={"args": asdict(ARGS)})

    load_adapter(dense, tmp_path / "from_q", ARGS)
    for name, m in lora_modules(qmodel).items():
        assert torch.equal(lora_modules(dense)[name].lora_a, m.lora_a)
        assert torch.equal(lora_modules(dense)[name].lora_b, m.lora_b)
    # Same adapter, bases differing only by 4-bit rounding (~10% per weight on this random model).
    out_q, out_d = qmodel(*inputs()), dense(*inputs())
    assert (out_q - out_d).norm() < 0.35 * out_d.norm()

    save_adapter(dense, tmp_path / "from_dense", settings, base={"args": asdict(ARGS)})
    fresh_q = quantised_model(spec)
    load_adapter(fresh_q, tmp_path / "from_dense", ARGS)
    torch.testing.assert_close(fresh_q(*inputs()), out_q, rtol=0, atol=0)


def test_merge_lora_onto_a_quantised_base_gives_a_model_transformers_and_mft_load(tmp_path):
    transformers = pytest.importorskip("transformers")
    settings = LoRASettings(r=4, alpha=8)
    qmodel = quantised_model(NF4_DQ)
    base = save_quantized(qmodel, tmp_path / "base")
    apply_lora(qmodel, settings)
    randomise_lora(qmodel)
    save_adapter(qmodel, tmp_path / "adapter", settings, base={"args": asdict(ARGS), "checkpoint": str(base)})
    expected = qmodel(*inputs())

    # A vocabulary of 96 names no Mistral tokenizer: the export ships none.
    assert mft_export(["hf", str(tmp_path / "adapter"), str(tmp_path / "merged"), "--dtype", "fp32",
                       "--tokenizer", "none"]) == 0
    hf_model = transformers.MistralForCausalLM.from_pretrained(tmp_path / "merged", torch_dtype=torch.float32).eval()
    tokens = inputs()[0]
    with torch.no_grad():
        hf_logits = hf_model(tokens[None]).logits[0]
    torch.testing.assert_close(hf_logits, expected, rtol=1e-4, atol=1e-4)

    ours = build(ARGS, device="cpu", dtype=torch.float32)
    load_weights(ours, tmp_path / "merged")
    torch.testing.assert_close(ours(*inputs()), expected, rtol=1e-4, atol=1e-4)


def test_qlora_adapter_exports_round_once_and_move_onto_the_dense_base(tmp_path):
    """A bf16 export holds (dequantised fp32 W + scale * B @ A) rounded once; --base merges the same
    adapter onto the dense twin instead of the quantised base it records."""
    from mft.generate.load import AdapterRef, ModelSource, load_model

    settings = LoRASettings(r=4, alpha=8)
    torch.manual_seed(0)
    dense_base = export_hf(build(ARGS, device="cpu", dtype=torch.float32), tmp_path / "dense", dtype=torch.float32)
    qmodel = quantised_model(NF4_DQ)  # the same seed: the quantised twin of the dense base
    base = save_quantized(qmodel, tmp_path / "base")
    apply_lora(qmodel, settings)
    randomise_lora(qmodel)
    save_adapter(qmodel, tmp_path / "adapter", settings, base={"args": asdict(ARGS), "checkpoint": str(base)})

    assert mft_export(["consolidated", str(tmp_path / "adapter"), str(tmp_path / "bf16"), "--merge",
                       "--tokenizer", "none"]) == 0
    merged = build(ARGS, device="cpu", dtype=torch.bfloat16)
    load_weights(merged, tmp_path / "bf16")
    for name, layer in lora_modules(qmodel).items():
        once = (dense_weight(layer, torch.float32) + layer.delta_weight()).to(torch.bfloat16)
        assert torch.equal(merged.get_submodule(name).weight, once), name

    assert mft_export(["hf", str(tmp_path / "adapter"), str(tmp_path / "onto_dense"), "--base", str(dense_base),
                       "--dtype", "fp32", "--tokenizer", "none"]) == 0
    onto_dense = build(ARGS, device="cpu", dtype=torch.float32)
    load_weights(onto_dense, tmp_path / "onto_dense")
    reference = load_model(ModelSource(dense_base, [AdapterRef(tmp_path / "adapter")]), device="cpu",
                           dtype=torch.float32, merge=False)
    with torch.no_grad():
        torch.testing.assert_close(onto_dense(*inputs()), reference(*inputs()), rtol=1e-5, atol=1e-5)


def test_quantize_command_runs_as_a_module(tmp_path):
    torch.manual_seed(0)
    source = export_hf(build(ARGS, device="cpu", dtype=torch.bfloat16), tmp_path / "hf", dtype=torch.bfloat16)
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}

    def mft_quantize_process(*args):
        return subprocess.run([sys.executable, "-m", "mft.cli.quantize", *map(str, args), "--device", "cpu"],
                              env=env, capture_output=True, text=True)

    ok = mft_quantize_process(source, tmp_path / "q", "--format", "int4")
    assert ok.returncode == 0, ok.stderr
    assert json.loads((tmp_path / "q" / "quant_config.json").read_text())["quant"]["format"] == "int4"
    bad = mft_quantize_process(tmp_path / "missing", tmp_path / "q2")
    assert bad.returncode == 1
    assert bad.stderr.startswith("mft-quantize: error: ") and "missing" in bad.stderr
    assert "Traceback" not in bad.stderr
