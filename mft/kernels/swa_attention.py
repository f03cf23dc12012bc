"""Causal sliding-window attention over packed documents: FlashAttention-2-style Triton kernels.

Semantics are those of mft.model.attention: q (T, Hq, D), k and v (T, Hkv, D) hold documents
packed one after another (`bounds` is cu_seqlens on the host); the query at token t of a document
sees keys t - W + 1 .. t of the same document (W keys, itself included), or every earlier key of
the document when window is None. Inputs are bf16, fp16 or fp32; accumulation is fp32.

Why the work grows with tokens x W and not tokens^2:
- the host cuts every document into tiles and lists them in a small int32 table of
  (tile start, document start, document end); one program handles one tile of one head, so
  no program ever starts on a tile that crosses documents or lies outside them;
- a program loops only over the blocks that meet its window inside its document; blocks wholly
  inside the window run without a mask, and only those that cross the window's far edge, the
  diagonal or the document's end pay for one;
- the table lists the heaviest tiles first, so the light ones fill the last wave.

Forward: one program per (query tile, query head) keeps a running max and sum (online softmax in
base 2: scores are pre-multiplied by log2(e)/sqrt(D)) and writes O and the base-2 log-sum-exp.
Backward: the dq kernel (per query tile and head) also writes delta = rowsum(dO * O) for its rows;
then the dk/dv kernel (per key tile and KV head) loops over its group's query heads and over the
query blocks that can see its keys. GQA thus needs neither repeated K/V nor atomics.
"""

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from mft.utils.errors import MftError

# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _fwd_step(acc, l_i, m_i, q, k_row, v_row, n0, offs_m, doc_start, doc_end, window, qk_scale, stride_kt,
              STEP: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr):
    """One block of STEP keys (k_row, v_row point at its first row) folded into the running softmax."""
    offs_n = n0 + tl.arange(0, STEP)
    rows = tl.arange(0, STEP)[:, None] * stride_kt + tl.arange(0, HEAD_DIM)[None, :]
    kp = k_row + rows
    vp = v_row + rows
    if MASKED:
        inside = (offs_n >= doc_start) & (offs_n < doc_end)
        k = tl.load(kp, mask=inside[:, None], other=0.0)
        v = tl.load(vp, mask=inside[:, None], other=0.0)
    else:
        k = tl.load(kp)
        v = tl.load(vp)
    s = tl.dot(q, tl.trans(k)) * qk_scale
    if MASKED:
        lag = offs_m[:, None] - offs_n[None, :]
        keep = (lag >= 0) & (lag < window) & (offs_n[None, :] >= doc_start)
        # Finite, not -inf: a row whose first block is all masked gets garbage weights that the
        # next real maximum scales to exactly zero, where -inf - -inf would give NaN.
        s = tl.where(keep, s, -1.0e30)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, l_i, m_new


