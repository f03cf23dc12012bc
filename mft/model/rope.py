"""Rotary position embedding on interleaved pairs, the Mistral/Meta native layout.

Dimension pair i of a head is (x[2i], x[2i+1]) and is rotated by position * theta^(-2i/head_dim),
as in mistral-inference. Hugging Face checkpoints use the "rotate_half" layout instead; the HF
loader undoes HF's permutation of wq/wk so that this module serves both.
"""

import torch


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, each (T, head_dim // 2) in fp32, for the per-token positions (T,).

    Computed once per forward and shared by all layers. The inverse frequencies are computed
    here rather than kept in a buffer: a buffer would need re-computing after to_empty() and
    would be silently rounded by model.to(bfloat16); this costs one tiny kernel per forward.
    """
    exponents = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim
    inv_freq = 1.0 / (theta**exponents)
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (T, heads, head_dim) by the angles of its tokens; math in fp32, result in x's dtype."""
    pairs = x.to(torch.float32).unflatten(-1, (-1, 2))  # (T, heads, head_dim // 2, 2)
    even, odd = pairs.unbind(-1)
    cos, sin = cos[:, None, :], sin[:, None, :]  # broadcast over heads
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2).to(x.dtype)
