"""Exports against their consumers: peft + transformers load the PEFT adapter, transformers loads
the merged HF folder (and its tokenizer), mistral-inference's LoRA merge rule reproduces
lora.safetensors, and mft-export drives them from a run dir."""

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from conftest import build, tiny_args
from safetensors.torch import load_file

from mft.checkpoint.adapter import save_adapter
from mft.checkpoint.consolidated import save_consolidated
from mft.checkpoint.export import (
    MISTRAL_LORA,
    export_consolidated,
    export_hf,
    export_peft,
    parse_size,
)
from mft.checkpoint.load import load_weights, read_model_args
from mft.cli.export import main as mft_export
from mft.generate.load import AdapterRef, ModelSource, load_model
from mft.peft.lora import LoRASettings, apply_lora, lora_modules

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

VOCAB, SEQ = 160, 30
REPO = str(Path(__file__).resolve().parents[1])


def logits_of(model, ids):
    n = len(ids)
    with torch.no_grad():
        return model(ids, torch.arange(n), torch.tensor([0, n], dtype=torch.int32), n)


def hf_logits(model, ids):
    with torch.no_grad():
        return model(ids[None]).logits[0]


@pytest.fixture(scope="module")
def gen_export_setup(tmp_path_factory):
    """An HF base saved by transformers, and an mft adapter on it (random B, a subset of targets,
    q and k included so the rotary permutation matters)."""
    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    config = transformers.MistralConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=5000.0, sliding_window=16,
        tie_word_embeddings=False, initializer_range=0.2,
    )
    transformers.MistralForCausalLM(config).save_pretrained(root / "base")
    args = read_model_args(root / "base")
    model = build(args, device="cpu", dtype=torch.float32)
    load_weights(model, root / "base")
    settings = LoRASettings(r=4, alpha=8, target_modules=["wq", "wk", "wv", "w2"])
    torch.manual_seed(1)
    apply_lora(model, settings)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_b.normal_(std=0.1)
    save_adapter(model, root / "adapter", settings,
                 {"name": "t", "checkpoint": str(root / "base"), "tokenizer": "v3", "args": asdict(args)})
    ids = torch.randint(0, VOCAB, (SEQ,), generator=torch.Generator().manual_seed(2))
    return root, model.eval(), ids


def fresh_hf_base(root):
    return transformers.MistralForCausalLM.from_pretrained(root / "base").eval()


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_peft_export_loads_onto_transformers(gen_export_setup, scale):
    root, model, ids = gen_export_setup
    out = export_peft(root / "adapter", root / f"peft_{scale}", scale=scale)
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["target_modules"] == ["down_proj", "k_proj", "q_proj", "v_proj"]
    adapted = peft.PeftModel.from_pretrained(fresh_hf_base(root), out).eval()
    expected = logits_of(load_model(ModelSource(root / "base", [AdapterRef(root / "adapter", scale)]),
                                    device="cpu", dtype=torch.float32, merge=False), ids)
    diff = (hf_logits(adapted, ids) - expected).abs().max().item()
    assert diff <= 1e-4, diff
    if scale != 1.0:  # the scale really changed the adapter
        assert (expected - logits_of(model, ids)).abs().max() > 1e-2


