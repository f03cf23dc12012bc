"""The one build pipeline: precision of what trains, one forward for training and decoding."""

import pytest
import torch
from conftest import build, tiny_args

from mft.build import ModelSpec, Runtime, build_model
from mft.generate.fuse import fuse_projections
from mft.model.kv_cache import KVCache, plan_decode, plan_prefill
from mft.peft.lora import LoRASettings

ARGS = tiny_args(vocab_size=96, sliding_window=6)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
def test_full_fine_tuning_in_bf16_keeps_fp32_masters(device):
    """One process, bf16 compute: an lr-1e-5 AdamW update of a weight is applied, not rounded away
    (bf16's spacing near 0.02 is ~8e-5), and the forward still computes in bf16."""
    model = build_model(ModelSpec(ARGS), Runtime(device=device, dtype=torch.bfloat16, train=True))
    weight = model.layers[0].attention.wq.weight
    assert weight.dtype == torch.float32 and weight.requires_grad
    before = weight.detach().clone()
    tokens = torch.arange(1, 17, device=device)
    cu = torch.tensor([0, 16], dtype=torch.int32, device=device)
    logits = model(tokens, torch.arange(16, device=device), cu, 16)
    assert logits.dtype == torch.bfloat16
    logits.float().logsumexp(-1).sum().backward()
    torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0).step()
    # Adam's first step moves each weight by lr * g / (|g| + eps): lr, where |g| >> eps.
    change = (weight.detach() - before).abs()[weight.grad.abs() > 1e-6]
    assert change.numel() > weight.numel() // 2
    torch.testing.assert_close(change, torch.full_like(change, 1e-5), rtol=0.02, atol=0)


def test_lora_keeps_the_frozen_base_in_the_compute_dtype():
    model = build_model(ModelSpec(ARGS, lora=LoRASettings(r=2, alpha=4)),
                        Runtime(dtype=torch.bfloat16, train=True))
    wq = model.layers[0].attention.wq
    assert wq.weight.dtype == torch.bfloat16 and not wq.weight.requires_grad
    assert wq.lora_a.dtype == torch.float32 and wq.lora_a.requires_grad
    assert torch.count_nonzero(wq.lora_a) > 0 and torch.count_nonzero(wq.lora_b) == 0  # drawn, and B starts at zero


def test_the_same_seed_gives_the_same_weights_whatever_else_is_built():
    """Random weights depend on the seed only: not on LoRA, training or the compute precision."""
    plain = build(ARGS, seed=3)
    trained = build_model(ModelSpec(ARGS, seed=3, lora=LoRASettings(r=2)), Runtime(train=True))
    full = build_model(ModelSpec(ARGS, seed=3), Runtime(train=True))
    for name, tensor in plain.state_dict().items():
        assert torch.equal(tensor, trained.state_dict()[name]) and torch.equal(tensor, full.state_dict()[name]), name
    assert not torch.equal(plain.output.weight, build(ARGS, seed=4).output.weight)


@pytest.mark.parametrize("fused", [False, True])
def test_the_forward_over_a_kv_cache_equals_the_packed_forward(fused):
    """Chunked prefill then one token at a time, through a rolling cache shorter than the
    sequence (window 6), gives the logits of one packed forward over the whole sequence."""
    model = build(ARGS, std=0.2).eval()
    n = 20
    tokens = torch.randint(0, ARGS.vocab_size, (n,), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(n)
    with torch.no_grad():
        packed = model(tokens, positions, torch.tensor([0, n], dtype=torch.int32), n)
        weights = fuse_projections(model) if fused else None
        cache = KVCache.allocate(ARGS, 1, n, device="cpu", dtype=torch.float32)
        assert cache.groups[0].size == ARGS.sliding_window
        steps = []
        for a, b in ((0, 3), (3, 11)):  # the second chunk is longer than the window
            plan = plan_prefill(cache, positions[None, a:b], torch.ones(1, b - a, dtype=torch.bool))
            steps.append(model(tokens[None, a:b], positions[None, a:b], cache=plan, fused=weights))
        for t in range(11, n):
            plan = plan_decode(cache, positions[t:t + 1])
            steps.append(model(tokens[t:t + 1, None], positions[t:t + 1, None], cache=plan, fused=weights))
    torch.testing.assert_close(torch.cat(steps), packed, atol=1e-5, rtol=1e-5)
