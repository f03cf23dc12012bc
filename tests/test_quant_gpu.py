"""QLoRA on the lent GPU: `PYTHONPATH=. python -m pytest -m gpu tests/test_quant_gpu.py`.

The Triton dequantisation equals the torch reference bit for bit at the 7B layer sizes; the
quantised linear layer on CUDA; quantising on the GPU gives the checkpoint the CPU gives; and
loading 7B-sized layers peaks at "quantised model + one bf16 tensor". Imports torch, triton,
safetensors and mft only (no Hydra, no mistral-common).
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import build

from mft.checkpoint.consolidated import save_consolidated
from mft.checkpoint.load import load_weights
from mft.checkpoint.quantized import save_quantized
from mft.model.args import ModelArgs
from mft.quant.dequant import dequantize_triton
from mft.quant.formats import QuantSpec, dequantize, quantize
from mft.quant.linear import QuantizedLinear

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
SPECS = {"nf4": QuantSpec("nf4", 64), "nf4-dq": QuantSpec("nf4", 64, double_quant=True), "int4": QuantSpec("int4", 128)}
# wq/wo, wk/wv, w1/w3, w2 of Mistral 7B, and its output head.
SHAPES_7B = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336), (32768, 4096)]
MIB = 2**20


def weight(shape, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(shape, device="cuda", generator=g, dtype=torch.float32) * 0.02
    w[0, :256] *= 40  # outliers: blocks with a large absmax next to ordinary ones
    w[1, :128] = 0  # all-zero blocks
    return w.to(torch.bfloat16)


@pytest.mark.parametrize("shape", SHAPES_7B, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", list(SPECS))
def test_triton_dequantisation_equals_the_torch_reference_bit_for_bit(name, shape):
    qt = quantize(weight(shape), SPECS[name])
    dtypes = (torch.bfloat16, torch.float16, torch.float32) if shape == (14336, 4096) else (torch.bfloat16,)
    for dtype in dtypes:
        got, want = dequantize_triton(qt, dtype), dequantize(qt, dtype)
        assert got.dtype == want.dtype == dtype
        mismatches = int((got.view(torch.uint8) != want.view(torch.uint8)).sum())
        assert mismatches == 0, f"{name} {shape} {dtype}: {mismatches} bytes differ"


@pytest.mark.parametrize("name", list(SPECS))
def test_quantising_on_the_gpu_equals_quantising_on_the_cpu(name):
    w = weight((4096, 4096), seed=1)
    on_gpu, on_cpu = quantize(w, SPECS[name]), quantize(w.cpu(), SPECS[name])
    for part, tensor in on_gpu.parts.items():
        assert torch.equal(tensor.cpu(), on_cpu.parts[part]), part


@pytest.mark.parametrize("name", list(SPECS))
def test_quantised_linear_on_cuda(name):
    layer = QuantizedLinear.from_dense(weight((14336, 4096), seed=2), SPECS[name])
    dense = layer.dequantize(torch.bfloat16)
    x = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y, y_ref = layer(x), F.linear(x_ref, dense)
    torch.testing.assert_close(y, y_ref, rtol=1e-2, atol=1e-2)  # same bf16 weight; cuBLAS picks the algorithm
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-2, atol=1e-2)


def test_loading_7b_sized_layers_peaks_at_the_quantised_model_plus_one_bf16_tensor(tmp_path):
    args = ModelArgs(n_layers=2, vocab_size=32768, rope_theta=1e6, sliding_window=None)  # 7B layers, 2 of them
    torch.manual_seed(0)
    dense = build(args, device="cpu", dtype=torch.bfloat16)
    folder = save_consolidated(dense, tmp_path / "dense")
    del dense
    largest = args.hidden_dim * args.dim * 2  # one bf16 w1 / w2 / w3
    spec = SPECS["nf4-dq"]

    torch.cuda.empty_cache()
    model = build(args, quant=spec, device="cuda", dtype=torch.bfloat16)
    torch.cuda.reset_peak_memory_stats()
    load_weights(model, folder)
    resident, peak = torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()
    print(f"\nstreaming load: resident {resident / MIB:.0f} MiB, peak {peak / MIB:.0f} MiB, "
          f"one bf16 tensor {largest / MIB:.0f} MiB")
    assert peak <= resident + largest + 192 * MIB

    quantised = save_quantized(model, tmp_path / "q")
    del model
    torch.cuda.empty_cache()
    again = build(args, quant=spec, device="cuda", dtype=torch.bfloat16)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    load_weights(again, quantised)  # packed tensors copied as they are: no dense tensor on the GPU
    print(f"quantised checkpoint load: resident {base / MIB:.0f} MiB, peak {torch.cuda.max_memory_allocated() / MIB:.0f} MiB")
    assert torch.cuda.max_memory_allocated() <= base + 16 * MIB
