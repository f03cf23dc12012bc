"""The Mistral transformer (dense), one device, packed documents in one flat token stream.

Parameter names are those of Mistral's consolidated checkpoints. This file knows nothing of
FSDP, LoRA or activation checkpointing: they are applied from outside, and LoRA replaces the
plain nn.Linear attributes wq..wo and w1..w3 by modules that keep a `weight` parameter.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from mft.kernels.cross_entropy import chunked_cross_entropy
from mft.model.args import ModelArgs
from mft.model.attention import AttentionFn, PackedDocs, get_attention_backend
from mft.model.rope import apply_rope, rope_angles


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 (a bf16 mean of squares loses too much), cast back, then scale:
        # the order of mistral-inference and transformers, so bf16 results round like theirs.
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, attn_fn: AttentionFn):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.window = args.sliding_window
        self.attn_fn = attn_fn
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, docs: PackedDocs) -> torch.Tensor:
        T = x.shape[0]
        q = self.wq(x).view(T, self.n_heads, self.head_dim)
        k = self.wk(x).view(T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(T, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = self.attn_fn(q, k, v, docs, self.window)
        return self.wo(out.reshape(T, self.n_heads * self.head_dim))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=False)
        self.w3 = nn.Linear(args.dim, args.hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, attn_fn: AttentionFn):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args, attn_fn)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, docs: PackedDocs) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, docs)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs, attn_backend: str = "auto"):
        super().__init__()
        self.args = args
        attn_fn = get_attention_backend(attn_backend)  # chosen once, shared by every layer
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args, attn_fn) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)  # untied from tok_embeddings

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Random init in module order, so it is deterministic under torch.manual_seed.

        The output head gets std dim**-0.5 so that logits start at unit scale: with 0.02 a
        small model's logits are so flat that adapters on the blocks alone cannot sharpen them.
        """
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=self.args.dim**-0.5 if module is self.output else std)
            elif isinstance(module, RMSNorm):
                module.reset_parameters()

    def hidden_states(
        self, tokens: torch.Tensor, positions: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int
    ) -> torch.Tensor:
        """Final normed hidden states (T, dim): the input of `output`."""
        docs = PackedDocs.from_cu_seqlens(cu_seqlens, max_seqlen, num_tokens=tokens.shape[0])
        cos, sin = rope_angles(positions, self.args.head_dim, self.args.rope_theta)
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, cos, sin, docs)
        return self.norm(h)

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
        head_mask: Optional[torch.Tensor] = None,
        targets: Optional[torch.Tensor] = None,
        loss_chunk: int = 0,
    ) -> torch.Tensor:
        """Logits (T, vocab) in the compute dtype for tokens (T,) packed as cu_seqlens says.

        With `head_mask` (T,) bool, only the selected positions go through the output head: a
        loss on a few supervised tokens skips most of the largest matmul. With `targets` (one
        per selected position) it returns instead their summed fp32 cross-entropy, the head and
        the loss run `loss_chunk` tokens at a time and recomputed in backward
        (mft.kernels.cross_entropy), so no (tokens x vocab) logits are kept; 0: one chunk.
        (One entry point, so that wrappers that hook `forward`, FSDP's among them, see every call.)
        """
        hidden = self.hidden_states(tokens, positions, cu_seqlens, max_seqlen)
        hidden = hidden if head_mask is None else hidden[head_mask]
        if targets is None:
            return self.output(hidden)
        return chunked_cross_entropy(hidden, self.output, targets, loss_chunk or max(hidden.shape[0], 1))
