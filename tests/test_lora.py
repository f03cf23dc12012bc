"""LoRA: identity at init, merge/unmerge, frozen base, adapter round trip, equality with peft;
the per-step factor copies and the shared A products against the per-layer path and peft."""

import contextlib
from dataclasses import asdict

import pytest
import torch
from conftest import build, tiny_args
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
from torch.utils._python_dispatch import TorchDispatchMode

from mft.checkpoint.adapter import load_adapter, save_adapter
from mft.model.args import ModelArgs
from mft.model.transformer import TransformerBlock, project
from mft.peft.lora import (
    LoRALinear,
    LoRASettings,
    apply_lora,
    lora_modules,
    lora_step_copies,
    merge_lora,
    unmerge_lora,
)
from mft.quant.formats import QuantSpec
from mft.utils.errors import MftError

ARGS = tiny_args(dim=32, head_dim=8, hidden_dim=64, vocab_size=50, sliding_window=5)
CUDA_ARGS = tiny_args(dim=32, head_dim=16, hidden_dim=64, vocab_size=50, sliding_window=5)  # Triton's smallest head


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    return build(ARGS, device="cpu", dtype=torch.float32)


def inputs(n: int = 12):
    tokens = torch.randint(0, ARGS.vocab_size, (n,), generator=torch.Generator().manual_seed(1))
    return tokens, torch.arange(n), torch.tensor([0, n], dtype=torch.int32), n


def randomise_b(model):
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_b.normal_(std=0.1)


def test_identical_output_at_init():
    model = tiny_model()
    before = model(*inputs())
    names = apply_lora(model, LoRASettings(r=4, alpha=8))
    assert len(names) == 7 * ARGS.n_layers
    torch.testing.assert_close(model(*inputs()), before, rtol=0, atol=0)


def test_merge_unmerge_round_trip():
    model = tiny_model()
    apply_lora(model, LoRASettings(r=4, alpha=8))
    randomise_b(model)
    adapted = model(*inputs())
    weights = {n: p.clone() for n, p in model.state_dict().items() if n.endswith(".weight")}
    merge_lora(model)
    torch.testing.assert_close(model(*inputs()), adapted, atol=1e-5, rtol=1e-5)
    unmerge_lora(model)
    torch.testing.assert_close(model(*inputs()), adapted, atol=1e-6, rtol=1e-6)
    for name, p in model.state_dict().items():
        if name in weights:
            torch.testing.assert_close(p, weights[name], atol=1e-6, rtol=0)


def test_only_lora_parameters_get_gradients():
    model = tiny_model()
    apply_lora(model, LoRASettings(r=4, alpha=8, dropout=0.1))
    randomise_b(model)
    model(*inputs()).float().pow(2).mean().backward()
    for name, p in model.named_parameters():
        is_lora = name.endswith(("lora_a", "lora_b"))
        assert p.requires_grad == is_lora, name
        assert (p.grad is not None) == is_lora, name
        if is_lora:
            assert p.grad.abs().sum() > 0, name


def test_adapter_save_and_reload_reproduces_outputs(tmp_path):
    model = tiny_model()
    settings = LoRASettings(r=4, alpha=8, target_modules=["wq", "wv", "w2"])
    apply_lora(model, settings)
    randomise_b(model)
    expected = model(*inputs())
    save_adapter(model, tmp_path / "adapter", settings, base={"args": asdict(ARGS)})

    fresh = tiny_model()
    loaded = load_adapter(fresh, tmp_path / "adapter", ARGS)
    assert loaded.target_modules == ["wq", "wv", "w2"]
    torch.testing.assert_close(fresh(*inputs()), expected, rtol=0, atol=0)


def test_adapter_for_another_shape_is_refused(tmp_path):
    model = tiny_model()
    settings = LoRASettings(r=2)
    apply_lora(model, settings)
    save_adapter(model, tmp_path / "a", settings, base={"args": asdict(ARGS)})
    other = ModelArgs(**{**ARGS.__dict__, "dim": 48})
    with pytest.raises(MftError, match="dim: adapter 32 vs model 48"):
        load_adapter(tiny_model(), tmp_path / "a", other)


def test_unknown_target_module_is_a_clear_error():
    with pytest.raises(MftError, match="q_proj"):
        apply_lora(tiny_model(), LoRASettings(target_modules=["q_proj"]))


