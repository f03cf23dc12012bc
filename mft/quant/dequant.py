"""Dequantise a QuantizedTensor with the fastest path for its device: mft's Triton kernels
(mft/kernels/dequant.py) on CUDA, the torch reference (mft.quant.formats.dequantize) elsewhere.
The two agree bit for bit (tested), so the choice never changes a result.

The kernels module (and so triton) is imported on first use, not with mft.quant: a CPU-only
process never loads triton, and tests can still choose Triton's interpreter before it loads.
"""

from typing import Dict, Optional

import torch

from mft.quant.formats import QuantizedTensor, nf4_levels
from mft.quant.formats import dequantize as dequantize_torch

_LEVELS: Dict[torch.device, torch.Tensor] = {}  # the NF4 table, once per device


def dequantize_triton(qt: QuantizedTensor, dtype: torch.dtype = torch.bfloat16, block: Optional[int] = None
                      ) -> torch.Tensor:
    """The Triton kernels on qt's device (CUDA, or CPU under TRITON_INTERPRET=1); `block`: packed
    bytes per program (the kernels' default when None)."""
    from mft.kernels.dequant import dequantize_int4, dequantize_nf4

    qt.check()
    spec, p = qt.spec, qt.parts
    tiling = {} if block is None else {"block": block}
    if spec.format == "int4":
        return dequantize_int4(p["q"], p["scale"], p["zero"], qt.shape, spec.block_size, dtype, **tiling)
    if qt.device not in _LEVELS:
        _LEVELS[qt.device] = nf4_levels(qt.device)
    if spec.double_quant:
        return dequantize_nf4(p["q"], p["absmax_q"], _LEVELS[qt.device], qt.shape, spec.block_size, dtype,
                              absmax_scale=p["absmax_scale"], absmax_offset=p["absmax_offset"],
                              dq_block_size=spec.dq_block_size, **tiling)
    return dequantize_nf4(p["q"], p["absmax"], _LEVELS[qt.device], qt.shape, spec.block_size, dtype, **tiling)


def dequantize(qt: QuantizedTensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Dense weight in `dtype`: the Triton kernel on CUDA, the torch reference elsewhere."""
    if qt.device.type == "cuda" and _triton_imports():
        return dequantize_triton(qt, dtype)
    return dequantize_torch(qt, dtype)


def _triton_imports() -> bool:
    """Whether mft's kernels module found a working triton (imported once, on the first CUDA call)."""
    from mft.kernels import dequant as kernels

    return kernels.triton is not None


__all__ = ["dequantize", "dequantize_torch", "dequantize_triton"]
