"""4-bit Mixtral experts (QLoRA bases): the quantised grouped product against dequantise-then-grouped_linear,
models built quantised from a tiny transformers Mixtral, mft's quantised checkpoint and mft-quantize on it,
and torch.compile of the op and of a whole quantised MoE feed-forward without a graph break."""

import pytest
import torch
from conftest import build
from safetensors import safe_open

from mft.build import checkpoint_spec
from mft.build.pipeline import build_model
from mft.checkpoint.load import read_model_args
from mft.checkpoint.quantized import read_quant_config, save_quantized
from mft.cli.quantize import main as mft_quantize
from mft.model.moe import GroupedLinear, grouped_linear
from mft.peft.lora import GroupedLoRALinear, LoRASettings, lora_modules
from mft.quant.dequant import dequantize_stack
from mft.quant.formats import QuantSpec, dequantize, quantize, quantize_stack
from mft.quant.grouped import QuantizedGroupedLinear, quantized_grouped_linear
from mft.quant.linear import QuantizedLinear, dense_weight, quantized_layers
from mft.quant.model import model_quant, quantize_model_

transformers = pytest.importorskip("transformers")

from test_mixtral import mft_logits, mixtral, tokens  # noqa: E402

SPECS = {"nf4": QuantSpec("nf4", 64), "nf4-dq": QuantSpec("nf4", 64, double_quant=True), "int4": QuantSpec("int4", 128)}
# The tiny Mixtral's dim is 64: int4 in groups of 64 so that every projection's in_features divides.
MODEL_SPECS = {"nf4-dq": SPECS["nf4-dq"], "int4": QuantSpec("int4", 64)}
OFFSETS = torch.tensor([3, 3, 11, 11, 19], dtype=torch.int32)  # 5 experts, two of them empty, uneven counts


def expert_weights(groups=5, out=24, cols=256, seed=0):
    """Stacked weights whose experts have different scales (so their constants differ)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(groups, out, cols, generator=g) * torch.linspace(0.01, 0.1, groups)[:, None, None]


def per_row_reference(x, dense, offsets):
    """Row n times the weight of its expert, one row at a time in fp64: independent of grouped_linear."""
    expert = torch.searchsorted(offsets.long(), torch.arange(x.shape[0]), right=True)
    return torch.einsum("ni,noi->no", x.double(), dense.double()[expert]).to(x.dtype)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny transformers Mixtral (4 experts, top 2) with dims that divide the block sizes."""
    path = tmp_path_factory.mktemp("mixtral64")
    mixtral(hidden_size=64, intermediate_size=128).save_pretrained(path)
    return path


