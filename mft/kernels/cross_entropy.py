"""Cross-entropy through the output head in chunks of tokens, without keeping any logits.

At seq 4096 and vocab 32768 the fp32 logits alone are 512 MiB, and autograd keeps them (and
the log-softmax) for backward. Here each chunk's head matmul + cross-entropy runs under
activation checkpointing: forward keeps only the chunk's hidden states, backward recomputes
one chunk's logits at a time. Peak extra memory: one chunk's logits (chunk x vocab x ~10 bytes).
Pure torch (the name of the folder notwithstanding): the matmul dominates, fusing buys little.
"""

from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

Head = Callable[[torch.Tensor], torch.Tensor]  # hidden states (T, dim) -> logits (T, vocab)


def _chunk_loss(head: Head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def chunked_cross_entropy(
    hidden: torch.Tensor, head: Head, targets: torch.Tensor, chunk_size: int = 1024
) -> torch.Tensor:
    """Summed cross-entropy of head(hidden) (T, vocab) against targets (T,), fp32, chunk by chunk."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if hidden.shape[0] <= chunk_size:
        return _chunk_loss(head, hidden, targets)
    total = hidden.new_zeros((), dtype=torch.float32)
    for h, t in zip(hidden.split(chunk_size), targets.split(chunk_size)):
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss, head, h, t, use_reentrant=False)
        else:
            total = total + _chunk_loss(head, h, t)
    return total
