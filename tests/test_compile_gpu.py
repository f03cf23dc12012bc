"""Compiled blocks on the lent GPU: `PYTHONPATH=. python -m pytest -m gpu tests/test_compile_gpu.py`.

A 2-layer model of Mistral 7B's shapes in bf16 with LoRA, built through the pipeline with
compile on (inductor, fullgraph) and off: the loss and the LoRA gradients agree within bf16's
rounding, for attn_backend auto on a batch where every document fits in the window (torch's
varlen_attn, or batched SDPA) and on one where a document does not (mft's Triton kernel, as a
custom op), and for an NF4 QLoRA base (the dequantise kernels as custom ops); with the LoRA
factors cast per forward (evaluation) and through lora_step_copies (the training loop).
"""

import contextlib

import pytest
import torch

from mft.build import ModelSpec, Runtime, build_model
from mft.model import attention
from mft.model.args import ModelArgs
from mft.model.attention import PackedDocs
from mft.model.names import canonical_name
from mft.peft.lora import LoRASettings, lora_step_copies
from mft.quant.formats import QuantSpec

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
WINDOW = 1024
ARGS_7B = ModelArgs(dim=4096, n_layers=2, head_dim=128, hidden_dim=14336, n_heads=32, n_kv_heads=8,
                    vocab_size=32768, norm_eps=1e-5, rope_theta=1e6, sliding_window=WINDOW)
LORA = LoRASettings(r=16, alpha=32, dropout=0.0, target_modules=["wq", "wk", "wv", "wo", "w1", "w2", "w3"])
FITS = [1024, 1024, 1024, 1024]  # one length, each fits in the window: batched SDPA
LONGER = [3000, 1096]  # documents longer than the window: the Triton kernel


def model(compile: bool, quant=None):
    spec = ModelSpec(ARGS_7B, attn_backend="auto", quant=quant, lora=LORA, seed=0)
    built = build_model(spec, Runtime(device="cuda", dtype=torch.bfloat16, train=True, compile=compile))
    with torch.no_grad():  # lora_b starts at zero, which would leave lora_a without a gradient
        g = torch.Generator(device="cuda").manual_seed(5)
        for name, p in built.named_parameters():
            if name.endswith("lora_b"):
                p.copy_(torch.randn(p.shape, generator=g, device="cuda") * 0.01)
    return built


def batch(lengths, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    tokens = torch.randint(0, ARGS_7B.vocab_size, (sum(lengths),), generator=g, device="cuda")
    positions = torch.cat([torch.arange(n) for n in lengths]).cuda()
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    return tokens, positions, cu, max(lengths)


def loss_and_grads(m, inputs, copies=False):
    with lora_step_copies(m) if copies else contextlib.nullcontext():
        loss = m(*inputs).float().logsumexp(-1).mean()
        loss.backward()
    grads = {canonical_name(n): p.grad.float().clone() for n, p in m.named_parameters() if p.requires_grad}
    m.zero_grad(set_to_none=True)
    return loss.item(), grads


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp(min=1e-8)).item()


def assert_close(compiled, eager, inputs, copies=False):
    loss, grads = loss_and_grads(compiled, inputs, copies)
    ref_loss, ref_grads = loss_and_grads(eager, inputs, copies)
    assert abs(loss - ref_loss) / abs(ref_loss) < 5e-3, (loss, ref_loss)
    assert grads.keys() == ref_grads.keys() and grads
    errors = {n: rel_err(grads[n], ref_grads[n]) for n in grads}
    assert max(errors.values()) < 5e-2, errors


def test_auto_chooses_as_expected_on_the_test_batches():
    cuda = torch.device("cuda")
    fit, _ = attention._auto_choice(PackedDocs.from_cu_seqlens(batch(FITS)[2], 1024, sum(FITS)), WINDOW, cuda)
    longer, _ = attention._auto_choice(PackedDocs.from_cu_seqlens(batch(LONGER)[2], 3000, sum(LONGER)), WINDOW, cuda)
    assert fit.backend == "batched_sdpa" and longer.backend == "triton"


@pytest.mark.parametrize("copies", [False, True], ids=["cast_per_forward", "step_copies"])
def test_compiled_lora_model_equals_eager_for_both_auto_choices(copies):
    compiled, eager = model(True), model(False)
    for seed, lengths in enumerate((FITS, LONGER, FITS)):  # back to the first choice: no new failure
        assert_close(compiled, eager, batch(lengths, seed), copies)


def test_compiled_qlora_model_equals_eager():
    quant = QuantSpec("nf4", 64, double_quant=True)
    compiled, eager = model(True, quant), model(False, quant)
    assert_close(compiled, eager, batch(LONGER, 3))