def test_lora_linear_equals_peft_lora_layer():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = nn.Linear(16, 24, bias=False)
    ours = LoRALinear(nn.Parameter(base.weight.detach().clone()), LoRASettings(r=4, alpha=12))
    with torch.no_grad():
        ours.lora_b.normal_()
    wrapped = peft.get_peft_model(
        nn.Sequential(base), peft.LoraConfig(r=4, lora_alpha=12, target_modules=["0"], lora_dropout=0.0)
    )
    layer = wrapped.base_model.model[0]
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(ours.lora_a)
        layer.lora_B["default"].weight.copy_(ours.lora_b)
    x = torch.randn(5, 16)
    torch.testing.assert_close(ours(x), wrapped(x), atol=1e-5, rtol=1e-5)


# --- per-step copies and shared A products -------------------------------------------------

R = 3  # a rank no other tensor dimension of these tests equals (the cast counter relies on it)


def bf16_lora_model(seed: int = 0, checkpointing: bool = False, qlora: bool = False, device="cpu",
                    **settings) -> nn.Module:
    """The tiny model in bf16 with fp32 LoRA factors (as mft-train builds it), B random; an nf4
    base with `qlora`."""
    model = build(ARGS if device == "cpu" else CUDA_ARGS, device=device, dtype=torch.bfloat16, seed=seed, lora=LoRASettings(r=R, alpha=6, **settings),
                  quant=QuantSpec("nf4", 32) if qlora else None)
    torch.manual_seed(seed + 7)
    randomise_b(model)
    if checkpointing:
        apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, TransformerBlock))
    return model


def batch(seed: int, n: int = 12, device="cpu"):
    tokens = torch.randint(0, ARGS.vocab_size, (n,), generator=torch.Generator().manual_seed(seed))
    return tokens.to(device), torch.arange(n, device=device), torch.tensor([0, n], dtype=torch.int32, device=device), n


def lora_grads(model) -> dict:
    return {f"{name}.{f}": getattr(m, f).grad.clone() for name, m in lora_modules(model).items()
            for f in ("lora_a", "lora_b")}


def one_step(model, copies: bool, micro_steps: int = 2, device="cpu") -> tuple[list[torch.Tensor], dict]:
    """Forward + backward over `micro_steps` batches, as accumulate_gradients does: losses and grads."""
    losses = []
    with lora_step_copies(model) if copies else contextlib.nullcontext():
        for i in range(micro_steps):
            loss = model(*batch(i, device=device)).float().pow(2).mean()
            loss.backward()
            losses.append(loss.detach())
    return losses, lora_grads(model)


@pytest.fixture
def per_layer(monkeypatch):
    """Switch the shared A products off: project runs each layer on its own."""
    def switch_off():
        monkeypatch.delattr(LoRALinear, "project_together")
    return switch_off


def assert_grads_close(ours: dict, reference: dict, rel: float) -> None:
    assert ours.keys() == reference.keys()
    for name, grad in reference.items():
        err = (ours[name] - grad).abs().max() / grad.abs().max()
        assert err <= rel, (name, float(err))


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "activation-checkpointing"])
@pytest.mark.parametrize("qlora", [False, True], ids=["dense", "qlora"])
def test_step_copies_and_shared_a_keep_loss_and_grads(per_layer, checkpointing, qlora):
    shared = {c: one_step(bf16_lora_model(checkpointing=checkpointing, qlora=qlora), c) for c in (False, True)}
    per_layer()
    separate = {c: one_step(bf16_lora_model(checkpointing=checkpointing, qlora=qlora), c) for c in (False, True)}
    # The copies are the casts each forward made, made once: the same numbers, bit for bit.
    for path in (shared, separate):
        assert all(torch.equal(a, b) for a, b in zip(path[True][0], path[False][0]))
        assert all(torch.equal(path[True][1][n], g) for n, g in path[False][1].items())
    # One A product for wq|wk|wv and w1|w3: the same sums, up to bf16 rounding.
    for ours, ref in zip(shared[True][0], separate[False][0]):
        torch.testing.assert_close(ours, ref, rtol=1e-2, atol=0)
    assert_grads_close(shared[True][1], separate[False][1], rel=2e-2)