def test_merged_hf_export_loads_in_transformers(gen_export_setup):
    from mft.data.tokenizer import load_tokenizer

    root, model, ids = gen_export_setup
    tokenizer = load_tokenizer("v3")
    out = export_hf(model, root / "hf", tokenizer_file=tokenizer.path, dtype=torch.float32, max_shard_size="40KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    merged = transformers.MistralForCausalLM.from_pretrained(out).eval()
    diff = (hf_logits(merged, ids) - logits_of(model, ids)).abs().max().item()
    assert diff <= 1e-4, diff
    # Merged on the fly: the model keeps its adapter, unmerged (training on it would go on adapting).
    assert lora_modules(model) and not any(m.merged for m in lora_modules(model).values())
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    text = "Anagrams of listen: silent, enlist."
    assert hf_tokenizer(text).input_ids == tokenizer.encode_text(text, bos=True, eos=False)
    assert read_model_args(out) == model.args and load_tokenizer(out).version == "v3"


def test_consolidated_export_with_mistral_inference_lora(gen_export_setup):
    root, model, ids = gen_export_setup
    base = load_model(ModelSource(root / "base"), device="cpu", dtype=torch.float32)
    out = export_consolidated(base, root / "consolidated", dtype=torch.float32, lora_from=root / "adapter")
    lora = load_file(str(out / MISTRAL_LORA))
    assert len(lora) == 2 * 7 * model.args.n_layers and {t.dtype for t in lora.values()} == {torch.float32}
    # mistral-inference's load_lora: W + scaling * B @ A for every linear of every block, scaling 2.0.
    reloaded = load_model(ModelSource(out), device="cpu", dtype=torch.float32)
    with torch.no_grad():
        for name in [k.removesuffix(".lora_A.weight") for k in lora if k.endswith(".lora_A.weight")]:
            delta = lora[f"{name}.lora_B.weight"] @ lora[f"{name}.lora_A.weight"]
            reloaded.get_parameter(f"{name}.weight").add_(2.0 * delta)
    diff = (logits_of(reloaded, ids) - logits_of(model, ids)).abs().max().item()
    assert diff <= 1e-4, diff


def test_export_command_from_a_run_dir(gen_export_setup, tmp_path, capsys):
    """mft-export over a run dir: its latest adapter onto the base the adapter names."""
    root, model, ids = gen_export_setup
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    for step in (1, 3):
        (run / "checkpoints" / f"step_{step:06d}").symlink_to(root / "adapter")
    (run / "resolved_config.yaml").write_text("model:\n  tokenizer: v3\n")

    assert mft_export(["hf", str(run), str(tmp_path / "hf"), "--dtype", "fp32"]) == 0
    assert mft_export(["peft", str(run), str(tmp_path / "peft")]) == 0
    assert mft_export(["consolidated", str(run), str(tmp_path / "merged"), "--merge", "--dtype", "fp32"]) == 0
    assert "Hugging Face model" in capsys.readouterr().out
    merged = transformers.MistralForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert (hf_logits(merged, ids) - logits_of(model, ids)).abs().max() <= 1e-4
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(root / "base")
    consolidated = load_model(ModelSource(tmp_path / "merged"), device="cpu", dtype=torch.float32)
    assert (logits_of(consolidated, ids) - logits_of(model, ids)).abs().max() <= 1e-4
    assert not (tmp_path / "merged" / MISTRAL_LORA).exists()
    assert mft_export(["peft", str(root / "base"), str(tmp_path / "nothing")]) == 1
    assert "exactly one adapter" in capsys.readouterr().err


def test_export_command_puts_an_adapter_onto_another_base(gen_export_setup, tmp_path, capsys):
    """--base: the adapter onto a base other than the one it records (which need not exist), at --scale."""
    root, model, ids = gen_export_setup
    moved = tmp_path / "adapter"
    moved.mkdir()
    config = json.loads((root / "adapter" / "adapter_config.json").read_text())
    config["base_model"]["checkpoint"] = str(tmp_path / "gone")
    (moved / "adapter_config.json").write_text(json.dumps(config))
    (moved / "adapter.safetensors").symlink_to(root / "adapter" / "adapter.safetensors")
    other = tmp_path / "other_base"
    torch.manual_seed(5)
    transformers.MistralForCausalLM(fresh_hf_base(root).config).save_pretrained(other)

    assert mft_export(["hf", str(moved), str(tmp_path / "hf"), "--base", str(other), "--scale", "0.5",
                       "--dtype", "fp32", "--tokenizer", "v3"]) == 0
    expected = logits_of(load_model(ModelSource(other, [AdapterRef(root / "adapter", 0.5)]),
                                    device="cpu", dtype=torch.float32, merge=False), ids)
    merged = transformers.MistralForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert (hf_logits(merged, ids) - expected).abs().max() <= 1e-4
    assert mft_export(["hf", str(moved), str(tmp_path / "nothing")]) == 1
    assert "gone" in capsys.readouterr().err


def test_export_command_runs_as_a_module(gen_export_setup, tmp_path):
    root, _, _ = gen_export_setup
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}

    def mft_export_process(*args):
        return subprocess.run([sys.executable, "-m", "mft.cli.export", *map(str, args)], env=env,
                              capture_output=True, text=True)

    ok = mft_export_process("peft", root / "adapter", tmp_path / "peft")
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "peft" / "adapter_model.safetensors").is_file()
    bad = mft_export_process("hf", tmp_path / "missing", tmp_path / "hf")
    assert bad.returncode == 1
    assert bad.stderr.startswith("mft-export: error: ") and "missing does not exist" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("20KB") == 20_000 and parse_size(123) == 123
    assert parse_size("1.5MB") == 1_500_000


