"""torch.compile of the blocks on CPU: one graph per block, no recompile when the packing moves,
and the compiled model equal to the eager one.

The Triton kernels (attention, dequantise) run as custom ops under Triton's interpreter
(TRITON_INTERPRET=1, set before triton is imported, as in tests/test_attention_kernels.py).
Blocks compile with the aot_eager backend: it traces the same graphs as inductor (dynamo, the
custom ops' fake implementations and autograd formulas, AOTAutograd's joint graph) without
inductor's C++ compile, which takes minutes on two cores; inductor itself runs in the GPU test
(tests/test_compile_gpu.py).
"""

import copy
import dataclasses
import logging
import os
import subprocess
import sys

import pytest
import torch
import torch._dynamo.testing

_INTERPRETER_POSSIBLE = (torch.cuda.is_available() or "triton" not in sys.modules
                         or os.environ.get("TRITON_INTERPRET") == "1")
if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton")
from conftest import build, tiny_args  # noqa: E402

from mft.build import Runtime  # noqa: E402
from mft.build.parallelize import compile_blocks  # noqa: E402
from mft.model import attention  # noqa: E402
from mft.model.attention import PackedDocs, sdpa_attention  # noqa: E402
from mft.model.names import canonical_name  # noqa: E402
from mft.peft.lora import LoRASettings  # noqa: E402
from mft.quant.formats import QuantSpec, quantize  # noqa: E402
from mft.train.setup import resolve_compile  # noqa: E402

needs_kernels = pytest.mark.skipif(not _INTERPRETER_POSSIBLE or torch.cuda.is_available(),
                                   reason="runs in a fresh process, see below (or on the GPU: test_compile_gpu)")
ARGS = tiny_args(vocab_size=50, hidden_dim=128, sliding_window=8)  # hidden_dim: nf4 blocks of 64
LORA = LoRASettings(r=4, alpha=8, dropout=0.0, target_modules=["wq", "wv", "wo", "w2"])


@pytest.mark.skipif(_INTERPRETER_POSSIBLE or torch.cuda.is_available(), reason="the tests run in this process")
def test_in_a_fresh_process():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                            env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def packed(lengths, seed):
    """(tokens, positions, cu_seqlens, max_seqlen) of random documents packed back to back."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, ARGS.vocab_size, (sum(lengths),), generator=g)
    positions = torch.cat([torch.arange(n) for n in lengths])
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return tokens, positions, cu, max(lengths)


def loss_and_grads(model, batch):
    """A loss over every logit and the gradients of what trains (the LoRA factors)."""
    loss = model(*batch).float().logsumexp(-1).mean()
    loss.backward()
    grads = {canonical_name(n): p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-6)).item()


def lora_model(backend, **spec):
    model = build(ARGS, attn_backend=backend, std=0.2, lora=LORA, **spec)
    with torch.no_grad():  # lora_b starts at zero, which would leave lora_a without a gradient
        g = torch.Generator().manual_seed(5)
        for name, p in model.named_parameters():
            if name.endswith("lora_b"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


# Same token count, other boundaries: the tile tables differ in values and in length.
PACKINGS = ([5, 23, 1, 12], [20, 11, 3, 3, 4])


@needs_kernels
def test_compiled_triton_model_is_one_graph_per_block_never_recompiles_and_matches_reference():
    model = lora_model("triton")
    reference = lora_model("sdpa")  # the same weights, attention by torch SDPA in fp32
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compile_blocks(model, torch.device("cpu"), backend=counter)  # fullgraph: a graph break would raise
    frames = []
    for seed, lengths in enumerate(PACKINGS):
        batch = packed(lengths, seed)
        (loss, grads), (ref_loss, ref_grads) = loss_and_grads(model, batch), loss_and_grads(reference, batch)
        assert rel_err(loss, ref_loss) < 1e-5
        assert grads.keys() == ref_grads.keys() and len(grads) == 2 * 4 * ARGS.n_layers
        assert all(rel_err(grads[n], ref_grads[n]) < 1e-4 for n in grads), lengths
        frames.append(counter.frame_count)
    # Block 0 reads the embedding (no grad), block 1 a tensor that requires grad: two graphs at most,
    # and none more for the second packing.
    assert frames[0] <= 2 and frames[1] == frames[0]


@needs_kernels
def test_compiled_moe_model_is_one_graph_per_block_never_recompiles_and_matches_eager(monkeypatch, caplog):
    """Mixtral's sparse block through torch's grouped GEMM (forced here: on CUDA it runs in bf16 on
    sm90+, and torch's fake implementation takes bf16 only; the per-expert loop reads the offsets
    on the host, a graph break), with the load-balancing loss's gradient on: one graph, none
    more for a new packing of the same token count, and the eager model's numbers."""
    from mft.kernels import grouped
    from mft.model.args import MoeArgs
    from mft.train.routing import moe_layers, set_aux_loss_scale

    monkeypatch.setattr(grouped, "grouped_gemm_runs", lambda device, dtype: True)
    args = dataclasses.replace(ARGS, hidden_dim=64, moe=MoeArgs(4, 2))
    model = build(args, attn_backend="triton", std=0.2, dtype=torch.bfloat16)
    set_aux_loss_scale(moe_layers(model), 0.1, 1)
    eager = copy.deepcopy(model)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    with caplog.at_level(logging.WARNING, logger="mft.build.parallelize"):
        compile_blocks(model, torch.device("cpu"), backend=counter)  # fullgraph: a graph break would raise
    assert not caplog.records
    frames = []
    for seed, lengths in enumerate(PACKINGS):
        batch = packed(lengths, seed)
        (loss, grads), (ref_loss, ref_grads) = loss_and_grads(model, batch), loss_and_grads(eager, batch)
        assert rel_err(loss, ref_loss) < 1e-3
        assert grads.keys() == ref_grads.keys() and "layers.1.feed_forward.gate.weight" in grads
        assert all(rel_err(grads[n], ref_grads[n]) < 1e-2 for n in grads), lengths
        assert torch.equal(moe_layers(model)[1].routing_stats[0], moe_layers(eager)[1].routing_stats[0])
        frames.append(counter.frame_count)
    assert frames[0] <= 2 and frames[1] == frames[0]


