"""The transformer on packed documents: isolation, sliding window, rope, names, sizes, init."""

import pytest
import torch
from conftest import build, tiny_args

from mft.checkpoint.consolidated import expected_shapes
from mft.model.args import ModelArgs
from mft.model.attention import (
    PackedDocs,
    attention_backend_names,
    get_attention_backend,
)
from mft.model.rope import apply_rope, rope_tables

ARGS = tiny_args(vocab_size=120)
LENGTHS = [5, 17, 1, 12, 9]  # odd lengths, a single token, documents longer than the window
# Every backend that runs on CPU tensors; the Triton kernel runs here only under Triton's
# interpreter, which tests/test_attention_kernels.py switches on for itself.
CPU_BACKENDS = [name for name in attention_backend_names() if name != "triton"]


def tiny_model(args=ARGS, backend="auto", seed=0, dtype=torch.float32):
    # std 0.2: large enough that mixing documents or positions would show
    model = build(args, device="cpu", dtype=dtype, attn_backend=backend, seed=seed, std=0.2)
    return model.eval()


def packed_inputs(lengths, seed=1):
    tokens = torch.randint(0, ARGS.vocab_size, (sum(lengths),), generator=torch.Generator().manual_seed(seed))
    positions = torch.cat([torch.arange(n) for n in lengths])
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return tokens, positions, cu, max(lengths)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("window", [8, None])
def test_packed_documents_equal_documents_alone(backend, window):
    args = ModelArgs(**{**ARGS.__dict__, "sliding_window": window})
    model = tiny_model(args, backend)
    tokens, positions, cu, max_len = packed_inputs(LENGTHS)
    with torch.no_grad():
        packed = model(tokens, positions, cu, max_len)
        for i, n in enumerate(LENGTHS):
            start = int(cu[i])
            alone = model(tokens[start:start + n], torch.arange(n), torch.tensor([0, n], dtype=torch.int32), n)
            assert (packed[start:start + n] - alone).abs().max().item() <= 1e-5


def test_positions_restart_per_document():
    """Rope rotates each document's q/k by its own positions, as if the document ran alone.

    (The logits could not show this: rope is relative, so shifting a whole document's positions
    changes q and k but not their products, up to rounding.)
    """
    model = tiny_model()
    attention = model.layers[0].attention
    captured = []

    def capture(q, k, v, docs, window):
        captured.append((q, k))
        return get_attention_backend("sdpa")(q, k, v, docs, window)

    attention.attn_fn = capture
    tokens, positions, cu, max_len = packed_inputs(LENGTHS)
    with torch.no_grad():
        model(tokens, positions, cu, max_len)
        model(tokens, torch.arange(len(tokens)), cu, max_len)  # positions wrongly continued
        start, n = int(cu[1]), LENGTHS[1]
        model(tokens[start:start + n], torch.arange(n), torch.tensor([0, n], dtype=torch.int32), n)
    (q_packed, k_packed), (q_continued, _), (q_alone, k_alone) = captured
    assert torch.allclose(q_packed[start:start + n], q_alone) and torch.allclose(k_packed[start:start + n], k_alone)
    assert (q_continued[start:start + n] - q_alone).abs().max() > 1e-2


def test_rope_is_relative_and_identity_at_zero():
    q, k = torch.randn(1, 1, 16), torch.randn(1, 1, 16)
    args = ModelArgs(head_dim=16, rope_theta=10000.0)
    at_zero = rope_tables(torch.tensor([0]), args)
    assert torch.allclose(apply_rope(q, at_zero.cos, at_zero.sin), q)

    def score(m, n):
        tm, tn = rope_tables(torch.tensor([m]), args), rope_tables(torch.tensor([n]), args)
        return (apply_rope(q, tm.cos, tm.sin) * apply_rope(k, tn.cos, tn.sin)).sum()

    assert torch.allclose(score(7, 3), score(104, 100), atol=1e-5)  # depends only on m - n


