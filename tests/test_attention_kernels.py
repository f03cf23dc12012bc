"""The sliding-window attention backends against an fp32 reference with an explicit mask.

On a machine without CUDA the Triton kernels run under Triton's interpreter (TRITON_INTERPRET=1,
switched on here before the kernel module is imported) on CPU tensors at tiny sizes; with CUDA
they run compiled. `-m gpu` adds the full-size checks (bf16, the benchmark's shapes).
"""

import importlib
import logging
import os
import random
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

# Triton decides interpreter or compiler when its @jit decorators run, its own library's included,
# so the switch must be on before triton is first imported in this process.
# In the fresh process below TRITON_INTERPRET=1 is set from the start, so whatever imports triton there
# gets the interpreter (and that process never starts another).
_INTERPRETER_POSSIBLE = (torch.cuda.is_available() or "triton" not in sys.modules
                         or os.environ.get("TRITON_INTERPRET") == "1")
if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton")
swa = importlib.import_module("mft.kernels.swa_attention")
from conftest import build, tiny_args  # noqa: E402

from mft.model.attention import PackedDocs, get_attention_backend  # noqa: E402

DEVICE = "cpu" if swa.INTERPRETED else "cuda"
TC, SC = swa.TileConfig, swa.SwaConfig
# Something imported triton (compiled) before this module and there is no GPU: the kernel tests
# then run in a fresh interpreter process instead (test_kernels_in_a_fresh_process).
needs_kernels = pytest.mark.skipif(not _INTERPRETER_POSSIBLE, reason="runs in a fresh process, see below")


@pytest.mark.skipif(_INTERPRETER_POSSIBLE, reason="the kernel tests run in this process")
def test_kernels_in_a_fresh_process():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                            env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(swa, "POISON_OUTPUTS", True)


def reference(q, k, v, lengths, window):
    """fp32 SDPA per document with an explicit (causal, window) mask and K/V repeated per group."""
    group = q.shape[1] // k.shape[1]
    outs = []
    for qd, kd, vd in zip(q.split(lengths), k.split(lengths), v.split(lengths)):
        n = qd.shape[0]
        if n == 0:
            continue
        lag = torch.arange(n, device=q.device)[:, None] - torch.arange(n, device=q.device)[None, :]
        allowed = (lag >= 0) & (lag < (window if window is not None else n + 1))
        qd, kd, vd = (x.float().transpose(0, 1)[None] for x in (qd, kd.repeat_interleave(group, 1),
                                                                  vd.repeat_interleave(group, 1)))
        outs.append(F.scaled_dot_product_attention(qd, kd, vd, attn_mask=allowed)[0].transpose(0, 1))
    return torch.cat(outs)


def rel_err(a, b):
    """||a - b|| / ||b||, ||b|| floored at 0.1 per element: with a window of 1, dq and dk are exactly
    zero and the kernel's are rounding noise of dp - delta (two sums of about 8 each)."""
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp(min=0.1 * b.numel() ** 0.5)).item()