@pytest.mark.parametrize("name", list(SPECS))
def test_quantised_grouped_product_equals_dequantise_then_grouped_linear(name):
    spec = SPECS[name]
    layer = QuantizedGroupedLinear.from_dense(expert_weights(), spec)
    dense = layer.dequantize(torch.float32)
    x = torch.randn(19, 256, generator=torch.Generator().manual_seed(1), requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y, y_ref = layer(x, OFFSETS), grouped_linear(x_ref, dense, OFFSETS)
    assert torch.equal(y, y_ref)
    torch.testing.assert_close(y, per_row_reference(x.detach(), dense, OFFSETS), rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-6, atol=1e-7)
    assert not any(p.requires_grad for p in layer.parameters()) and all(not b.requires_grad for b in layer.buffers())


@pytest.mark.parametrize("name", list(SPECS))
def test_each_expert_is_quantised_on_its_own(name):
    """Expert g's parts are exactly `quantize` of its dense weight: its own constants, nf4 double
    quantisation's per-tensor offset included; dequantising some experts gives their slices."""
    spec, w = SPECS[name], expert_weights()
    stack = quantize_stack(w, spec)
    assert {k: tuple(t.shape) for k, t in stack.parts.items()} == {k: s for k, (s, _) in spec.part_shapes(24, 256, 5).items()}
    for g in range(5):
        single = quantize(w[g], spec)
        assert all(torch.equal(stack.parts[k][g], single.parts[k]) for k in single.parts)
    if spec.double_quant:
        assert stack.parts["absmax_offset"].unique().numel() == 5
    dense = dequantize_stack(stack, torch.float32)
    assert torch.equal(dense[3], dequantize(quantize(w[3], spec), torch.float32))
    chosen = torch.tensor([4, 1, 4])
    assert torch.equal(dequantize_stack(stack, torch.float32, chosen), dense[chosen])


def test_bf16_grouped_product_runs_in_the_input_dtype():
    layer = QuantizedGroupedLinear.from_dense(expert_weights(), SPECS["nf4-dq"])
    x = torch.randn(19, 256, dtype=torch.bfloat16, requires_grad=True)
    y = quantized_grouped_linear(x, OFFSETS, layer.quantized_weights())
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, grouped_linear(x.detach(), layer.dequantize(torch.bfloat16), OFFSETS))
    y.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_compiles_without_graph_break_and_keeps_no_dense_weight(compiled):
    """fullgraph=True fails on any graph break; the partitioner finds nothing weight-sized to keep."""
    layer = QuantizedGroupedLinear.from_dense(expert_weights(out=256), SPECS["nf4-dq"])
    saved = []

    def pack(t):
        saved.append(t)
        return t

    x = torch.randn(19, 256, generator=torch.Generator().manual_seed(2), requires_grad=True)
    run = torch.compile(layer, backend="aot_eager_decomp_partition", fullgraph=True) if compiled else layer
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = run(x, OFFSETS)
    assert saved and all(not t.is_floating_point() or t.numel() < 256 * 256 for t in saved), \
        [(t.dtype, tuple(t.shape)) for t in saved]
    y.square().sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = grouped_linear(x_ref, layer.dequantize(torch.float32), OFFSETS)
    y_ref.square().sum().backward()
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)


def test_a_whole_quantised_moe_feed_forward_compiles_in_one_graph(folder):
    """The experts' loop runs inside the op, so routing, experts and combination make one graph."""
    model = build(read_model_args(folder), weights=folder, quant=SPECS["nf4"]).eval()
    ff = model.layers[0].feed_forward
    x = torch.randn(10, 64, generator=torch.Generator().manual_seed(3))
    compiled = torch.compile(ff, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), ff(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", list(MODEL_SPECS))
def test_quantised_mixtral_equals_the_dense_model_with_its_dequantised_weights(folder, name):
    spec = MODEL_SPECS[name]
    args = read_model_args(folder)
    model = build(args, weights=folder, quant=spec).eval()
    ff = model.layers[1].feed_forward
    assert isinstance(ff.gate, torch.nn.Linear)  # the router stays dense
    assert all(isinstance(getattr(ff, w), QuantizedGroupedLinear) for w in ("w1", "w2", "w3"))
    assert isinstance(model.layers[1].attention.wq, QuantizedLinear)
    assert model.state_dict()["layers.1.feed_forward.w1.weight_q"].shape == (4, 128, 32)
    assert model_quant(model)["modules"] == ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]

    dense = build(args, weights=folder).eval()
    toks = tokens()
    original = mft_logits(dense, toks)
    with torch.no_grad():
        for layer_name, layer in quantized_layers(model).items():
            dense.get_submodule(layer_name).weight.copy_(dense_weight(layer))
    expected = mft_logits(dense, toks)
    assert not torch.equal(expected, original)  # the quantisation changed the weights
    torch.testing.assert_close(mft_logits(model, toks), expected, rtol=1e-4, atol=1e-4)

    # Converting the materialised dense model quantises the same tensors to the same bytes.
    converted = build(args, weights=folder)
    assert sorted(quantize_model_(converted, spec)) == sorted(quantized_layers(model))
    assert isinstance(converted.layers[0].feed_forward.gate, torch.nn.Linear)
    state = model.state_dict()
    assert all(torch.equal(t, state[k]) for k, t in converted.state_dict().items())


