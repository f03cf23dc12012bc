"""LoRA: identity at init, merge/unmerge, frozen base, adapter round trip, equality with peft."""

from dataclasses import asdict

import pytest
import torch
from conftest import build, tiny_args
from torch import nn

from mft.checkpoint.adapter import load_adapter, save_adapter
from mft.model.args import ModelArgs
from mft.peft.lora import (
    LoRALinear,
    LoRASettings,
    apply_lora,
    lora_modules,
    merge_lora,
    unmerge_lora,
)
from mft.utils.errors import MftError

ARGS = tiny_args(dim=32, head_dim=8, hidden_dim=64, vocab_size=50, sliding_window=5)


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    return build(ARGS, device="cpu", dtype=torch.float32)


def inputs(n: int = 12):
    tokens = torch.randint(0, ARGS.vocab_size, (n,), generator=torch.Generator().manual_seed(1))
    return tokens, torch.arange(n), torch.tensor([0, n], dtype=torch.int32), n


def randomise_b(model):
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_b.normal_(std=0.1)


def test_identical_output_at_init():
    model = tiny_model()
    before = model(*inputs())
    names = apply_lora(model, LoRASettings(r=4, alpha=8))
    assert len(names) == 7 * ARGS.n_layers
    torch.testing.assert_close(model(*inputs()), before, rtol=0, atol=0)


def test_merge_unmerge_round_trip():
    model = tiny_model()
    apply_lora(model, LoRASettings(r=4, alpha=8))
    randomise_b(model)
    adapted = model(*inputs())
    weights = {n: p.clone() for n, p in model.state_dict().items() if n.endswith(".weight")}
    merge_lora(model)
    torch.testing.assert_close(model(*inputs()), adapted, atol=1e-5, rtol=1e-5)
    unmerge_lora(model)
    torch.testing.assert_close(model(*inputs()), adapted, atol=1e-6, rtol=1e-6)
    for name, p in model.state_dict().items():
        if name in weights:
            torch.testing.assert_close(p, weights[name], atol=1e-6, rtol=0)


def test_only_lora_parameters_get_gradients():
    model = tiny_model()
    apply_lora(model, LoRASettings(r=4, alpha=8, dropout=0.1))
    randomise_b(model)
    model(*inputs()).float().pow(2).mean().backward()
    for name, p in model.named_parameters():
        is_lora = name.endswith(("lora_a", "lora_b"))
        assert p.requires_grad == is_lora, name
        assert (p.grad is not None) == is_lora, name
        if is_lora:
            assert p.grad.abs().sum() > 0, name


def test_adapter_save_and_reload_reproduces_outputs(tmp_path):
    model = tiny_model()
    settings = LoRASettings(r=4, alpha=8, target_modules=["wq", "wv", "w2"])
    apply_lora(model, settings)
    randomise_b(model)
    expected = model(*inputs())
    save_adapter(model, tmp_path / "adapter", settings, base={"args": asdict(ARGS)})

    fresh = tiny_model()
    loaded = load_adapter(fresh, tmp_path / "adapter", ARGS)
    assert loaded.target_modules == ["wq", "wv", "w2"]
    torch.testing.assert_close(fresh(*inputs()), expected, rtol=0, atol=0)


def test_adapter_for_another_shape_is_refused(tmp_path):
    model = tiny_model()
    settings = LoRASettings(r=2)
    apply_lora(model, settings)
    save_adapter(model, tmp_path / "a", settings, base={"args": asdict(ARGS)})
    other = ModelArgs(**{**ARGS.__dict__, "dim": 48})
    with pytest.raises(MftError, match="dim: adapter 32 vs model 48"):
        load_adapter(tiny_model(), tmp_path / "a", other)


def test_unknown_target_module_is_a_clear_error():
    with pytest.raises(MftError, match="q_proj"):
        apply_lora(tiny_model(), LoRASettings(target_modules=["q_proj"]))


def test_lora_linear_equals_peft_lora_layer():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = nn.Linear(16, 24, bias=False)
    ours = LoRALinear(nn.Parameter(base.weight.detach().clone()), LoRASettings(r=4, alpha=12))
    with torch.no_grad():
        ours.lora_b.normal_()
    wrapped = peft.get_peft_model(
        nn.Sequential(base), peft.LoraConfig(r=4, lora_alpha=12, target_modules=["0"], lora_dropout=0.0)
    )
    layer = wrapped.base_model.model[0]
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(ours.lora_a)
        layer.lora_B["default"].weight.copy_(ours.lora_b)
    x = torch.randn(5, 16)
    torch.testing.assert_close(ours(x), wrapped(x), atol=1e-5, rtol=1e-5)