@triton.jit
def _swa_fwd_kernel(Q, K, V, O, LSE, TILES, n_heads, n_tokens, window, qk_scale, stride_qt, stride_kt,
                    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, TILE: tl.constexpr, STEP: tl.constexpr):
    pid = tl.program_id(0)
    tile = pid // n_heads
    head = pid % n_heads
    m0 = tl.load(TILES + 3 * tile)
    doc_start = tl.load(TILES + 3 * tile + 1)
    doc_end = tl.load(TILES + 3 * tile + 2)

    offs_m = m0 + tl.arange(0, TILE)
    offs_d = tl.arange(0, HEAD_DIM)
    valid = offs_m < doc_end
    q_at = m0.to(tl.int64) * stride_qt + head * HEAD_DIM + tl.arange(0, TILE)[:, None] * stride_qt + offs_d[None, :]
    q = tl.load(Q + q_at, mask=valid[:, None], other=0.0)

    # Key blocks start at m0 - j * STEP: the far ones cross the window's edge or the document's
    # start (masked), then come the clean ones, then the diagonal blocks from m0 on (masked).
    lo = tl.maximum(doc_start, m0 - window + 1)
    far = m0 - tl.cdiv(m0 - lo, STEP) * STEP
    clean = m0 - (tl.maximum(tl.minimum(m0 - doc_start, window - TILE), 0) // STEP) * STEP
    hi = tl.minimum(m0 + TILE, doc_end)

    # Loops carry scalar row pointers only: a carried (STEP, HEAD_DIM) block of 64-bit pointers
    # costs 2 * STEP * HEAD_DIM / threads registers each and made the forward spill.
    kv_at = far.to(tl.int64) * stride_kt + (head // GROUP) * HEAD_DIM
    kp = K + kv_at
    vp = V + kv_at
    acc = tl.zeros([TILE, HEAD_DIM], dtype=tl.float32)
    l_i = tl.zeros([TILE], dtype=tl.float32)
    m_i = tl.full([TILE], float("-inf"), dtype=tl.float32)
    for n0 in range(far, clean, STEP):
        acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, kp, vp, n0, offs_m, doc_start, doc_end, window, qk_scale,
                                  stride_kt, STEP, HEAD_DIM, True)
        kp += STEP * stride_kt
        vp += STEP * stride_kt
    for n0 in range(clean, m0, STEP):
        acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, kp, vp, n0, offs_m, doc_start, doc_end, window, qk_scale,
                                  stride_kt, STEP, HEAD_DIM, False)
        kp += STEP * stride_kt
        vp += STEP * stride_kt
    for n0 in range(m0, hi, STEP):
        acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, kp, vp, n0, offs_m, doc_start, doc_end, window, qk_scale,
                                  stride_kt, STEP, HEAD_DIM, True)
        kp += STEP * stride_kt
        vp += STEP * stride_kt

    out = acc / l_i[:, None]
    tl.store(O + q_at, out.to(O.dtype.element_ty), mask=valid[:, None])
    tl.store(LSE + head * n_tokens + offs_m, m_i + tl.math.log2(l_i), mask=valid)


@triton.jit
def _dq_step(dq, q, do, lse, delta, k_row, v_row, n0, offs_m, doc_start, doc_end, window, qk_scale, stride_kt,
             STEP: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr):
    offs_n = n0 + tl.arange(0, STEP)
    rows = tl.arange(0, STEP)[:, None] * stride_kt + tl.arange(0, HEAD_DIM)[None, :]
    kp = k_row + rows
    vp = v_row + rows
    if MASKED:
        inside = (offs_n >= doc_start) & (offs_n < doc_end)
        k = tl.load(kp, mask=inside[:, None], other=0.0)
        v = tl.load(vp, mask=inside[:, None], other=0.0)
    else:
        k = tl.load(kp)
        v = tl.load(vp)
    p = tl.math.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse[:, None])
    if MASKED:
        lag = offs_m[:, None] - offs_n[None, :]
        p = tl.where((lag >= 0) & (lag < window) & (offs_n[None, :] >= doc_start), p, 0.0)
    dp = tl.dot(do, tl.trans(v))
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k)


