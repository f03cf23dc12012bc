"""One attention interface over packed documents; backends live behind a name registry.

A backend is a function ``attn(q, k, v, docs, window) -> out`` with q (T, n_heads, head_dim),
k and v (T, n_kv_heads, head_dim) and out (T, n_heads, head_dim). Its semantics are fixed:
causal, no attention across documents, and with a window W a query sees itself and the
previous W - 1 tokens of its own document (W keys, the convention of transformers, vLLM and
xformers). window None means plain causal. A backend may also have a host-side
``prepare(docs, windows, head_dim)`` that the model runs once per forward, before the blocks
(`prepare_attention`): it puts what depends on the document boundaries (tile tables, the choice
of `auto`) into ``docs.cache`` as tensors and plain values, so a block compiled with
torch.compile reads no boundaries and does not recompile when they move. The model picks a
backend once, by name:

- ``sdpa``: torch SDPA once per document; the reference, and what ``auto`` runs on CPU;
- ``triton``: mft's own sliding-window varlen kernel (mft/kernels/swa_attention.py), a custom op
  for torch.compile; work grows with tokens x window, not tokens^2;
- ``auto``: on CUDA, per batch (in `prepare`): where every document fits in the window, one
  batched SDPA call when the documents have one length, else torch's varlen_attn where it takes
  GQA natively; the Triton kernel otherwise; sdpa on CPU;
- ``flex``: torch flex_attention with a document + window block mask (compiled on CUDA);
- ``xformers``: xformers' memory_efficient_attention, used only where it imports and a probe
  call works; otherwise one log line and the ``auto`` choice.
"""

import inspect
import logging
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from mft.utils.errors import MftError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackedDocs:
    """Document boundaries of a packed sequence, built once per forward and shared by all layers."""

    cu_seqlens: torch.Tensor  # (n_docs + 1,) int32 on the compute device, for fused kernels
    max_seqlen: int
    bounds: tuple[int, ...]  # cu_seqlens on the host, so backends never sync per layer
    # Per-forward cache of masks (keyed by the backend), so 32 layers build a mask once.
    cache: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: torch.Tensor, max_seqlen: int, num_tokens: int) -> "PackedDocs":
        bounds = tuple(int(b) for b in cu_seqlens.tolist())  # the one host sync of the forward
        if not bounds or bounds[0] != 0 or bounds[-1] != num_tokens:
            raise ValueError(f"cu_seqlens must run from 0 to {num_tokens} (the token count), got {bounds}")
        if any(prev > nxt for prev, nxt in zip(bounds[:-1], bounds[1:])):
            raise ValueError(f"cu_seqlens must be non-decreasing, got {bounds}")
        return cls(cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, bounds=bounds)

    @property
    def lengths(self) -> list[int]:
        return [b - a for a, b in zip(self.bounds[:-1], self.bounds[1:])]


AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, PackedDocs, Optional[int]], torch.Tensor]


def sliding_window_mask(n: int, window: Optional[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """(n, n) bool mask, True where query i may attend key j: 0 <= i - j < window (or just i >= j)."""
    distance = torch.arange(n, device=device)[:, None] - torch.arange(n, device=device)[None, :]
    allowed = distance >= 0
    if window is not None:
        allowed &= distance < window
    return allowed


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: PackedDocs, window: Optional[int]
) -> torch.Tensor:
    """Reference backend: torch SDPA once per document.

    is_causal whenever the document fits in the window (lets SDPA pick its fused kernels);
    an explicit band mask only for documents longer than the window.
    """
    lengths = docs.lengths
    # One split per tensor (not a slice per document): its backward is one concatenation,
    # where per-document slices would each zero-fill a full-size gradient.
    outputs = []
    for qd, kd, vd in zip(q.split(lengths), k.split(lengths), v.split(lengths)):
        n = qd.shape[0]
        if n == 0:
            continue
        # (1, heads, seq, head_dim): SDPA's fused CUDA kernels (cuDNN, flash) take only 4-D inputs;
        # 3-D ones fall back to the math kernel (16-25x slower, measured on an H100).
        # enable_gqa shares K/V heads between query heads without repeating them in memory.
        qd, kd, vd = (x.transpose(0, 1).unsqueeze(0) for x in (qd, kd, vd))
        if window is None or n <= window:
            out = F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, enable_gqa=True)
        else:
            key = ("sdpa_band", n, window)
            if key not in docs.cache:
                docs.cache[key] = sliding_window_mask(n, window, q.device)
            out = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=docs.cache[key], enable_gqa=True)
        outputs.append(out[0].transpose(0, 1))
    if not outputs:  # an empty batch: keep the output shape and the graph
        return q.new_empty(q.shape)
    return torch.cat(outputs, dim=0) if len(outputs) > 1 else outputs[0]