def test_save_consolidated_round_trip_keeps_generation(tmp_path, gen_export_setup):
    """A random-init base saved by training (save_consolidated) loads back bit-identical."""
    root, model, ids = gen_export_setup
    base = load_model(ModelSource(root / "base"), device="cpu", dtype=torch.float32)
    save_consolidated(base, tmp_path / "c")
    again = load_model(ModelSource(tmp_path / "c"), device="cpu", dtype=torch.float32)
    assert torch.equal(logits_of(again, ids), logits_of(base, ids))


@pytest.fixture(scope="module")
def random_base_run(tmp_path_factory):
    """A run dir as mft-train leaves it on a random base: base_model/ (consolidated, fp32) and a
    LoRA checkpoint whose config names it (tokenizer v3)."""
    run = tmp_path_factory.mktemp("random_run") / "run"
    model = build(tiny_args(vocab_size=VOCAB), device="cpu", dtype=torch.float32, std=0.2)
    base = save_consolidated(model, run / "base_model")
    settings = LoRASettings(r=4, alpha=8, target_modules=["wq", "wk", "w1"])
    torch.manual_seed(3)
    apply_lora(model, settings)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_b.normal_(std=0.1)
    describe = {"name": "tiny", "checkpoint": str(base), "tokenizer": "v3", "args": asdict(model.args)}
    save_adapter(model, run / "checkpoints" / "step_000002", settings, describe, step=2)
    (run / "resolved_config.yaml").write_text("model:\n  tokenizer: v3\n")
    ids = torch.randint(0, VOCAB, (SEQ,), generator=torch.Generator().manual_seed(4))
    return run, model.eval(), ids


V3_HELLO = [1, 7080, 29477]  # mistral-common's v3 ids of "hello" (BOS first)
# Strings whose ids transformers' own conversion of a SentencePiece model gets wrong (runs of spaces).
TOKENIZER_TEXTS = ["Anagrams of listen: silent, enlist.", "  What's the weather in Oslo?\n", "a\tb  c   d",
                   "héllo wörld 日本 🙂", "def f(x):\n    return x  # ok", " ", ""]


