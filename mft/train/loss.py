"""Next-token cross-entropy on supervised positions only.

The output head runs only on the hidden states whose target is supervised: for chat data
(loss on assistant tokens) that skips most of the largest matmul and of the fp32 logits.
"""

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from mft.data.batch import Batch


@dataclass
class LossSums:
    """Sums over a batch, so that micro-batches and ranks can be added before dividing."""

    loss: torch.Tensor  # summed cross-entropy (fp32, keeps the graph in training)
    tokens: int  # supervised targets
    correct: Optional[torch.Tensor]  # targets predicted exactly by argmax (when asked for)


def supervised_loss(model, batch: Batch, count_correct: bool = False, loss_chunk: int = 0) -> LossSums:
    """loss_chunk > 0: the head and the loss run that many supervised tokens at a time inside the
    model's forward, no logits kept (accuracy counting needs the logits, so it takes the plain path)."""
    mask = batch.loss_mask
    targets = batch.targets[mask]
    inputs = (batch.tokens, batch.positions, batch.cu_seqlens, batch.max_seqlen)
    if loss_chunk > 0 and not count_correct:
        loss = model(*inputs, head_mask=mask, targets=targets, loss_chunk=loss_chunk)
        return LossSums(loss=loss, tokens=int(targets.numel()), correct=None)
    logits = model(*inputs, head_mask=mask).float()
    loss = F.cross_entropy(logits, targets, reduction="sum")
    correct = (logits.detach().argmax(dim=-1) == targets).sum() if count_correct else None
    return LossSums(loss=loss, tokens=int(targets.numel()), correct=correct)