def test_activation_checkpointing_and_micro_steps_give_the_grads_of_one_pass():
    """Two micro-steps through the same copies (and checkpoint recomputes through them) reach the
    masters twice: their grads are the sum of two separate steps' grads."""
    together = one_step(bf16_lora_model(checkpointing=True), copies=True)[1]
    model = bf16_lora_model()
    with lora_step_copies(model):
        model(*batch(0)).float().pow(2).mean().backward()
    first = lora_grads(model)
    model.zero_grad()
    with lora_step_copies(model):
        model(*batch(1)).float().pow(2).mean().backward()
    summed = {n: g + first[n] for n, g in lora_grads(model).items()}
    assert_grads_close(together, summed, rel=1e-6)


def test_copies_last_one_step_and_the_next_forward_sees_the_update():
    model = bf16_lora_model()
    keys = {n: t.clone() for n, t in model.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    before = model(*batch(0)).detach()
    with lora_step_copies(model):
        assert all(m.step_copies is not None for m in lora_modules(model).values())
        assert model.state_dict().keys() == keys.keys()  # the copies are no state
        model(*batch(0)).float().pow(2).mean().backward()
    assert all(m.step_copies is None for m in lora_modules(model).values())
    assert all(torch.equal(t, keys[n]) for n, t in model.state_dict().items())
    optimizer.step()
    after = model(*batch(0)).detach()
    assert (after.float() - before.float()).abs().max() > 1e-2  # the new factors, no stale copy
    with lora_step_copies(model):
        assert torch.equal(model(*batch(0)).detach(), after)


@pytest.mark.parametrize("targets", [["wq", "wv", "w1"], ["wq", "wk", "wv", "w3"]],
                         ids=["some-of-qkv", "all-of-qkv-w3-alone"])
def test_mixed_targets(per_layer, targets):
    """Layers read by one project() but not all adapted run one by one; a fully adapted
    wq|wk|wv still shares its A product."""
    shared = one_step(bf16_lora_model(target_modules=targets), copies=True)
    per_layer()
    separate = one_step(bf16_lora_model(target_modules=targets), copies=False)
    for ours, ref in zip(shared[0], separate[0]):
        torch.testing.assert_close(ours, ref, rtol=1e-2, atol=0)
    assert_grads_close(shared[1], separate[1], rel=2e-2)


def test_dropout_keeps_one_mask_per_layer(per_layer):
    """With dropout each layer draws its own mask (as peft does), so the A products are not shared."""
    def outputs():
        model = bf16_lora_model(dropout=0.3).train()
        torch.manual_seed(3)
        return one_step(model, copies=True)

    shared = outputs()
    per_layer()
    separate = outputs()
    assert all(torch.equal(a, b) for a, b in zip(shared[0], separate[0]))
    assert all(torch.equal(shared[1][n], g) for n, g in separate[1].items())


def test_shared_a_products_equal_peft_layers():
    """wq, wk, wv as peft LoRA layers (fp32) against one project() over LoRALinears, forward and
    grads, in fp32 and in bf16 with this step's copies."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    shapes = {"q": 24, "k": 16, "v": 16}
    bases = nn.ModuleDict({n: nn.Linear(16, out, bias=False) for n, out in shapes.items()})
    wrapped = peft.get_peft_model(bases, peft.LoraConfig(r=4, lora_alpha=12, target_modules=list(shapes),
                                                         lora_dropout=0.0))
    x = torch.randn(9, 16)
    weights = {n: torch.randn(9, out) for n, out in shapes.items()}
    theirs = {n: wrapped.base_model.model[n] for n in shapes}
    for layer in theirs.values():
        with torch.no_grad():
            layer.lora_B["default"].weight.normal_()
    expected = [theirs[n](x) for n in shapes]
    sum((out * weights[n]).sum() for out, n in zip(expected, shapes)).backward()

    for dtype in (torch.float32, torch.bfloat16):
        ours = {n: LoRALinear(nn.Parameter(bases[n].weight.detach().to(dtype)), LoRASettings(r=4, alpha=12))
                for n in shapes}
        with torch.no_grad():
            for n, layer in ours.items():
                layer.lora_a.copy_(theirs[n].lora_A["default"].weight)
                layer.lora_b.copy_(theirs[n].lora_B["default"].weight)
        model = nn.ModuleDict(ours)
        with lora_step_copies(model) if dtype == torch.bfloat16 else contextlib.nullcontext():
            assert all((m.step_copies is not None) == (dtype == torch.bfloat16) for m in ours.values())
            outs = project(x.to(dtype), *ours.values())
            sum((out.float() * weights[n]).sum() for out, n in zip(outs, shapes)).backward()
        tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 5e-2}
        for n, out, ref in zip(shapes, outs, expected):
            torch.testing.assert_close(out.float(), ref, **tol)
            for f, peft_name in (("lora_a", "lora_A"), ("lora_b", "lora_B")):
                grad, ref_grad = getattr(ours[n], f).grad, getattr(theirs[n], peft_name)["default"].weight.grad
                assert grad.dtype == torch.float32
                assert (grad - ref_grad).abs().max() <= (1e-5 if dtype == torch.float32 else 2e-2) * ref_grad.abs().max()


class CastCounter(TorchDispatchMode):
    """Counts fp32 -> bf16 casts of LoRA-factor-shaped tensors (a dimension of R, 2R or 3R)."""

    def __init__(self):
        super().__init__()
        self.casts = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default and kwargs.get("dtype") == torch.bfloat16:
            self.casts += is_factor_fp32(args[0])
        if func is torch.ops.aten._foreach_copy_.default:  # lora_step_copies casts all factors at once
            self.casts += sum(dst.dtype == torch.bfloat16 and is_factor_fp32(src) for dst, src in zip(*args[:2]))
        return func(*args, **kwargs)


def is_factor_fp32(t: torch.Tensor) -> bool:
    return t.dtype == torch.float32 and t.dim() == 2 and bool({R, 2 * R, 3 * R} & set(t.shape))


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "activation-checkpointing"])
def test_factors_are_cast_once_per_step_not_once_per_forward(checkpointing):
    def casts(copies: bool, micro_steps: int) -> int:
        model = bf16_lora_model(checkpointing=checkpointing)
        with CastCounter() as counter:
            one_step(model, copies, micro_steps)
        return counter.casts

    layers = 7 * ARGS.n_layers
    # Per forward: wq|wk|wv share one cast A, w1|w3 another; wo and w2 one each; every B its own.
    per_forward = ARGS.n_layers * (2 + 2 + 7) * (2 if checkpointing else 1)  # recomputed in backward
    assert casts(copies=False, micro_steps=1) == per_forward
    assert casts(copies=False, micro_steps=3) == 3 * per_forward
    assert casts(copies=True, micro_steps=1) == casts(copies=True, micro_steps=3) == 2 * layers


def test_the_training_step_casts_the_factors_once():
    from mft.data.batch import Batch
    from mft.train.loop import accumulate_gradients

    def micro_batch(seed: int, n: int = 12) -> Batch:
        tokens, positions, cu_seqlens, _ = batch(seed, n + 1)
        return Batch(tokens[:-1], tokens[1:], torch.ones(n, dtype=torch.bool), positions[:-1],
                     torch.tensor([0, n], dtype=torch.int32), n)

    model = bf16_lora_model()
    with CastCounter() as counter:
        accumulate_gradients(model, [micro_batch(0), micro_batch(1), micro_batch(2)], torch.device("cpu"))
    assert counter.casts == 2 * 7 * ARGS.n_layers
    assert all(m.lora_a.grad is not None for m in lora_modules(model).values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("qlora", [False, True], ids=["dense", "qlora"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_step_copies_and_shared_a_on_cuda(per_layer, compiled, qlora):
    """On the GPU (Triton attention, cuBLAS addmm), with torch.compile per block as mft-train
    runs it: the loss and grads of the per-layer path without copies, up to bf16 rounding."""
    model = bf16_lora_model(checkpointing=True, qlora=qlora, device="cuda")
    if compiled:
        for i, block in enumerate(model.layers):
            model.layers[i] = torch.compile(block)
    shared = one_step(model, copies=True, device="cuda")
    model.zero_grad()
    again = one_step(model, copies=True, device="cuda")  # a second step through fresh copies
    per_layer()
    separate = one_step(bf16_lora_model(qlora=qlora, device="cuda"), copies=False, device="cuda")
    for path in (shared, again):
        for ours, ref in zip(path[0], separate[0]):
            torch.testing.assert_close(ours, ref, rtol=1e-2, atol=0)
        assert_grads_close(path[1], separate[1], rel=3e-2)