def check_against_reference(lengths, n_heads, n_kv, head_dim, window, dtype, config=None, seed=0, tol=None):
    """Forward and the three gradients of the Triton kernel against the fp32 reference."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    T = sum(lengths)
    q = torch.randn(T, n_heads, head_dim, generator=g, device=DEVICE).to(dtype).requires_grad_()
    k = torch.randn(T, n_kv, head_dim, generator=g, device=DEVICE).to(dtype).requires_grad_()
    v = torch.randn(T, n_kv, head_dim, generator=g, device=DEVICE).to(dtype).requires_grad_()
    dout = torch.randn(T, n_heads, head_dim, generator=g, device=DEVICE).to(dtype)
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)

    out = swa.swa_attention(q, k, v, bounds, window, config=config)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    qr, kr, vr = (x.detach().float().requires_grad_() for x in (q, k, v))
    ref = reference(qr, kr, vr, lengths, window)
    ref_grads = torch.autograd.grad(ref, (qr, kr, vr), dout.float())

    if tol is None:  # fp32 here: exact up to rounding (tf32 dots on a GPU); half types: their rounding
        tol = {torch.float32: 1e-4 if DEVICE == "cpu" else 5e-3, torch.float16: 5e-3, torch.bfloat16: 1e-2}[dtype]
    errors = {name: rel_err(a, b) for name, a, b in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads))}
    assert all(e < tol for e in errors.values()), (lengths, n_heads, n_kv, head_dim, window, errors)
    return errors


def random_lengths(rng, n_docs, longest):
    return [rng.choice([1, 2, rng.randint(1, longest), rng.randint(longest // 2, longest) | 1]) for _ in range(n_docs)]


# (lengths, query heads, kv heads, head dim, window): odd lengths, single tokens, windows of 1,
# shorter and longer than the documents, GQA ratios 1, 4 and 8, head dims 16, 64 and 128.
CASES = [
    ([5, 37, 1, 70, 16], 4, 4, 16, 24),
    ([5, 37, 1, 70, 16], 4, 1, 16, None),
    ([33, 2, 51], 8, 2, 64, 1),
    ([33, 2, 51], 8, 1, 64, 40),
    ([45, 19], 4, 1, 128, 9),
    ([45, 19], 8, 8, 128, 100),
]


@pytest.mark.parametrize("lengths,n_heads,n_kv,head_dim,window", CASES)
@needs_kernels
def test_kernel_matches_reference_fp32(lengths, n_heads, n_kv, head_dim, window):
    check_against_reference(lengths, n_heads, n_kv, head_dim, window, torch.float32)


@needs_kernels
def test_kernel_matches_reference_random_shapes():
    rng = random.Random(4)
    for seed in range(3):
        lengths = random_lengths(rng, rng.randint(1, 4), 60)
        n_kv = rng.choice([1, 2])
        window = rng.choice([None, 1, rng.randint(2, 20), rng.randint(20, 80)])
        check_against_reference(lengths, n_kv * rng.choice([1, 4, 8]), n_kv, rng.choice([16, 32]), window,
                                torch.float32, seed=seed)


@needs_kernels
@pytest.mark.parametrize("config", [
    SC(fwd=TC(32, 16), dq=TC(32, 16), dkdv=TC(16, 32)),  # tiles larger than steps and the reverse
    SC(fwd=TC(16, 32), dq=TC(16, 32), dkdv=TC(32, 16)),
])
@pytest.mark.parametrize("window", [3, 40, None])
def test_kernel_block_shapes_cover_the_same_pairs(config, window):
    """Clean (unmasked) blocks, window-edge blocks and diagonal blocks meet at other offsets."""
    check_against_reference([70, 33, 1], 2, 1, 32, window, torch.float32, config=config)


@needs_kernels
def test_kernel_fp16():
    check_against_reference([45, 19, 3], 4, 2, 64, 20, torch.float16)


def test_tile_tables_cover_every_token_once_heaviest_first():
    bounds = (0, 5, 5, 70, 71, 200)
    for queries in (True, False):
        table = swa._tile_table(bounds, 16, 40, queries, torch.device("cpu"), None).view(-1, 3).tolist()
        covered = sorted(t for start, ds, de in table for t in range(start, min(start + 16, de)))
        assert covered == list(range(200))
        assert all(ds <= start < de and (ds, de) in zip(bounds[:-1], bounds[1:]) for start, ds, de in table)
        work = [min(s - ds, 40) if queries else min(de - s, 56) for s, ds, de in table]
        assert work == sorted(work, reverse=True)


def test_tile_tables_are_cached_per_forward():
    cache = {}
    a = swa._tile_table((0, 10, 40), 16, 8, True, torch.device("cpu"), cache)
    assert swa._tile_table((0, 10, 40), 16, 8, True, torch.device("cpu"), cache) is a


@needs_kernels
def test_kernel_rejects_unsupported_head_dim():
    from mft.utils.errors import MftError

    q = torch.randn(4, 2, 24, device=DEVICE)
    with pytest.raises(MftError, match="head dims"):
        swa.swa_attention(q, q, q, [0, 4], None)


def _model(backend, window):
    args = tiny_args(vocab_size=50, sliding_window=window)
    model = build(args, device=DEVICE, dtype=torch.float32, attn_backend=backend, std=0.2)
    return model


@needs_kernels
@pytest.mark.parametrize("window", [8, None])
def test_model_with_triton_backend_matches_sdpa(window):
    lengths = [5, 23, 1, 12]
    T = sum(lengths)
    tokens = torch.randint(0, 50, (T,), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    positions = torch.cat([torch.arange(n) for n in lengths]).to(DEVICE)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    results = []
    for backend in ("triton", "sdpa"):
        model = _model(backend, window)
        logits = model(tokens, positions, cu, max(lengths))
        logits.float().logsumexp(-1).mean().backward()
        results.append((logits.detach(), model.layers[0].attention.wq.weight.grad))
    (a, ga), (b, gb) = results
    tol = 1e-5 if DEVICE == "cpu" else 5e-3
    assert rel_err(a, b) < tol and rel_err(ga, gb) < tol


def test_auto_picks_sdpa_on_cpu_and_flex_matches_reference():
    lengths = [7, 30, 1, 20]
    T = sum(lengths)
    g = torch.Generator().manual_seed(2)
    q, k, v = torch.randn(T, 4, 16, generator=g), torch.randn(T, 2, 16, generator=g), torch.randn(T, 2, 16, generator=g)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    for window in (5, None):
        docs = PackedDocs.from_cu_seqlens(cu, max(lengths), num_tokens=T)
        ref = reference(q, k, v, lengths, window)
        assert rel_err(get_attention_backend("auto")(q, k, v, docs, window), ref) < 1e-5
        assert rel_err(get_attention_backend("flex")(q, k, v, docs, window), ref) < 1e-5


@pytest.mark.parametrize("window", [1, 100, 300, None])
def test_flex_block_mask_matches_dense_mask(window):
    """Our block-level counts classify blocks exactly as a dense evaluation of the mask would."""
    from mft.model.attention import _flex_block_mask

    lengths = [130, 1, 300, 99]  # crosses 128-token blocks, a partial last block
    T = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    docs = PackedDocs.from_cu_seqlens(cu, max(lengths), num_tokens=T)
    dense = _flex_block_mask(docs, window, T, torch.device("cpu")).to_dense()[0, 0]  # (q blocks, k blocks)
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    pos = torch.arange(T)
    lag = pos[:, None] - pos[None, :]
    allowed = (doc[:, None] == doc[None, :]) & (lag >= 0) & (lag < (window or T + 1))
    n = -(-T // 128)
    padded = torch.zeros(n * 128, n * 128, dtype=torch.bool)
    padded[:T, :T] = allowed
    expected = padded.view(n, 128, n, 128).any(3).any(1)
    assert torch.equal(dense.bool(), expected)


def test_xformers_backend_falls_back_with_one_message(caplog, monkeypatch):
    import mft.model.attention as attention

    monkeypatch.setattr(attention, "_xformers_ok", {})
    monkeypatch.setitem(sys.modules, "xformers", None)  # as if not installed, even where it is
    lengths = [6, 9]
    q = torch.randn(15, 4, 16)
    kv = torch.randn(15, 2, 16)
    docs = PackedDocs.from_cu_seqlens(torch.tensor([0, 6, 15], dtype=torch.int32), 9, num_tokens=15)
    with caplog.at_level(logging.WARNING, logger="mft.model.attention"):
        out1 = get_attention_backend("xformers")(q, kv, kv, docs, 4)
        out2 = get_attention_backend("xformers")(q, kv, kv, docs, 4)
    messages = [r.getMessage() for r in caplog.records if "xformers" in r.getMessage()]
    assert len(messages) == 1 and "using sdpa" in messages[0]
    assert torch.equal(out1, out2) and rel_err(out1, reference(q, kv, kv, lengths, 4)) < 1e-5


# ---- full size, on the lent GPU -----------------------------------------------------------------

# The benchmark's shapes (32 query heads, 8 KV heads, head dim 128, W = 4096) and odd ones.
GPU_CASES = [
    ([8192], 32, 8, 128, 4096),
    ([32768], 32, 8, 128, 4096),
    ([4096] * 8, 32, 8, 128, 4096),
    ([2048] * 8, 32, 8, 128, 4096),
    ([8192], 32, 8, 128, None),
    ([1000, 1, 3001, 777, 2500], 16, 16, 64, 1500),
    ([5000, 333, 2047], 32, 4, 128, 129),
]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("lengths,n_heads,n_kv,head_dim,window", GPU_CASES)
def test_gpu_full_size_against_fp32_reference(lengths, n_heads, n_kv, head_dim, window):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):  # the fp32 reference, never the T^2-memory math kernel
        errors = check_against_reference(lengths, n_heads, n_kv, head_dim, window, torch.bfloat16)
    print(lengths[:3], n_heads, n_kv, head_dim, window, {k: f"{e:.1e}" for k, e in errors.items()})
