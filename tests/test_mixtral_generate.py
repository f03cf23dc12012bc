"""Mixtral generation: greedy Generator and the mft-generate command equal transformers' greedy
generate on the tiny Mixtral of test_mixtral.py; decoding reads only the chosen experts; the
compiled decode step equals eager; int4 experts on torch's int4 matmul equal the dequantised model."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from conftest import build  # noqa: E402
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


def test_compiled_decode_equals_eager(checkpoint, monkeypatch):
    """The compiled decode step (aot_eager here: dynamo and AOTAutograd trace what inductor would
    compile) gives eager's tokens, and is one graph: the MoE decode path has no host sync."""
    _, _, model = checkpoint
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile_(fn, backend=counter, dynamic=kw["dynamic"]))
    torch._dynamo.reset()
    prompts = [prompt(11), prompt(6, seed=2)]
    settings = GenerationSettings(max_new_tokens=10)
    eager = [g.tokens for g in Generator(model).generate(prompts, settings)]
    compiled = Generator(model, compile=True)
    for _ in range(2):
        assert [g.tokens for g in compiled.generate(prompts, settings)] == eager
    assert counter.frame_count == 1


def test_mft_generate_command_equals_transformers_generate(tmp_path):
    """The mft-generate command on a tiny Mixtral folder transformers wrote, with its own tekken.json:
    the chat prompt mistral-common builds, greedy, gives the text of transformers' generate."""
    import shutil
    import subprocess
    import sys

    from mft.data.tokenizer import BUILTIN, load_tokenizer
    from mft.generate.chat import ChatFormat

    hf_model = mixtral(vocab_size=131072)  # the tekken vocabulary
    hf_model.save_pretrained(tmp_path / "model")
    shutil.copyfile(BUILTIN["v3-tekken"], tmp_path / "model" / "tekken.json")
    fmt = ChatFormat(load_tokenizer(tmp_path / "model"))
    ids = fmt.encode([{"role": "user", "content": "Name three rivers."}])
    with torch.no_grad():
        ids_t = torch.tensor([ids])
        out = hf_model.generate(ids_t, attention_mask=torch.ones_like(ids_t), max_new_tokens=16, do_sample=False,
                                eos_token_id=fmt.tokenizer.eos_id, pad_token_id=fmt.tokenizer.eos_id)
    new = [t for t in out[0, len(ids):].tolist() if t != fmt.tokenizer.eos_id]
    cmd = [sys.executable, "-m", "mft.generate", f"base={tmp_path / 'model'}", "prompt=Name three rivers.",
           "max_new_tokens=16", "device=cpu", "precision=fp32", "stream=false"]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == fmt.decode(new) + "\n"
