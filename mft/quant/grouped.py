"""A mixture of experts' frozen projection with its G stacked weights stored quantised.

`QuantizedGroupedLinear` is GroupedLinear (mft/model/moe.py) with a 4-bit base: its buffers are
QuantizedLinear's `weight_<part>` names, each with a leading G (a QuantizedStack: every expert
quantised on its own, nf4 double quantisation's absmax_offset included), so a quantised
`layers.0.feed_forward.w1` has `layers.0.feed_forward.w1.weight_q` (G, out, in // 2) where a dense
one has `layers.0.feed_forward.w1.weight` (G, out, in).

Compute, as for the quantised linear layer: one custom op dequantises the stack into one
(G, out, in) buffer in x's dtype and runs the grouped product (torch's grouped GEMM in bf16 on
Hopper, the per-expert loop elsewhere: mft.kernels.grouped.grouped_linear), and its backward op
dequantises again for the gradient of x. Nothing weight-sized is kept for backward, and
torch.compile sees one opaque node each (no graph break, the loop's host sync included).
"""

import torch
from torch import nn

from mft.kernels.grouped import grouped_linear
from mft.quant.dequant import dequantize_stack
from mft.quant.formats import QuantizedStack, QuantSpec
from mft.quant.linear import load_dense_weight_, quantized_stack_of, register_quantized_weight


def _stack(parts: list[torch.Tensor], fmt: str, rows: int, cols: int, block_size: int, double_quant: bool,
           dq_block_size: int) -> QuantizedStack:
    spec = QuantSpec(fmt, block_size, double_quant=double_quant, dq_block_size=dq_block_size)
    return QuantizedStack(spec, (rows, cols), dict(zip(spec.part_shapes(rows, cols), parts)))


@torch.library.custom_op("mft::quantized_grouped_mm", mutates_args=())
def quantized_grouped_mm(x: torch.Tensor, offsets: torch.Tensor, parts: list[torch.Tensor], fmt: str, rows: int,
                         cols: int, block_size: int, double_quant: bool, dq_block_size: int) -> torch.Tensor:
    """grouped_linear(x, dequant(W), offsets) for G stacked (rows, cols) weights stored as `parts`
    (QuantSpec.part_shapes order, each with a leading G): (N, cols) -> (N, rows)."""
    weight = dequantize_stack(_stack(parts, fmt, rows, cols, block_size, double_quant, dq_block_size), x.dtype)
    return grouped_linear(x.contiguous(), weight, offsets)


@quantized_grouped_mm.register_fake
def _(x, offsets, parts, fmt, rows, cols, block_size, double_quant, dq_block_size):
    return x.new_empty((x.shape[0], rows))


@torch.library.custom_op("mft::quantized_grouped_mm_backward", mutates_args=())
def quantized_grouped_mm_backward(grad: torch.Tensor, offsets: torch.Tensor, parts: list[torch.Tensor], fmt: str,
                                  rows: int, cols: int, block_size: int, double_quant: bool,
                                  dq_block_size: int) -> torch.Tensor:
    """The gradient of quantized_grouped_mm's x: row n of group g is grad[n] @ dequant(W)[g]."""
    weight = dequantize_stack(_stack(parts, fmt, rows, cols, block_size, double_quant, dq_block_size), grad.dtype)
    # torch's grouped GEMM needs dense strides; a sum's gradient arrives expanded (stride 0).
    return grouped_linear(grad.contiguous(), weight.transpose(-2, -1), offsets)


@quantized_grouped_mm_backward.register_fake
def _(grad, offsets, parts, fmt, rows, cols, block_size, double_quant, dq_block_size):
    return grad.new_empty((grad.shape[0], cols))


def _save_parts(ctx, inputs, output) -> None:
    _, offsets, parts, *layout = inputs
    ctx.save_for_backward(offsets, *parts)  # the packed storage itself, not a dense copy
    ctx.layout = layout


def _grad_of_input(ctx, grad):
    offsets, *parts = ctx.saved_tensors  # read once: activation checkpointing allows one unpack
    grad_x = quantized_grouped_mm_backward(grad, offsets, parts, *ctx.layout) if ctx.needs_input_grad[0] else None
    return grad_x, None, [None] * len(parts), *(None,) * len(ctx.layout)  # the weights are frozen


quantized_grouped_mm.register_autograd(_grad_of_input, setup_context=_save_parts)


def quantized_grouped_linear(x: torch.Tensor, offsets: torch.Tensor, stack: QuantizedStack) -> torch.Tensor:
    """grouped_linear(x, dequantize_stack(stack), offsets) without keeping the dense weights for backward."""
    spec = stack.spec
    parts = [stack.parts[name] for name in spec.part_shapes(*stack.shape)]
    return quantized_grouped_mm(x, offsets, parts, spec.format, *stack.shape, spec.block_size, spec.double_quant,
                                spec.dq_block_size)


class QuantizedGroupedLinear(nn.Module):
    """G frozen, bias-free linear layers of one shape with 4-bit stacked weights (see the module
    docstring); forward(x, offsets) as GroupedLinear's."""

    def __init__(self, groups: int, in_features: int, out_features: int, spec: QuantSpec, device=None):
        super().__init__()
        self.groups, self.in_features, self.out_features = groups, in_features, out_features
        register_quantized_weight(self, spec, out_features, in_features, device, groups=groups)

    @classmethod
    def from_dense(cls, weight: torch.Tensor, spec: QuantSpec) -> "QuantizedGroupedLinear":
        groups, out_features, in_features = weight.shape
        layer = cls(groups, in_features, out_features, spec, device=weight.device)
        layer.load_dense_weight(weight)
        return layer

    def quantized_weights(self) -> QuantizedStack:
        """The stacked weights; their parts are this module's buffers (a wrapper takes them over by name)."""
        return quantized_stack_of(self)

    def load_dense_weight(self, weight: torch.Tensor) -> None:
        load_dense_weight_(self, weight)

    def dequantize(self, dtype: torch.dtype = torch.bfloat16, groups: torch.Tensor | None = None) -> torch.Tensor:
        """(G, out, in) dense weights; `groups` (1-D indices): only those experts."""
        return dequantize_stack(self.quantized_weights(), dtype, groups)

    def forward(self, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return quantized_grouped_linear(x, offsets, self.quantized_weights())

    def forward_rows(self, x: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
        """Row n of x (N, in) times expert group[n]'s weight, dequantising only those experts (decoding)."""
        return torch.bmm(self.dequantize(x.dtype, groups=group), x[:, :, None])[:, :, 0]

    def extra_repr(self) -> str:
        return f"groups={self.groups}, in={self.in_features}, out={self.out_features}, {self.quant_spec.describe()}"
