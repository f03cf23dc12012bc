"""Mixtral (mixture of experts) through mft against transformers' MixtralForCausalLM, on tiny random
checkpoints transformers writes itself (4 experts, top 2): the loaders (the hub's per-expert names,
transformers 5's fused names, consolidated folders), logits, packing, and the grouped products
against the per-expert loop."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from conftest import build  # noqa: E402

from mft.checkpoint.consolidated import (  # noqa: E402
    args_to_params,
    file_shapes,
    params_to_args,
    save_consolidated,
)
from mft.checkpoint.load import read_model_args  # noqa: E402
from mft.model.args import ModelArgs, MoeArgs  # noqa: E402
from mft.model.moe import grouped_linear, route  # noqa: E402
from mft.utils.errors import MftError  # noqa: E402

VOCAB, SEQ = 160, 40
SHAPE = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, initializer_range=0.2, num_local_experts=4,
             num_experts_per_tok=2, sliding_window=None, rope_theta=5000.0)
TINY_MOE = ModelArgs(dim=48, n_layers=2, head_dim=16, hidden_dim=64, n_heads=4, n_kv_heads=2, vocab_size=VOCAB,
                     moe=MoeArgs(4, 2))


def mixtral(**overrides):
    torch.manual_seed(0)
    return transformers.MixtralForCausalLM(transformers.MixtralConfig(**{**SHAPE, **overrides})).eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(transformers model, the folder it saved itself to, mft's model loaded from it)."""
    hf_model = mixtral()
    folder = tmp_path_factory.mktemp("mixtral")
    hf_model.save_pretrained(folder)
    model = build(read_model_args(folder), weights=folder).eval()
    return hf_model, folder, model


def tokens(n=SEQ, seed=1):
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def mft_logits(model, toks, lengths=None):
    lengths = lengths or [len(toks)]
    positions = torch.cat([torch.arange(n) for n in lengths])
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    with torch.no_grad():
        return model(toks, positions, cu, max(lengths))


def hf_logits(model, toks):
    with torch.no_grad():
        return model(input_ids=toks[None], use_cache=False).logits[0]


def test_config_reads_as_moe(checkpoint):
    _, folder, model = checkpoint
    assert model.args.moe == MoeArgs(num_experts=4, num_experts_per_tok=2)
    assert model.layers[0].feed_forward.w1.weight.shape == (4, 64, 48)
    assert params_to_args(args_to_params(model.args), folder) == model.args


def test_logits_match_transformers(checkpoint):
    hf_model, _, model = checkpoint
    toks = tokens()
    assert (mft_logits(model, toks) - hf_logits(hf_model, toks)).abs().max().item() <= 1e-4


def test_packed_equals_unpacked(checkpoint):
    _, _, model = checkpoint
    lengths = [SEQ, 5, 17]
    toks = tokens(sum(lengths))
    packed, start = mft_logits(model, toks, lengths), 0
    for n in lengths:
        assert (packed[start:start + n] - mft_logits(model, toks[start:start + n])).abs().max().item() <= 1e-5
        start += n


def test_fused_names_of_transformers_5_load(checkpoint, tmp_path):
    """A file written from transformers 5's state dict (gate_up_proj, down_proj, mlp.gate) loads too."""
    hf_model, folder, model = checkpoint
    state = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in state)
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    fused = build(read_model_args(tmp_path), weights=tmp_path).eval()
    toks = tokens()
    assert torch.equal(mft_logits(fused, toks), mft_logits(model, toks))


def test_consolidated_round_trip_stores_one_tensor_per_expert(checkpoint, tmp_path):
    hf_model, _, model = checkpoint
    folder = save_consolidated(model, tmp_path / "consolidated")
    names = set(load_file(folder / "consolidated.safetensors"))
    assert names == set(file_shapes(model.args))
    assert "layers.1.feed_forward.experts.3.w2.weight" in names and "layers.1.feed_forward.gate.weight" in names
    assert json.loads((folder / "params.json").read_text())["moe"] == {"num_experts": 4, "num_experts_per_tok": 2}
    again = build(read_model_args(folder), weights=folder).eval()
    toks = tokens()
    assert (mft_logits(again, toks) - hf_logits(hf_model, toks)).abs().max().item() <= 1e-4


def test_a_missing_expert_is_named(checkpoint, tmp_path):
    _, folder, _ = checkpoint
    state = load_file(folder / "model.safetensors")
    del state["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(MftError, match=r"missing tensors \(1\): model\.layers\.1\.block_sparse_moe\.experts\.2\.w3"):
        build(read_model_args(tmp_path), weights=tmp_path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_gemm_equals_the_per_expert_loop(dtype):
    """torch's grouped GEMM and the loop over experts give the same products and gradients,
    with empty experts and uneven groups."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(19, 32, generator=gen).to(dtype)
    weight = torch.randn(5, 24, 32, generator=gen).to(dtype)
    offsets = torch.tensor([3, 3, 11, 11, 19], dtype=torch.int32)
    grad = torch.randn(19, 24, generator=gen).to(dtype)
    results = []
    for grouped in (True, False):
        xi, wi = x.clone().requires_grad_(), weight.clone().requires_grad_()
        out = grouped_linear(xi, wi, offsets, grouped=grouped)
        out.backward(grad)
        results.append((out, xi.grad, wi.grad))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)
    torch.testing.assert_close(results[1][0][3:11], x[3:11].float().matmul(weight[2].float().t()).to(dtype),
                               atol=tol * 10, rtol=tol * 10)


def test_routing_is_top_k_renormalised_and_sorted_by_expert():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 3.0, 1.0], [1.0, 2.0, 0.0, 0.0]])
    routing = route(logits, 2)
    assert routing.counts.tolist() == [2, 2, 1, 1]
    assert routing.offsets.tolist() == [2, 4, 5, 6]
    assert routing.token.tolist() == [0, 2, 0, 2, 1, 1]  # expert 0: tokens 0, 2; expert 1: 0, 2; 2: 1; 3: 1
    p = torch.softmax(logits[0], -1)
    assert routing.weight[0].item() == pytest.approx((p[0] / (p[0] + p[1])).item())
    uniform = route(torch.zeros(8, 4), 2)
    assert uniform.aux_loss.item() == pytest.approx(1.0)
