"""Activation checkpointing per block (none | selective | full | auto): same numbers, what each
policy keeps (measured on meta against autograd on CPU), and auto's plan under a budget."""

import dataclasses

import pytest
import torch
from conftest import tiny_args
from torch.utils._python_dispatch import TorchDispatchMode

from mft.build import ModelSpec, Runtime, build_model
from mft.build import memory
from mft.build.parallelize import block_policies
from mft.data.encode import Encoded
from mft.data.packing import collate, pack
from mft.model.args import ModelArgs
from mft.model.attention import PackedDocs
from mft.model.rope import rope_tables
from mft.peft.lora import LoRASettings, lora_modules
from mft.train.loop import accumulate_gradients
from mft.utils.distributed import World
from mft.utils.errors import MftError

ARGS = tiny_args(dim=64, head_dim=16, hidden_dim=96, vocab_size=64, sliding_window=6)  # LoRA's r=4 < every dim / 4
LORA = LoRASettings(r=4, alpha=8)
# Shaped like a (much) smaller Mistral, built on meta only: matmuls through dim and hidden_dim
# are wider than LoRA's rank, as in a real model.
META_ARGS = ModelArgs(dim=256, n_layers=3, head_dim=32, hidden_dim=768, n_heads=8, n_kv_heads=2, vocab_size=512,
                      norm_eps=1e-5, rope_theta=1e4, sliding_window=None)


def lora_model(policy: str):
    model = build_model(ModelSpec(ARGS, seed=0, lora=LORA), Runtime(train=True, activation_checkpointing=policy))
    with torch.no_grad():  # B at zero would give A no gradient
        for m in lora_modules(model).values():
            m.lora_b.normal_(std=0.1, generator=torch.Generator().manual_seed(m.in_features + m.out_features))
    return model


def batch():
    g = torch.Generator().manual_seed(0)
    docs = [Encoded(torch.randint(1, ARGS.vocab_size, (n,), generator=g).tolist(), [i % 3 != 0 for i in range(n)])
            for n in (9, 5, 12)]
    (seq,), _ = pack(docs, 28, pad_id=0)
    return collate([seq])


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls: dict = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[func] = self.calls.get(func, 0) + 1
        return func(*args, **(kwargs or {}))


def test_selective_and_full_give_the_loss_and_gradients_of_none_and_recompute_what_they_should():
    results = {}
    for policy in ("none", "selective", "full"):
        model = lora_model(policy)
        loss = model(*batch_inputs(), head_mask=None).float().logsumexp(-1).sum()
        counter = _Count()
        with counter:
            loss.backward()
        grads = {n.replace("._checkpoint_wrapped_module", ""): p.grad for n, p in model.named_parameters()
                 if p.grad is not None}
        results[policy] = (float(loss.detach()), grads, counter.calls)
    loss, grads, none_calls = results["none"]
    assert len(grads) == ARGS.n_layers * 7 * 2
    for policy in ("selective", "full"):
        assert results[policy][0] == pytest.approx(loss, rel=1e-6)
        assert results[policy][1].keys() == grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(results[policy][1][name], grad, atol=1e-6, rtol=1e-5)
    # What backward runs again: nothing (none), the cheap ops and LoRA's rank-r B products
    # (selective: SwiGLU's silu once per block; B products are addmm into the base output), the whole forward (full). Recomputation stops
    # once backward has what it needs, so w2's B product (its output feeds only additions,
    # which keep nothing) is never recomputed.
    silu, mm, addmm = torch.ops.aten.silu.default, torch.ops.aten.mm.default, torch.ops.aten.addmm.default
    counts = {p: (results[p][2].get(silu, 0), results[p][2].get(mm, 0) + results[p][2].get(addmm, 0)) for p in results}
    assert counts["none"][0] == 0 and counts["selective"][0] == counts["full"][0] == ARGS.n_layers
    assert counts["selective"][1] == counts["none"][1] + ARGS.n_layers * 6  # the B products
    # full: the 7 base products, 4 A products (one shared by wq/wk/wv, one by w1/w3) and 6 B products.
    assert counts["full"][1] == counts["none"][1] + ARGS.n_layers * (7 + 4 + 6)


def batch_inputs():
    b = batch()
    return b.tokens, b.positions, b.cu_seqlens, b.max_seqlen


def test_selective_keeps_every_attention_kernel_and_the_quantised_matmul():
    import mft.quant.linear  # noqa: F401  registers mft::quantized_matmul

    class TritonAttention:  # mft::swa_attention's namespace and name (the op itself needs triton to import)
        namespace = "mft"

        def name(self):
            return "mft::swa_attention"

    kept = [TritonAttention(), torch.ops.mft.quantized_matmul.default,
            torch.ops.aten._scaled_dot_product_flash_attention.default]
    if hasattr(torch.ops.torch_attn, "_varlen_attn"):  # torch's varlen_attn, where auto may pick it
        kept.append(torch.ops.torch_attn._varlen_attn.default)
    assert all(memory.keeps_output(op, ()) for op in kept)
    assert not memory.keeps_output(torch.ops.aten.silu.default, ())
    assert not memory.keeps_output(torch.ops.mft.dequantize_nf4.default, ())  # a dense weight: recomputed


