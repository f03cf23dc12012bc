"""Triton dequantisation of NF4 and int4 weights, bit-identical to the torch reference.

The kernels take plain tensors (the packed parts, the NF4 levels); mft.quant.dequant wraps them
for QuantizedTensors and picks them on CUDA, the torch reference (mft.quant.formats.dequantize)
elsewhere. Both compute the same fp32 operations in the same order and round once into the
compute dtype, so they agree bit for bit:
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

from typing import Optional

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs without triton use the torch reference
    triton = None

BLOCK_BYTES = 2048
_OUT_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


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


def _output(shape: tuple[int, int], dtype: torch.dtype, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the dense output, the view the kernel writes: bf16 as int16 bit patterns)."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    if dtype not in _OUT_KINDS:
        raise ValueError(f"dequantize to {dtype} is not supported; use one of {list(_OUT_KINDS)}")
    if q.numel() * 2 >= 2**31:
        raise ValueError(f"a weight of {2 * q.numel()} elements is too large for the int32 indexing of the kernel")
    out = torch.empty(shape, dtype=dtype, device=q.device)
    return out, out.view(torch.int16) if dtype == torch.bfloat16 else out


def dequantize_nf4(q: torch.Tensor, absmax: torch.Tensor, levels: torch.Tensor, shape: tuple[int, int],
                   block_size: int, dtype: torch.dtype, *, absmax_scale: Optional[torch.Tensor] = None,
                   absmax_offset: Optional[torch.Tensor] = None, dq_block_size: int = 256,
                   block: int = BLOCK_BYTES) -> torch.Tensor:
    """levels[code] * absmax per `block_size` weights; with absmax_scale/absmax_offset (double
    quantisation) `absmax` holds int8 codes: absmax = code * scale (per dq_block_size) + offset."""
    out, target = _output(shape, dtype, q)
    n_bytes = q.numel()
    double_quant = absmax_scale is not None
    _nf4_kernel[(triton.cdiv(n_bytes, block),)](
        q, absmax, absmax_scale if double_quant else absmax, absmax_offset if double_quant else absmax,
        levels, target, n_bytes, BYTES_PER_BLOCK=block_size // 2, DQ_BLOCK=dq_block_size,
        DOUBLE_QUANT=double_quant, OUT_KIND=_OUT_KINDS[dtype], BLOCK=block, enable_fp_fusion=False,
    )
    return out


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, shape: tuple[int, int],
                    block_size: int, dtype: torch.dtype, *, block: int = BLOCK_BYTES) -> torch.Tensor:
    """(code - zero) * scale per group of `block_size` weights."""
    out, target = _output(shape, dtype, q)
    n_bytes = q.numel()
    _int4_kernel[(triton.cdiv(n_bytes, block),)](
        q, scale, zero, target, n_bytes, BYTES_PER_BLOCK=block_size // 2, OUT_KIND=_OUT_KINDS[dtype], BLOCK=block,
        enable_fp_fusion=False,
    )
    return out
