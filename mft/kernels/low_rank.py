"""LoRA's update added into its base layer's output in one pass: out = base + xa @ b^T.

xa (M, r) is the input times A, b (N, r) is scale * B, base (M, N) the frozen layer's output. At
rank 16 the product is 2r FLOPs per output element, so the op is bound by reading `base` and
writing `out`. cuBLAS's addmm runs it as a GEMM with K = r and reaches about a third of the
memory bandwidth (measured on an H200: 151 us for a 4096 x 14336 bf16 output, where a plain copy
of it takes 58 us). This kernel streams each (BLOCK_M, BLOCK_N) tile of `base` once, computes the
tile's rank-r product from the few rows of xa and b it needs, adds in fp32 and rounds once, as
addmm does.

`add_low_rank` is a torch.library custom op (torch.compile sees one opaque node; selective
checkpointing recomputes it like the addmm it replaces, mft.build.memory). Its backward is the
two small matmuls addmm's own backward runs. The rank is padded inside the kernel (masked loads)
to the 16 that tl.dot needs at least.
"""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: mft.peft.lora uses torch.addmm instead
    triton = None

BLOCK_M, BLOCK_N = 64, 128
KERNEL_DTYPES = (torch.bfloat16, torch.float16)  # fp32 would meet tl.dot's TF32 rounding: addmm instead


if triton is not None:

    @triton.jit
    def _add_low_rank_kernel(base_ptr, xa_ptr, b_ptr, out_ptr, M, N, R, stride_base, stride_xa, stride_b,
                             stride_out, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
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


def kernel_available(base: torch.Tensor) -> bool:
    """Whether `add_low_rank` runs the Triton kernel for this output: half types on CUDA (or any
    device under TRITON_INTERPRET=1, as the CPU tests run it)."""
    return triton is not None and base.dtype in KERNEL_DTYPES and (base.is_cuda or _interpreted())


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
    out = torch.empty_like(base)
    grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N))
    _add_low_rank_kernel[grid](base, xa, b, out, M, N, R, base.stride(0), xa.stride(0), b.stride(0), out.stride(0),
                               BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_R=max(16, triton.next_power_of_2(R)))
    return out


@add_low_rank.register_fake
def _(base, xa, b):
    return torch.empty_like(base, memory_format=torch.contiguous_format)


def _save_factors(ctx, inputs, output):
    _, xa, b = inputs
    ctx.save_for_backward(xa, b)


def _grads(ctx, grad):
    xa, b = ctx.saved_tensors
    _, need_xa, need_b = ctx.needs_input_grad
    return grad, grad @ b if need_xa else None, grad.t() @ xa if need_b else None


add_low_rank.register_autograd(_grads, setup_context=_save_factors)
