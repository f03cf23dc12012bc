"""Validation: token-weighted loss, perplexity and mean token accuracy on supervised targets."""

import math
from itertools import islice
from typing import Dict, Optional

import torch

from mft.train.loss import supervised_loss


@torch.no_grad()
def evaluate(model, dataset, batch_size: int, device: torch.device, max_batches: Optional[int] = None) -> Dict[str, float]:
    was_training = model.training
    model.eval()
    loss_sum, correct, tokens = 0.0, 0, 0
    for batch in islice(dataset.batches(batch_size, epoch=0), max_batches):
        sums = supervised_loss(model, batch.to(device), count_correct=True)
        loss_sum += float(sums.loss)
        correct += int(sums.correct)
        tokens += sums.tokens
    model.train(was_training)
    loss = loss_sum / max(tokens, 1)
    return {
        "valid_loss": loss,
        "valid_perplexity": math.exp(min(loss, 80.0)),
        "valid_mean_token_accuracy": correct / max(tokens, 1),
        "valid_tokens": tokens,
    }