def test_accumulated_step_with_selective_blocks_equals_plain_training():
    plain, selective = lora_model("none"), lora_model("selective")
    loss_a, _ = accumulate_gradients(plain, [batch()], torch.device("cpu"), loss_chunk=7)
    loss_b, _ = accumulate_gradients(selective, [batch()], torch.device("cpu"), loss_chunk=7)
    assert loss_a == pytest.approx(loss_b, rel=1e-6)


def meta_lora_model(args=META_ARGS, dtype=torch.bfloat16):
    return build_model(ModelSpec(args, lora=LoRASettings(r=8, alpha=16)), Runtime(device="meta", dtype=dtype, train=True))


def test_kept_bytes_order_the_policies_and_grow_linearly_with_tokens():
    model = meta_lora_model()
    sizes = {t: memory.measure_blocks(model, t, torch.bfloat16, autocast=False)[1] for t in (256, 512, 768)}
    for m in sizes.values():
        assert m.none > m.selective > m.full == 256 * 2 * (m.full // (256 * 2))
    for policy in memory.POLICIES:
        kept = [sizes[t].kept(policy) for t in (256, 512, 768)]
        # Affine in tokens (LoRA's bf16 copies of its factors are the constant), and nearly proportional.
        assert kept[2] - kept[1] == kept[1] - kept[0]
        assert kept[1] / kept[0] == pytest.approx(2, rel=0.02)
    assert sizes[256].full == 256 * META_ARGS.dim * 2  # the block's bf16 input, nothing else


def test_none_bytes_equal_what_autograd_keeps_on_cpu():
    """The meta estimate of `none` equals the bytes autograd really saves in a CPU block (SDPA's
    CPU flash kernel keeps q, k, v, its output and the log-sum-exp, as the stand-in does)."""
    args = dataclasses.replace(META_ARGS, dim=64, hidden_dim=128, head_dim=16, n_heads=4, vocab_size=64)
    tokens = 48
    torch.manual_seed(0)
    model = build_model(ModelSpec(args, lora=LORA, attn_backend="sdpa"), Runtime(dtype=torch.float32, train=True))
    estimate = memory.measure_blocks(build_model(ModelSpec(args, lora=LORA), Runtime(device="meta", train=True)),
                                     tokens, torch.float32, autocast=False)[1]
    assert bytes_autograd_saves(model.layers[1], args, tokens) == estimate.none


def bytes_autograd_saves(block, args, tokens: int) -> int:
    """What autograd saves for backward in one forward of `block` over `tokens` tokens of one
    document: the storages of its saved tensors, the block's parameters and the rope tables left out."""
    x = torch.randn(tokens, args.dim, requires_grad=True)
    rope = rope_tables(torch.arange(tokens), args)
    docs = PackedDocs.from_cu_seqlens(torch.tensor([0, tokens], dtype=torch.int32), tokens, tokens)
    shared = {t.untyped_storage().data_ptr() for t in (*block.parameters(), rope.cos, rope.sin)}
    saved = {}

    def keep(t):
        saved[t.untyped_storage().data_ptr()] = t
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        out = block(x, rope, docs)
    assert out.shape == x.shape
    return sum(t.untyped_storage().nbytes() for ptr, t in saved.items() if ptr not in shared)


def blocks(n=4, none=100, selective=40, full=10, largest=5):
    return [memory.BlockActivations(none=none, selective=selective, full=full, largest=largest)] * n


def test_plan_picks_the_least_recomputation_that_fits():
    fixed, head = 1000, 30
    roomy = memory.plan_policies(fixed, blocks(), head, budget=10_000)
    assert roomy.policies == ("none",) * 4 and roomy.fits and roomy.peak == 1000 + 400 + 30
    tight = memory.plan_policies(fixed, blocks(), head, budget=1000 + 40 + 115)
    assert tight.policies == ("full",) * 4 and tight.fits
    impossible = memory.plan_policies(fixed, blocks(), head, budget=100)
    assert impossible.policies == ("full",) * 4 and not impossible.fits and "does NOT fit" in impossible.summary()
    # Two blocks none, two selective: 200 + 80 kept, 100 recomputed in one block's backward.
    middle = memory.plan_policies(fixed, blocks(), head, budget=1000 + 280 + 115)
    assert middle.policies == ("none", "none", "selective", "selective") and middle.fits
    assert middle.summary().startswith("blocks 0-1 none, 2-3 selective; estimated peak")
    # A budget between all-selective and the rest: a mix of selective and full.
    mixed = memory.plan_policies(fixed, blocks(), head, budget=1000 + 40 * 3 + 10 + 115)  # 1 none + 3 full fits too
    assert mixed.policies == ("selective",) * 3 + ("full",)


def test_auto_plans_from_measured_blocks_under_the_budget():
    def policies(budget_gib, device="cuda"):
        model = meta_lora_model()
        runtime = Runtime(device=device, dtype=torch.bfloat16, train=True, activation_checkpointing="auto",
                          memory_budget_gib=budget_gib, tokens_per_microbatch=4096)
        return block_policies(model, runtime, torch.bfloat16)

    assert policies(100.0) == ("none",) * 3
    assert policies(0.001) == ("full",) * 3
    model = meta_lora_model()
    fixed = memory.fixed_bytes(model, 1, torch.bfloat16)
    measured = memory.measure_blocks(model, 4096, torch.bfloat16, autocast=False)
    head = memory.head_bytes(META_ARGS.dim, META_ARGS.vocab_size, 4096, 0, torch.bfloat16)
    # Checkpointing one block adds its recomputed activations to backward's peak: here one
    # selective block costs more than it saves, two save more.
    mix = ("none", "selective", "selective")
    assert memory.peak_bytes(fixed, measured, mix, head) < memory.peak_bytes(fixed, measured, ("none",) * 3, head)
    assert policies((memory.peak_bytes(fixed, measured, mix, head) + 1) / memory.GIB) == mix
    assert policies(0.001, device="cpu") == ("none",) * 3  # no budget on CPU: auto means none


def test_config_takes_the_four_policies_and_refuses_true_false():
    from test_config_checks import composed

    from mft.train.setup import train_runtime

    cfg = composed("model=tiny")
    assert cfg.activation_checkpointing == "auto" and cfg.memory_budget_gib is None
    runtime = train_runtime(composed("activation_checkpointing=selective", "memory_budget_gib=20", "batch_size=3",
                                     "data.seq_len=100"), torch.device("cpu"), torch.float32, World())
    assert (runtime.activation_checkpointing, runtime.memory_budget_gib, runtime.tokens_per_microbatch) == \
        ("selective", 20.0, 300)
    for old in ("true", "false"):  # refused when composed, with the allowed values (tests/test_cli.py: the CLI's message)
        with pytest.raises(Exception) as refused:
            composed(f"activation_checkpointing={old}")
        assert "expected one of [none, full, selective, auto]" in str(refused.value.__cause__)
    from mft.train.checks import check_config

    with pytest.raises(MftError, match="memory_budget_gib"):
        check_config(composed("memory_budget_gib=0"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("policy", ["none", "selective", "full"])
def test_estimated_peak_is_within_15_percent_of_cuda_max_memory_allocated(policy):
    """A 3-layer Mistral-7B-shaped bf16 LoRA model, 4096 tokens: a step's measured peak against
    the plan's estimate for the same policy."""
    args = ModelArgs(dim=4096, n_layers=3, head_dim=128, hidden_dim=14336, n_heads=32, n_kv_heads=8,
                     vocab_size=32768, norm_eps=1e-5, rope_theta=1e6, sliding_window=None)
    assert_peak_matches_estimate(ModelSpec(args, lora=LoRASettings(r=16, alpha=32)), policy)


def assert_peak_matches_estimate(spec: ModelSpec, policy: str, tokens: int = 4096, chunk: int = 2048) -> None:
    """Two training steps of `spec` on the GPU under `policy`: the peak of allocated memory (AdamW's
    states included) within 15% of the plan's estimate, measured on the meta device."""
    from types import SimpleNamespace

    from mft.train.optim import build_optimizer

    args, device = spec.args, torch.device("cuda")
    meta = build_model(spec, Runtime(device="meta", dtype=torch.bfloat16, train=True))
    measured = memory.measure_blocks(meta, tokens, torch.bfloat16, autocast=False)
    estimate = memory.peak_bytes(memory.fixed_bytes(meta, 1, torch.bfloat16), measured, (policy,) * args.n_layers,
                                 memory.head_bytes(args.dim, args.vocab_size, tokens, chunk, torch.bfloat16))
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    model = build_model(spec, Runtime(device=device, dtype=torch.bfloat16, train=True, activation_checkpointing=policy))
    optimizer = build_optimizer(model, SimpleNamespace(lr=1e-5, betas=[0.9, 0.95], eps=1e-8, weight_decay=0.0))
    ids = torch.randint(0, args.vocab_size, (tokens + 1,), device=device)
    inputs = (ids[:-1], torch.arange(tokens, device=device), torch.tensor([0, tokens], dtype=torch.int32, device=device),
              tokens)
    for _ in range(2):  # the second step has AdamW's states
        torch.cuda.reset_peak_memory_stats()
        model(*inputs, targets=ids[1:], loss_chunk=chunk).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    peak = torch.cuda.max_memory_allocated() - base
    assert estimate == pytest.approx(peak, rel=0.15), (policy, estimate / memory.GIB, peak / memory.GIB)
