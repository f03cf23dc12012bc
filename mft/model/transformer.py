"""The Mistral transformer (dense, or Mixtral's mixture of experts: mft/model/moe.py), one device, one forward for training and decoding.

Training feeds packed documents as one flat token stream (cu_seqlens marks the documents);
decoding feeds (batch, chunk) rows with a KV cache plan (mft/model/kv_cache.py), and may pass
fused projection weights (mft/generate/fuse.py). Both run the same blocks; only the attention
step differs: the packed backend, or attention over the cache.

Parameter names are those of Mistral's consolidated checkpoints. This file knows nothing of
FSDP, LoRA or activation checkpointing: they are applied from outside (mft/build/), and LoRA
replaces the plain nn.Linear attributes wq..wo and w1..w3 by modules that keep a `weight`.
Layers that read the same input (wq, wk, wv; w1, w3) are called through `project`, so a layer
type that can share work between them (LoRA's A products) may do so.
"""

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mft.kernels.cross_entropy import chunked_cross_entropy, linear_cross_entropy
from mft.model.args import ModelArgs
from mft.model.attention import AttentionFn, PackedDocs, get_attention_backend, prepare_attention
from mft.model.kv_cache import CachePlan
from mft.model.moe import MoEFeedForward
from mft.model.rope import RopeTables, apply_rope, rope_tables


@dataclass
class FusedProjections:
    """One block's projections that read the same input, concatenated along their output rows:
    one matmul instead of three (wq|wk|wv) or two (w1|w3). For decoding only: these are plain
    tensors, so no gradient reaches the layers' parameters through them. None: not fused."""

    qkv: Optional[torch.Tensor]  # (n_heads * hd + 2 * n_kv_heads * hd, dim)
    w13: Optional[torch.Tensor]  # (2 * hidden_dim, dim): w1's rows then w3's; None for a mixture of experts


