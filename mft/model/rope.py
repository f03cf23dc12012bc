"""Rotary position embedding on interleaved pairs, the Mistral/Meta native layout, with YaRN
scaling and Llama 4's query scale (Ministral 3).

Dimension pair i of a head is (x[2i], x[2i+1]) and is rotated by position * inv_freq[i], as in
mistral-inference. Hugging Face checkpoints use the "rotate_half" layout instead; the HF loader
undoes HF's permutation of wq/wk so that this module serves both.

Positions are each packed document's own (they restart at 0 per document), so YaRN's angles and
the query scale, which depend on the position, are those of the document's tokens. transformers
uses the absolute position in its batch row; for one unpacked document the two agree.
"""

import math
from dataclasses import dataclass
from typing import Optional

import torch

from mft.model.args import ModelArgs, QueryScalingArgs, YarnArgs


@dataclass
class RopeTables:
    """What every attention layer of one forward needs for positions; computed once per forward."""

    # Per dimension of a head, in the interleaved layout: pair i's cos twice, and its sin as
    # (-sin, +sin), so that apply_rope is two products and a sum (no stack of the halves).
    cos: torch.Tensor  # (T, head_dim) fp32, times YaRN's attention factor
    sin: torch.Tensor  # (T, head_dim)
    query_scale: Optional[torch.Tensor] = None  # (T,) fp32 Llama 4 query scale; None: 1


def yarn_attention_factor(yarn: YarnArgs) -> float:
    """YaRN's factor on cos and sin (so on both q and k): 0.1 m ln(s) + 1 with s the scaling
    factor, as a ratio of two such terms when mscale_all_dim is set (transformers' rule)."""

    def mscale(m: float) -> float:
        return 1.0 if yarn.factor <= 1 else 0.1 * m * math.log(yarn.factor) + 1.0

    if yarn.mscale and yarn.mscale_all_dim:
        return mscale(yarn.mscale) / mscale(yarn.mscale_all_dim)
    return mscale(1.0)


def inverse_frequencies(head_dim: int, theta: float, yarn: YarnArgs, device=None) -> torch.Tensor:
    """inv_freq (head_dim // 2,) fp32. With YaRN, a pair that turns more than beta_fast times over
    the original context keeps its frequency, one that turns fewer than beta_slow times has it
    divided by `factor`, and the pairs between blend the two along a linear ramp."""
    exponents = torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim
    inv_freq = 1.0 / (theta**exponents)
    if not yarn.active:
        return inv_freq

    def pair_index(rotations: float) -> float:
        # The pair whose wavelength fits `rotations` times in the original context.
        return head_dim * math.log(yarn.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(pair_index(yarn.beta_fast)), 0)
    high = min(math.ceil(pair_index(yarn.beta_slow)), head_dim - 1)
    high = high + 0.001 if high == low else high  # a ramp of width 0 would divide by zero
    ramp = ((torch.arange(head_dim // 2, device=device, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    return inv_freq / yarn.factor * ramp + inv_freq * (1 - ramp)


def query_scale(positions: torch.Tensor, scaling: QueryScalingArgs) -> torch.Tensor:
    """Llama 4's per-token query scale (T,) fp32: 1 + beta ln(1 + floor(pos / length))."""
    steps = torch.floor(positions.to(torch.float32) / scaling.original_max_position_embeddings)
    return 1 + scaling.beta * torch.log1p(steps)


def rope_tables(positions: torch.Tensor, args: ModelArgs) -> RopeTables:
    """The tables of the per-token positions (T,).

    The inverse frequencies are computed here rather than kept in a buffer: a buffer would need
    re-computing after to_empty() and would be silently rounded by model.to(bfloat16); this costs
    one tiny kernel per forward.
    """
    inv_freq = inverse_frequencies(args.head_dim, args.rope_theta, args.yarn, positions.device)
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    cos, sin = angles.cos(), angles.sin()
    if args.yarn.active:
        factor = yarn_attention_factor(args.yarn)
        cos, sin = cos * factor, sin * factor
    scale = query_scale(positions, args.query_scaling) if args.query_scaling.active else None
    return RopeTables(cos.repeat_interleave(2, dim=-1), torch.stack((-sin, sin), dim=-1).flatten(-2), scale)


def swap_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x1, x0, x3, x2, ...): each interleaved pair of the last dimension swapped."""
    return x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Rotate x (T, heads, head_dim) by the angles of its tokens (tables of rope_tables), then
    multiply token t by scale[t] when given; math in fp32, result in x's dtype.

    Pair (e, o) becomes (e cos - o sin, o cos + e sin): the same products and sums, each rounded
    once in fp32, as the rotation written per pair, so the result is bit for bit the same.
    """
    xf = x.to(torch.float32)
    rotated = xf * cos[:, None, :] + swap_pairs(xf) * sin[:, None, :]  # tables broadcast over heads
    if scale is not None:
        rotated = rotated * scale[:, None, None]
    return rotated.to(x.dtype)