def test_hf_export_defaults_to_the_base_dtype_and_ships_a_tokenizer(random_base_run, tmp_path, capsys):
    """mft-export hf of a run on a random fp32 base: fp32 weights (said, and in config.json), mft's
    logits, and a tokenizer AutoTokenizer loads with mistral-common's ids."""
    from mft.data.tokenizer import load_tokenizer

    run, model, ids = random_base_run
    assert mft_export(["hf", str(run), str(tmp_path / "hf")]) == 0
    assert "fp32" in capsys.readouterr().out
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "float32"
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert merged.dtype == torch.float32
    diff = (hf_logits(merged, ids) - logits_of(model, ids)).abs().max().item()
    assert diff <= 1e-4, diff
    reference = load_tokenizer("v3")
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in TOKENIZER_TEXTS:
        assert hf_tokenizer(text).input_ids == reference.encode_text(text, bos=True, eos=False), text
        assert hf_tokenizer.decode(hf_tokenizer(text).input_ids, skip_special_tokens=True) == text
    # A bf16 base exports in bf16 unless --dtype says otherwise.
    bf16_base = tmp_path / "bf16_base"
    save_consolidated(load_model(ModelSource(run / "base_model"), device="cpu", dtype=torch.bfloat16), bf16_base)
    assert mft_export(["hf", str(bf16_base), str(tmp_path / "hf16"), "--tokenizer", "v3"]) == 0
    assert "bf16" in capsys.readouterr().out
    assert json.loads((tmp_path / "hf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"


@pytest.mark.parametrize("spec", ["v1", "v7", "v3-tekken"])
def test_merged_consolidated_export_tokenizer_loads_in_transformers(random_base_run, tmp_path, spec):
    """consolidated --merge: one Mistral tokenizer file (mistral-inference) and AutoTokenizer's files."""
    from mft.data.tokenizer import load_tokenizer

    run, _, _ = random_base_run
    out = tmp_path / "merged"
    assert mft_export(["consolidated", str(run), str(out), "--merge", "--tokenizer", spec]) == 0
    mistral_files = [p.name for p in out.iterdir() if p.name == "tekken.json" or p.name.startswith("tokenizer.model")]
    assert len(mistral_files) == 1, mistral_files
    reference, hf_tokenizer = load_tokenizer(spec), transformers.AutoTokenizer.from_pretrained(out)
    for text in TOKENIZER_TEXTS:
        assert hf_tokenizer(text).input_ids == reference.encode_text(text, bos=True, eos=False), (spec, text)


def test_hf_export_copies_a_hf_base_tokenizer(gen_export_setup, tmp_path):
    """A Hugging Face base's own tokenizer files (chat template included) go with the export as they are."""
    from mft.checkpoint.hf_tokenizer import write_sentencepiece_as_hf
    from mft.data.tokenizer import load_tokenizer

    root, _, _ = gen_export_setup
    base = tmp_path / "base"
    base.mkdir()
    for f in (root / "base").iterdir():
        (base / f.name).symlink_to(f)
    write_sentencepiece_as_hf(load_tokenizer("v3").path, base)  # as Mistral's repos: HF files + tokenizer.model.v3
    (base / "tokenizer.model.v3").symlink_to(load_tokenizer("v3").path)
    (base / "chat_template.jinja").write_text("{{ messages }}")
    assert mft_export(["hf", str(base), str(tmp_path / "hf"), "--dtype", "fp32"]) == 0
    assert (tmp_path / "hf" / "chat_template.jinja").read_text() == "{{ messages }}"
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")("hello").input_ids == V3_HELLO


def test_peft_export_of_a_random_base_run_loads_with_transformers(random_base_run, tmp_path, capsys):
    """The PEFT export of an adapter on a consolidated (random) base names a base transformers reads
    (OUT/base, written in Hugging Face format), and peft on it gives mft's logits."""
    run, model, ids = random_base_run
    out = tmp_path / "peft"
    assert mft_export(["peft", str(run), str(out)]) == 0
    assert "fp32" in capsys.readouterr().out
    config = json.loads((out / "adapter_config.json").read_text())
    base = transformers.AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"])
    adapted = peft.PeftModel.from_pretrained(base, out).eval()
    diff = (hf_logits(adapted, ids) - logits_of(model, ids)).abs().max().item()
    assert diff <= 1e-4, diff
    assert transformers.AutoTokenizer.from_pretrained(config["base_model_name_or_path"])("hello").input_ids == V3_HELLO
