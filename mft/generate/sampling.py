"""Next-token choice from logits: greedy, or temperature with optional top-k / top-p filtering."""

from dataclasses import dataclass
from typing import Optional

import torch

from mft.utils.errors import MftError


@dataclass(frozen=True)
class SamplingSettings:
    temperature: float = 0.0  # 0: greedy (argmax); otherwise logits / temperature are sampled
    top_p: float = 1.0  # nucleus: keep the most likely tokens whose probability mass reaches top_p
    top_k: int = 0  # keep the k most likely tokens; 0: all

    def __post_init__(self):
        if self.temperature < 0:
            raise MftError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            raise MftError(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.top_k < 0:
            raise MftError(f"top_k must be >= 0 (0 = off), got {self.top_k}.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """logits (B, V) with the tokens outside top-k / the top-p nucleus set to -inf.

    The nucleus is the smallest set of most likely tokens whose mass reaches top_p; the most
    likely token always stays.
    """
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # mass of the strictly more likely tokens
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(logits: torch.Tensor, settings: SamplingSettings, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Token ids (B,) from logits (B, V)."""
    if settings.greedy:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits.float() / settings.temperature, settings.top_k, settings.top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