def test_quantised_checkpoint_round_trip(folder, tmp_path):
    spec = MODEL_SPECS["nf4-dq"]
    args = read_model_args(folder)
    model = build(args, weights=folder, quant=spec).eval()
    out = save_quantized(model, tmp_path / "q")
    with safe_open(out / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert f.get_slice("layers.0.feed_forward.w2.weight_q").get_shape() == [4, 64, 64]
        assert f.get_slice("layers.0.feed_forward.w2.weight_absmax_offset").get_shape() == [4, 1]
    assert "layers.0.feed_forward.gate.weight" in keys and not any(".experts." in k for k in keys)

    again = build_model(checkpoint_spec(out))
    state = model.state_dict()
    assert again.state_dict().keys() == state.keys()
    assert all(torch.equal(t, state[k]) for k, t in again.state_dict().items())

    dequantised = build_model(checkpoint_spec(out, dense=True)).eval()
    assert isinstance(dequantised.layers[0].feed_forward.w1, GroupedLinear)
    assert torch.equal(dequantised.layers[0].feed_forward.w3.weight, dense_weight(model.layers[0].feed_forward.w3))
    toks = tokens()
    torch.testing.assert_close(mft_logits(dequantised, toks), mft_logits(model, toks), rtol=1e-4, atol=1e-4)


def test_mft_quantize_on_a_mixtral_folder(folder, tmp_path):
    out = tmp_path / "nf4"
    assert mft_quantize([str(folder), str(out), "--format", "nf4", "--device", "cpu", "--dtype", "fp32"]) == 0
    spec, modules, _ = read_quant_config(out)
    assert spec == SPECS["nf4-dq"] and modules == ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]
    loaded = build_model(checkpoint_spec(out))
    direct = build(read_model_args(folder), weights=folder, quant=spec)
    state = direct.state_dict()
    assert all(torch.equal(t, state[k]) for k, t in loaded.state_dict().items())


