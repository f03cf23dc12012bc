"""tools/bench_moe.py: the counts its rows check before timing (against mft's and peft's own
builds), the active-parameter FLOP count, and a CPU smoke run of the rows that work today (each in
its own subprocess, tokens/s and a loss; the LoRA-on-experts mft row either runs with the expected
count or fails loudly with it, never times a model without expert adapters)."""

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import TINY
from mft.build import ModelSpec, Runtime, build_model
from mft.model.args import MoeArgs
from mft.peft.lora import LoRASettings
from mft.quant.formats import QuantSpec

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))

import bench_moe  # noqa: E402
from bench_common import flops_per_token, mean_keys, preset_args  # noqa: E402

TINY_MOE = replace(TINY, sliding_window=None, moe=MoeArgs(4, 2))


def lora(targets):
    return LoRASettings(r=bench_moe.LORA_RANK, alpha=bench_moe.LORA_ALPHA, target_modules=list(targets))


def on_meta(args, **spec):
    return build_model(ModelSpec(args, **spec), Runtime(device="meta", dtype=torch.bfloat16, train=True))


def test_expected_mft_count_is_mft_builds_count():
    """Dense blocks (one copy of w1 w2 w3) and MoE attention: what apply_lora makes today."""
    targets = bench_moe.ATTENTION + bench_moe.EXPERTS
    dense = on_meta(TINY, lora=lora(targets))
    assert bench_moe.check_trainable(dense, bench_moe.expected_mft_lora_params(TINY, targets), "dense") > 0
    attention = on_meta(TINY_MOE, lora=lora(bench_moe.ATTENTION))
    bench_moe.check_trainable(attention, bench_moe.expected_mft_lora_params(TINY_MOE, bench_moe.ATTENTION), "attn")


def test_expert_count_is_one_adapter_per_expert_and_a_shortfall_fails():
    per_expert = bench_moe.expected_mft_lora_params(replace(TINY_MOE, moe=MoeArgs(1, 1)), bench_moe.EXPERTS)
    assert bench_moe.expected_mft_lora_params(TINY_MOE, bench_moe.EXPERTS) == 4 * per_expert
    model = on_meta(TINY_MOE, lora=lora(bench_moe.ATTENTION))
    with pytest.raises(RuntimeError, match="trainable parameters, expected"):
        bench_moe.check_trainable(model, bench_moe.trainable_params(model) + 1, "short")


@pytest.mark.parametrize("experts_lora", [True, False])
def test_expected_peft_count_is_peffs(experts_lora):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from mft.checkpoint.hf import args_to_hf_config

    config = transformers.MixtralConfig(**args_to_hf_config(TINY_MOE, torch.float32))
    with torch.device("meta"):
        model = transformers.MixtralForCausalLM(config)
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=bench_moe.LORA_RANK, lora_alpha=bench_moe.LORA_ALPHA, target_modules=list(bench_moe.HF_ATTENTION),
        target_parameters=list(bench_moe.HF_EXPERT_PARAMETERS) if experts_lora else None))
    assert bench_moe.trainable_params(model) == bench_moe.expected_peft_lora_params(TINY_MOE, experts_lora)


def test_quantised_check_names_a_bf16_kind():
    spec = QuantSpec("nf4", 32, double_quant=True)  # TINY's hidden_dim 96 is no multiple of 64
    all_kinds = bench_moe.ATTENTION + bench_moe.EXPERTS
    bench_moe.check_quantised(on_meta(TINY, quant=spec, lora=lora(all_kinds)), TINY, all_kinds)
    partly = on_meta(TINY, quant=spec, quant_modules=("wq", "wk", "wv", "wo", "w1", "w3"), lora=lora(all_kinds))
    with pytest.raises(RuntimeError, match="w2: 2.00 bytes per weight"):
        bench_moe.check_quantised(partly, TINY, all_kinds)


def test_flops_count_active_parameters():
    """Mixtral-8x7B: 12.9B parameters active per token (Mistral's figure, embeddings included)."""
    args = preset_args("mixtral-8x7b")
    attention = 3 * 2 * 2 * args.n_heads * args.head_dim * mean_keys(4096, None) * args.n_layers
    active = (flops_per_token(args, 4096) - attention) / 4 + args.vocab_size * args.dim
    assert active == pytest.approx(12.9e9, rel=0.01)
    dense = replace(args, moe=None)
    assert flops_per_token(args, 4096) - flops_per_token(dense, 4096) == pytest.approx(
        4 * args.n_layers * (3 * args.dim * args.hidden_dim + args.dim * 8))


def table_rows(stdout: str) -> dict[tuple[str, str], list[str]]:
    """The table's cells by (group, row name), the header and rule lines left out."""
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] not in ("group", "---"):
            rows[cells[0], cells[1]] = cells
    return rows


@pytest.mark.slow
def test_bench_moe_smoke_on_cpu():
    """Both sides of the expert-LoRA group run (mft's row checks its adapters cover the experts)."""
    command = [sys.executable, "tools/bench_moe.py", "--device", "cpu", "--shape", "tiny", "--moe", "4,2",
               "--layers", "1", "--seq", "64", "--steps", "1", "--warmup", "0", "--groups", "moe4-lora",
               "--rows", "mft eager,tf+peft grouped_mm"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = table_rows(done.stdout)
    assert set(rows) == {("moe4-lora", r) for r in ("mft eager", "tf+peft grouped_mm")}
    for cells in rows.values():
        group, _, targets, layers, checkpointing, seq, tokens_per_s, peak, ratio, mfu, trainable, loss, note = cells
        assert (targets, layers, checkpointing, seq, peak, mfu) == ("attn+experts", "1", "none", "64", "-", "-"), cells
        assert note == "" and float(tokens_per_s.replace(",", "")) > 0 and 0 < float(loss) < 20, cells
    assert rows["moe4-lora", "tf+peft grouped_mm"][8] == "1.00x"
    assert "command: python tools/bench_moe.py --device cpu" in done.stdout
