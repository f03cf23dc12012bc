"""Dequantise a QuantizedTensor with the fastest path for its device: mft's Triton kernels
(mft/kernels/dequant.py) on CUDA, the torch reference (mft.quant.formats.dequantize) elsewhere.
The two agree bit for bit (tested), so the choice never changes a result.

The kernels module (and so triton) is imported on first use, not with mft.quant: a CPU-only
process never loads triton, and tests can still choose Triton's interpreter before it loads.
"""

from typing import Dict, Optional

import torch

from mft.quant.formats import QuantizedStack, QuantizedTensor, nf4_levels
from mft.quant.formats import dequantize as dequantize_torch

_LEVELS: Dict[torch.device, torch.Tensor] = {}  # the NF4 table, once per device


def _levels(device: torch.device) -> torch.Tensor:
    if device not in _LEVELS:
        _LEVELS[device] = nf4_levels(device)
    return _LEVELS[device]


# The kernels as custom ops: torch.compile sees one node each (no graph break) and never traces
# into Triton's launcher. Arguments are tensors and plain numbers; block 0: the kernels' default.
@torch.library.custom_op("mft::dequantize_nf4", mutates_args=())
def dequantize_nf4_op(q: torch.Tensor, absmax: torch.Tensor, absmax_scale: Optional[torch.Tensor],
                      absmax_offset: Optional[torch.Tensor], rows: int, cols: int, block_size: int,
                      dq_block_size: int, dtype: torch.dtype, block: int) -> torch.Tensor:
    """NF4 codes to a dense (rows, cols) weight; absmax holds int8 codes when absmax_scale is given."""
    from mft.kernels.dequant import BLOCK_BYTES, dequantize_nf4

    return dequantize_nf4(q, absmax, _levels(q.device), (rows, cols), block_size, dtype,
                          absmax_scale=absmax_scale, absmax_offset=absmax_offset, dq_block_size=dq_block_size,
                          block=block or BLOCK_BYTES)


@dequantize_nf4_op.register_fake
def _(q, absmax, absmax_scale, absmax_offset, rows, cols, block_size, dq_block_size, dtype, block):
    return q.new_empty((rows, cols), dtype=dtype)


@torch.library.custom_op("mft::dequantize_int4", mutates_args=())
def dequantize_int4_op(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, rows: int, cols: int,
                       block_size: int, dtype: torch.dtype, block: int) -> torch.Tensor:
    """int4 codes to a dense (rows, cols) weight."""
    from mft.kernels.dequant import BLOCK_BYTES, dequantize_int4

    return dequantize_int4(q, scale, zero, (rows, cols), block_size, dtype, block=block or BLOCK_BYTES)


@dequantize_int4_op.register_fake
def _(q, scale, zero, rows, cols, block_size, dtype, block):
    return q.new_empty((rows, cols), dtype=dtype)


def dequantize_triton(qt: QuantizedTensor, dtype: torch.dtype = torch.bfloat16, block: Optional[int] = None
                      ) -> torch.Tensor:
    """The Triton kernels on qt's device (CUDA, or CPU under TRITON_INTERPRET=1); `block`: packed
    bytes per program (the kernels' default when None)."""
    qt.check()
    spec, p = qt.spec, qt.parts
    rows, cols = qt.shape
    if spec.format == "int4":
        return dequantize_int4_op(p["q"], p["scale"], p["zero"], rows, cols, spec.block_size, dtype, block or 0)
    if spec.double_quant:
        return dequantize_nf4_op(p["q"], p["absmax_q"], p["absmax_scale"], p["absmax_offset"], rows, cols,
                                 spec.block_size, spec.dq_block_size, dtype, block or 0)
    return dequantize_nf4_op(p["q"], p["absmax"], None, None, rows, cols, spec.block_size, spec.dq_block_size,
                             dtype, block or 0)


def dequantize(qt: QuantizedTensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Dense weight in `dtype`: the Triton kernel on CUDA, the torch reference elsewhere."""
    if qt.device.type == "cuda" and _triton_imports():
        return dequantize_triton(qt, dtype)
    return dequantize_torch(qt, dtype)


def dequantize_stack(stack: QuantizedStack, dtype: torch.dtype = torch.bfloat16,
                     groups: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Dense (G, out, in) weights in `dtype`, dequantised one weight at a time into one buffer (so
    the temporaries are one weight's). `groups`, a 1-D integer tensor: only those weights, in that
    order (a decoding step reads the experts its tokens chose, not all of them)."""
    if groups is not None:
        stack = stack.select(groups)
    stack.check()
    out = torch.empty((stack.groups, *stack.shape), dtype=dtype, device=stack.device)
    for g in range(stack.groups):
        out[g] = dequantize(stack.weight(g), dtype)
    return out


def _triton_imports() -> bool:
    """Whether mft's kernels module found a working triton (imported once, on the first CUDA call)."""
    from mft.kernels import dequant as kernels

    return kernels.triton is not None


__all__ = ["dequantize", "dequantize_stack", "dequantize_torch", "dequantize_triton"]
