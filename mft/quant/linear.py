"""A frozen linear layer whose weight is stored quantised, and the matmul that goes with it.

Storage: the QuantizedTensor parts live as persistent buffers named `weight_<part>` on the
module that owns the weight (`weight_q`, `weight_absmax` or `weight_absmax_q` /
`weight_absmax_scale` / `weight_absmax_offset` for nf4, `weight_scale` / `weight_zero` for
int4), so a quantised `layers.0.attention.wq` has `layers.0.attention.wq.weight_q` where a
dense one has `layers.0.attention.wq.weight`. LoRALinear takes the same buffers over when it
wraps a QuantizedLinear, so names do not change when adapters are applied. A module with stacked
weights (`groups` of them: mft/quant/grouped.py, a mixture of experts) has the same buffers with a
leading G; the helpers here (loading, dense_weight) handle both.

Compute: `quantized_linear(x, qweight)` dequantises to x's dtype, multiplies, and drops the
dense weight; backward dequantises again and returns a gradient for x only (the base is
frozen). Nothing weight-sized is kept between forward and backward.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from mft.quant.dequant import dequantize, dequantize_stack
from mft.quant.formats import QuantizedStack, QuantizedTensor, QuantSpec, quantize

PREFIX = "weight_"


def _quantized(parts: list[torch.Tensor], fmt: str, rows: int, cols: int, block_size: int, double_quant: bool,
               dq_block_size: int) -> QuantizedTensor:
    spec = QuantSpec(fmt, block_size, double_quant=double_quant, dq_block_size=dq_block_size)
    return QuantizedTensor(spec, (rows, cols), dict(zip(spec.part_shapes(rows, cols), parts)))


# One custom op for dequantise + matmul, and one for its backward: the dense weight lives only
# inside them, so neither autograd nor a compiled graph can keep it between forward and backward
# (AOTAutograd saves a custom dequantise op's output for backward otherwise: measured on a
# compiled 7B QLoRA step, 28.7 GiB instead of ~6).
@torch.library.custom_op("mft::quantized_matmul", mutates_args=())
def quantized_matmul(x: torch.Tensor, parts: list[torch.Tensor], fmt: str, rows: int, cols: int, block_size: int,
                     double_quant: bool, dq_block_size: int) -> torch.Tensor:
    """x @ dequant(W).T for a (rows, cols) weight stored as `parts` (QuantSpec.part_shapes order)."""
    weight = dequantize(_quantized(parts, fmt, rows, cols, block_size, double_quant, dq_block_size), x.dtype)
    return F.linear(x, weight)


@quantized_matmul.register_fake
def _(x, parts, fmt, rows, cols, block_size, double_quant, dq_block_size):
    return x.new_empty((*x.shape[:-1], rows))


@torch.library.custom_op("mft::quantized_matmul_backward", mutates_args=())
def quantized_matmul_backward(grad: torch.Tensor, parts: list[torch.Tensor], fmt: str, rows: int, cols: int,
                              block_size: int, double_quant: bool, dq_block_size: int) -> torch.Tensor:
    """grad @ dequant(W): the gradient of quantized_matmul's input, the weight dequantised again."""
    weight = dequantize(_quantized(parts, fmt, rows, cols, block_size, double_quant, dq_block_size), grad.dtype)
    return grad.matmul(weight)


@quantized_matmul_backward.register_fake
def _(grad, parts, fmt, rows, cols, block_size, double_quant, dq_block_size):
    return grad.new_empty((*grad.shape[:-1], cols))


def _save_parts(ctx, inputs, output) -> None:
    _, parts, *layout = inputs
    ctx.save_for_backward(*parts)  # the packed storage itself, not a dense copy
    ctx.layout = layout


def _grad_of_input(ctx, grad):
    parts = list(ctx.saved_tensors)  # read once: activation checkpointing allows one unpack
    grad_x = quantized_matmul_backward(grad, parts, *ctx.layout) if ctx.needs_input_grad[0] else None
    return grad_x, [None] * len(parts), *(None,) * len(ctx.layout)  # the weight is frozen


quantized_matmul.register_autograd(_grad_of_input, setup_context=_save_parts)


