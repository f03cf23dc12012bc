"""LoRA on Mixtral's experts and router: GroupedLoRALinear against per-expert references (forward,
gradients, merging), adapters on disk, and the exports against their consumers (transformers'
MixtralForCausalLM for merged folders, peft's target_parameters for the PEFT adapter,
mistral-inference's merge rule for lora.safetensors). Tiny checkpoints from tests/test_mixtral.py."""

import dataclasses
import json
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from test_mixtral import SEQ, TINY_MOE, hf_logits, mft_logits, mixtral, tokens

from conftest import build
from mft.checkpoint.adapter import load_adapter, save_adapter
from mft.checkpoint.consolidated import file_shapes
from mft.checkpoint.export import export_consolidated, export_hf, export_peft, mistral_lora_tensors
from mft.checkpoint.load import read_model_args
from mft.cli.export import main as mft_export
from mft.kernels.grouped import uses_grouped_gemm
from mft.model.moe import GroupedLinear, grouped_linear, project_grouped
from mft.peft.lora import (
    GroupedLoRALinear,
    LoRALinear,
    LoRASettings,
    apply_lora,
    init_lora_,
    init_lora_factors_,
    lora_modules,
    lora_state_dict,
    lora_step_copies,
    merge_and_unload,
    merge_lora,
    unmerge_lora,
)
from mft.utils.errors import MftError

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

EXPERTS, DIM, HIDDEN = TINY_MOE.moe.num_experts, TINY_MOE.dim, TINY_MOE.hidden_dim
ALL_TARGETS = ["wq", "wk", "wv", "wo", "w1", "w2", "w3", "gate"]


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    """A tiny Mixtral transformers saved itself (the hub's per-expert names)."""
    folder = tmp_path_factory.mktemp("mixtral_base")
    mixtral().save_pretrained(folder)
    return folder


def adapted(folder, targets, seed=1, r=4, alpha=8.0):
    """mft's model on `folder` with LoRA on `targets`, B drawn at random (so the update is not zero)."""
    model = build(read_model_args(folder), weights=folder)
    settings = LoRASettings(r=r, alpha=alpha, target_modules=list(targets))
    apply_lora(model, settings)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_b.copy_(torch.randn(m.lora_b.shape, generator=gen) * 0.3)
    return model.eval(), settings


def base_record(folder, model):
    return {"name": "tiny-mixtral", "checkpoint": str(folder), "tokenizer": "v3", "args": asdict(model.args)}


def random_layer(settings, groups=5, in_features=12, out_features=20, seed=0):
    gen = torch.Generator().manual_seed(seed)
    base = GroupedLinear(groups, in_features, out_features)
    with torch.no_grad():
        base.weight.copy_(torch.randn(base.weight.shape, generator=gen))
    layer = GroupedLoRALinear(base, settings)
    with torch.no_grad():
        layer.lora_b.copy_(torch.randn(layer.lora_b.shape, generator=gen))
    return layer


OFFSETS = torch.tensor([3, 3, 11, 12, 19], dtype=torch.int32)  # an empty group and uneven ones


def per_group_reference(x, weight, a, b, scale, offsets):
    """Group g's rows times W_g^T + scale (x A_g^T) B_g^T, from plain tensors, one group at a time."""
    rows, start = [], 0
    for g, end in enumerate(offsets.tolist()):
        xs = x[start:end]
        rows.append(xs @ weight[g].t() + scale * (xs @ a[g].t()) @ b[g].t())
        start = end
    return torch.cat(rows)


@pytest.mark.parametrize("r", [3, 4])
def test_grouped_lora_forward_equals_a_per_group_reference(r):
    settings = LoRASettings(r=r, alpha=6.0)
    layer = random_layer(settings)
    x = torch.randn(19, 12, generator=torch.Generator().manual_seed(1))
    expected = per_group_reference(x, layer.weight, layer.lora_a, layer.lora_b, settings.scale, OFFSETS)
    torch.testing.assert_close(layer(x, OFFSETS), expected, atol=1e-5, rtol=1e-5)
    # torch's grouped GEMM (on CPU too) and the loop give the same update; the GEMM needs rows of
    # 16-byte multiples, so rank 3 in fp32 runs only the loop.
    for grouped in (True, False) if r % 4 == 0 else (False,):
        a, b = layer.lora_factors(x.dtype)
        update = grouped_linear(grouped_linear(x, a, OFFSETS, grouped=grouped), b, OFFSETS, grouped=grouped)
        torch.testing.assert_close(grouped_linear(x, layer.weight, OFFSETS) + update, expected, atol=1e-5, rtol=1e-5)


