"""Validation: token-weighted loss, perplexity and mean token accuracy on supervised targets.

Under several processes each rank runs the forward of every world_size-th batch (each still
reads and collates the whole validation set, which is cheap next to the forwards) and the sums
are all-reduced, so the metrics equal one process's.
Every rank still runs the same number of forwards (FSDP's collectives need all ranks in each):
a rank left one batch short repeats one and discards its result.
"""

import math
from itertools import islice
from typing import Dict, Optional

import torch
import torch.distributed as dist

from mft.train.loss import supervised_loss


@torch.no_grad()
def evaluate(model, dataset, batch_size: int, device: torch.device, max_batches: Optional[int] = None,
             rank: int = 0, world_size: int = 1) -> Dict[str, float]:
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, correct, tokens
    first, n_batches, forwards = None, 0, 0
    for i, batch in enumerate(islice(dataset.batches(batch_size, epoch=0), max_batches)):
        first = batch if first is None else first
        n_batches += 1
        if i % world_size != rank:
            continue
        result = supervised_loss(model, batch.to(device), count_correct=True)
        sums += torch.stack([result.loss.double(), result.correct.double(), sums.new_tensor(result.tokens)])
        forwards += 1
    for _ in range(-(-n_batches // world_size) - forwards):  # 0 or 1: keep in step with the other ranks
        supervised_loss(model, first.to(device))
    if world_size > 1:
        dist.all_reduce(sums)
    model.train(was_training)
    loss_sum, correct, tokens = sums.tolist()
    loss = loss_sum / max(tokens, 1)
    return {
        "valid_loss": loss,
        "valid_perplexity": math.exp(min(loss, 80.0)),
        "valid_mean_token_accuracy": correct / max(tokens, 1),
        "valid_tokens": int(tokens),
    }