def test_moe_blocks_whose_experts_loop_compile_with_graph_breaks(caplog):
    """Where the grouped GEMM does not run (here: CPU; on CUDA: not bf16, or before sm90) the
    per-expert loop reads the offsets on the host, so fullgraph would fail: the blocks compile
    without it, and the log says why."""
    from mft.model.args import MoeArgs

    model = build(dataclasses.replace(ARGS, moe=MoeArgs(4, 2)), attn_backend="triton")
    with caplog.at_level(logging.WARNING, logger="mft.build.parallelize"):
        compile_blocks(model, torch.device("cpu"), backend="aot_eager", dtype=torch.float32)
    assert "per-expert loop" in caplog.text


@needs_kernels
def test_compiled_sdpa_model_matches_eager_without_graph_breaks():
    model = lora_model("sdpa")
    eager = copy.deepcopy(model)
    compile_blocks(model, torch.device("cpu"), backend="aot_eager")
    batch = packed(PACKINGS[0], 0)
    (loss, grads), (ref_loss, ref_grads) = loss_and_grads(model, batch), loss_and_grads(eager, batch)
    assert rel_err(loss, ref_loss) < 1e-6 and all(rel_err(grads[n], ref_grads[n]) < 1e-5 for n in grads)
    block = eager.layers[0]
    x = torch.randn(sum(PACKINGS[0]), ARGS.dim)
    tokens, positions, cu, max_len = packed(PACKINGS[0], 0)
    from mft.model.rope import rope_tables

    explained = torch._dynamo.explain(block)(x, rope_tables(positions, ARGS),
                                            PackedDocs.from_cu_seqlens(cu, max_len, len(tokens)))
    assert explained.graph_break_count == 0 and explained.graph_count == 1


@needs_kernels
def test_compiled_qlora_model_matches_eager():
    """An NF4 base (double quantised): the 4-bit matmul's autograd.Function compiles into the graph
    (on CPU it dequantises with the torch reference; the Triton kernels' ops are tested below)."""
    model = lora_model("sdpa", quant=QuantSpec("nf4", 64, double_quant=True, dq_block_size=4))
    eager = copy.deepcopy(model)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compile_blocks(model, torch.device("cpu"), backend=counter)
    batch = packed(PACKINGS[1], 1)
    (loss, grads), (ref_loss, ref_grads) = loss_and_grads(model, batch), loss_and_grads(eager, batch)
    assert rel_err(loss, ref_loss) < 1e-6 and all(rel_err(grads[n], ref_grads[n]) < 1e-5 for n in grads)
    assert 1 <= counter.frame_count <= 2


@needs_kernels
@pytest.mark.parametrize("fmt", ["nf4", "int4", "nf4-dq"])
def test_dequantize_ops_compile_into_one_graph_and_match_the_torch_reference(fmt):
    from mft.quant.dequant import dequantize_torch, dequantize_triton

    spec = {"nf4": QuantSpec("nf4", 64), "int4": QuantSpec("int4", 128),
            "nf4-dq": QuantSpec("nf4", 64, double_quant=True, dq_block_size=4)}[fmt]
    weight = torch.randn(32, 256, generator=torch.Generator().manual_seed(3))
    qt = quantize(weight, spec)
    x = torch.randn(5, 256)

    def matmul(x, parts):
        return x @ dequantize_triton(type(qt)(spec, qt.shape, parts), torch.bfloat16, block=256).float().T

    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    got = torch.compile(matmul, backend=counter, fullgraph=True)(x, qt.parts)
    assert counter.frame_count == 1
    want = x @ dequantize_torch(qt, torch.bfloat16).float().T
    assert torch.equal(got, want)


