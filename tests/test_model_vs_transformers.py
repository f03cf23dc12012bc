"""mft's model, fed through mft's HF loader, reproduces transformers' MistralForCausalLM logits."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from conftest import build  # noqa: E402
from transformers import MistralConfig, MistralForCausalLM  # noqa: E402
from transformers.masking_utils import sliding_window_causal_mask_function  # noqa: E402

from mft.checkpoint.load import load_weights, read_model_args  # noqa: E402
from mft.model.args import ModelArgs  # noqa: E402
from mft.model.attention import sliding_window_mask  # noqa: E402

SEQ, WINDOW, VOCAB = 40, 16, 160


def save_hf_model(folder, *, window, attn="eager", tie=False, max_shard_size=None, seed=0):
    """A tiny GQA Mistral saved by transformers itself; returns the in-memory model too."""
    torch.manual_seed(seed)
    config = MistralConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
        rope_theta=5000.0, sliding_window=window, tie_word_embeddings=tie,
        # A large init makes logits O(1..10): a wrong mask, rope or permutation shows far above 1e-4.
        initializer_range=0.2, attn_implementation=attn,
    )
    model = MistralForCausalLM(config).eval()
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    return model


def load_mft(folder, **overrides):
    args = read_model_args(folder)
    for key, value in overrides.items():
        setattr(args, key, value)
    model = build(args, device="cpu", dtype=torch.float32)
    load_weights(model, folder)
    return model.eval()


def tokens(n=SEQ, seed=1):
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def mft_logits(model, toks, lengths=None):
    lengths = lengths or [len(toks)]
    positions = torch.cat([torch.arange(n) for n in lengths])
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    with torch.no_grad():
        return model(toks, positions, cu, max(lengths))


def hf_logits(model, toks, positions=None):
    kwargs = {"position_ids": positions[None]} if positions is not None else {}
    with torch.no_grad():
        return model(toks[None], use_cache=False, **kwargs).logits[0]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("window", [WINDOW, None])
def test_logits_match_transformers(tmp_path, attn, window):
    hf_model = save_hf_model(tmp_path, window=window, attn=attn)
    model = load_mft(tmp_path)
    assert model.args.sliding_window == window and model.args.rope_theta == 5000.0
    toks = tokens()
    diff = (mft_logits(model, toks) - hf_logits(hf_model, toks)).abs().max().item()
    assert diff <= 1e-4, diff


@pytest.mark.parametrize("wrong", [WINDOW - 1, WINDOW + 1, None])
def test_window_off_by_one_is_visible(tmp_path, wrong):
    """The comparison can tell W keys from W +- 1 keys, so the match above pins the convention."""
    hf_model = save_hf_model(tmp_path, window=WINDOW)
    toks = tokens()
    diff = (mft_logits(load_mft(tmp_path, sliding_window=wrong), toks) - hf_logits(hf_model, toks)).abs().max()
    assert diff > 1e-2


def test_transformers_window_convention_is_w_keys_including_self():
    """transformers' own mask function: query i sees keys i - W + 1 .. i, exactly our band."""
    n = 12
    q_idx, kv_idx = torch.arange(n)[:, None], torch.arange(n)[None, :]
    for window in (1, 3, 5, 12):
        theirs = sliding_window_causal_mask_function(window)(0, 0, q_idx, kv_idx)
        assert torch.equal(theirs, sliding_window_mask(n, window))
        assert theirs.sum(-1).max().item() == window  # W keys, the query itself included


def test_packed_matches_transformers_packed(tmp_path):
    """transformers detects packing from restarting position_ids; both models agree on it."""
    hf_model = save_hf_model(tmp_path, window=WINDOW)
    model = load_mft(tmp_path)
    lengths = [9, 23, 1, 7]
    toks = tokens(sum(lengths))
    positions = torch.cat([torch.arange(n) for n in lengths])
    diff = (mft_logits(model, toks, lengths) - hf_logits(hf_model, toks, positions)).abs().max().item()
    assert diff <= 1e-4, diff


def test_sharded_checkpoint(tmp_path):
    hf_model = save_hf_model(tmp_path, window=WINDOW, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (tmp_path / "model.safetensors").exists()
    toks = tokens()
    diff = (mft_logits(load_mft(tmp_path), toks) - hf_logits(hf_model, toks)).abs().max().item()
    assert diff <= 1e-4, diff


def test_tied_embeddings_share_one_parameter(tmp_path):
    hf_model = save_hf_model(tmp_path, window=WINDOW, tie=True)
    model = load_mft(tmp_path)
    assert model.args.tied_embeddings and model.output is None
    assert "output.weight" not in dict(model.named_parameters())
    toks = tokens()
    diff = (mft_logits(model, toks) - hf_logits(hf_model, toks)).abs().max().item()
    assert diff <= 1e-4, diff


def test_read_model_args_from_transformers_config(tmp_path):
    save_hf_model(tmp_path, window=WINDOW)
    assert read_model_args(tmp_path) == ModelArgs(
        dim=64, n_layers=2, head_dim=16, hidden_dim=96, n_heads=4, n_kv_heads=2, vocab_size=VOCAB,
        norm_eps=1e-5, rope_theta=5000.0, sliding_window=WINDOW,
    )