def test_w1_and_w3_share_one_grouped_product_for_their_a_factors():
    """project_grouped (w1 and w3 read the same rows): the same outputs and LoRA gradients as each
    layer on its own, with ranks that differ."""
    layers = [random_layer(LoRASettings(r=r, alpha=8.0), seed=seed) for r, seed in ((4, 0), (2, 1))]
    x = torch.randn(19, 12, generator=torch.Generator().manual_seed(1))
    grads = []
    for outputs in (lambda: project_grouped(x, OFFSETS, *layers), lambda: [layer(x, OFFSETS) for layer in layers]):
        for layer in layers:
            layer.zero_grad()
        outs = outputs()
        sum((o * torch.randn(o.shape, generator=torch.Generator().manual_seed(i))).sum() for i, o in enumerate(outs)).backward()
        grads.append([t.detach().clone() for layer in layers for t in (layer.lora_a.grad, layer.lora_b.grad)] + outs)
    for together, alone in zip(*grads):
        torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_grouped_lora_draws_each_group_as_lora_linear_does():
    settings = LoRASettings(r=3, alpha=6.0)
    layer = random_layer(settings)
    layer.reset_lora_parameters(torch.Generator().manual_seed(7))
    gen = torch.Generator().manual_seed(7)
    for g in range(layer.groups):
        a, b = torch.empty(3, 12), torch.empty(20, 3)
        init_lora_factors_(a, b, gen)
        assert torch.equal(layer.lora_a[g], a) and torch.equal(layer.lora_b[g], b)
    assert layer.lora_a.dtype == torch.float32 and not layer.weight.requires_grad


def test_grouped_lora_merge_unmerge_and_unload():
    layer = random_layer(LoRASettings(r=3, alpha=6.0))
    x = torch.randn(19, 12, generator=torch.Generator().manual_seed(1))
    before, weight = layer(x, OFFSETS), layer.weight.clone()
    assert layer.delta_weight().shape == (5, 20, 12)
    torch.testing.assert_close(layer.delta_weight()[2], layer.delta_weight(2))
    layer.merge()
    torch.testing.assert_close(layer(x, OFFSETS), before, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.weight, weight + layer.delta_weight())
    layer.unmerge()
    torch.testing.assert_close(layer.weight, weight, atol=1e-6, rtol=0)
    holder = torch.nn.Module()
    holder.w1 = layer
    assert merge_and_unload(holder) == ["w1"]
    assert type(holder.w1) is GroupedLinear and holder.w1.weight is layer.weight
    torch.testing.assert_close(holder.w1(x, OFFSETS), before, atol=1e-5, rtol=1e-5)