@needs_kernels
def test_swa_attention_op_passes_torch_opcheck():
    """Schema, fake implementation and autograd registration, checked by torch itself."""
    import mft.kernels.swa_attention as swa

    g = torch.Generator().manual_seed(0)
    q = torch.randn(21, 4, 16, generator=g, requires_grad=True)
    k, v = (torch.randn(21, 2, 16, generator=g, requires_grad=True) for _ in range(2))
    plan = swa.make_plan((0, 9, 21), 5, 21, 16, torch.device("cpu"))
    args = (q, k, v, plan.fwd_tiles, plan.dq_tiles, plan.dkdv_tiles, plan.window, swa._config_ints(plan.config))
    torch.library.opcheck(swa.swa_attention_op, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_auto_on_cpu_is_sdpa():
    docs = PackedDocs.from_cu_seqlens(torch.tensor([0, 3, 40], dtype=torch.int32), 37, 40)
    attention.auto_attention.prepare(docs, [8, None], 16)
    assert {docs.cache[("auto", w)].backend for w in (8, None)} == {"sdpa"}


def _docs(lengths):
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return PackedDocs.from_cu_seqlens(cu, max(lengths), sum(lengths))


def test_auto_on_cuda_picks_torch_attention_where_every_document_fits(monkeypatch):
    cuda = torch.device("cuda")
    choose = attention._auto_choice
    monkeypatch.setattr(attention, "_VARLEN", (None, "window_size", True))  # a torch with varlen_attn and GQA
    fit = choose(_docs([5, 300, 220, 400]), 512, cuda)[0]
    assert fit.backend == "varlen" and fit.max_seqlen == 512  # 400 rounded up to a power of two
    assert choose(_docs([5, 3000, 20]), None, cuda)[0].backend == "varlen"  # no window: every document fits
    assert choose(_docs([5, 600, 20]), 512, cuda)[0].backend == "triton"
    same = choose(_docs([64, 64, 64]), 512, cuda)[0]
    assert same.backend == "batched_sdpa" and same.doc_len == 64  # one length: batched SDPA even so
    for varlen in (None, (None, "window_size", False)):  # no varlen_attn, or one without GQA (torch 2.11)
        monkeypatch.setattr(attention, "_VARLEN", varlen)
        assert choose(_docs([64, 64, 64]), 512, cuda)[0].backend == "batched_sdpa"
        assert choose(_docs([64, 60, 64]), 512, cuda)[0].backend == "triton"


def test_auto_logs_each_choice_once(monkeypatch, caplog):
    monkeypatch.setattr(attention, "_auto_choice", lambda docs, window, device: (attention.AutoChoice(
        "batched_sdpa" if len(set(docs.lengths)) == 1 else "sdpa"), "a test"))
    auto = attention.AutoAttention()
    with caplog.at_level(logging.INFO, logger="mft.model.attention"):
        for lengths in ([4, 4], [3, 5], [2, 2], [1, 7]):
            auto.prepare(_docs(lengths), [8], 16)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and "batched_sdpa" in lines[0] and "sdpa, since a test" in lines[1]


def test_batched_sdpa_equals_sdpa_per_document():
    g = torch.Generator().manual_seed(2)
    lengths = [6, 6, 6]
    q, k, v = torch.randn(18, 4, 16, generator=g), torch.randn(18, 2, 16, generator=g), torch.randn(18, 2, 16, generator=g)
    got = attention._batched_sdpa(q, k, v, 6)
    assert torch.allclose(got, sdpa_attention(q, k, v, _docs(lengths), 8), atol=1e-6)


def test_compile_defaults_to_on_for_cuda_only():
    assert resolve_compile(None, torch.device("cuda")) and not resolve_compile(None, torch.device("cpu"))
    assert resolve_compile(True, torch.device("cpu")) and not resolve_compile(False, torch.device("cuda"))
    # sdpa and flex blocks recompile per packing: not compiled unless asked for
    assert resolve_compile(None, torch.device("cuda"), "triton") and not resolve_compile(None, torch.device("cuda"), "sdpa")
    assert not resolve_compile(None, torch.device("cuda"), "flex") and resolve_compile(True, torch.device("cuda"), "flex")
    assert Runtime().compile is False