def reference_attention(q, k, v, lengths, window):
    """Dense softmax over the whole packed sequence with an explicit document + band mask."""
    dev = q.device
    doc = torch.repeat_interleave(torch.arange(len(lengths), device=dev), torch.tensor(lengths, device=dev))
    pos = torch.cat([torch.arange(n, device=dev) for n in lengths])
    distance = pos[:, None] - pos[None, :]
    allowed = (doc[:, None] == doc[None, :]) & (distance >= 0)
    if window is not None:
        allowed &= distance < window
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / q.shape[-1] ** 0.5
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return torch.einsum("hqk,khd->qhd", probs, v)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("window", [1, 4, None])
def test_attention_backend_matches_dense_reference(backend, window):
    g = torch.Generator().manual_seed(0)
    T = sum(LENGTHS)
    q, k, v = torch.randn(T, 4, 8, generator=g), torch.randn(T, 2, 8, generator=g), torch.randn(T, 2, 8, generator=g)
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    docs = PackedDocs.from_cu_seqlens(cu, max(LENGTHS), num_tokens=T)
    out = get_attention_backend(backend)(q, k, v, docs, window)
    assert out.shape == q.shape
    assert (out - reference_attention(q, k, v, LENGTHS, window)).abs().max().item() <= 1e-5


def test_packed_docs_reject_bad_boundaries():
    with pytest.raises(ValueError):
        PackedDocs.from_cu_seqlens(torch.tensor([0, 5, 9], dtype=torch.int32), 5, num_tokens=10)
    with pytest.raises(ValueError):
        PackedDocs.from_cu_seqlens(torch.tensor([0, 6, 4, 10], dtype=torch.int32), 6, num_tokens=10)


def test_mistral_7b_on_meta_counts_parameters_without_memory():
    args = ModelArgs()  # the defaults are Mistral-7B-v0.1's shape
    model = build(args, device="meta", dtype=torch.bfloat16)
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == 7_241_732_096
    assert sum(p.numel() for p in model.parameters()) == sum(torch.Size(s).numel() for s in expected_shapes(args).values())


def test_parameter_names_are_consolidated_names_and_no_buffers():
    model = tiny_model()
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected_shapes(ARGS)
    assert list(model.buffers()) == []  # build_model's to_empty() would leave buffers uninitialised


def test_random_init_is_a_function_of_the_seed():
    a, b = tiny_model(seed=3), tiny_model(seed=3)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert torch.equal(a.norm.weight, torch.ones(ARGS.dim))
    default = build(ARGS, device="cpu", dtype=torch.float32)
    assert abs(default.layers[0].attention.wq.weight.std().item() - 0.02) < 0.002


def test_hidden_states_feed_the_output_head():
    model = tiny_model()
    inputs = packed_inputs(LENGTHS)
    with torch.no_grad():
        assert torch.equal(model.output(model.hidden_states(*inputs)), model(*inputs))


def test_bf16_forward_and_backward():
    model = tiny_model(dtype=torch.bfloat16).train()
    logits = model(*packed_inputs(LENGTHS))
    assert logits.dtype == torch.bfloat16 and logits.shape == (sum(LENGTHS), ARGS.vocab_size)
    logits.float().logsumexp(-1).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("window", [None, 64])
def test_sdpa_backend_uses_fused_cuda_kernels(window):
    """Guards the 4-D layout: with 3-D inputs SDPA silently drops to its math kernel (25x slower)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    lengths, dev = [100, 300, 17], "cuda"
    T = sum(lengths)
    q = torch.randn(T, 8, 64, device=dev, dtype=torch.bfloat16)
    k, v = (torch.randn(T, 2, 64, device=dev, dtype=torch.bfloat16) for _ in range(2))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=dev)
    docs = PackedDocs.from_cu_seqlens(cu, max(lengths), num_tokens=T)
    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    with sdpa_kernel(fused):  # raises "No available kernel" if only the math kernel would do
        out = get_attention_backend("sdpa")(q, k, v, docs, window)
    ref = reference_attention(q.float(), k.float(), v.float(), lengths, window)
    assert (out.float() - ref).abs().max().item() < 2e-2