@triton.jit
def _swa_bwd_dq_kernel(Q, K, V, O, DO, DQ, LSE, DELTA, TILES, n_heads, n_tokens, window, qk_scale, sm_scale,
                       stride_qt, stride_kt,
                       GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, TILE: tl.constexpr, STEP: tl.constexpr):
    pid = tl.program_id(0)
    tile = pid // n_heads
    head = pid % n_heads
    m0 = tl.load(TILES + 3 * tile)
    doc_start = tl.load(TILES + 3 * tile + 1)
    doc_end = tl.load(TILES + 3 * tile + 2)

    offs_m = m0 + tl.arange(0, TILE)
    offs_d = tl.arange(0, HEAD_DIM)
    valid = offs_m < doc_end
    q_at = m0.to(tl.int64) * stride_qt + head * HEAD_DIM + tl.arange(0, TILE)[:, None] * stride_qt + offs_d[None, :]
    q = tl.load(Q + q_at, mask=valid[:, None], other=0.0)
    do = tl.load(DO + q_at, mask=valid[:, None], other=0.0)
    o = tl.load(O + q_at, mask=valid[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + head * n_tokens + offs_m, delta, mask=valid)  # read next by the dk/dv kernel
    lse = tl.load(LSE + head * n_tokens + offs_m, mask=valid, other=0.0)

    lo = tl.maximum(doc_start, m0 - window + 1)
    far = m0 - tl.cdiv(m0 - lo, STEP) * STEP
    clean = m0 - (tl.maximum(tl.minimum(m0 - doc_start, window - TILE), 0) // STEP) * STEP
    hi = tl.minimum(m0 + TILE, doc_end)

    # Loops carry scalar row pointers only: a carried (STEP, HEAD_DIM) block of 64-bit pointers
    # costs 2 * STEP * HEAD_DIM / threads registers each and made the forward spill.
    kv_at = far.to(tl.int64) * stride_kt + (head // GROUP) * HEAD_DIM
    kp = K + kv_at
    vp = V + kv_at
    dq = tl.zeros([TILE, HEAD_DIM], dtype=tl.float32)
    for n0 in range(far, clean, STEP):
        dq = _dq_step(dq, q, do, lse, delta, kp, vp, n0, offs_m, doc_start, doc_end, window, qk_scale, stride_kt,
                          STEP, HEAD_DIM, True)
        kp += STEP * stride_kt
        vp += STEP * stride_kt
    for n0 in range(clean, m0, STEP):
        dq = _dq_step(dq, q, do, lse, delta, kp, vp, n0, offs_m, doc_start, doc_end, window, qk_scale, stride_kt,
                          STEP, HEAD_DIM, False)
        kp += STEP * stride_kt
        vp += STEP * stride_kt
    for n0 in range(m0, hi, STEP):
        dq = _dq_step(dq, q, do, lse, delta, kp, vp, n0, offs_m, doc_start, doc_end, window, qk_scale, stride_kt,
                          STEP, HEAD_DIM, True)
        kp += STEP * stride_kt
        vp += STEP * stride_kt
    tl.store(DQ + q_at, (dq * sm_scale).to(DQ.dtype.element_ty), mask=valid[:, None])


@triton.jit
def _dkdv_step(dk, dv, k, v, q_row, do_row, lse_row, delta_row, m0, offs_n, doc_end, window, qk_scale, stride_qt,
               STEP: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr):
    """One block of STEP queries (q_row, do_row point at its first row; lse_row, delta_row likewise)."""
    offs_m = m0 + tl.arange(0, STEP)
    rows = tl.arange(0, STEP)[:, None] * stride_qt + tl.arange(0, HEAD_DIM)[None, :]
    qp = q_row + rows
    dop = do_row + rows
    lp = lse_row + tl.arange(0, STEP)
    dp_ = delta_row + tl.arange(0, STEP)
    if MASKED:
        inside = offs_m < doc_end
        q = tl.load(qp, mask=inside[:, None], other=0.0)
        do = tl.load(dop, mask=inside[:, None], other=0.0)
        lse = tl.load(lp, mask=inside, other=0.0)
        delta = tl.load(dp_, mask=inside, other=0.0)
    else:
        q = tl.load(qp)
        do = tl.load(dop)
        lse = tl.load(lp)
        delta = tl.load(dp_)
    # Transposed scores (keys x queries), so dk and dv come out as rows of this program's keys.
    p_t = tl.math.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse[None, :])
    if MASKED:
        lag = offs_m[None, :] - offs_n[:, None]
        p_t = tl.where((lag >= 0) & (lag < window) & (offs_m[None, :] < doc_end), p_t, 0.0)
    dv += tl.dot(p_t.to(do.dtype), do)
    ds_t = p_t * (tl.dot(v, tl.trans(do)) - delta[None, :])
    dk += tl.dot(ds_t.to(q.dtype), q)
    return dk, dv


@triton.jit
def _swa_bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, TILES, n_kv_heads, n_tokens, window, qk_scale, sm_scale,
                         stride_qt, stride_kt,
                         GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, TILE: tl.constexpr, STEP: tl.constexpr):
    pid = tl.program_id(0)
    tile = pid // n_kv_heads
    kv_head = pid % n_kv_heads
    n0 = tl.load(TILES + 3 * tile)
    doc_end = tl.load(TILES + 3 * tile + 2)

    offs_n = n0 + tl.arange(0, TILE)
    offs_d = tl.arange(0, HEAD_DIM)
    valid = offs_n < doc_end
    kv_at = n0.to(tl.int64) * stride_kt + kv_head * HEAD_DIM \
        + tl.arange(0, TILE)[:, None] * stride_kt + offs_d[None, :]
    k = tl.load(K + kv_at, mask=valid[:, None], other=0.0)
    v = tl.load(V + kv_at, mask=valid[:, None], other=0.0)

    # Queries that see these keys: n0 .. n0 + TILE - 1 + window - 1 inside the document. Diagonal
    # blocks first (masked), then blocks every query of which sees every key (clean), then those
    # that cross the window's edge or the document's end (masked).
    hi = tl.minimum(n0 + TILE + window - 1, doc_end)
    diag_end = tl.minimum(n0 + ((TILE + STEP - 1) // STEP) * STEP, hi)
    clean_end = diag_end + (tl.maximum(tl.minimum(n0 + window, doc_end) - diag_end, 0) // STEP) * STEP

    dk = tl.zeros([TILE, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([TILE, HEAD_DIM], dtype=tl.float32)
    for g in range(GROUP):
        head = kv_head * GROUP + g
        q_at = n0.to(tl.int64) * stride_qt + head * HEAD_DIM
        qp = Q + q_at
        dop = DO + q_at
        lp = LSE + head * n_tokens + n0
        dp_ = DELTA + head * n_tokens + n0
        for m0 in range(n0, diag_end, STEP):
            dk, dv = _dkdv_step(dk, dv, k, v, qp, dop, lp, dp_, m0, offs_n, doc_end, window, qk_scale,
                                stride_qt, STEP, HEAD_DIM, True)
            qp += STEP * stride_qt
            dop += STEP * stride_qt
            lp += STEP
            dp_ += STEP
        for m0 in range(diag_end, clean_end, STEP):
            dk, dv = _dkdv_step(dk, dv, k, v, qp, dop, lp, dp_, m0, offs_n, doc_end, window, qk_scale,
                                stride_qt, STEP, HEAD_DIM, False)
            qp += STEP * stride_qt
            dop += STEP * stride_qt
            lp += STEP
            dp_ += STEP
        for m0 in range(clean_end, hi, STEP):
            dk, dv = _dkdv_step(dk, dv, k, v, qp, dop, lp, dp_, m0, offs_n, doc_end, window, qk_scale,
                                stride_qt, STEP, HEAD_DIM, True)
            qp += STEP * stride_qt
            dop += STEP * stride_qt
            lp += STEP
            dp_ += STEP
    tl.store(DK + kv_at, (dk * sm_scale).to(DK.dtype.element_ty), mask=valid[:, None])
    tl.store(DV + kv_at, dv.to(DV.dtype.element_ty), mask=valid[:, None])


# True when TRITON_INTERPRET=1 was set before this module was imported: the kernels then run on
# CPU tensors through Triton's interpreter (CI), slowly and only at tiny sizes.
INTERPRETED = type(_swa_fwd_kernel).__name__ == "InterpretedFunction"


# ---------------------------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TileConfig:
    """Launch shape of one kernel: `tile` tokens per program, `step` tokens per loop iteration."""

    tile: int
    step: int
    num_warps: int = 4
    num_stages: int = 2


@dataclass(frozen=True)
class SwaConfig:
    fwd: TileConfig  # tile = queries per program, step = keys per iteration
    dq: TileConfig  # likewise
    dkdv: TileConfig  # tile = keys per program, step = queries per iteration


# Per head dim (16 and 32 use 64's). 128: the fastest of tools/bench_attention.py --tune on the
# lent H100 (docs/benchmarks.md). 64 and 256: picked from the compiler's register and shared-memory
# report only, untimed (64 passed the GPU tests; 256 has not run on a GPU).
_GPU_CONFIGS = {
    64: SwaConfig(fwd=TileConfig(128, 64, 8, 3), dq=TileConfig(128, 64, 8, 3), dkdv=TileConfig(128, 32, 8, 3)),
    128: SwaConfig(fwd=TileConfig(128, 128, 8, 3), dq=TileConfig(128, 64, 8, 3), dkdv=TileConfig(64, 32, 4, 3)),
    256: SwaConfig(fwd=TileConfig(64, 32, 8, 2), dq=TileConfig(64, 32, 8, 2), dkdv=TileConfig(64, 16, 8, 2)),
}
_INTERPRETER_CONFIG = SwaConfig(fwd=TileConfig(16, 16), dq=TileConfig(16, 16), dkdv=TileConfig(16, 16))
_overrides: dict[int, SwaConfig] = {}

# Tests set this to fill every output with NaN before the kernels run, so an element that no
# program writes shows up instead of passing as whatever the allocator left there.
POISON_OUTPUTS = False


def _new(like: torch.Tensor, shape=None, dtype=None) -> torch.Tensor:
    shape = like.shape if shape is None else shape
    dtype = like.dtype if dtype is None else dtype
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=like.device)
    return torch.empty(shape, dtype=dtype, device=like.device)


def set_config(head_dim: int, config: Optional[SwaConfig]) -> None:
    """Override (or with None restore) the launch configuration for one head dim (benchmarks, tuning)."""
    if config is None:
        _overrides.pop(head_dim, None)
    else:
        _overrides[head_dim] = config


def config_for(head_dim: int, on_cuda: bool) -> SwaConfig:
    if head_dim in _overrides:
        return _overrides[head_dim]
    if not on_cuda:
        return _INTERPRETER_CONFIG
    return _GPU_CONFIGS[min(d for d in _GPU_CONFIGS if d >= head_dim)]


# ---------------------------------------------------------------------------------------------
# Host side: tile tables, the custom ops (torch.compile sees them as single nodes), entry point
# ---------------------------------------------------------------------------------------------


def _tile_table(bounds: Sequence[int], tile: int, window: int, queries: bool, device: torch.device,
                cache: Optional[dict]) -> torch.Tensor:
    """(n_tiles * 3,) int32 of (tile start, document start, document end), heaviest tile first.

    A query tile's work grows with the keys before it (up to the window); a key tile's with the
    queries after it. Built on the host from `bounds`, so no device sync; cached per forward.
    """
    key = ("swa_tiles", queries, tile, window, str(device))
    if cache is not None and key in cache:
        return cache[key]
    rows = []
    for doc_start, doc_end in zip(bounds[:-1], bounds[1:]):
        for start in range(doc_start, doc_end, tile):
            work = min(start - doc_start, window) if queries else min(doc_end - start, window + tile)
            rows.append((work, start, doc_start, doc_end))
    rows.sort(key=lambda row: -row[0])  # stable: equal tiles stay in token order (shared K/V in L2)
    table = torch.tensor([x for row in rows for x in row[1:]], dtype=torch.int32)
    if device.type == "cuda":
        table = table.pin_memory().to(device, non_blocking=True)  # no host sync
    else:
        table = table.to(device)
    if cache is not None:
        cache[key] = table
    return table


@dataclass(frozen=True)
class _Plan:
    """Everything the kernels need besides q, k, v: built on the host, once per forward and window.

    Only tensors and numbers that stay the same from batch to batch of one model (the window, the
    launch shapes), so a compiled block that reads a plan neither guards on document boundaries
    nor recompiles when they move; the tables' lengths are marked dynamic for the same reason.
    """

    fwd_tiles: torch.Tensor
    dq_tiles: torch.Tensor
    dkdv_tiles: torch.Tensor
    window: int  # effective: never larger than the token count
    config: SwaConfig


def make_plan(bounds: Sequence[int], window: Optional[int], num_tokens: int, head_dim: int, device: torch.device,
              cache: Optional[dict] = None, config: Optional[SwaConfig] = None) -> _Plan:
    """The tile tables of `bounds` for `window` on `device`, in the launch shapes of `config` (the
    head dim's default when None); `cache` (PackedDocs.cache) shares tables between layers."""
    device = torch.device(device)
    config = config or config_for(head_dim, device.type == "cuda")
    window = num_tokens if window is None else min(window, num_tokens)
    tables = [_tile_table(bounds, cfg.tile, window, queries, device, cache)
              for cfg, queries in ((config.fwd, True), (config.dq, True), (config.dkdv, False))]
    for table in tables:
        torch._dynamo.maybe_mark_dynamic(table, 0)
    return _Plan(*tables, window=window, config=config)


def _config_ints(config: SwaConfig) -> list[int]:
    return [x for cfg in (config.fwd, config.dq, config.dkdv) for x in (cfg.tile, cfg.step, cfg.num_warps, cfg.num_stages)]


def _config_of(ints: Sequence[int]) -> SwaConfig:
    return SwaConfig(*(TileConfig(*ints[i:i + 4]) for i in (0, 4, 8)))


def _forward(q, k, v, plan: _Plan):
    T, n_heads, head_dim = q.shape
    n_kv_heads = k.shape[1]
    cfg = plan.config.fwd
    tiles = plan.fwd_tiles
    out = _new(q)
    lse = _new(q, (n_heads, T), torch.float32)
    sm_scale = head_dim ** -0.5
    grid = (tiles.numel() // 3 * n_heads,)
    _swa_fwd_kernel[grid](
        q, k, v, out, lse, tiles, n_heads, T, plan.window, sm_scale * math.log2(math.e), q.stride(0), k.stride(0),
        GROUP=n_heads // n_kv_heads, HEAD_DIM=head_dim, TILE=cfg.tile, STEP=cfg.step,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out, lse


def _backward_dq(q, k, v, out, lse, dout, plan: _Plan):
    """dq, and delta = rowsum(dO * O) for the dk/dv kernel."""
    T, n_heads, head_dim = q.shape
    cfg = plan.config.dq
    tiles = plan.dq_tiles
    dq, delta = _new(q), _new(lse)
    sm_scale = head_dim ** -0.5
    _swa_bwd_dq_kernel[(tiles.numel() // 3 * n_heads,)](
        q, k, v, out, dout, dq, lse, delta, tiles, n_heads, T, plan.window, sm_scale * math.log2(math.e), sm_scale,
        q.stride(0), k.stride(0),
        GROUP=n_heads // k.shape[1], HEAD_DIM=head_dim, TILE=cfg.tile, STEP=cfg.step,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return dq, delta


def _backward_dkdv(q, k, v, dout, lse, delta, plan: _Plan):
    T, n_heads, head_dim = q.shape
    n_kv_heads = k.shape[1]
    cfg = plan.config.dkdv
    tiles = plan.dkdv_tiles
    dk, dv = _new(k), _new(v)
    sm_scale = head_dim ** -0.5
    _swa_bwd_dkdv_kernel[(tiles.numel() // 3 * n_kv_heads,)](
        q, k, v, dout, dk, dv, lse, delta, tiles, n_kv_heads, T, plan.window, sm_scale * math.log2(math.e), sm_scale,
        q.stride(0), k.stride(0),
        GROUP=n_heads // n_kv_heads, HEAD_DIM=head_dim, TILE=cfg.tile, STEP=cfg.step,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return dk, dv


# The ops take the plan as tensors and plain numbers (the config as 12 ints: tile, step, warps and
# stages of fwd, dq and dkdv): custom ops accept nothing else, and dynamo guards on none of it per batch.
@torch.library.custom_op("mft::swa_attention", mutates_args=())
def swa_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fwd_tiles: torch.Tensor,
                     dq_tiles: torch.Tensor, dkdv_tiles: torch.Tensor, window: int, config: list[int]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse): out (T, Hq, D) like q, lse (Hq, T) fp32 in base 2; q, k, v contiguous."""
    plan = _Plan(fwd_tiles, dq_tiles, dkdv_tiles, window, _config_of(config))
    return _forward(q.contiguous(), k.contiguous(), v.contiguous(), plan)


@swa_attention_op.register_fake
def _(q, k, v, fwd_tiles, dq_tiles, dkdv_tiles, window, config):
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("mft::swa_attention_backward", mutates_args=())
def swa_attention_backward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                              lse: torch.Tensor, dout: torch.Tensor, dq_tiles: torch.Tensor,
                              dkdv_tiles: torch.Tensor, window: int, config: list[int]
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of swa_attention_op's out for the gradient `dout`."""
    plan = _Plan(dq_tiles, dq_tiles, dkdv_tiles, window, _config_of(config))  # no forward table needed
    q, k, v, out, dout = (x.contiguous() for x in (q, k, v, out, dout))
    dq, delta = _backward_dq(q, k, v, out, lse, dout, plan)
    dk, dv = _backward_dkdv(q, k, v, dout, lse, delta, plan)
    return dq, dk, dv


@swa_attention_backward_op.register_fake
def _(q, k, v, out, lse, dout, dq_tiles, dkdv_tiles, window, config):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, _, dq_tiles, dkdv_tiles, window, config = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, dq_tiles, dkdv_tiles)
    ctx.window, ctx.config = window, config


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, dq_tiles, dkdv_tiles = ctx.saved_tensors
    dq, dk, dv = swa_attention_backward_op(q, k, v, out, lse, dout, dq_tiles, dkdv_tiles, ctx.window, ctx.config)
    return dq, dk, dv, None, None, None, None, None


swa_attention_op.register_autograd(_backward, setup_context=_setup_context)


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: Optional[int]) -> None:
    """Raise for shapes, head dims, dtypes or windows the kernels do not take."""
    if q.dim() != 3 or k.dim() != 3 or k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise ValueError(f"expected q (T, Hq, D) and k, v (T, Hkv, D), got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    _, n_heads, head_dim = q.shape
    if n_heads % k.shape[1]:
        raise ValueError(f"{n_heads} query heads do not split into groups over {k.shape[1]} KV heads")
    if head_dim < 16 or head_dim > 256 or head_dim & (head_dim - 1):
        raise MftError(f"attn_backend 'triton' supports head dims 16, 32, 64, 128, 256, not {head_dim}; "
                       "use attn_backend sdpa or flex")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise MftError(f"attn_backend 'triton' takes bf16, fp16 or fp32 q, k, v of one dtype, got "
                       f"{q.dtype}, {k.dtype}, {v.dtype}")
    if window is not None and window < 1:
        raise ValueError(f"window must be at least 1 (the query itself), got {window}")


def swa_attention_planned(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """Attention out (T, Hq, D) with a plan built by make_plan for these tokens; differentiable,
    and one node for torch.compile (no graph break)."""
    if q.shape[0] == 0:
        return q.clone()
    out, _ = swa_attention_op(q.contiguous(), k.contiguous(), v.contiguous(), plan.fwd_tiles, plan.dq_tiles,
                              plan.dkdv_tiles, plan.window, _config_ints(plan.config))
    return out


def swa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bounds: Sequence[int],
    window: Optional[int],
    *,
    cache: Optional[dict] = None,
    config: Optional[SwaConfig] = None,
) -> torch.Tensor:
    """Attention out (T, Hq, D) for q (T, Hq, D), k and v (T, Hkv, D); differentiable.

    `bounds` are the document boundaries (0, ..., T) on the host; `cache` (PackedDocs.cache)
    keeps the tile tables for the other layers of the same forward and their backward.
    """
    check_inputs(q, k, v, window)
    T, _, head_dim = q.shape
    if len(bounds) < 1 or bounds[0] != 0 or bounds[-1] != T:
        raise ValueError(f"bounds must run from 0 to {T} (the token count), got {tuple(bounds)}")
    if T == 0:
        return q.clone()
    return swa_attention_planned(q, k, v, make_plan(bounds, window, T, head_dim, q.device, cache, config))
