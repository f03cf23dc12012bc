"""The training step: gradient accumulation and activation checkpointing change nothing numerically."""

import torch
from conftest import build, tiny_args
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    apply_activation_checkpointing,
)

from mft.data.encode import Encoded
from mft.data.packing import PackedSequence, collate, pack
from mft.model.transformer import TransformerBlock
from mft.peft.lora import LoRASettings, apply_lora, lora_modules
from mft.train.loop import accumulate_gradients

ARGS = tiny_args(dim=32, head_dim=8, hidden_dim=64, vocab_size=64, sliding_window=6)


def lora_model():
    torch.manual_seed(0)
    model = build(ARGS, device="cpu", dtype=torch.float32)
    apply_lora(model, LoRASettings(r=4, alpha=8))
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_b.normal_(std=0.1)
    return model


def sequence(seed: int, lengths=(5, 9, 4), seq_len=20) -> PackedSequence:
    g = torch.Generator().manual_seed(seed)
    docs = []
    for n in lengths:
        ids = torch.randint(1, ARGS.vocab_size, (n,), generator=g).tolist()
        mask = (torch.rand(n, generator=g) < 0.6).tolist()
        mask[-1] = True
        docs.append(Encoded(ids, mask))
    (seq,), _ = pack(docs, seq_len, pad_id=0)
    return seq


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_accumulation_equals_one_big_batch():
    seqs = [sequence(1), sequence(2, lengths=(12, 3)), sequence(3, lengths=(2, 2, 2, 7))]
    split_model, whole_model = lora_model(), lora_model()
    loss_a, tokens_a = accumulate_gradients(split_model, [collate([s]) for s in seqs], torch.device("cpu"))
    loss_b, tokens_b = accumulate_gradients(whole_model, [collate(seqs)], torch.device("cpu"))
    assert tokens_a == tokens_b
    assert abs(loss_a - loss_b) < 1e-4
    a, b = grads(split_model), grads(whole_model)
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-5)


def test_activation_checkpointing_gives_the_same_gradients():
    batch = collate([sequence(4), sequence(5)])
    plain, checkpointed = lora_model(), lora_model()
    apply_activation_checkpointing(checkpointed, check_fn=lambda m: isinstance(m, TransformerBlock))
    accumulate_gradients(plain, [batch], torch.device("cpu"))
    accumulate_gradients(checkpointed, [batch], torch.device("cpu"))
    a = grads(plain)
    b = {n.replace("._checkpoint_wrapped_module", ""): g for n, g in grads(checkpointed).items()}
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-5)


def test_chunked_head_and_loss_give_the_same_loss_and_gradients():
    """loss_chunk_tokens: head + cross-entropy 6 supervised tokens at a time, recomputed in backward,
    equal the plain path, head and embedding gradients included (full fine-tuning), also under
    activation checkpointing."""
    batch = collate([sequence(6), sequence(7, lengths=(11, 8))])
    assert int(batch.loss_mask.sum()) == 20  # chunks of 6 below: three whole ones and a partial one

    def full_model():
        torch.manual_seed(0)
        return build(ARGS, device="cpu", dtype=torch.float32)

    plain, chunked, both = full_model(), full_model(), full_model()
    apply_activation_checkpointing(both, check_fn=lambda m: isinstance(m, TransformerBlock))
    loss_a, tokens_a = accumulate_gradients(plain, [batch], torch.device("cpu"))
    loss_b, tokens_b = accumulate_gradients(chunked, [batch], torch.device("cpu"), loss_chunk=6)
    loss_c, _ = accumulate_gradients(both, [batch], torch.device("cpu"), loss_chunk=6)
    assert tokens_a == tokens_b and abs(loss_a - loss_b) < 1e-4 and abs(loss_a - loss_c) < 1e-4
    a, b = grads(plain), grads(chunked)
    c = {n.replace("._checkpoint_wrapped_module", ""): g for n, g in grads(both).items()}
    assert a.keys() == b.keys() == c.keys() and "output.weight" in a
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(c[name], a[name], atol=1e-6, rtol=1e-5)
    none = torch.zeros_like(batch.loss_mask)  # a batch without supervised tokens sums to zero
    inputs = (batch.tokens, batch.positions, batch.cu_seqlens, batch.max_seqlen)
    assert float(plain(*inputs, head_mask=none, targets=batch.targets[none])) == 0.0