def project(x: torch.Tensor, *layers: nn.Module) -> Sequence[torch.Tensor]:
    """The outputs of linear `layers` that all read `x`, in order.

    When every layer is of one type that defines `project_together(x, layers)`, that computes
    them together (LoRALinear shares one product with its concatenated A factors); otherwise
    each layer runs on its own. The layers' own forward hooks are not run by project_together.
    """
    kind = type(layers[0])
    together = getattr(kind, "project_together", None)
    if together is not None and all(type(layer) is kind for layer in layers):
        return together(x, layers)
    return [layer(x) for layer in layers]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 (a bf16 mean of squares loses too much), cast back, then scale:
        # the order of mistral-inference and transformers, so bf16 results round like theirs.
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, attn_fn: AttentionFn, layer_id: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.window = args.windows[layer_id]  # None: full causal (interleaved models mix both)
        self.attn_fn = attn_fn
        self.layer_id = layer_id  # which of the KV cache's layers this one reads and writes
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x: torch.Tensor, rope: RopeTables, docs: Optional[PackedDocs],
                cache: Optional[CachePlan] = None, qkv: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (T, dim) -> (T, dim): over packed `docs`, or, with `cache`, over the cached keys too."""
        T, hd = x.shape[0], self.head_dim
        if qkv is None:
            q, k, v = project(x, self.wq, self.wk, self.wv)
        else:
            q, k, v = F.linear(x, qkv).split([self.n_heads * hd, self.n_kv_heads * hd, self.n_kv_heads * hd], dim=-1)
        q = apply_rope(q.view(T, self.n_heads, hd), rope.cos, rope.sin, rope.query_scale)
        k = apply_rope(k.view(T, self.n_kv_heads, hd), rope.cos, rope.sin)
        v = v.view(T, self.n_kv_heads, hd)
        out = self.attn_fn(q, k, v, docs, self.window) if cache is None else cache.attend(q, k, v, self.layer_id)
        return self.wo(out.reshape(T, self.n_heads * hd))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=False)
        self.w3 = nn.Linear(args.dim, args.hidden_dim, bias=False)

    def forward(self, x: torch.Tensor, w13: Optional[torch.Tensor] = None) -> torch.Tensor:
        if w13 is None:
            gate, up = project(x, self.w1, self.w3)
        else:
            gate, up = F.linear(x, w13).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, attn_fn: AttentionFn, layer_id: int):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args, attn_fn, layer_id)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args) if args.moe is None else MoEFeedForward(args)

    def forward(self, x: torch.Tensor, rope: RopeTables, docs: Optional[PackedDocs],
                cache: Optional[CachePlan] = None, fused: Optional[FusedProjections] = None) -> torch.Tensor:
        qkv, w13 = (fused.qkv, fused.w13) if fused is not None else (None, None)
        h = x + self.attention(self.attention_norm(x), rope, docs, cache, qkv)
        if w13 is None:
            return h + self.feed_forward(self.ffn_norm(h))
        return h + self.feed_forward(self.ffn_norm(h), w13)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs, attn_backend: str = "auto"):
        super().__init__()
        self.args = args
        attn_fn = get_attention_backend(attn_backend)  # chosen once, shared by every layer
        self.attn_fn = attn_fn
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args, attn_fn, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        # Tied embeddings have no head of their own: `head` multiplies by tok_embeddings' weight,
        # so there is one parameter whatever to_empty, FSDP or a state dict do with modules.
        self.output = None if args.tied_embeddings else nn.Linear(args.dim, args.vocab_size, bias=False)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of final hidden states: the output layer, or the token embedding when tied."""
        if self.output is None:
            return F.linear(hidden, self.tok_embeddings.weight)
        return self.output(hidden)

    def frozen_head_weight(self) -> Optional[torch.Tensor]:
        """The head's weight (the output layer's, or the embedding's when tied) when it is a plain
        tensor that does not train; None for a head that trains or a 4-bit output layer."""
        if self.output is None:
            weight = self.tok_embeddings.weight
        elif type(self.output) is nn.Linear:
            weight = self.output.weight
        else:
            return None
        return None if weight.requires_grad else weight

    def hidden_states(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cu_seqlens: Optional[torch.Tensor] = None,
        max_seqlen: int = 0,
        cache: Optional[CachePlan] = None,
        fused: Optional[Sequence[FusedProjections]] = None,
    ) -> torch.Tensor:
        """Final normed hidden states (T, dim), T = tokens.numel(): the input of `output`."""
        if cache is None and cu_seqlens is None:
            raise ValueError("packed tokens need cu_seqlens (their document boundaries), or pass a cache plan")
        tokens, positions = tokens.reshape(-1), positions.reshape(-1)
        docs = None if cache is not None else PackedDocs.from_cu_seqlens(cu_seqlens, max_seqlen, tokens.shape[0])
        if docs is not None:  # host-side work on the boundaries, outside the (compiled) blocks
            prepare_attention(self.attn_fn, docs, tuple(dict.fromkeys(self.args.windows)), self.args.head_dim)
        rope = rope_tables(positions, self.args)
        h = self.tok_embeddings(tokens)
        for i, layer in enumerate(self.layers):
            h = layer(h, rope, docs, cache, fused[i] if fused is not None else None)
        return self.norm(h)

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cu_seqlens: Optional[torch.Tensor] = None,
        max_seqlen: int = 0,
        head_mask: Optional[torch.Tensor] = None,
        targets: Optional[torch.Tensor] = None,
        loss_chunk: int = 0,
        cache: Optional[CachePlan] = None,
        fused: Optional[Sequence[FusedProjections]] = None,
    ) -> torch.Tensor:
        """Logits (T, vocab) in the compute dtype, one row per token.

        Training and evaluation: tokens (T,) packed as cu_seqlens says (positions restart per
        document). Decoding: tokens and positions (B, C), `cache` the plan of this step over the
        KV cache (mft.model.kv_cache: which keys each query sees, where the new ones are
        stored), no cu_seqlens; rows are flattened, so T = B * C. `fused`: per block, fused
        projection weights to use instead of the separate layers (decoding only).

        With `head_mask` (T,) or (B, C) bool, only the selected positions go through the output
        head: a loss on a few supervised tokens (or a prefill that needs the last token's logits)
        skips most of the largest matmul. With `targets` (one per selected position) it returns
        instead their summed fp32 cross-entropy, the head and the loss run `loss_chunk` tokens at
        a time (mft.kernels.cross_entropy: the gradient made in forward for a frozen plain head,
        else recomputed in backward), so no (tokens x vocab) logits are kept; 0: one chunk.
        (One entry point, so that wrappers that hook `forward`, FSDP's among them, see every call.)
        """
        hidden = self.hidden_states(tokens, positions, cu_seqlens, max_seqlen, cache, fused)
        hidden = hidden if head_mask is None else hidden[head_mask.reshape(-1)]
        if targets is None:
            return self.head(hidden)
        chunk = loss_chunk or max(hidden.shape[0], 1)
        weight = self.frozen_head_weight()
        if weight is None:
            return chunked_cross_entropy(hidden, self.head, targets, chunk)
        return linear_cross_entropy(hidden, weight, targets, chunk)
