"""Architecture hyper-parameters of a Mistral model."""

from dataclasses import dataclass
from typing import Optional


@dataclass
class ModelArgs:
    """Shape of a Mistral transformer, named as in Mistral's params.json."""

    dim: int = 4096
    n_layers: int = 32
    head_dim: int = 128
    hidden_dim: int = 14336
    n_heads: int = 32
    n_kv_heads: int = 8
    vocab_size: int = 32000
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # A query sees itself and the previous sliding_window - 1 tokens of its document; None: full causal.
    sliding_window: Optional[int] = None