def test_step_copies_cover_grouped_layers():
    layer = random_layer(LoRASettings(r=3, alpha=6.0)).to(torch.bfloat16)
    layer.lora_a.data, layer.lora_b.data = layer.lora_a.data.float(), layer.lora_b.data.float()
    holder = torch.nn.Module()
    holder.w1 = layer
    x = torch.randn(19, 12, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    plain = layer(x, OFFSETS)
    with lora_step_copies(holder):
        assert layer.step_copies is not None and layer.step_copies[0].dtype == torch.bfloat16
        copied = layer(x, OFFSETS)
        copied.float().sum().backward()
    assert layer.step_copies is None and layer.lora_a.grad is not None and layer.lora_a.grad.dtype == torch.float32
    torch.testing.assert_close(copied, plain, atol=0, rtol=0)


def test_apply_lora_wraps_experts_and_the_router_on_request(base_folder):
    model = build(read_model_args(base_folder), weights=base_folder)
    names = apply_lora(model, LoRASettings(r=4, alpha=8.0))
    assert len(names) == 7 * TINY_MOE.n_layers and not any(n.endswith(".gate") for n in names)
    ff = model.layers[0].feed_forward
    assert isinstance(ff.w1, GroupedLoRALinear) and isinstance(ff.gate, torch.nn.Linear)
    assert ff.w1.lora_a.shape == (EXPERTS, 4, DIM) and ff.w2.lora_b.shape == (EXPERTS, DIM, 4)

    model = build(read_model_args(base_folder), weights=base_folder)
    assert apply_lora(model, LoRASettings(target_modules=["gate"])) == ["layers.0.feed_forward.gate",
                                                                        "layers.1.feed_forward.gate"]
    assert isinstance(model.layers[0].feed_forward.gate, LoRALinear)
    assert set(lora_state_dict(model)) == {f"layers.{i}.feed_forward.gate.{p}" for i in (0, 1) for p in ("lora_a", "lora_b")}

    dense = build(dataclasses.replace(TINY_MOE, moe=None))
    with pytest.raises(MftError, match=r"\['gate'\] matched no layer"):
        apply_lora(dense, LoRASettings(target_modules=["gate"]))
    with pytest.raises(MftError, match="'gate'"):
        apply_lora(dense, LoRASettings(target_modules=["router"]))


def test_the_build_pipeline_draws_expert_factors_in_module_order(base_folder):
    """build_model converts on meta and draws the factors after loading, from seed + 1, expert by
    expert: the same factors as LoRALinears of each expert's shape drawn in module order."""
    settings = LoRASettings(r=4, alpha=8.0, target_modules=ALL_TARGETS)
    model = build(read_model_args(base_folder), weights=base_folder, lora=settings, seed=5)
    gen = torch.Generator().manual_seed(6)
    for name, m in lora_modules(model).items():
        slices = zip(m.lora_a, m.lora_b) if isinstance(m, GroupedLoRALinear) else [(m.lora_a, m.lora_b)]
        for a, b in slices:
            ref_a, ref_b = torch.empty(a.shape), torch.empty(b.shape)
            init_lora_factors_(ref_a, ref_b, gen)
            assert torch.equal(a, ref_a) and not b.any(), name
    assert list(lora_modules(model))[:6] == [f"layers.0.{n}" for n in (
        "attention.wq", "attention.wk", "attention.wv", "attention.wo", "feed_forward.gate", "feed_forward.w1")]


def test_expert_lora_grads_equal_per_expert_lora_linears(base_folder):
    """The model's loss and LoRA gradients equal a reference that runs each expert as its own
    LoRALinear (the routing and weights of transformers' Mixtral, written out here)."""
    model, _ = adapted(base_folder, ["w1", "w2", "w3", "gate"])
    model.train()
    toks = tokens()
    positions, cu = torch.arange(SEQ), torch.tensor([0, SEQ], dtype=torch.int32)
    model(toks, positions, cu, SEQ).float().logsumexp(-1).sum().backward()
    ours = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    assert set(ours) == set(lora_state_dict(model))
    for p in model.parameters():
        p.grad = None

    experts = {}
    for i, block in enumerate(model.layers):
        ff = block.feed_forward
        for leaf in ("w1", "w2", "w3"):
            grouped = getattr(ff, leaf)
            for e in range(EXPERTS):
                single = LoRALinear(grouped.weight[e], LoRASettings(r=4, alpha=8.0))
                single.lora_a, single.lora_b = [torch.nn.Parameter(t[e].detach().clone())
                                                for t in (grouped.lora_a, grouped.lora_b)]
                experts[i, leaf, e] = single

    def reference_moe(i, ff, x):
        probs = torch.softmax(ff.gate(x).float(), -1)
        weight, chosen = torch.topk(probs, ff.top_k, dim=-1)
        weight = weight / weight.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        for e in range(EXPERTS):
            token, slot = torch.where(chosen == e)
            xs = x[token]
            y = experts[i, "w2", e](F.silu(experts[i, "w1", e](xs)) * experts[i, "w3", e](xs))
            out = out.index_add(0, token, (y * weight[token, slot, None]).to(x.dtype))
        return out

    forwards = [block.feed_forward.forward for block in model.layers]
    for i, block in enumerate(model.layers):
        block.feed_forward.forward = (lambda x, i=i, ff=block.feed_forward: reference_moe(i, ff, x))
    try:
        model(toks, positions, cu, SEQ).float().logsumexp(-1).sum().backward()
    finally:
        for block, forward in zip(model.layers, forwards):
            block.feed_forward.forward = forward
    for i in range(TINY_MOE.n_layers):
        for leaf in ("w1", "w2", "w3"):
            for p in ("lora_a", "lora_b"):
                reference = torch.stack([getattr(experts[i, leaf, e], p).grad for e in range(EXPERTS)])
                torch.testing.assert_close(ours[f"layers.{i}.feed_forward.{leaf}.{p}"], reference, atol=1e-5, rtol=1e-4)
        for p in ("lora_a", "lora_b"):
            name = f"layers.{i}.feed_forward.gate.{p}"
            torch.testing.assert_close(ours[name], model.get_parameter(name).grad, atol=1e-5, rtol=1e-4)
    assert ours["layers.0.feed_forward.w1.lora_a"].abs().sum() > 0


def test_merge_round_trip_and_init_of_a_whole_model(base_folder):
    model, _ = adapted(base_folder, ALL_TARGETS)
    toks = tokens()
    before = mft_logits(model, toks)
    merge_lora(model)
    torch.testing.assert_close(mft_logits(model, toks), before, atol=1e-4, rtol=1e-4)
    unmerge_lora(model)
    torch.testing.assert_close(mft_logits(model, toks), before, atol=1e-5, rtol=1e-5)
    init_lora_(model, 3)  # B back to zero: the base again (its weights within fp32 rounding of the merge)
    assert all(not m.lora_b.any() and m.lora_a.any() for m in lora_modules(model).values())
    plain = build(read_model_args(base_folder), weights=base_folder)
    torch.testing.assert_close(mft_logits(model, toks), mft_logits(plain, toks), atol=1e-5, rtol=1e-5)


def test_adapter_round_trip_and_shape_check(base_folder, tmp_path):
    model, settings = adapted(base_folder, ALL_TARGETS)
    save_adapter(model, tmp_path / "adapter", settings, base_record(base_folder, model))
    saved = load_file(tmp_path / "adapter" / "adapter.safetensors")
    assert saved["layers.1.feed_forward.w1.lora_a"].shape == (EXPERTS, 4, DIM)
    assert saved["layers.1.feed_forward.w2.lora_b"].shape == (EXPERTS, DIM, 4)
    assert saved["layers.1.feed_forward.gate.lora_b"].shape == (EXPERTS, 4)
    again = build(read_model_args(base_folder), weights=base_folder)
    load_adapter(again, tmp_path / "adapter")
    toks = tokens()
    torch.testing.assert_close(mft_logits(again.eval(), toks), mft_logits(model, toks), atol=0, rtol=0)

    saved["layers.1.feed_forward.w3.lora_a"] = saved["layers.1.feed_forward.w3.lora_a"][:3].contiguous()
    save_file(saved, tmp_path / "adapter" / "adapter.safetensors")
    with pytest.raises(MftError, match=r"layers\.1\.feed_forward\.w3\.lora_a"):
        load_adapter(build(read_model_args(base_folder), weights=base_folder), tmp_path / "adapter")


@pytest.mark.parametrize("export", ["hf", "consolidated"])
def test_merged_exports_give_mfts_logits(base_folder, tmp_path, export):
    model, _ = adapted(base_folder, ALL_TARGETS)
    out = tmp_path / export
    if export == "hf":
        export_hf(model, out, dtype=torch.float32)
        assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in load_file(out / "model.safetensors")
        hf_model = transformers.MixtralForCausalLM.from_pretrained(out).eval()
        toks = tokens()
        torch.testing.assert_close(hf_logits(hf_model, toks), mft_logits(model, toks), atol=1e-4, rtol=1e-4)
    else:  # mistral-inference's layout, read back by mft's own loader
        export_consolidated(model, out, dtype=torch.float32)
        assert set(load_file(out / "consolidated.safetensors")) == set(file_shapes(model.args))
        again = build(read_model_args(out), weights=out).eval()
        toks = tokens()
        torch.testing.assert_close(mft_logits(again, toks), mft_logits(model, toks), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("targets", [ALL_TARGETS, ["wq", "w1", "w2"], ["w3"], ["wq", "wk", "gate"]])
def test_peft_adapter_gives_mfts_logits(base_folder, tmp_path, targets):
    """Expert LoRA maps exactly onto transformers 5's fused experts through peft's target_parameters."""
    model, settings = adapted(base_folder, targets)
    save_adapter(model, tmp_path / "adapter", settings, base_record(base_folder, model))
    out = export_peft(tmp_path / "adapter", tmp_path / "peft", scale=0.5)
    config = json.loads((out / "adapter_config.json").read_text())
    if "w1" in targets and "w3" in targets:
        assert config["rank_pattern"] == {"gate_up_proj": 8} and config["alpha_pattern"] == {"gate_up_proj": 16.0}
    base = transformers.MixtralForCausalLM.from_pretrained(base_folder).eval()
    adapted_hf = peft.PeftModel.from_pretrained(base, out).eval()
    for m in lora_modules(model).values():
        m.scale *= 0.5
    toks = tokens()
    torch.testing.assert_close(hf_logits(adapted_hf, toks), mft_logits(model, toks), atol=1e-4, rtol=1e-4)


def test_mistral_inference_lora_for_experts(base_folder, tmp_path):
    """lora.safetensors names every linear layer mistral-inference's Mixtral has (router and each
    expert), and its merge rule W + scaling * B @ A reproduces mft's merged weights."""
    model, settings = adapted(base_folder, ["wq", "w1", "w2", "w3"])
    save_adapter(model, tmp_path / "adapter", settings, base_record(base_folder, model))
    lora = mistral_lora_tensors(tmp_path / "adapter", dtype=torch.float32, scaling=2.0)
    linear = [n for n, shape in file_shapes(model.args).items() if len(shape) == 2 and not n.startswith(("tok_", "output"))]
    assert {f"{n.removesuffix('.weight')}.lora_{ab}.weight" for n in linear for ab in "AB"} == set(lora)
    assert lora["layers.1.feed_forward.gate.lora_B.weight"].abs().sum() == 0
    plain = build(read_model_args(base_folder), weights=base_folder)
    for e in (0, 3):
        name = f"layers.1.feed_forward.experts.{e}.w2"
        merged = plain.layers[1].feed_forward.w2.weight[e] + 2.0 * lora[f"{name}.lora_B.weight"] @ lora[f"{name}.lora_A.weight"]
        torch.testing.assert_close(merged, model.layers[1].feed_forward.w2.weight[e]
                                   + model.layers[1].feed_forward.w2.delta_weight(e), atol=1e-6, rtol=1e-5)


def test_export_command_merges_stacked_expert_adapters(base_folder, tmp_path):
    """mft-export hf with a second adapter: both are merged into the experts as the model loads
    (merge_and_unload puts GroupedLinears back), and transformers gives the logits of mft's model
    carrying both."""
    first, settings = adapted(base_folder, ["w1", "w2", "w3"], seed=1)
    save_adapter(first, tmp_path / "first", settings, base_record(base_folder, first))
    second, settings = adapted(base_folder, ["wv", "w3", "gate"], seed=2)
    save_adapter(second, tmp_path / "second", settings, base_record(base_folder, second))
    assert mft_export(["hf", str(tmp_path / "first"), str(tmp_path / "hf"), "--adapter", f"{tmp_path / 'second'}:0.5",
                       "--dtype", "fp32", "--tokenizer", "none"]) == 0
    reference = build(read_model_args(base_folder), weights=base_folder)
    load_adapter(reference, tmp_path / "first")
    assert set(merge_and_unload(reference)) == {f"layers.{i}.feed_forward.w{j}" for i in (0, 1) for j in (1, 2, 3)}
    assert type(reference.layers[0].feed_forward.w1) is GroupedLinear
    load_adapter(reference, tmp_path / "second", scale=0.5)
    hf_model = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "hf").eval()
    toks = tokens()
    torch.testing.assert_close(hf_logits(hf_model, toks), mft_logits(reference.eval(), toks), atol=1e-4, rtol=1e-4)


def test_mft_train_config_accepts_the_router_target():
    from mft.compose import compose, to_dataclass
    from mft.config import register_configs
    from mft.train.checks import check_config

    register_configs()
    check_config(to_dataclass(compose("train", ["model=tiny-moe", "peft.target_modules=[wq,w1,gate]"])))
    with pytest.raises(MftError, match=r"peft\.target_modules.*'gate'"):
        check_config(to_dataclass(compose("train", ["peft.target_modules=[wq,router]"])))


@pytest.mark.gpu
@pytest.mark.parametrize("r", [4, 8])
def test_grouped_lora_on_cuda_bf16_matches_the_fp32_loop(r):
    """On CUDA in bf16 the base and update run torch's grouped GEMM (a rank of 4 padded to 8 by
    grouped_factors); forward and gradients match the per-group loop in fp32 on the same bf16
    inputs, by relative norm: these gradients are sums with heavy cancellation (entries up to
    ~1e4), where any two bf16 computations with different accumulation orders, the bf16 loop
    among them, differ elementwise by far more than a fixed tolerance."""
    layer = random_layer(LoRASettings(r=r, alpha=2.0 * r), groups=8, in_features=64, out_features=96).cuda()
    layer.weight.data = layer.weight.data.bfloat16()
    offsets = torch.tensor([5, 5, 40, 41, 90, 90, 120, 128], dtype=torch.int32, device="cuda")
    x = torch.randn(128, 64, device="cuda", generator=torch.Generator("cuda").manual_seed(0)).bfloat16()
    assert uses_grouped_gemm(x, layer.grouped_factors(x.dtype)[0])

    def output_and_grads(forward):
        out = forward()
        out.float().square().sum().backward()
        grads = layer.lora_a.grad.clone(), layer.lora_b.grad.clone()
        layer.lora_a.grad = layer.lora_b.grad = None
        return out.float(), grads

    def fp32_loop():
        a, b = layer.lora_factors(torch.float32)
        x32 = x.float()
        return (grouped_linear(x32, layer.weight.float(), offsets, grouped=False)
                + grouped_linear(grouped_linear(x32, a, offsets, grouped=False), b, offsets, grouped=False))

    out, grads = output_and_grads(lambda: layer(x, offsets))
    ref_out, ref_grads = output_and_grads(fp32_loop)
    for ours, reference in zip((out, *grads), (ref_out, *ref_grads)):
        assert ((ours - reference).norm() / reference.norm()).item() < 2e-2


@pytest.mark.parametrize("quantised", [False, True])
def test_adapted_experts_decode_row_by_row_as_the_grouped_products(quantised):
    """forward_rows (decoding: each token copy through its own expert, only those experts read)
    equals the grouped forward, for a dense and a 4-bit base, with a rank the grouped GEMM pads."""
    from mft.quant.formats import QuantSpec
    from mft.quant.grouped import QuantizedGroupedLinear

    gen = torch.Generator().manual_seed(0)
    base = GroupedLinear(4, 64, 24)
    with torch.no_grad():
        base.weight.copy_(torch.randn(base.weight.shape, generator=gen))
    if quantised:
        base = QuantizedGroupedLinear.from_dense(base.weight.detach(), QuantSpec("nf4", 64, double_quant=True))
    layer = GroupedLoRALinear(base, LoRASettings(r=3, alpha=6.0))
    with torch.no_grad():
        layer.lora_b.copy_(torch.randn(layer.lora_b.shape, generator=gen))
    group = torch.tensor([2, 0, 2, 3])
    x = torch.randn(4, 64, generator=gen)
    order = torch.argsort(group, stable=True)
    offsets = torch.cumsum(torch.bincount(group, minlength=4), 0).to(torch.int32)
    grouped = torch.empty(4, 24)
    grouped[order] = layer(x[order], offsets)
    torch.testing.assert_close(layer.forward_rows(x, group), grouped, atol=1e-4, rtol=1e-4)

