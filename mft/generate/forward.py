"""The Transformer's forward over a KV cache, for generation.

It reuses the model's own submodules (norms, projections, feed-forward, embeddings, head), so
LoRA layers and loaded weights apply unchanged; only the attention differs from training's
packed forward: tokens come as (B, C) rows, keys come from the cache (see cache.py).
"""

import torch

from mft.generate.cache import CachePlan, KVCache, attend_cached
from mft.model.rope import apply_rope, rope_angles
from mft.model.transformer import Attention, Transformer


def _attention(attn: Attention, x: torch.Tensor, cos, sin, B: int, C: int, cache: KVCache, layer: int, plan: CachePlan):
    T = B * C
    q = apply_rope(attn.wq(x).view(T, attn.n_heads, attn.head_dim), cos, sin)
    k = apply_rope(attn.wk(x).view(T, attn.n_kv_heads, attn.head_dim), cos, sin)
    v = attn.wv(x).view(T, attn.n_kv_heads, attn.head_dim)
    q, k, v = (t.view(B, C, t.shape[1], t.shape[2]).transpose(1, 2) for t in (q, k, v))
    out = attend_cached(q, k, v, cache, layer, plan)  # (B, n_heads, C, hd)
    return attn.wo(out.transpose(1, 2).reshape(T, attn.n_heads * attn.head_dim))


def forward_cached(
    model: Transformer, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache, plan: CachePlan
) -> torch.Tensor:
    """Final normed hidden states (B, C, dim) of tokens (B, C) at positions (B, C)."""
    B, C = tokens.shape
    cos, sin = rope_angles(positions.reshape(-1), model.args.head_dim, model.args.rope_theta)
    h = model.tok_embeddings(tokens.reshape(-1))
    for i, block in enumerate(model.layers):
        h = h + _attention(block.attention, block.attention_norm(h), cos, sin, B, C, cache, i, plan)
        h = h + block.feed_forward(block.ffn_norm(h))
    return model.norm(h).view(B, C, -1)
