"""mft.kernels.low_rank: LoRA's update added into the base output, against an fp32 torch reference
and against torch.addmm's autograd (the op it replaces on CUDA)."""

import textwrap

import pytest
import torch

from conftest import run_in_triton_interpreter

# Triton's interpreter mishandles bf16 loads on CPU, so the interpreted check runs fp16; bf16 is the
# GPU test's.
_INTERPRETED_SCRIPT = textwrap.dedent(
    """
    import torch
    from mft.kernels import low_rank
    half, bf16 = torch.empty(4, 8, dtype=torch.float16), torch.empty(4, 8, dtype=torch.bfloat16)
    assert low_rank.kernel_available(half, half, half)
    assert not low_rank.kernel_available(bf16, bf16, bf16)  # the interpreter cannot load bf16
    assert not low_rank.kernel_available(half, half.new_empty(4, 129), half.new_empty(8, 129))  # rank > MAX_RANK
    gen = torch.Generator().manual_seed(0)
    # Partial tiles in both dimensions, ranks under, at and over tl.dot's 16, and xa a column slice
    # of a wider product (strided rows), as LoRALinear.project_together passes it.
    for M, N, R in [(37, 70, 8), (64, 128, 16), (130, 200, 24)]:
        base = torch.randn(M, N, generator=gen).half()
        xa = torch.randn(M, 3 * R, generator=gen).half()[:, R:2 * R]
        b = torch.randn(N, R, generator=gen).half()
        want = (base.float() + xa.float() @ b.float().t()).half()
        got = low_rank.add_low_rank(base, xa, b)
        torch.testing.assert_close(got, want, rtol=0, atol=2e-3 * want.abs().max().item())

        leaves = [t.float().requires_grad_() for t in (base, xa, b)]
        mine = [t.detach().clone().requires_grad_() for t in (base, xa, b)]
        grad = torch.randn(M, N, generator=gen).half()
        torch.addmm(leaves[0], leaves[1], leaves[2].t()).backward(grad.float())
        low_rank.add_low_rank(*mine).backward(grad)
        for got_t, want_t in zip(mine, leaves):
            torch.testing.assert_close(got_t.grad.float(), want_t.grad, rtol=2e-3, atol=2e-2)
    print("low-rank kernel ok")
    """
)


def test_kernel_equals_the_fp32_reference_in_the_interpreter():
    pytest.importorskip("triton")
    result = run_in_triton_interpreter(_INTERPRETED_SCRIPT)
    assert result.returncode == 0 and "low-rank kernel ok" in result.stdout, result.stderr[-3000:]


def test_cpu_and_fp32_take_addmm():
    from mft.kernels import low_rank

    bf16 = torch.empty(2, 2, dtype=torch.bfloat16)
    assert not low_rank.kernel_available(bf16, bf16, bf16)
    if torch.cuda.is_available():
        fp32, half = torch.empty(2, 2, device="cuda"), torch.empty(2, 2, device="cuda", dtype=torch.bfloat16)
        assert not low_rank.kernel_available(fp32, fp32, fp32)
        assert not low_rank.kernel_available(half, fp32, half)  # mixed dtypes


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4096, 14336, 16), (4096, 1024, 8), (1000, 4100, 32)])
def test_kernel_on_cuda_equals_addmm(shape):
    from mft.kernels import low_rank

    M, N, R = shape
    gen = torch.Generator(device="cuda").manual_seed(0)
    base, xa, b = (torch.randn(s, device="cuda", generator=gen, dtype=torch.bfloat16) for s in ((M, N), (M, R), (N, R)))
    want = torch.addmm(base, xa, b.t())
    got = low_rank.add_low_rank(base, xa, b)
    # The kernel sums in fp32 and rounds once: within half a bf16 step (2^-8 relative) of an fp32
    # reference, up to the fp32 sums' own order. cuBLAS's addmm is not: measured on an H200, it
    # differs from the kernel in 30% of the elements (by a bf16 step of the operands, 0.0156 at
    # most here), as if it rounded the product before adding the base.
    reference = base.float() + xa.float() @ b.float().t()
    assert ((got.float() - reference).abs() <= reference.abs() * 2**-8 + 1e-5).all()
    torch.testing.assert_close(got, want, rtol=1e-2, atol=3e-2)

    compiled = torch.compile(lambda t, u, v: low_rank.add_low_rank(t, u, v) * 2, fullgraph=True)
    assert torch.equal(compiled(base, xa, b), got * 2)

    grad = torch.randn(M, N, device="cuda", generator=gen, dtype=torch.bfloat16)
    leaves = [t.clone().requires_grad_() for t in (base, xa, b)]
    mine = [t.clone().requires_grad_() for t in (base, xa, b)]
    torch.addmm(leaves[0], leaves[1], leaves[2].t()).backward(grad)
    low_rank.add_low_rank(*mine).backward(grad)
    for got_t, want_t in zip(mine, leaves):  # the same products; cuBLAS may order them differently
        torch.testing.assert_close(got_t.grad, want_t.grad)
