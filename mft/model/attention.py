"""One attention interface over packed documents; backends live behind a name registry.

A backend is a function ``attn(q, k, v, docs, window) -> out`` with q (T, n_heads, head_dim),
k and v (T, n_kv_heads, head_dim) and out (T, n_heads, head_dim). Its semantics are fixed:
causal, no attention across documents, and with a window W a query sees itself and the
previous W - 1 tokens of its own document (W keys, the convention of transformers, vLLM and
xformers). window None means plain causal. The model picks a backend once, by name.
"""

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from mft.errors import MftError


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


_BACKENDS: dict[str, AttentionFn] = {"sdpa": sdpa_attention}


def register_attention_backend(name: str, fn: AttentionFn) -> None:
    """Make a backend selectable by name (optional ones register themselves when importable)."""
    if name == "auto":
        raise ValueError("'auto' is reserved: it picks a backend, it is not one")
    _BACKENDS[name] = fn


def attention_backend_names() -> list[str]:
    return ["auto", *sorted(_BACKENDS)]


def get_attention_backend(name: str) -> AttentionFn:
    """Resolve a config name to a backend; "auto" picks the best one available (sdpa for now)."""
    if name == "auto":
        name = "sdpa"  # later: the Triton kernel on CUDA
    if name not in _BACKENDS:
        raise MftError(
            f"Unknown attention backend {name!r} (model attn_backend); valid names: "
            + ", ".join(attention_backend_names())
        )
    return _BACKENDS[name]
