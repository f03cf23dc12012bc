"""apply_rope, written as two products and a sum over interleaved tables, against the rotation
written per pair (the formula it replaced) and against transformers' rotate_half rope."""

import pytest
import torch

from mft.model.args import ModelArgs, QueryScalingArgs, YarnArgs
from mft.model.rope import apply_rope, inverse_frequencies, rope_tables, yarn_attention_factor

ARGS = {
    "plain": ModelArgs(head_dim=16, rope_theta=10000.0),
    "yarn+query-scale": ModelArgs(head_dim=16, rope_theta=10000.0,
                                  yarn=YarnArgs(factor=4.0, original_max_position_embeddings=16),
                                  query_scaling=QueryScalingArgs(beta=0.5, original_max_position_embeddings=16)),
}


def per_pair_rope(x, positions, args, scale=None):
    """The rotation of each (even, odd) pair, stacked back: mft's formula before this one."""
    angles = positions.to(torch.float32)[:, None] * inverse_frequencies(args.head_dim, args.rope_theta, args.yarn)
    cos, sin = angles.cos(), angles.sin()
    if args.yarn.active:
        factor = yarn_attention_factor(args.yarn)
        cos, sin = cos * factor, sin * factor
    even, odd = x.to(torch.float32).unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)
    if scale is not None:
        rotated = rotated * scale[:, None, None]
    return rotated.to(x.dtype)


@pytest.mark.parametrize("name", list(ARGS))
def test_rope_equals_the_per_pair_rotation_bit_for_bit_in_fp32(name):
    args = ARGS[name]
    positions = torch.cat([torch.arange(37), torch.arange(5), torch.tensor([4000, 65000])])  # packed, and far
    x = torch.randn(len(positions), 3, args.head_dim, generator=torch.Generator().manual_seed(0)) * 4
    tables = rope_tables(positions, args)
    assert (tables.query_scale is not None) == (name != "plain")
    for scale in (None, tables.query_scale):
        ours = apply_rope(x, tables.cos, tables.sin, scale)
        assert torch.equal(ours, per_pair_rope(x, positions, args, scale))
        bf16 = apply_rope(x.bfloat16(), tables.cos, tables.sin, scale)
        # bf16 in, fp32 math, one rounding out: as the old formula, and as fp32 rounded once at the end.
        assert torch.equal(bf16, per_pair_rope(x.bfloat16(), positions, args, scale))
        assert torch.equal(bf16, apply_rope(x.bfloat16().float(), tables.cos, tables.sin, scale).bfloat16())


def test_rope_equals_transformers_rotate_half_after_the_permutation():
    pytest.importorskip("transformers")
    from transformers.models.mistral.modeling_mistral import apply_rotary_pos_emb

    args, T, hd = ARGS["plain"], 23, 16
    positions = torch.arange(T)
    x = torch.randn(T, 2, hd, generator=torch.Generator().manual_seed(1))
    tables = rope_tables(positions, args)
    ours = apply_rope(x, tables.cos, tables.sin)
    # transformers rotates halves (x[:hd/2], x[hd/2:]): the interleaved pair i is (i, i + hd/2) there.
    to_halves = torch.cat([torch.arange(0, hd, 2), torch.arange(1, hd, 2)])
    angles = positions[:, None].float() * inverse_frequencies(hd, args.rope_theta, args.yarn)[None]
    emb = torch.cat([angles, angles], dim=-1)
    q = x[..., to_halves].transpose(0, 1)[None]  # (1, heads, T, hd)
    theirs, _ = apply_rotary_pos_emb(q, q, emb.cos()[None], emb.sin()[None])
    torch.testing.assert_close(theirs[0].transpose(0, 1), ours[..., to_halves], rtol=1e-6, atol=1e-6)
