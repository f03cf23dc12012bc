"""mft.kernels.cross_entropy: the head + loss in chunks, against autograd through the whole logits."""

import pytest
import torch
import torch.nn.functional as F

from mft.kernels.cross_entropy import IGNORE_INDEX, chunked_cross_entropy, linear_cross_entropy


def inputs(dtype: torch.dtype, seed: int = 0):
    """hidden (23, 16), a frozen head (50, 16) and targets, two of them ignored."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(23, 16, generator=gen).to(dtype)
    weight = torch.randn(50, 16, generator=gen).to(dtype)
    targets = torch.randint(0, 50, (23,), generator=gen)
    targets[[3, 17]] = IGNORE_INDEX
    return hidden, weight, targets


def loss_and_grad(loss_fn, hidden, weight, targets, scale=0.37):
    hidden = hidden.clone().requires_grad_()
    loss = loss_fn(hidden, weight, targets)
    (loss * scale).backward()  # a scaled loss, as the training step divides by the token count
    return loss.detach(), hidden.grad


def reference(hidden, weight, targets):
    return F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")


@pytest.mark.parametrize("chunk", [1, 5, 23, 100])
def test_linear_cross_entropy_equals_autograd_in_fp32(chunk):
    args = inputs(torch.float32)
    (loss, grad), (want_loss, want_grad) = (loss_and_grad(fn, *args) for fn in (
        lambda h, w, t: linear_cross_entropy(h, w, t, chunk), reference))
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-6)
    assert grad[3].abs().max() == 0 and grad[17].abs().max() == 0  # ignored positions get nothing


def test_linear_cross_entropy_in_bf16_matches_the_checkpointed_chunks():
    args = inputs(torch.bfloat16, seed=1)
    want_loss, want_grad = loss_and_grad(lambda h, w, t: chunked_cross_entropy(h, lambda x: F.linear(x, w), t, 6), *args)
    loss, grad = loss_and_grad(lambda h, w, t: linear_cross_entropy(h, w, t, 6), *args)
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=1e-5)  # the same fp32 sums
    # bf16 products, the scale applied in another order
    assert (grad.float() - want_grad.float()).abs().max() <= 1e-2 * want_grad.float().abs().max()


def test_no_grad_and_a_head_that_trains():
    hidden, weight, targets = inputs(torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, targets, 4), reference(hidden, weight, targets))
        linear_cross_entropy(hidden, weight.requires_grad_(), targets, 4)  # nothing trains under no_grad
    with pytest.raises(ValueError, match="frozen head"):
        linear_cross_entropy(hidden, weight, targets, 4)
    with pytest.raises(ValueError, match="chunk_size"):
        linear_cross_entropy(hidden, weight.detach(), targets, 0)


def test_the_model_takes_it_for_a_frozen_plain_head_only():
    from conftest import TINY, tiny_args
    from mft.model.transformer import Transformer
    from mft.quant.formats import QuantSpec
    from mft.quant.model import quantize_model_

    model = Transformer(TINY)
    assert model.frozen_head_weight() is None  # full fine-tuning: the head trains
    model.output.weight.requires_grad_(False)
    assert model.frozen_head_weight() is model.output.weight
    tied = Transformer(tiny_args(tied_embeddings=True)).requires_grad_(False)
    assert tied.frozen_head_weight() is tied.tok_embeddings.weight
    quantize_model_(model, QuantSpec("int4", 32), ["output"])
    assert model.frozen_head_weight() is None


def test_no_gradient_is_made_without_grad_mode():
    hidden, weight, targets = inputs(torch.float32)
    hidden.requires_grad_()
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, targets, 4)
    assert loss.grad_fn is None
    saved = linear_cross_entropy(hidden, weight, targets, 4).grad_fn.saved_tensors
    assert len(saved) == 1 and saved[0].shape == hidden.shape  # with grad mode: d hidden, kept
