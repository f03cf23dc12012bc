"""Cross-entropy through the output head in chunks of tokens, without keeping any logits.

At seq 4096 and vocab 32768 the fp32 logits alone are 512 MiB, and autograd would keep them (and
the log-softmax) for backward. Two ways to avoid that, both pure torch:

- `linear_cross_entropy`, for a frozen plain head weight (LoRA, QLoRA with a bf16 head): each
  chunk's logits are made once, and their gradient (softmax - one-hot) is multiplied back through
  the head at once, in forward; backward only scales the kept d hidden (T, dim). No head matmul
  is recomputed.
- `chunked_cross_entropy`, for any head function (one that trains, a 4-bit one): each chunk's
  head matmul + cross-entropy runs under activation checkpointing, and backward recomputes one
  chunk's logits at a time.

Peak extra memory of either: one chunk's logits and their gradient (chunk x vocab x ~10 bytes),
and d hidden (T, dim) in the compute dtype. Targets are class ids or IGNORE_INDEX; positions
whose target is IGNORE_INDEX add nothing to the loss and get no gradient.
"""

from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

Head = Callable[[torch.Tensor], torch.Tensor]  # hidden states (T, dim) -> logits (T, vocab)
IGNORE_INDEX = -100  # F.cross_entropy's default


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


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of hidden @ weight^T against targets, d hidden made in forward."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int,
                make_grad: bool) -> torch.Tensor:
        ctx.chunk_size = chunk_size
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if make_grad else None
        for start in range(0, hidden.shape[0], chunk_size):
            h, t = hidden[start:start + chunk_size], targets[start:start + chunk_size]
            logits = F.linear(h, weight).float()
            lse = torch.logsumexp(logits, dim=-1)
            supervised = t != IGNORE_INDEX
            rows, picked = torch.arange(len(t), device=t.device), t.clamp(min=0)
            total += ((lse - logits[rows, picked]) * supervised).sum()
            if grad_hidden is None:
                continue
            # d loss / d logits = softmax - one-hot, in fp32 (in place of the logits), then in the
            # compute dtype, as autograd would pass it back through the head's .float().
            grad = logits.sub_(lse[:, None]).exp_()
            grad[rows, picked] -= supervised.float()
            grad = grad.mul_(supervised[:, None]).to(h.dtype)
            grad_hidden[start:start + chunk_size] = grad @ weight
        ctx.save_for_backward(grad_hidden)
        return total

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        (grad_hidden,) = ctx.saved_tensors
        if grad_hidden is None:
            return None, None, None, None, None
        # Scaled in fp32 and rounded once (the chain rule's order differs from autograd's here), a
        # chunk at a time, so no (tokens x dim) fp32 copy exists at once.
        scaled = torch.empty_like(grad_hidden)
        for g, out in zip(grad_hidden.split(ctx.chunk_size), scaled.split(ctx.chunk_size)):
            out.copy_(g.float() * grad_loss)
        return scaled, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk_size: int = 1024) -> torch.Tensor:
    """Summed cross-entropy of hidden (T, dim) @ weight (vocab, dim)^T against targets (T,), fp32,
    chunk by chunk, d hidden computed in forward (module docstring). The head is frozen: a head
    that trains takes `chunked_cross_entropy`, whose weight gradient accumulates in its .grad
    (here it would need a second fp32 copy of the weight until backward)."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError("linear_cross_entropy takes a frozen head weight; use chunked_cross_entropy for one "
                         "that trains")
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk_size,
                                     torch.is_grad_enabled() and hidden.requires_grad)
