"""A frozen linear layer whose weight is stored quantised, and the matmul that goes with it.

Storage: the QuantizedTensor parts live as persistent buffers named `weight_<part>` on the
module that owns the weight (`weight_q`, `weight_absmax` or `weight_absmax_q` /
`weight_absmax_scale` / `weight_absmax_offset` for nf4, `weight_scale` / `weight_zero` for
int4), so a quantised `layers.0.attention.wq` has `layers.0.attention.wq.weight_q` where a
dense one has `layers.0.attention.wq.weight`. LoRALinear takes the same buffers over when it
wraps a QuantizedLinear, so names do not change when adapters are applied.

Compute: `quantized_linear(x, qweight)` dequantises to x's dtype, multiplies, and drops the
dense weight; backward dequantises again and returns a gradient for x only (the base is
frozen). Nothing weight-sized is kept between forward and backward.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from mft.quant.dequant import dequantize
from mft.quant.formats import QuantizedTensor, QuantSpec, quantize

PREFIX = "weight_"


class _QuantizedMatmul(torch.autograd.Function):
    """y = x @ dequant(W).T; grad_x = grad_y @ dequant(W), recomputed; no grad for W."""

    @staticmethod
    def forward(ctx, x, spec, shape, names, *parts):
        ctx.spec, ctx.shape, ctx.names = spec, shape, names
        ctx.save_for_backward(*parts)  # the packed storage itself, not a dense copy
        weight = dequantize(QuantizedTensor(spec, shape, dict(zip(names, parts))), x.dtype)
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx, grad_out):
        grad_x = None
        if ctx.needs_input_grad[0]:
            parts = dict(zip(ctx.names, ctx.saved_tensors))
            weight = dequantize(QuantizedTensor(ctx.spec, ctx.shape, parts), grad_out.dtype)
            grad_x = grad_out.matmul(weight)
        return (grad_x, None, None, None) + (None,) * len(ctx.names)


def quantized_linear(x: torch.Tensor, qweight: QuantizedTensor) -> torch.Tensor:
    """F.linear(x, dequantize(qweight)) without keeping the dense weight for backward."""
    names = tuple(qweight.parts)
    return _QuantizedMatmul.apply(x, qweight.spec, qweight.shape, names, *(qweight.parts[n] for n in names))


def register_quantized_weight(
    module: nn.Module, spec: QuantSpec, out_features: int, in_features: int, device=None
) -> None:
    """Give `module` empty `weight_<part>` buffers for an (out, in) weight in `spec`."""
    module.quant_spec = spec
    for name, (shape, dtype) in spec.part_shapes(out_features, in_features).items():
        module.register_buffer(PREFIX + name, torch.empty(shape, dtype=dtype, device=device))


def quantized_weight_of(module: nn.Module) -> QuantizedTensor:
    """The module's quantised weight, read from its buffers (so .to(device) is always honoured)."""
    spec: QuantSpec = module.quant_spec
    names = spec.part_shapes(module.out_features, module.in_features)
    return QuantizedTensor(spec, (module.out_features, module.in_features),
                           {name: getattr(module, PREFIX + name) for name in names})


@torch.no_grad()
def load_dense_weight_(module: nn.Module, weight: torch.Tensor) -> None:
    """Quantise a dense (out, in) weight on the module's device and store it in its buffers."""
    target = quantized_weight_of(module)
    if tuple(weight.shape) != target.shape:
        raise ValueError(f"weight of shape {tuple(weight.shape)} for a layer of shape {target.shape}")
    quantized = quantize(weight.to(target.device), module.quant_spec)
    for name, tensor in quantized.parts.items():
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
    """The dense weight of a linear layer, quantised or not (LoRA updates not included)."""
    if getattr(module, "quant_spec", None) is not None:
        return dequantize(quantized_weight_of(module), dtype)
    return module.weight.detach().to(dtype)


def quantized_layers(model: nn.Module) -> dict:
    """Modules that hold a quantised weight, by name."""
    return {name: m for name, m in model.named_modules() if getattr(m, "quant_spec", None) is not None}


def replace_linears(model: nn.Module, spec: QuantSpec, targets, device: Optional[torch.device] = None) -> list:
    """Swap every nn.Linear whose attribute name is in `targets` for an empty QuantizedLinear.

    Used on a meta-built model: the dense weights are never allocated. Returns the names.
    """
    replaced = []
    for name, module in list(model.named_modules()):
        parent_name, _, leaf = name.rpartition(".")
        if leaf in targets and isinstance(module, nn.Linear):
            if module.bias is not None:
                raise ValueError(f"{name} has a bias; quantised layers are bias-free")
            layer = QuantizedLinear(module.in_features, module.out_features, spec,
                                    device=device or module.weight.device)
            setattr(model.get_submodule(parent_name) if parent_name else model, leaf, layer)
            replaced.append(name)
    return replaced