def _swa_kernels():
    """mft.kernels.swa_attention, or an MftError when triton does not import."""
    try:
        import mft.kernels.swa_attention as swa
    except ImportError as e:
        raise MftError(f"attn_backend 'triton' needs the triton package ({e}); use attn_backend auto or sdpa") from e
    return swa


def _triton_plan(docs: PackedDocs, window: Optional[int], head_dim: int):
    """The kernels' tile tables for `window`, built once per forward into docs.cache."""
    key = ("triton_plan", window, head_dim)
    if key not in docs.cache:
        docs.cache[key] = _swa_kernels().make_plan(docs.bounds, window, docs.bounds[-1], head_dim,
                                                   docs.cu_seqlens.device, docs.cache)
    return docs.cache[key]


class TritonAttention:
    """mft's Triton kernel: on CUDA, or on CPU under Triton's interpreter (TRITON_INTERPRET=1)."""

    def prepare(self, docs: PackedDocs, windows: Sequence[Optional[int]], head_dim: int) -> None:
        for window in windows:
            _triton_plan(docs, window, head_dim)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: PackedDocs,
                 window: Optional[int]) -> torch.Tensor:
        swa = _swa_kernels()
        if not q.is_cuda and not swa.INTERPRETED:
            raise MftError(f"attn_backend 'triton' needs a CUDA device, the tensors are on {q.device}; "
                           "use attn_backend auto (sdpa on CPU) or sdpa")
        swa.check_inputs(q, k, v, window)
        return swa.swa_attention_planned(q, k, v, _triton_plan(docs, window, q.shape[2]))


triton_attention = TritonAttention()


# ---- flex_attention --------------------------------------------------------------------------

_FLEX_BLOCK = 128  # flex_attention's default tile; the block mask is built at this granularity
_flex_compiled = None


