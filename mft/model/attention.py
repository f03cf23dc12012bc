"""One attention interface over packed documents; backends live behind a name registry.

A backend is a function ``attn(q, k, v, docs, window) -> out`` with q (T, n_heads, head_dim),
k and v (T, n_kv_heads, head_dim) and out (T, n_heads, head_dim). Its semantics are fixed:
causal, no attention across documents, and with a window W a query sees itself and the
previous W - 1 tokens of its own document (W keys, the convention of transformers, vLLM and
xformers). window None means plain causal. The model picks a backend once, by name:

- ``sdpa``: torch SDPA once per document; the reference, and what ``auto`` runs on CPU;
- ``triton``: mft's own sliding-window varlen kernel (mft/kernels/swa_attention.py), what
  ``auto`` runs on CUDA; work grows with tokens x window, not tokens^2;
- ``flex``: torch flex_attention with a document + window block mask (compiled on CUDA);
- ``xformers``: xformers' memory_efficient_attention, used only where it imports and a probe
  call works; otherwise one log line and the ``auto`` choice.
"""

import logging
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

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


def triton_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: PackedDocs, window: Optional[int]
) -> torch.Tensor:
    """mft's Triton kernel: on CUDA, or on CPU under Triton's interpreter (TRITON_INTERPRET=1)."""
    try:
        from mft.kernels.swa_attention import INTERPRETED, swa_attention
    except ImportError as e:
        raise MftError(f"attn_backend 'triton' needs the triton package ({e}); use attn_backend auto or sdpa") from e
    if not q.is_cuda and not INTERPRETED:
        raise MftError(f"attn_backend 'triton' needs a CUDA device, the tensors are on {q.device}; "
                       "use attn_backend auto (sdpa on CPU) or sdpa")
    return swa_attention(q, k, v, docs.bounds, window, cache=docs.cache)


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
            log.warning("attn_backend xformers unavailable on %s (%s); using %s instead",
                        device.type, first_line, _auto_name(device))
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
    """The backend `auto` runs on `device`: the Triton kernel on CUDA (if triton imports), else sdpa."""
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


def auto_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: PackedDocs, window: Optional[int]
) -> torch.Tensor:
    """Chooses per call from the tensors' device: the model is built on meta and moved later."""
    return _BACKENDS[_auto_name(q.device)](q, k, v, docs, window)


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
    """Resolve a config name to a backend; "auto" picks per device at call time (triton on CUDA, sdpa on CPU)."""
    if name == "auto":
        return auto_attention
    if name not in _BACKENDS:
        raise MftError(
            f"Unknown attention backend {name!r} (model attn_backend); valid names: "
            + ", ".join(attention_backend_names())
        )
    return _BACKENDS[name]
