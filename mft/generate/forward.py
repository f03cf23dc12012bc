"""The Transformer's forward over a KV cache, for generation.

It reuses the model's own submodules (norms, projections, feed-forward, embeddings, head), so
LoRA layers and loaded weights apply unchanged; only the attention differs from training's
packed forward: tokens come as (B, C) rows, keys come from the cache (see cache.py).
"""

from typing import Optional

import torch
import torch.nn.functional as F

from mft.generate.cache import CachePlan, KVCache, attend_cached
from mft.generate.fuse import FusedBlock
from mft.model.rope import apply_rope, rope_angles
from mft.model.transformer import Attention, FeedForward, Transformer


def _attention(attn: Attention, x: torch.Tensor, cos, sin, B: int, C: int, cache: KVCache, layer: int,
               plan: CachePlan, qkv: Optional[torch.Tensor]):
    T = B * C
    if qkv is None:
        q, k, v = attn.wq(x), attn.wk(x), attn.wv(x)
    else:
        kv = attn.n_kv_heads * attn.head_dim
        q, k, v = F.linear(x, qkv).split([attn.n_heads * attn.head_dim, kv, kv], dim=-1)
    q = apply_rope(q.view(T, attn.n_heads, attn.head_dim), cos, sin)
    k = apply_rope(k.view(T, attn.n_kv_heads, attn.head_dim), cos, sin)
    v = v.view(T, attn.n_kv_heads, attn.head_dim)
    q, k, v = (t.view(B, C, t.shape[1], t.shape[2]).transpose(1, 2) for t in (q, k, v))
    out = attend_cached(q, k, v, cache, layer, plan)  # (B, n_heads, C, hd)
    return attn.wo(out.transpose(1, 2).reshape(T, attn.n_heads * attn.head_dim))


def _feed_forward(ff: FeedForward, x: torch.Tensor, w13: Optional[torch.Tensor]) -> torch.Tensor:
    if w13 is None:
        return ff(x)
    gate, up = F.linear(x, w13).chunk(2, dim=-1)
    return ff.w2(F.silu(gate) * up)


def forward_cached(
    model: Transformer, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache, plan: CachePlan,
    fused: Optional[list[FusedBlock]] = None,
) -> torch.Tensor:
    """Final normed hidden states (B, C, dim) of tokens (B, C) at positions (B, C).

    `fused` (mft.generate.fuse) replaces a block's separate projections by its fused weights.
    """
    B, C = tokens.shape
    cos, sin = rope_angles(positions.reshape(-1), model.args.head_dim, model.args.rope_theta)
    h = model.tok_embeddings(tokens.reshape(-1))
    for i, block in enumerate(model.layers):
        f = fused[i] if fused is not None else FusedBlock(None, None)
        h = h + _attention(block.attention, block.attention_norm(h), cos, sin, B, C, cache, i, plan, f.qkv)
        h = h + _feed_forward(block.feed_forward, block.ffn_norm(h), f.w13)
    return model.norm(h).view(B, C, -1)
