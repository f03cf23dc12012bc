"""LoRA's update added into its base layer's output in one pass: out = base + xa @ b^T.

xa (M, r) is the input times A, b (N, r) is scale * B, base (M, N) the frozen layer's output. At
rank 16 the product is 2r FLOPs per output element, so the op is bound by reading `base` and
writing `out`. cuBLAS's addmm runs it as a GEMM with K = r and reaches about a third of the
memory bandwidth (measured on an H200: 151 us for a 4096 x 14336 bf16 output, where a plain copy
of it takes 58 us; the kernel 65 us). This kernel streams each (BLOCK_M, BLOCK_N) tile of `base`
once, computes the tile's rank-r product from the few rows of xa and b it needs, adds in fp32 and
rounds once (cuBLAS's addmm, measured on the H200, differs from that correctly rounded sum in
about 30% of the elements by a bf16 step, as if it rounded the product before adding).

`add_low_rank` is a torch.library custom op (torch.compile sees one opaque node; selective
checkpointing recomputes it like the addmm it replaces, mft.build.memory). Its backward is the
two small matmuls addmm's own backward runs. The rank is padded inside the kernel (masked loads)
to the 16 that tl.dot needs at least; ranks above MAX_RANK (whose tiles would not fit in shared
memory) take addmm.
"""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: mft.peft.lora uses torch.addmm instead
    triton = None

BLOCK_M, BLOCK_N = 64, 128
MAX_RANK = 128
KERNEL_DTYPES = (torch.bfloat16, torch.float16)  # fp32 would meet tl.dot's TF32 rounding: addmm instead


if triton is not None:

    @triton.jit
    def _add_low_rank_kernel(base_ptr, xa_ptr, b_ptr, out_ptr, M, N, R, stride_base, stride_xa, stride_b,
                             stride_out, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
        # 64-bit offsets: rows x stride passes 2^31 elements at 65,536 tokens of a 32,768-wide output.
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        ranks = tl.arange(0, BLOCK_R)
        xa = tl.load(xa_ptr + rows[:, None] * stride_xa + ranks[None, :],
                     mask=(rows[:, None] < M) & (ranks[None, :] < R), other=0.0)
        b = tl.load(b_ptr + cols[:, None] * stride_b + ranks[None, :],
                    mask=(cols[:, None] < N) & (ranks[None, :] < R), other=0.0)
        update = tl.dot(xa, tl.trans(b))  # fp32 accumulation
        inside = (rows[:, None] < M) & (cols[None, :] < N)
        base = tl.load(base_ptr + rows[:, None] * stride_base + cols[None, :], mask=inside, other=0.0)
        out = base.to(tl.float32) + update
        tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=inside)


def kernel_available(base: torch.Tensor, xa: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether `add_low_rank` can run the Triton kernel on these operands: one half type, rank at
    most MAX_RANK, on CUDA; or fp16 on the CPU under TRITON_INTERPRET=1, as the CPU tests run it
    (the interpreter cannot load bf16)."""
    if triton is None or not base.dtype == xa.dtype == b.dtype or xa.shape[-1] > MAX_RANK:
        return False
    if base.is_cuda:
        return base.dtype in KERNEL_DTYPES
    return _interpreted() and base.dtype == torch.float16


def _interpreted() -> bool:
    return triton is not None and type(_add_low_rank_kernel).__name__ == "InterpretedFunction"


@torch.library.custom_op("mft::add_low_rank", mutates_args=())
def add_low_rank(base: torch.Tensor, xa: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """base (M, N) + xa (M, r) @ b (N, r)^T, all three of one dtype, rounded once."""
    M, N = base.shape
    R = xa.shape[1]
    # The kernel steps along rows by stride and expects unit column strides (xa is often a column
    # slice of a shared A product: rows strided, columns dense).
    base, xa, b = (t if t.stride(1) == 1 else t.contiguous() for t in (base, xa, b))
    out = torch.empty(base.shape, dtype=base.dtype, device=base.device)  # dense, as the fake says
    grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N))
    _add_low_rank_kernel[grid](base, xa, b, out, M, N, R, base.stride(0), xa.stride(0), b.stride(0), out.stride(0),
                               BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_R=max(16, triton.next_power_of_2(R)))
    return out


@add_low_rank.register_fake
def _(base, xa, b):
    return base.new_empty(base.shape)


def _save_factors(ctx, inputs, output):
    _, xa, b = inputs
    ctx.save_for_backward(xa, b)


def _grads(ctx, grad):
    xa, b = ctx.saved_tensors
    _, need_xa, need_b = ctx.needs_input_grad
    return grad, grad @ b if need_xa else None, grad.t() @ xa if need_b else None


add_low_rank.register_autograd(_grads, setup_context=_save_factors)
