"""mft.kernels.cross_entropy: the head + loss in chunks, against autograd through the whole logits."""

import pytest
import torch
import torch.nn.functional as F

from mft.kernels.cross_entropy import IGNORE_INDEX, chunked_cross_entropy, linear_cross_entropy


def inputs(dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(23, 16, generator=gen).to(dtype).requires_grad_()
    weight = torch.randn(50, 16, generator=gen).to(dtype).requires_grad_()
    targets = torch.randint(0, 50, (23,), generator=gen)
    targets[[3, 17]] = IGNORE_INDEX
    return hidden, weight, targets


def loss_and_grads(loss_fn, hidden, weight, targets, scale=0.37):
    hidden, weight = (t.detach().clone().requires_grad_() for t in (hidden, weight))
    loss = loss_fn(hidden, weight, targets)
    (loss * scale).backward()  # a scaled loss, as the training step divides by the token count
    return loss.detach(), hidden.grad, weight.grad


def reference(hidden, weight, targets):
    return F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")


@pytest.mark.parametrize("chunk", [1, 5, 23, 100])
def test_linear_cross_entropy_equals_autograd_in_fp32(chunk):
    args = inputs(torch.float32)
    want = loss_and_grads(reference, *args)
    got = loss_and_grads(lambda h, w, t: linear_cross_entropy(h, w, t, chunk), *args)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    assert got[1][3].abs().max() == 0 and got[1][17].abs().max() == 0  # ignored positions get nothing


def test_linear_cross_entropy_in_bf16_matches_the_checkpointed_chunks():
    args = inputs(torch.bfloat16, seed=1)
    want = loss_and_grads(lambda h, w, t: chunked_cross_entropy(h, lambda x: F.linear(x, w), t, 6), *args)
    got = loss_and_grads(lambda h, w, t: linear_cross_entropy(h, w, t, 6), *args)
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-5)  # the same fp32 sums
    for g, w in zip(got[1:], want[1:]):  # bf16 products, the scale applied in another order
        assert (g.float() - w.float()).abs().max() <= 1e-2 * w.float().abs().max()


def test_frozen_head_and_no_grad():
    hidden, weight, targets = inputs(torch.float32)
    weight = weight.detach()
    loss = linear_cross_entropy(hidden, weight, targets, 4)
    loss.backward()
    assert weight.grad is None and hidden.grad is not None
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, targets, 4), reference(hidden, weight, targets))
    with pytest.raises(ValueError, match="chunk_size"):
        linear_cross_entropy(hidden, weight, targets, 0)


def test_a_quantised_head_takes_the_checkpointed_chunks():
    from conftest import TINY
    from mft.model.transformer import Transformer
    from mft.quant.formats import QuantSpec
    from mft.quant.model import quantize_model_

    model = Transformer(TINY)
    assert model.head_weight() is model.output.weight
    quantize_model_(model, QuantSpec("int4", 32), ["output"])
    assert model.head_weight() is None
