"""NF4 / int4 against independent references, error bounds, the Triton kernel, the quantised linear layer.

Imports only torch, numpy, triton (in a subprocess) and mft.quant / mft.peft, no Hydra.
"""

import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import run_in_triton_interpreter
from mft.peft.lora import LoRALinear, LoRASettings
from mft.quant.formats import (
    NF4_LEVELS,
    QuantizedTensor,
    QuantSpec,
    dequantize,
    dequantize_absmax,
    quantize,
    quantize_absmax,
    unpack_nibbles,
)
import mft.quant.linear as linear_module
from mft.quant.dequant import dequantize_torch
from mft.quant.linear import QuantizedLinear, quantized_linear
from mft.utils.errors import MftError

# The NF4 data type as printed in the QLoRA paper (Dettmers et al. 2023, appendix E), typed here
# independently of mft.quant.formats.
PAPER_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]
NF4 = QuantSpec("nf4", 64)
NF4_DQ = QuantSpec("nf4", 64, double_quant=True)
INT4 = QuantSpec("int4", 128)


def weights(shape=(48, 256), seed=0, std=0.02):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * std


def reference_nf4(w: np.ndarray, block: int = 64):
    """QLoRA's NF4, straight from the paper: per block of `block` consecutive weights, c = max|w|;
    each w / c becomes the index of the nearest NF4 level (first index on ties). Two 4-bit indices
    per byte, the earlier weight in the high nibble. An all-zero block has c = 0 and codes of 0.0."""
    levels = np.array(PAPER_NF4, dtype=np.float32)
    blocks = w.astype(np.float32).reshape(-1, block)
    absmax = np.abs(blocks).max(axis=1)
    normed = blocks / np.where(absmax == 0, np.float32(1.0), absmax)[:, None]
    codes = np.abs(normed[:, :, None] - levels[None, None, :]).argmin(axis=2).reshape(-1).astype(np.uint8)
    packed = (codes[0::2] << 4) | codes[1::2]
    return packed, absmax


