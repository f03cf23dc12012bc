"""Fused decoding projections (mft/generate/fuse.py): no memory added, the model's own forward
unchanged, the same tokens as unfused decoding, LoRA blocks left alone, stale fusions refused."""

import copy

import pytest
import torch
from conftest import build, tiny_args
from torch import nn

from mft.generate.decode import GenerationSettings, Generator
from mft.generate.fuse import fuse_projections, still_fused
from mft.model.args import ModelArgs
from mft.peft.lora import LoRASettings, apply_lora
from mft.utils.errors import MftError

ARGS = tiny_args(vocab_size=160, rope_theta=5000.0, sliding_window=16)


def random_model(args=ARGS):
    torch.manual_seed(0)
    model = build(args, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(std=0.2)
    return model.eval()


def storage_bytes(model):
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
    return sum(storages.values())


def logits(model, ids):
    n = len(ids)
    with torch.no_grad():
        return model(torch.tensor(ids), torch.arange(n), torch.tensor([0, n], dtype=torch.int32), n)


def test_fusion_adds_no_memory_and_keeps_the_models_forward():
    model = random_model()
    ids = torch.randint(0, ARGS.vocab_size, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    before, bytes_before = logits(model, ids), storage_bytes(model)
    blocks = fuse_projections(model)
    assert storage_bytes(model) == bytes_before
    for block, fused in zip(model.layers, blocks):
        attn, ff = block.attention, block.feed_forward
        assert fused.qkv.shape == (ARGS.n_heads * 16 + 2 * ARGS.n_kv_heads * 16, ARGS.dim)
        assert fused.w13.shape == (2 * ARGS.hidden_dim, ARGS.dim)
        for layer in (attn.wq, attn.wk, attn.wv):
            assert layer.weight.untyped_storage().data_ptr() == fused.qkv.untyped_storage().data_ptr()
        assert torch.equal(fused.w13[ARGS.hidden_dim:], ff.w3.weight)
    assert torch.equal(logits(model, ids), before)
    with torch.no_grad():  # an in-place change (merging an adapter, loading weights) reaches both
        model.layers[0].attention.wv.weight.mul_(2)
    assert torch.equal(blocks[0].qkv[-ARGS.n_kv_heads * 16:], model.layers[0].attention.wv.weight)


@pytest.mark.parametrize("window", [16, None])
def test_fused_decoding_equals_unfused(window):
    model = random_model(ModelArgs(**{**vars(ARGS), "sliding_window": window}))
    prompts = [torch.randint(0, ARGS.vocab_size, (n,), generator=torch.Generator().manual_seed(n)).tolist()
               for n in (30, 5)]
    settings = GenerationSettings(max_new_tokens=25)
    unfused = Generator(copy.deepcopy(model), prefill_chunk=8, fuse=False).generate(prompts, settings)
    fused = Generator(model, prefill_chunk=8).generate(prompts, settings)
    assert [g.tokens for g in fused] == [g.tokens for g in unfused]


def test_lora_blocks_stay_unfused_and_decode_alike():
    model = random_model()
    apply_lora(model, LoRASettings(r=4, alpha=8, target_modules=["wq", "wv", "w1"]))
    with torch.no_grad():  # B starts at zero: give the adapter an effect
        for name, p in model.named_parameters():
            if name.endswith("lora_b"):
                p.normal_(std=0.5)
    reference = copy.deepcopy(model)
    generator = Generator(model)
    assert all(f.qkv is None and f.w13 is None for f in generator.fused)
    prompt = list(range(3, 23))
    settings = GenerationSettings(max_new_tokens=12)
    assert generator.generate([prompt], settings)[0].tokens == \
        Generator(reference, fuse=False).generate([prompt], settings)[0].tokens


def test_a_layer_replaced_after_fusion_is_refused():
    model = random_model()
    generator = Generator(model)
    assert still_fused(model, generator.fused)
    model.layers[1].feed_forward.w3 = nn.Linear(ARGS.dim, ARGS.hidden_dim, bias=False)
    assert not still_fused(model, generator.fused)
    with pytest.raises(MftError, match="make a new Generator"):
        generator.generate([[1, 2, 3]], GenerationSettings(max_new_tokens=2))
    assert Generator(model).generate([[1, 2, 3]], GenerationSettings(max_new_tokens=2))[0].tokens


def test_a_dropped_generator_frees_its_fused_weights_at_once():
    """No reference cycle: the fused tensors go with the Generator, without waiting for gc."""
    import gc
    import weakref

    model = random_model()
    generator = Generator(model)
    generator.generate([[1, 2, 3]], GenerationSettings(max_new_tokens=3))
    refs = [weakref.ref(block.w13) for block in generator.fused]
    model.layers[0].feed_forward.w1 = nn.Linear(ARGS.dim, ARGS.hidden_dim, bias=False)  # as quantising would
    model.layers[0].feed_forward.w3 = nn.Linear(ARGS.dim, ARGS.hidden_dim, bias=False)
    gc.disable()
    try:
        del generator
        assert refs[0]() is None
    finally:
        gc.enable()


def test_a_fused_model_saves_and_loads_like_before(tmp_path):
    """The rebound weights are disjoint views: safetensors writes them as separate tensors."""
    from mft.checkpoint.consolidated import save_consolidated
    from mft.checkpoint.load import load_weights

    model = random_model()
    Generator(model)
    save_consolidated(model, tmp_path / "fused")
    loaded = build(ARGS, device="cpu", dtype=torch.float32)
    load_weights(loaded, tmp_path / "fused")
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_two_generators_share_one_fusion():
    model = random_model()
    first = Generator(model)
    second = Generator(model)
    assert all(a.qkv is b.qkv and a.w13 is b.w13 for a, b in zip(first.fused, second.fused))
    settings = GenerationSettings(max_new_tokens=4)
    assert first.generate([[1, 2, 3]], settings)[0].tokens == second.generate([[1, 2, 3]], settings)[0].tokens


def test_fusion_keeps_the_parameter_objects_an_optimizer_holds():
    model = random_model()
    wq = model.layers[0].attention.wq.weight
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    generator = Generator(model)
    assert model.layers[0].attention.wq.weight is wq
    wq.grad = torch.ones_like(wq)
    optimizer.step()  # updates the Parameter in place: the fused tensor sees it
    assert torch.equal(generator.fused[0].qkv[: wq.shape[0]], wq)
    assert still_fused(model, generator.fused)