def _flex_block_mask(docs: PackedDocs, window: Optional[int], num_tokens: int, device: torch.device):
    """flex's BlockMask for documents + window, built from block-level counts (never a T x T mask).

    For every query and key block, count the allowed (query, key) pairs: a query t sees the keys
    max(doc_start, t - W + 1) .. t. Blocks with no pair are skipped, full ones run without the
    mask_mod, the rest are partial. Costs T x T/128 integers, once per forward (PackedDocs.cache).
    """
    from torch.nn.attention.flex_attention import BlockMask

    key = ("flex_block_mask", window, str(device))
    if key in docs.cache:
        return docs.cache[key]
    B = _FLEX_BLOCK
    n_blocks = -(-num_tokens // B)
    cu = docs.cu_seqlens.to(device=device, dtype=torch.int64)
    pos = torch.arange(n_blocks * B, device=device)
    # Padding positions (past T) get document -1: they match only each other and are never read.
    doc = torch.searchsorted(cu[1:], pos, right=True)
    doc = torch.where(pos < num_tokens, doc, -1)
    first = torch.where(pos < num_tokens, cu[doc.clamp(0, len(docs.bounds) - 2)], pos)
    lo = first if window is None else torch.maximum(first, pos - window + 1)
    key_start = torch.arange(n_blocks, device=device) * B
    counts = (torch.minimum(pos[:, None] + 1, key_start[None, :] + B) - torch.maximum(lo[:, None], key_start[None, :]))
    counts = counts.clamp_(min=0).view(n_blocks, B, n_blocks).sum(1)  # (query block, key block)
    full = counts == B * B
    partial = (counts > 0) & ~full

    def as_indices(blocks: torch.Tensor):
        order = torch.argsort(blocks.to(torch.int8), dim=-1, descending=True, stable=True)
        return blocks.sum(-1, dtype=torch.int32)[None, None], order.to(torch.int32)[None, None]

    def mask_mod(b, h, q_idx, kv_idx):  # indices run up to the padded length, as `doc` does
        keep = (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)
        if window is not None:
            keep = keep & (q_idx - kv_idx < window)
        return keep

    num, idx = as_indices(partial)
    full_num, full_idx = as_indices(full)
    mask = BlockMask.from_kv_blocks(num, idx, full_num, full_idx, BLOCK_SIZE=B, mask_mod=mask_mod,
                                    seq_lengths=(num_tokens, num_tokens))
    docs.cache[key] = mask
    return mask


def flex_attention_backend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: PackedDocs, window: Optional[int]
) -> torch.Tensor:
    """torch flex_attention; compiled on CUDA, eager elsewhere (unfused, and forward-only on CPU)."""
    from torch.nn.attention.flex_attention import flex_attention

    global _flex_compiled
    T = q.shape[0]
    if T == 0:
        return q.new_empty(q.shape)
    fn = flex_attention
    if q.is_cuda:
        if _flex_compiled is None:
            # dynamic=False: one specialised kernel per token count (a packer gives one count).
            _flex_compiled = torch.compile(flex_attention, dynamic=False)
        fn = _flex_compiled
    block_mask = _flex_block_mask(docs, window, T, q.device)
    qh, kh, vh = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))  # (1, heads, T, head_dim)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        out = fn(qh, kh, vh, block_mask=block_mask, enable_gqa=True)
    return out[0].transpose(0, 1)


# ---- xformers (optional) ---------------------------------------------------------------------

_xformers_ok: dict[str, bool] = {}


def _xformers_call(q, k, v, docs: PackedDocs, window: Optional[int]) -> torch.Tensor:
    from xformers.ops import fmha

    lengths = docs.lengths
    if window is None:
        bias = fmha.attn_bias.BlockDiagonalCausalMask.from_seqlens(lengths)
    else:  # xformers' window counts keys the way we do: t - W + 1 .. t
        bias = fmha.attn_bias.BlockDiagonalCausalLocalAttentionMask.from_seqlens(lengths, window_size=window)
    T, n_heads, head_dim = q.shape
    n_kv = k.shape[1]
    group = n_heads // n_kv
    # 5-D (batch, tokens, kv heads, group, head_dim): K/V broadcast over the group by stride 0.
    q5 = q.view(1, T, n_kv, group, head_dim)
    k5, v5 = (x.view(1, T, n_kv, 1, head_dim).expand(1, T, n_kv, group, head_dim) for x in (k, v))
    return fmha.memory_efficient_attention(q5, k5, v5, attn_bias=bias).view(T, n_heads, head_dim)


def _xformers_works(device: torch.device) -> bool:
    """Import xformers and run one tiny call on `device`; remember the answer per device type."""
    if device.type not in _xformers_ok:
        try:
            probe = torch.randn(8, 2, 64, device=device, dtype=torch.float16 if device.type == "cuda" else torch.float32)
            docs = PackedDocs.from_cu_seqlens(torch.tensor([0, 8], dtype=torch.int32, device=device), 8, 8)
            _xformers_call(probe, probe, probe, docs, 4)
            _xformers_ok[device.type] = True
        except Exception as e:  # ImportError, or a build without this device's kernels
            first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
            log.warning("attn_backend xformers unavailable on %s (%s); using %s instead", device.type, first_line,
                        "auto's choice per batch" if device.type == "cuda" else "sdpa")
            _xformers_ok[device.type] = False
    return _xformers_ok[device.type]


def xformers_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: PackedDocs, window: Optional[int]
) -> torch.Tensor:
    if not _xformers_works(q.device):
        return auto_attention(q, k, v, docs, window)
    return _xformers_call(q.contiguous(), k.contiguous(), v.contiguous(), docs, window)


# ---- auto and the registry -------------------------------------------------------------------