def quantized_linear(x: torch.Tensor, qweight: QuantizedTensor) -> torch.Tensor:
    """F.linear(x, dequantize(qweight)) without keeping the dense weight for backward."""
    spec = qweight.spec
    parts = [qweight.parts[name] for name in spec.part_shapes(*qweight.shape)]
    return quantized_matmul(x, parts, spec.format, *qweight.shape, spec.block_size, spec.double_quant,
                            spec.dq_block_size)


def register_quantized_weight(
    module: nn.Module, spec: QuantSpec, out_features: int, in_features: int, device=None,
    groups: Optional[int] = None,
) -> None:
    """Give `module` empty `weight_<part>` buffers for an (out, in) weight in `spec`, or with
    `groups` for G stacked ones (QuantizedStack: each buffer with a leading G)."""
    module.quant_spec = spec
    for name, (shape, dtype) in spec.part_shapes(out_features, in_features, groups).items():
        module.register_buffer(PREFIX + name, torch.empty(shape, dtype=dtype, device=device))


def is_stacked(module: nn.Module) -> bool:
    """Whether a quantised module holds G stacked weights (a mixture of experts' projection):
    such modules have an integer `groups`, as mft.model.moe.GroupedLinear does."""
    return getattr(module, "groups", None) is not None


def _buffers(module: nn.Module, groups: Optional[int] = None) -> dict:
    names = module.quant_spec.part_shapes(module.out_features, module.in_features, groups)
    return {name: getattr(module, PREFIX + name) for name in names}


def quantized_weight_of(module: nn.Module) -> QuantizedTensor:
    """The module's quantised weight, read from its buffers (so .to(device) is always honoured)."""
    return QuantizedTensor(module.quant_spec, (module.out_features, module.in_features), _buffers(module))


def quantized_stack_of(module: nn.Module) -> QuantizedStack:
    """quantized_weight_of for a module with stacked weights (`groups` of them)."""
    return QuantizedStack(module.quant_spec, (module.out_features, module.in_features), _buffers(module, module.groups))


@torch.no_grad()
def load_dense_weight_(module: nn.Module, weight: torch.Tensor) -> None:
    """Quantise a dense (out, in) weight, or (G, out, in) for stacked weights one (out, in) at a
    time, on the module's device and store it in its buffers."""
    if is_stacked(module):
        stack = quantized_stack_of(module)
        if tuple(weight.shape) != (stack.groups, *stack.shape):
            raise ValueError(f"weight of shape {tuple(weight.shape)} for {stack.groups} stacked weights of shape {stack.shape}")
        targets = [stack.weight(g) for g in range(stack.groups)]
    else:
        targets, weight = [quantized_weight_of(module)], weight[None]
        if tuple(weight.shape[1:]) != targets[0].shape:
            raise ValueError(f"weight of shape {tuple(weight.shape[1:])} for a layer of shape {targets[0].shape}")
    for target, dense in zip(targets, weight):
        for name, tensor in quantize(dense.to(target.device), module.quant_spec).parts.items():
            target.parts[name].copy_(tensor)


class QuantizedLinear(nn.Module):
    """A frozen, bias-free linear layer with a 4-bit weight (see the module docstring)."""

    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        register_quantized_weight(self, spec, out_features, in_features, device)

    @classmethod
    def from_dense(cls, weight: torch.Tensor, spec: QuantSpec) -> "QuantizedLinear":
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, spec, device=weight.device)
        layer.load_dense_weight(weight)
        return layer

    def quantized_weight(self) -> QuantizedTensor:
        return quantized_weight_of(self)

    def load_dense_weight(self, weight: torch.Tensor) -> None:
        load_dense_weight_(self, weight)

    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return dequantize(self.quantized_weight(), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantized_linear(x, self.quantized_weight())

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.quant_spec.describe()}"


def dense_weight(module: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense weight of a linear layer, quantised or not, (G, out, in) for stacked weights
    (LoRA updates not included)."""
    if getattr(module, "quant_spec", None) is not None:
        if is_stacked(module):
            return dequantize_stack(quantized_stack_of(module), dtype)
        return dequantize(quantized_weight_of(module), dtype)
    return module.weight.detach().to(dtype)


def quantized_layers(model: nn.Module) -> dict:
    """Modules that hold a quantised weight, by name."""
    return {name: m for name, m in model.named_modules() if getattr(m, "quant_spec", None) is not None}
