"""The one batch type that flows from the data pipeline to the model and the loss."""

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    """Packed documents as one flat token stream.

    Document i occupies tokens[cu_seqlens[i]:cu_seqlens[i+1]]; positions restart at 0 for
    every document and attention never crosses a document boundary. targets[j] is the token
    that follows tokens[j] in its document and loss_mask[j] says whether it is supervised.
    """

    tokens: torch.Tensor  # (T,) int64 input ids
    targets: torch.Tensor  # (T,) int64 next-token ids
    loss_mask: torch.Tensor  # (T,) bool: supervised target
    positions: torch.Tensor  # (T,) int64 position within the document
    cu_seqlens: torch.Tensor  # (n_docs + 1,) int32 document boundaries, cu_seqlens[-1] == T
    max_seqlen: int  # longest document in the batch
    padding: int = 0  # positions that are packing padding (pad ids, never supervised), not data

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(
            tokens=self.tokens.to(device, non_blocking=True),
            targets=self.targets.to(device, non_blocking=True),
            loss_mask=self.loss_mask.to(device, non_blocking=True),
            positions=self.positions.to(device, non_blocking=True),
            cu_seqlens=self.cu_seqlens.to(device, non_blocking=True),
            max_seqlen=self.max_seqlen,
            padding=self.padding,
        )

    @property
    def num_tokens(self) -> int:
        """Every position, padding included: the work the model does."""
        return int(self.tokens.numel())

    @property
    def num_real_tokens(self) -> int:
        """The positions that hold data (documents, not packing padding)."""
        return self.num_tokens - self.padding