_triton_missing_logged = False


def _auto_name(device: torch.device) -> str:
    """The backend `auto` runs on `device` for documents torch's attention does not take: the
    Triton kernel on CUDA (if triton imports), else sdpa."""
    global _triton_missing_logged
    if device.type != "cuda":
        return "sdpa"
    try:
        import mft.kernels.swa_attention  # noqa: F401
    except ImportError as e:
        if not _triton_missing_logged:
            log.warning("attn_backend auto: triton does not import (%s); using sdpa", e)
            _triton_missing_logged = True
        return "sdpa"
    return "triton"


def _varlen_call_style() -> Optional[tuple[Callable, str, bool]]:
    """torch.nn.attention.varlen.varlen_attn (torch >= 2.10), how it is told to be causal
    ("is_causal" or "window_size") and whether it takes enable_gqa; None where torch lacks it."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    if "is_causal" in params:
        causal = "is_causal"
    elif "window_size" in params:
        causal = "window_size"
    else:
        return None
    return varlen_attn, causal, "enable_gqa" in params


_VARLEN = _varlen_call_style()


@dataclass(frozen=True)
class AutoChoice:
    """What `auto` runs for one window of one batch; plain values only, and only those the call
    reads (a compiled block guards on them: a new choice compiles once more, a known one never)."""

    backend: str  # "varlen" | "batched_sdpa" | "triton" | "sdpa"
    max_seqlen: int = 0  # varlen: the longest document rounded up to a power of two (few distinct values)
    doc_len: int = 0  # batched_sdpa: the one document length


def _auto_choice(docs: PackedDocs, window: Optional[int], device: torch.device) -> tuple[AutoChoice, str]:
    """(the choice, why) for one window: torch's attention where every document fits in the window,
    the Triton kernel otherwise."""
    if device.type != "cuda":
        return AutoChoice("sdpa"), "on CPU"
    lengths = [n for n in docs.lengths if n > 0]
    longest = max(lengths, default=0)
    fits = "there is no window" if window is None else f"every document fits in the window of {window}"
    # Measured on an H200 (torch 2.11, 32 query / 8 KV heads of 128, forward + backward): one batched
    # SDPA call beats the Triton kernel 1.3-2.8x on documents of one length; varlen_attn without
    # native GQA (K/V repeated per query head) loses to it 1.04-1.3x on mixed lengths.
    if window is None or longest <= window:
        if len(set(lengths)) == 1:
            return AutoChoice("batched_sdpa", doc_len=longest), f"{fits} and all documents have one length"
        if _VARLEN is not None and _VARLEN[2]:
            bucket = min(1 << max(longest - 1, 0).bit_length(), max(docs.bounds[-1], 1))
            return AutoChoice("varlen", max_seqlen=bucket), f"{fits} (torch's varlen_attn, native GQA)"
        reason = f"{fits} but the documents differ in length and this torch has no varlen_attn with GQA"
    else:
        reason = f"a document of {longest} tokens is longer than the window of {window}"
    if _auto_name(device) == "triton":
        return AutoChoice("triton"), reason
    return AutoChoice("sdpa"), f"{reason}, and triton does not import"


def _varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: PackedDocs,
                      choice: AutoChoice) -> torch.Tensor:
    varlen_attn, causal, takes_gqa = _VARLEN
    kwargs = {"is_causal": True} if causal == "is_causal" else {"window_size": (-1, 0)}
    if q.shape[1] != k.shape[1]:
        if takes_gqa:
            kwargs["enable_gqa"] = True
        else:
            group = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    cu = docs.cu_seqlens
    return varlen_attn(q, k, v, cu, cu, choice.max_seqlen, choice.max_seqlen, **kwargs)


def _batched_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_len: int) -> torch.Tensor:
    """Documents of one length as the rows of one causal SDPA call."""
    T, n_heads, head_dim = q.shape
    if q.dtype == torch.float32 and k.shape[1] != n_heads:
        # fp32 has no flash kernel, and GQA would then fall to the math kernel, which keeps a
        # doc_len x doc_len matrix per head for backward: repeat K/V for the memory-efficient one.
        k, v = (x.repeat_interleave(n_heads // x.shape[1], dim=1) for x in (k, v))
    rows = [x.view(T // doc_len, doc_len, x.shape[1], head_dim).transpose(1, 2) for x in (q, k, v)]
    out = F.scaled_dot_product_attention(*rows, is_causal=True, enable_gqa=k.shape[1] != n_heads)
    return out.transpose(1, 2).reshape(T, n_heads, head_dim)


class AutoAttention:
    """Picks per batch, on the host, in `prepare` (see AutoChoice); each choice logged once."""

    def __init__(self) -> None:
        self._logged: set[tuple[str, Optional[int]]] = set()

    def prepare(self, docs: PackedDocs, windows: Sequence[Optional[int]], head_dim: int) -> None:
        device = docs.cu_seqlens.device
        for window in windows:
            choice, reason = _auto_choice(docs, window, device)
            docs.cache[("auto", window)] = choice
            if (choice.backend, window) not in self._logged:
                self._logged.add((choice.backend, window))
                log.info("attn_backend auto, window %s: %s, since %s", window, choice.backend, reason)
            if choice.backend == "varlen":
                torch._dynamo.maybe_mark_dynamic(docs.cu_seqlens, 0)  # the document count varies per batch
            # varlen too: FlashAttention takes half types only, so fp32 runs the kernel (see __call__).
            if choice.backend == "triton" or (choice.backend == "varlen" and _auto_name(device) == "triton"):
                triton_attention.prepare(docs, [window], head_dim)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: PackedDocs,
                 window: Optional[int]) -> torch.Tensor:
        if ("auto", window) not in docs.cache:  # called outside a model's forward
            self.prepare(docs, [window], q.shape[2])
        choice = docs.cache[("auto", window)]
        if choice.backend == "varlen" and q.dtype in (torch.bfloat16, torch.float16):
            return _varlen_attention(q, k, v, docs, choice)
        if choice.backend == "batched_sdpa":
            return _batched_sdpa(q, k, v, choice.doc_len)
        if choice.backend == "triton" or ("triton_plan", window, q.shape[2]) in docs.cache:
            return triton_attention(q, k, v, docs, window)
        return sdpa_attention(q, k, v, docs, window)


auto_attention = AutoAttention()


def prepare_attention(attn_fn: AttentionFn, docs: PackedDocs, windows: Sequence[Optional[int]], head_dim: int) -> None:
    """Run the backend's host-side `prepare` for this forward's documents, if it has one."""
    prepare = getattr(attn_fn, "prepare", None)
    if prepare is not None:
        prepare(docs, windows, head_dim)


def compiles_whole(attn_fn: AttentionFn, device: torch.device) -> bool:
    """Whether a block with this backend compiles as one graph (torch.compile fullgraph) that only a
    bounded number of batches recompile: triton, and auto on CUDA (a few choices). Not sdpa (a loop
    over documents: every packing compiles anew, until dynamo's limit makes the block run eagerly,
    where fullgraph would fail instead), flex (its own compiled call) or xformers."""
    return attn_fn is triton_attention or (attn_fn is auto_attention and device.type == "cuda")


_BACKENDS: dict[str, AttentionFn] = {
    "sdpa": sdpa_attention,
    "triton": triton_attention,
    "flex": flex_attention_backend,
    "xformers": xformers_attention,
}


def register_attention_backend(name: str, fn: AttentionFn) -> None:
    """Make a backend selectable by name."""
    if name == "auto":
        raise ValueError("'auto' is reserved: it picks a backend, it is not one")
    _BACKENDS[name] = fn


def attention_backend_names() -> list[str]:
    return ["auto", *sorted(_BACKENDS)]


def get_attention_backend(name: str) -> AttentionFn:
    """Resolve a config name to a backend; "auto" picks per batch (AutoAttention)."""
    if name == "auto":
        return auto_attention
    if name not in _BACKENDS:
        raise MftError(
            f"Unknown attention backend {name!r} (model attn_backend); valid names: "
            + ", ".join(attention_backend_names())
        )
    return _BACKENDS[name]