def test_random_quantised_moe_draws_each_expert(folder):
    model = build(read_model_args(folder), quant=MODEL_SPECS["int4"], std=0.02, seed=4)
    assert not any(p.ndim == 3 for p in model.parameters())  # no dense stacked weight anywhere
    w1 = dense_weight(model.layers[0].feed_forward.w1)
    assert w1.shape == (4, 128, 64) and not torch.equal(w1[0], w1[1])
    assert 0.017 < w1.std().item() < 0.023
    again = build(read_model_args(folder), quant=MODEL_SPECS["int4"], std=0.02, seed=4)
    assert torch.equal(dense_weight(again.layers[0].feed_forward.w1), w1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", list(SPECS))
def test_cuda_grouped_gemm_equals_the_cpu_loop(name):
    """bf16 on CUDA (torch's grouped GEMM on Hopper, Triton dequantisation) against the CPU loop
    over the torch reference's dequantised weights, forward and input gradient (also the expanded,
    stride-0 gradient of a sum, which the grouped GEMM refuses unless made dense)."""
    spec = SPECS[name]
    w = expert_weights(groups=8, out=512, cols=1024)
    cpu = QuantizedGroupedLinear.from_dense(w, spec)
    gpu = QuantizedGroupedLinear.from_dense(w.cuda(), spec)
    assert all(torch.equal(a, b.cpu()) for a, b in zip(cpu.buffers(), gpu.buffers()))
    assert torch.equal(gpu.dequantize(torch.bfloat16).cpu(), cpu.dequantize(torch.bfloat16))
    offsets = torch.tensor([40, 40, 100, 180, 180, 300, 301, 384], dtype=torch.int32)
    x = torch.randn(384, 1024, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    grad = torch.randn(384, 512, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    results = []
    for layer, device in ((cpu, "cpu"), (gpu, "cuda")):
        xi = x.to(device, copy=True).requires_grad_(True)
        y = layer(xi, offsets.to(device))
        y.backward(grad.to(device))
        xs = x.to(device, copy=True).requires_grad_(True)
        layer(xs, offsets.to(device)).sum().backward()
        results.append((y.float().cpu(), xi.grad.float().cpu(), xs.grad.float().cpu()))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def _perturb_lora_(model, seed=3):
    gen = torch.Generator().manual_seed(seed)
    for module in lora_modules(model).values():
        with torch.no_grad():
            module.lora_b.copy_(torch.randn(module.lora_b.shape, generator=gen) * 0.1)


@pytest.mark.parametrize("name", list(MODEL_SPECS))
def test_qlora_on_experts_equals_lora_on_the_dequantised_experts(folder, name):
    """QLoRA of the experts: LoRA over the 4-bit stacks (the buffers taken over under their names)
    gives the logits and LoRA gradients of the same adapters over a dense model holding the
    dequantised weights."""
    settings = LoRASettings(r=4, alpha=8, target_modules=["wq", "wv", "w1", "w2", "w3"])
    qlora = build(read_model_args(folder), weights=folder, quant=MODEL_SPECS[name], lora=settings)
    experts = qlora.layers[0].feed_forward.w1
    assert isinstance(experts, GroupedLoRALinear) and experts.quant_spec == MODEL_SPECS[name]
    assert "layers.0.feed_forward.w1.weight_q" in dict(qlora.named_buffers())
    dense = build(read_model_args(folder), weights=folder, lora=settings)
    with torch.no_grad():
        for module_name, module in quantized_layers(qlora).items():
            target = dense.get_submodule(module_name)
            target.weight.copy_(dense_weight(module))
    _perturb_lora_(qlora)
    _perturb_lora_(dense)
    toks = tokens()
    losses = []
    for model in (qlora, dense):
        logits = mft_logits(model, toks)
        positions, cu = torch.arange(len(toks)), torch.tensor([0, len(toks)], dtype=torch.int32)
        loss = model(toks, positions, cu, len(toks), targets=toks.roll(-1)) / len(toks)
        loss.backward()
        losses.append((logits, loss))
    torch.testing.assert_close(losses[0][0], losses[1][0], atol=1e-4, rtol=1e-4)
    q_grads, d_grads = lora_modules(qlora), lora_modules(dense)
    assert set(q_grads) == set(d_grads)
    for key in q_grads:
        torch.testing.assert_close(q_grads[key].lora_a.grad, d_grads[key].lora_a.grad, atol=1e-5, rtol=1e-3)
        torch.testing.assert_close(q_grads[key].lora_b.grad, d_grads[key].lora_b.grad, atol=1e-5, rtol=1e-3)


def test_merged_export_of_qlora_experts_gives_the_adapted_logits(folder, tmp_path):
    """mft-export's merge of a QLoRA Mixtral: each expert dequantised alone, its delta added, written
    one tensor at a time; the consolidated folder read back gives the adapted 4-bit model's logits."""
    from mft.checkpoint.export import export_consolidated

    settings = LoRASettings(r=4, alpha=8)
    qlora = build(read_model_args(folder), weights=folder, quant=MODEL_SPECS["nf4-dq"], lora=settings).eval()
    _perturb_lora_(qlora)
    out = export_consolidated(qlora, tmp_path / "merged", dtype=torch.float32)
    merged = build(read_model_args(out), weights=out).eval()
    toks = tokens()
    expected = mft_logits(qlora, toks)
    assert (expected - mft_logits(build(read_model_args(folder), weights=folder, quant=MODEL_SPECS["nf4-dq"]).eval(),
                                  toks)).abs().max() > 1e-2  # the adapter matters
    torch.testing.assert_close(mft_logits(merged, toks), expected, atol=1e-4, rtol=1e-4)
