"""Fused projections for decoding: wq, wk, wv as one matmul, w1, w3 as one.

At one token per step every matmul is a memory-bound matrix-vector product, and each kernel
pays a fixed cost (ramp-up, the partial last wave) on top of streaming its weight. Projections
that read the same input are therefore concatenated along their output rows: a block runs 4
matmuls per token instead of 7 (qkv, wo, w13, w2).

No memory is added: the fused tensor is allocated once, the three (or two) weights are copied
in, and the model's own parameters (the same Parameter objects, so an optimizer's references
stay valid) now hold views into it: disjoint row ranges, which safetensors saves as separate
tensors. In-place changes to either (merging an adapter, `load_state_dict`, an optimizer step)
are thus seen by both. A block whose projections are not plain bias-free `nn.Linear` layers
(LoRA kept unmerged, quantised layers, int4 kernels) is left as it is. A mixture-of-experts
block (Mixtral) gets its qkv fused; its experts stay as they are: at decoding each token copy
reads only its own expert's weights (mft/model/moe.py, forward_rows), w1 and w3 one after the other.
"""

import weakref
from typing import Optional

import torch
from torch import nn

from mft.model.transformer import FeedForward, FusedProjections, Transformer


def _plain(layer: nn.Module) -> bool:
    return type(layer) is nn.Linear and layer.bias is None


def _fuse(layers: list[nn.Linear]) -> Optional[torch.Tensor]:
    """One tensor holding the layers' weights one after another; each weight becomes a view of it.

    A group that another live Generator fused already is shared, not fused again (which would
    leave that Generator's tensor stale): the first layer keeps a weak reference to it.
    """
    if not all(_plain(layer) for layer in layers):
        return None
    known = getattr(layers[0], "_mft_fused", None)
    shared = known() if known is not None else None
    if shared is not None and _backs(shared, layers):
        return shared
    weights = [layer.weight for layer in layers]
    if len({(w.device, w.dtype) for w in weights}) != 1:
        return None
    with torch.no_grad():
        fused = torch.cat([w.detach() for w in weights])
        start = 0
        for weight in weights:  # the same Parameter objects (an optimizer keeps its references)
            rows = weight.shape[0]
            weight.data = fused[start:start + rows]
            start += rows
    layers[0]._mft_fused = weakref.ref(fused)
    return fused


def fuse_projections(model: Transformer) -> list[FusedProjections]:
    """Per block, the fused qkv and w13 weights (None where that group cannot be fused), as the
    model's forward takes them (`fused=`)."""
    blocks = []
    for block in model.layers:
        attn, ff = block.attention, block.feed_forward
        w13 = _fuse([ff.w1, ff.w3]) if isinstance(ff, FeedForward) else None  # experts: see the module docstring
        blocks.append(FusedProjections(qkv=_fuse([attn.wq, attn.wk, attn.wv]), w13=w13))
    return blocks


def _backs(tensor: Optional[torch.Tensor], layers: list[nn.Module]) -> bool:
    if tensor is None:
        return True
    storage = tensor.untyped_storage().data_ptr()
    return all(_plain(layer) and layer.weight.untyped_storage().data_ptr() == storage for layer in layers)


def still_fused(model: Transformer, blocks: list[FusedProjections]) -> bool:
    """Whether every fused tensor still backs the model's weights (no layer was replaced since)."""
    return all(
        _backs(fused.qkv, [block.attention.wq, block.attention.wk, block.attention.wv])
        and _backs(fused.w13, [block.feed_forward.w1, block.feed_forward.w3])
        for block, fused in zip(model.layers, blocks)
    )
