"""Which layers of a model are quantised, and how: the model-level view of mft.quant.

The build pipeline (mft/build/pipeline.py) swaps the chosen layers of a meta-built model for
empty quantised ones (packed buffers only): nn.Linear for QuantizedLinear, a mixture of experts'
stacked GroupedLinear for QuantizedGroupedLinear. A dense copy of them never exists; a loader or
the random init then quantises each tensor on the device as it arrives (a stacked one expert by
expert). `quantize_model_` instead converts an already materialised dense model in place.
"""

from dataclasses import asdict
from typing import Optional, Sequence

import torch
from torch import nn

from mft.quant.formats import QuantSpec
from mft.quant.grouped import QuantizedGroupedLinear
from mft.quant.linear import QuantizedLinear, is_stacked, quantized_layers
from mft.utils.errors import MftError

LINEAR_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")  # w1/w2/w3: a mixture of experts' too
# A mixture of experts' router (`gate`, experts x dim) is never quantised: it is tiny, and its
# logits decide which experts run, so 4-bit noise there would change the routing itself.
QUANTIZABLE = LINEAR_TARGETS + ("output",)


def check_modules(modules: Sequence[str]) -> list:
    unknown = sorted(set(modules) - set(QUANTIZABLE))
    if unknown or not modules:
        raise MftError(
            f"quant.modules: {unknown or 'empty list'} not allowed; expected a non-empty subset of {list(QUANTIZABLE)} "
            "(embeddings and norms stay in the compute dtype)."
        )
    return list(modules)


def _is_grouped_linear(module: nn.Module) -> bool:
    """A dense stack of G weights (mft.model.moe.GroupedLinear: an integer `groups` and a (G, out,
    in) `weight`), told by its attributes: this layer sits below the model's."""
    weight = getattr(module, "weight", None)
    return is_stacked(module) and isinstance(weight, torch.Tensor) and weight.dim() == 3


def _swap(model: nn.Module, targets: Sequence[str], make) -> list:
    """Replace every nn.Linear or GroupedLinear whose attribute name is in `targets` by
    make(module); returns their names."""
    replaced = []
    for name, module in list(model.named_modules()):
        parent_name, _, leaf = name.rpartition(".")
        if leaf in targets and (isinstance(module, nn.Linear) or _is_grouped_linear(module)):
            if getattr(module, "bias", None) is not None:
                raise ValueError(f"{name} has a bias; quantised layers are bias-free")
            setattr(model.get_submodule(parent_name) if parent_name else model, leaf, make(module))
            replaced.append(name)
    return replaced


def replace_linears(model: nn.Module, spec: QuantSpec, targets, device: Optional[torch.device] = None) -> list:
    """Swap the layers named in `targets` for empty quantised ones (see the module docstring).

    Used on a meta-built model: the dense weights are never allocated. Returns the names.
    """
    def empty(module: nn.Module) -> nn.Module:
        where = device or module.weight.device
        if _is_grouped_linear(module):
            return QuantizedGroupedLinear(module.groups, module.in_features, module.out_features, spec, device=where)
        return QuantizedLinear(module.in_features, module.out_features, spec, device=where)

    return _swap(model, targets, empty)


@torch.no_grad()
def quantize_model_(model: nn.Module, spec: QuantSpec, modules: Sequence[str] = LINEAR_TARGETS) -> list:
    """Replace materialised layers (nn.Linear, GroupedLinear) by quantised copies, in place; returns their names."""
    def quantised(module: nn.Module) -> nn.Module:
        layer = QuantizedGroupedLinear if _is_grouped_linear(module) else QuantizedLinear
        return layer.from_dense(module.weight.detach(), spec)

    return _swap(model, check_modules(modules), quantised)


def model_quant(model: nn.Module) -> Optional[dict]:
    """The quantisation of a model as JSON-ready facts: spec and quantised module kinds (None if dense)."""
    layers = quantized_layers(model)
    if not layers:
        return None
    specs = {m.quant_spec for m in layers.values()}
    if len(specs) > 1:
        raise ValueError(f"a model with several quantisation specs is not supported: {specs}")
    kinds = sorted({name.rsplit(".", 1)[-1] for name in layers}, key=QUANTIZABLE.index)
    return {**asdict(specs.pop()), "modules": kinds}