def test_nf4_levels_are_the_published_ones_and_follow_the_construction():
    assert list(NF4_LEVELS) == PAPER_NF4
    # The construction: N(0,1) quantiles at evenly spaced probabilities from 1 - delta to 1/2,
    # delta = (1/30 + 1/32) / 2, 8 for the positive side (+ zero) and 7 mirrored for the negative.
    top = 1 - (1 / 30 + 1 / 32) / 2
    positive = torch.special.ndtri(torch.linspace(top, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -torch.special.ndtri(torch.linspace(top, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).sort().values
    levels = levels / levels.abs().max()
    torch.testing.assert_close(levels.float(), torch.tensor(PAPER_NF4), atol=3e-7, rtol=0)


@pytest.mark.parametrize("shape,seed", [((48, 256), 0), ((7, 128), 1), ((96, 64), 2)])
def test_nf4_codes_and_absmax_equal_the_reference(shape, seed):
    w = weights(shape, seed)
    w[1, :64] = 0.0  # an all-zero block
    levels = torch.tensor(PAPER_NF4)
    # Adversarial values: every level and every fp32 midpoint (+/- 1 ulp) in a block with absmax 1.
    mids = (levels[1:] + levels[:-1]) / 2
    tricky = torch.cat([levels, mids, torch.nextafter(mids, torch.tensor(2.0)), torch.nextafter(mids, torch.tensor(-2.0))])
    w[2, : tricky.numel()] = tricky[: min(tricky.numel(), shape[1])] * 0.37
    w[2, 0] = 0.37  # the block's absmax
    qt = quantize(w, NF4)
    packed, absmax = reference_nf4(w.numpy())
    assert np.array_equal(qt.parts["q"].flatten().numpy(), packed)
    assert np.array_equal(qt.parts["absmax"].flatten().numpy(), absmax)
    assert qt.parts["q"].shape == (shape[0], shape[1] // 2) and qt.parts["absmax"].shape == (shape[0], shape[1] // 64)


def test_nf4_dequantisation_error_is_bounded_by_half_the_largest_level_gap():
    w = weights((64, 512), seed=3)
    qt = quantize(w, NF4)
    half_gap = max(b - a for a, b in zip(PAPER_NF4[:-1], PAPER_NF4[1:])) / 2
    absmax = qt.parts["absmax"].reshape(-1, 1)
    error = (dequantize(qt, torch.float32) - w).abs().reshape(-1, 64)
    assert (error <= absmax * half_gap * (1 + 1e-6)).all()
    # Relative RMS error for Gaussian weights (docs/benchmarks.md quotes it): ~ 0.1.
    rel_rms = ((dequantize(qt, torch.float32) - w).pow(2).mean() / w.pow(2).mean()).sqrt()
    assert rel_rms < 0.11, rel_rms


def test_double_quantisation_of_the_absmax():
    w = weights((64, 1024), seed=4)
    plain, dq = quantize(w, NF4), quantize(w, NF4_DQ)
    assert torch.equal(plain.parts["q"], dq.parts["q"])  # codes come from the exact absmax
    absmax = plain.parts["absmax"]
    offset = dq.parts["absmax_offset"]
    torch.testing.assert_close(offset, absmax.double().mean().float().reshape(1), rtol=1e-6, atol=0)
    centred = (absmax.flatten() - offset).reshape(-1, 256)
    scale = centred.abs().amax(dim=1) / 127
    torch.testing.assert_close(dq.parts["absmax_scale"], scale, rtol=1e-6, atol=0)
    decoded = dequantize_absmax(dq.parts["absmax_q"], dq.parts["absmax_scale"], offset, 256)
    assert ((decoded - absmax).abs().reshape(-1, 256) <= scale[:, None] * (0.5 + 1e-5)).all()
    # 8 bits + 32 per 256: 0.127 instead of 0.5 bits per weight, for a worst relative error < 1%.
    assert ((decoded - absmax).abs() / absmax).max() < 0.01
    half_gap = max(b - a for a, b in zip(PAPER_NF4[:-1], PAPER_NF4[1:])) / 2
    error = (dequantize(dq, torch.float32) - w).abs().reshape(-1, 64)
    bound = decoded.reshape(-1, 1) * half_gap + (decoded - absmax).abs().reshape(-1, 1)
    assert (error <= bound * (1 + 1e-5) + 1e-9).all()


def test_absmax_blocks_are_padded_when_they_do_not_divide():
    absmax = torch.rand(3, 100) + 0.5
    codes, scale, offset = quantize_absmax(absmax, 256)
    assert codes.shape == absmax.shape and codes.dtype == torch.int8 and scale.shape == (2,)
    assert (dequantize_absmax(codes, scale, offset, 256) - absmax).abs().max() <= scale.max() / 2 + 1e-6


def test_int4_is_asymmetric_per_group_of_128_and_bounded():
    w = weights((32, 512), seed=5) + 0.01  # off-centre, so the zero point matters
    w[3, :128] = 0.25  # a constant group is exact
    qt = quantize(w, INT4)
    assert qt.parts["scale"].dtype == torch.bfloat16 and qt.parts["zero"].shape == (32, 4)
    groups = w.reshape(-1, 128)
    lo, hi = groups.amin(dim=1), groups.amax(dim=1)
    scale = qt.parts["scale"].float().reshape(-1)
    zero = qt.parts["zero"].float().reshape(-1)
    ordinary = hi > lo
    torch.testing.assert_close(scale[ordinary], ((hi - lo) / 15)[ordinary], rtol=2**-8, atol=0)
    torch.testing.assert_close(zero[ordinary], (-lo / scale)[ordinary], rtol=2**-8, atol=0)
    codes = unpack_nibbles(qt.parts["q"]).reshape(-1, 128).float()
    # Codes are the rounded affine map of the stored constants; values come back as (q - zero) * scale.
    expected = torch.round(groups / scale[:, None] + zero[:, None]).clamp(0, 15)
    assert torch.equal(codes, expected)
    deq = dequantize(qt, torch.float32).reshape(-1, 128)
    assert torch.equal(deq, (codes - zero[:, None]) * scale[:, None])
    assert torch.equal(deq.reshape(32, 512)[3, :128], w[3, :128])
    # Rounding error half a step, plus the bf16 rounding of the zero point (< 1/16 step).
    assert ((deq - groups).abs() <= scale[:, None] * (0.5 + 1 / 16) * (1 + 1e-6)).all()
    rel_rms = ((deq - groups).pow(2).mean() / groups.pow(2).mean()).sqrt()
    assert rel_rms < 0.12, rel_rms


def test_specs_refuse_shapes_and_options_that_do_not_fit():
    with pytest.raises(MftError, match="divisible by block_size 128"):
        quantize(weights((4, 192)), INT4)
    with pytest.raises(MftError, match="nf4 only"):
        QuantSpec("int4", 128, double_quant=True)
    with pytest.raises(MftError, match="quant.format='fp3'"):
        QuantSpec("fp3", 64)


_KERNEL_SCRIPT = textwrap.dedent(
    """
    import torch
    from mft.quant.dequant import dequantize_triton
    from mft.quant.formats import QuantSpec, dequantize, quantize
    specs = [QuantSpec("nf4", 64), QuantSpec("nf4", 64, double_quant=True), QuantSpec("int4", 128)]
    for shape in [(6, 384), (40, 128)]:  # 1152 and 2560 bytes: a partial last program at block=256
        w = torch.randn(shape, generator=torch.Generator().manual_seed(shape[0])) * 0.05
        w[0, :128] = 0
        for spec in specs:
            qt = quantize(w, spec)
            for dtype in (torch.bfloat16, torch.float16, torch.float32):
                got, want = dequantize_triton(qt, dtype, block=256), dequantize(qt, dtype)
                assert got.dtype == dtype and torch.equal(got, want), (shape, spec, dtype)
    print("kernels bit-identical")
    """
)


def test_triton_kernels_equal_the_torch_reference_in_the_interpreter():
    pytest.importorskip("triton")
    result = run_in_triton_interpreter(_KERNEL_SCRIPT)
    assert result.returncode == 0 and "bit-identical" in result.stdout, result.stderr[-3000:]


@pytest.mark.parametrize("spec", [NF4, NF4_DQ, INT4], ids=["nf4", "nf4-dq", "int4"])
def test_quantised_linear_forward_and_backward(spec):
    layer = QuantizedLinear.from_dense(weights((96, 256), seed=6), spec)
    dense = layer.dequantize(torch.float32)
    x = torch.randn(5, 3, 256, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y = layer(x)
    assert torch.equal(y, F.linear(x_ref, dense))
    grad = torch.randn_like(y)
    y.backward(grad)
    F.linear(x_ref, dense).backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-6, atol=1e-7)
    assert not any(p.requires_grad for p in layer.parameters()) and all(not b.requires_grad for b in layer.buffers())


@torch.library.custom_op("mft_test::opaque_dequantize", mutates_args=())
def opaque_dequantize(parts: list[torch.Tensor], rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """NF4_DQ's torch dequantisation behind a custom op, as opaque to the compiler as the Triton one on CUDA."""
    return dequantize_torch(QuantizedTensor(NF4_DQ, (rows, cols), dict(zip(NF4_DQ.part_shapes(rows, cols), parts))), dtype)


@opaque_dequantize.register_fake
def _(parts, rows, cols, dtype):
    return parts[0].new_empty((rows, cols), dtype=dtype)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_the_dense_weight_is_not_kept_for_backward(compiled, monkeypatch):
    """Nor by a compiled graph, with dequantisation an opaque op as on CUDA: the min-cut partitioner
    kept a separate dequantise op's output (a 7B QLoRA step peaked at 28.7 GiB instead of ~6 on an
    H200); the fused dequantise-matmul op leaves it nothing weight-sized to keep."""
    monkeypatch.setattr(linear_module, "dequantize", lambda qt, dtype: opaque_dequantize(
        [qt.parts[n] for n in NF4_DQ.part_shapes(*qt.shape)], *qt.shape, dtype))
    layer = QuantizedLinear.from_dense(weights((512, 512), seed=7), NF4_DQ)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    x = torch.randn(4, 512, requires_grad=True)
    run = torch.compile(layer, backend="aot_eager_decomp_partition", fullgraph=True) if compiled else layer
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = run(x)
    assert saved, "the packed storage is saved"
    assert all(not t.is_floating_point() or t.numel() < 512 * 512 // 8 for t in saved), [(t.dtype, t.shape) for t in saved]
    y.sum().backward()  # recomputes the weight
    assert x.grad is not None


@pytest.mark.parametrize("spec", [NF4_DQ, INT4], ids=["nf4-dq", "int4"])
def test_lora_on_a_quantised_base_equals_lora_on_its_dequantised_weight(spec):
    settings = LoRASettings(r=4, alpha=8)
    base = QuantizedLinear.from_dense(weights((64, 128), seed=8), spec)
    torch.manual_seed(0)
    qlora = LoRALinear(base, settings)
    torch.manual_seed(0)
    lora = LoRALinear(torch.nn.Parameter(base.dequantize(torch.float32)), settings)
    with torch.no_grad():
        for m in (qlora, lora):
            m.lora_b.copy_(torch.randn(64, 4, generator=torch.Generator().manual_seed(9)))
    x = torch.randn(6, 128, generator=torch.Generator().manual_seed(10))
    xq, xd = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    yq, yd = qlora(xq), lora(xd)
    assert torch.equal(yq, yd)
    yq.square().sum().backward()
    yd.square().sum().backward()
    for a, b in [(qlora.lora_a.grad, lora.lora_a.grad), (qlora.lora_b.grad, lora.lora_b.grad), (xq.grad, xd.grad)]:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert sorted(n for n, _ in qlora.named_parameters()) == ["lora_a", "lora_b"]
    assert {n for n, _ in qlora.named_buffers()} == {"weight_" + p for p in base.quantized_weight().parts}
    assert "weight" not in dict(qlora.named_parameters())
    with pytest.raises(MftError, match="mft-export hf"):
        qlora.merge()


def test_casting_quantised_storage_is_a_clear_error():
    layer = QuantizedLinear.from_dense(weights((16, 128)), NF4).to(torch.bfloat16)  # absmax -> bf16
    with pytest.raises(MftError, match=r"\.to\(device\) only"):
        layer(torch.randn(2, 128, dtype=torch.bfloat16))


def test_quantised_matmul_runs_in_the_input_dtype():
    layer = QuantizedLinear.from_dense(weights((32, 128)), INT4)
    x = torch.randn(3, 128, dtype=torch.bfloat16, requires_grad=True)
    y = quantized_linear(x, layer.quantized_weight())
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16
