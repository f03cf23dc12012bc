"""Triton dequantisation of NF4 and int4 weights, bit-identical to the torch reference.

`dequantize(qt, dtype)` is what the quantised linear layer calls: the Triton kernels on CUDA,
mft.quant.formats.dequantize (torch) elsewhere. Both compute the same fp32 operations in the
same order and round once into the compute dtype, so they agree bit for bit:
- nf4: level[code] * absmax, with absmax = code8 * scale + offset under double quantisation.
  The kernel is compiled with fp fusion off, so that multiply-then-add is never contracted
  into an fma (which rounds once instead of twice, unlike torch's two kernels).
- int4: (code - zero) * scale.
- fp32 -> bf16 rounds to nearest even by integer arithmetic on the bits, the rounding of
  torch's cast; Triton's interpreter (TRITON_INTERPRET=1, used by the CPU tests) truncates
  in its own cast, so the bits are computed explicitly. Weights are finite (no NaN handling).

One program decodes BLOCK packed bytes into 2 * BLOCK contiguous outputs. Memory traffic is
0.5 byte read + 2 bytes written per bf16 element (+ 1 or 4 bytes per block of 64).
"""

from typing import Dict

import torch

from mft.quant.formats import QuantizedTensor, nf4_levels
from mft.quant.formats import dequantize as dequantize_torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs without triton use the torch reference
    triton = None

BLOCK_BYTES = 2048
_OUT_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_LEVELS: Dict[torch.device, torch.Tensor] = {}


def triton_available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _bf16_bits(x):
        """fp32 -> bf16 bit pattern (as int16), rounded to nearest, ties to even."""
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return rounded.to(tl.uint16).to(tl.int16, bitcast=True)

    @triton.jit
    def _store_pairs(out_ptr, pid, n_bytes, hi, lo, OUT_KIND: tl.constexpr, BLOCK: tl.constexpr):
        """Store hi (even columns) and lo (odd columns) interleaved: out[2j] = hi[j], out[2j+1] = lo[j]."""
        if OUT_KIND == 1:
            hi = _bf16_bits(hi)
            lo = _bf16_bits(lo)
        elif OUT_KIND == 2:
            hi = hi.to(tl.float16)
            lo = lo.to(tl.float16)
        values = tl.reshape(tl.join(hi, lo), (2 * BLOCK,))
        offs = pid * (2 * BLOCK) + tl.arange(0, 2 * BLOCK)
        tl.store(out_ptr + offs, values, mask=offs < 2 * n_bytes)

    @triton.jit
    def _nf4_kernel(
        q_ptr, absmax_ptr, absmax_scale_ptr, absmax_offset_ptr, levels_ptr, out_ptr, n_bytes,
        BYTES_PER_BLOCK: tl.constexpr, DQ_BLOCK: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
        OUT_KIND: tl.constexpr, BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_bytes
        byte = tl.load(q_ptr + offs, mask=mask, other=0).to(tl.int32)
        block = offs // BYTES_PER_BLOCK
        if DOUBLE_QUANT:
            code = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.float32)
            scale = tl.load(absmax_scale_ptr + block // DQ_BLOCK, mask=mask, other=0.0)
            offset = tl.load(absmax_offset_ptr)
            absmax = code * scale + offset
        else:
            absmax = tl.load(absmax_ptr + block, mask=mask, other=0.0)
        hi = tl.load(levels_ptr + (byte >> 4)) * absmax
        lo = tl.load(levels_ptr + (byte & 0xF)) * absmax
        _store_pairs(out_ptr, pid, n_bytes, hi, lo, OUT_KIND, BLOCK)

    @triton.jit
    def _int4_kernel(
        q_ptr, scale_ptr, zero_ptr, out_ptr, n_bytes,
        BYTES_PER_BLOCK: tl.constexpr, OUT_KIND: tl.constexpr, BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_bytes
        byte = tl.load(q_ptr + offs, mask=mask, other=0).to(tl.int32)
        group = offs // BYTES_PER_BLOCK
        scale = tl.load(scale_ptr + group, mask=mask, other=0.0).to(tl.float32)
        zero = tl.load(zero_ptr + group, mask=mask, other=0.0).to(tl.float32)
        hi = ((byte >> 4).to(tl.float32) - zero) * scale
        lo = ((byte & 0xF).to(tl.float32) - zero) * scale
        _store_pairs(out_ptr, pid, n_bytes, hi, lo, OUT_KIND, BLOCK)


def _levels(device: torch.device) -> torch.Tensor:
    if device not in _LEVELS:
        _LEVELS[device] = nf4_levels(device)
    return _LEVELS[device]


def dequantize_triton(qt: QuantizedTensor, dtype: torch.dtype = torch.bfloat16, block: int = BLOCK_BYTES) -> torch.Tensor:
    """The Triton kernels on qt's device (CUDA, or CPU under TRITON_INTERPRET=1)."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    if dtype not in _OUT_KINDS:
        raise ValueError(f"dequantize to {dtype} is not supported; use one of {list(_OUT_KINDS)}")
    qt.check()
    spec, p = qt.spec, qt.parts
    out = torch.empty(qt.shape, dtype=dtype, device=qt.device)
    n_bytes = p["q"].numel()
    if 2 * n_bytes >= 2**31:
        raise ValueError(f"a weight of {2 * n_bytes} elements is too large for the int32 indexing of the kernel")
    target = out.view(torch.int16) if dtype == torch.bfloat16 else out
    grid = (triton.cdiv(n_bytes, block),)
    common = dict(BYTES_PER_BLOCK=spec.block_size // 2, OUT_KIND=_OUT_KINDS[dtype], BLOCK=block)
    if spec.format == "nf4":
        if spec.double_quant:
            absmax, scale, offset = p["absmax_q"], p["absmax_scale"], p["absmax_offset"]
        else:
            absmax = scale = offset = p["absmax"]  # scale/offset unused without double quantisation
        _nf4_kernel[grid](
            p["q"], absmax, scale, offset, _levels(out.device), target, n_bytes,
            DQ_BLOCK=spec.dq_block_size, DOUBLE_QUANT=spec.double_quant, enable_fp_fusion=False, **common,
        )
    else:
        _int4_kernel[grid](p["q"], p["scale"], p["zero"], target, n_bytes, enable_fp_fusion=False, **common)
    return out


def dequantize(qt: QuantizedTensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Dense weight in `dtype`: the Triton kernel on CUDA, the torch reference elsewhere."""
    if qt.device.type == "cuda" and triton is not None:
        return dequantize_triton(qt, dtype)
    return dequantize_torch(qt, dtype)
