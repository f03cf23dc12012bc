"""Mixtral generation: greedy Generator and the mft-generate command equal transformers' greedy
generate on the tiny Mixtral of test_mixtral.py; decoding reads only the chosen experts; the
compiled decode step equals eager; int4 experts on torch's int4 matmul equal the dequantised model."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from conftest import build  # noqa: E402
from test_families import assert_mft_generate_command_equals_transformers  # noqa: E402
from test_mixtral import VOCAB, mixtral  # noqa: E402

from mft.checkpoint.load import read_model_args  # noqa: E402
from mft.generate.decode import GenerationSettings, Generator  # noqa: E402
from mft.model.args import ModelArgs, MoeArgs  # noqa: E402
from mft.model.moe import GroupedLinear, MoEFeedForward, grouped_linear  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(transformers' tiny Mixtral, never stopping early; the folder it saved; mft's model from it)."""
    hf_model = mixtral()
    hf_model.generation_config.eos_token_id = None
    hf_model.generation_config.pad_token_id = 0
    folder = tmp_path_factory.mktemp("mixtral")
    hf_model.save_pretrained(folder)
    return hf_model, folder, build(read_model_args(folder), weights=folder).eval()


def prompt(n, seed=1):
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def hf_greedy(model, ids, n):
    ids_t = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(ids_t, attention_mask=torch.ones_like(ids_t), max_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("prefill_chunk", [512, 7])
def test_greedy_equals_transformers_generate(checkpoint, prefill_chunk):
    hf_model, _, model = checkpoint
    ids = prompt(21)
    ours = Generator(model, prefill_chunk=prefill_chunk).generate([ids], GenerationSettings(max_new_tokens=30))
    assert ours[0].tokens == hf_greedy(hf_model, ids, 30)


def test_batched_rows_equal_single_rows(checkpoint):
    """Batch 2 (4 token copies, 4 experts: per-copy products) and batch 3 (6 copies: grouped
    products) decode as each row alone."""
    _, _, model = checkpoint
    prompts = [prompt(9), prompt(4, seed=2), prompt(13, seed=3)]
    settings = GenerationSettings(max_new_tokens=12)
    alone = [Generator(model).generate([p], settings)[0].tokens for p in prompts]
    for batch in (2, 3):
        assert [g.tokens for g in Generator(model).generate(prompts[:batch], settings)] == alone[:batch]


def test_moe_blocks_fuse_qkv_and_keep_experts(checkpoint):
    _, _, model = checkpoint
    generator = Generator(model)
    assert all(block.qkv is not None and block.w13 is None for block in generator.fused)
    attention = model.layers[0].attention
    assert attention.wq.weight.untyped_storage().data_ptr() == generator.fused[0].qkv.untyped_storage().data_ptr()


def test_decoding_reads_only_the_chosen_experts(monkeypatch):
    """A decode-sized forward under no_grad multiplies each token copy by its own expert, with no
    grouped product: the unchosen experts' weights are never read (here: NaN, and the output
    stays finite), and the result equals the grouped products'."""
    torch.manual_seed(0)
    args = ModelArgs(dim=32, n_layers=1, head_dim=8, hidden_dim=48, n_heads=4, n_kv_heads=2, vocab_size=64,
                     moe=MoeArgs(8, 2))
    ff = MoEFeedForward(args)
    for p in ff.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(3, 32)
    with torch.no_grad():
        reference = ff(x.unsqueeze(0).expand(9, 3, 32).reshape(27, 32))[:3]  # 54 copies: grouped products
        chosen = torch.topk(ff.gate(x), 2, dim=-1).indices.unique()
        unchosen = torch.tensor([e for e in range(8) if e not in chosen.tolist()])
        assert len(unchosen) > 0
        for layer in (ff.w1, ff.w2, ff.w3):
            layer.weight[unchosen] = float("nan")
        monkeypatch.setattr("mft.model.moe.grouped_linear", None)  # calling it would raise
        out = ff(x)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)


def test_forward_rows_equals_grouped_linear():
    torch.manual_seed(0)
    layer = GroupedLinear(5, 16, 24)
    torch.nn.init.normal_(layer.weight)
    x, group = torch.randn(4, 16), torch.tensor([3, 0, 3, 1])
    order = torch.argsort(group, stable=True)
    offsets = torch.bincount(group, minlength=5).cumsum(0).to(torch.int32)
    grouped = torch.empty(4, 24)
    grouped[order] = grouped_linear(x[order], layer.weight, offsets)
    torch.testing.assert_close(layer.forward_rows(x, group), grouped, atol=1e-5, rtol=1e-5)


@pytest.fixture
def compile_counter(monkeypatch):
    """Generator's torch.compile on the aot_eager backend (dynamo and AOTAutograd trace what
    inductor would compile), counting the graphs."""
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile_(fn, backend=counter, dynamic=kw["dynamic"]))
    torch._dynamo.reset()
    return counter


def assert_compiled_decode_equals_eager(model, counter):
    prompts = [prompt(11), prompt(6, seed=2)]
    settings = GenerationSettings(max_new_tokens=10)
    eager = [g.tokens for g in Generator(model).generate(prompts, settings)]
    compiled = Generator(model, compile=True)
    for _ in range(2):
        assert [g.tokens for g in compiled.generate(prompts, settings)] == eager
    assert counter.frame_count == 1  # one graph: the MoE decode path has no host sync


def test_compiled_decode_equals_eager(checkpoint, compile_counter):
    assert_compiled_decode_equals_eager(checkpoint[2], compile_counter)


def test_mft_generate_command_equals_transformers_generate(tmp_path):
    """The mft-generate command on a tiny Mixtral folder transformers wrote, with its own tekken.json:
    the chat prompt mistral-common builds, greedy, gives the text of transformers' generate."""
    assert_mft_generate_command_equals_transformers(mixtral(vocab_size=131072), tmp_path, 16)  # the tekken vocabulary


# -- int4 experts on torch's int4 matmul -----------------------------------------------------------
def decisive_router_(model):
    """Large router weights: bf16 rounding differences between two paths must not flip a near-tie
    of experts (which changes a token's output entirely)."""
    for block in model.layers:
        weight = block.feed_forward.gate.weight
        with torch.no_grad():
            weight.copy_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(2)))


def int4_mixtral(device="cpu"):
    """A tiny bf16 Mixtral (in_features multiples of 128), int4 everywhere by mft.quant (the experts
    as QuantizedGroupedLinear stacks)."""
    from mft.quant.formats import QuantSpec

    args = ModelArgs(dim=128, n_layers=2, head_dim=32, hidden_dim=256, n_heads=4, n_kv_heads=2, vocab_size=VOCAB,
                     moe=MoeArgs(4, 2))
    model = build(args, quant=QuantSpec(format="int4", block_size=128), device=device, dtype=torch.bfloat16,
                  std=0.05).eval()
    decisive_router_(model)
    return model


def packed_logits(model, ids):
    device = model.tok_embeddings.weight.device
    with torch.no_grad():
        n = len(ids)
        return model(torch.tensor(ids, device=device), torch.arange(n, device=device),
                     torch.tensor([0, n], dtype=torch.int32, device=device), n).float()


def test_int4_experts_match_the_dequantised_experts():
    """Experts on torch's int4 matmul give the dequantised model's logits: many tokens (per
    non-empty expert) and one (the chosen experts only); generation decodes as the model's own forward."""
    if not hasattr(torch, "_weight_int4pack_mm_for_cpu"):
        pytest.skip("this torch has no CPU int4 matmul")
    from mft.generate.int4 import Int4GroupedLinear, use_int4_kernels

    model = int4_mixtral()
    ids = prompt(24)
    references = [packed_logits(model, ids), packed_logits(model, ids[:1])]
    replaced = use_int4_kernels(model)
    assert "layers.1.feed_forward.w2" in replaced and len(replaced) == 7 * 2
    assert isinstance(model.layers[0].feed_forward.w1, Int4GroupedLinear)
    for reference, logits in zip(references, [packed_logits(model, ids), packed_logits(model, ids[:1])]):
        torch.testing.assert_close(logits, reference, atol=0.05 * reference.abs().max().item(), rtol=0)
    out = Generator(model, prefill_chunk=7).generate([ids], GenerationSettings(max_new_tokens=6))[0].tokens
    assert_argmax_up_to_rounding(model, ids, out)


def assert_argmax_up_to_rounding(model, ids, generated):
    """Each generated token is the argmax of the model's packed forward, up to bf16 rounding."""
    sequence = list(ids)
    for token in generated:
        logits = packed_logits(model, sequence)[-1]
        assert logits[token] >= logits.max() - 0.02 * logits.abs().max()
        sequence.append(token)


def test_compiled_int4_decode_equals_eager(compile_counter):
    if not hasattr(torch, "_weight_int4pack_mm_for_cpu"):
        pytest.skip("this torch has no CPU int4 matmul")
    from mft.generate.int4 import use_int4_kernels

    model = int4_mixtral()
    use_int4_kernels(model)
    assert_compiled_decode_equals_eager(model, compile_counter)


@pytest.mark.gpu
def test_int4_experts_on_cuda_with_cuda_graphs():
    """On the GPU: tinygemm's packs of the experts give the dequantised logits, and the compiled
    decode step (inductor, CUDA graphs) generates each token as the model's argmax, up to bf16
    rounding (inductor's fusions round otherwise than eager), the same on replay."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from mft.generate.int4 import Int4GroupedLinear, use_int4_kernels

    model = int4_mixtral("cuda")
    ids = prompt(24)
    references = [packed_logits(model, ids), packed_logits(model, ids[:1])]
    use_int4_kernels(model)
    assert isinstance(model.layers[0].feed_forward.w1, Int4GroupedLinear)
    for reference, logits in zip(references, [packed_logits(model, ids), packed_logits(model, ids[:1])]):
        torch.testing.assert_close(logits, reference, atol=0.05 * reference.abs().max().item(), rtol=0)
    compiled = Generator(model, compile=True)
    settings = GenerationSettings(max_new_tokens=12)
    first = compiled.generate([ids], settings)[0].tokens
    assert compiled.generate([ids], settings)[0].tokens == first  # replays the recorded graph
    assert_argmax_up_to_rounding(model, ids, first)


def test_int4_experts_under_an_adapter_stay_on_the_dequantising_path(caplog):
    if not hasattr(torch, "_weight_int4pack_mm_for_cpu"):
        pytest.skip("this torch has no CPU int4 matmul")
    from mft.generate.int4 import use_int4_kernels

    model = int4_mixtral()
    experts = model.layers[0].feed_forward.w3
    experts.lora_a = torch.zeros(experts.groups, 4, experts.in_features)  # as an expert LoRA wrapper holds
    with caplog.at_level("INFO", logger="mft.generate.int4"):
        replaced = use_int4_kernels(model)
    assert "layers.0.feed_forward.w3" not in replaced and len(replaced) == 7 * 2 - 1
    assert model.layers[0].feed_forward.w3 is experts
    assert "layers.0.feed_forward.w3: int4 experts under a LoRA adapter" in caplog.text
