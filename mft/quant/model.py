"""Which layers of a model are quantised, and how: the model-level view of mft.quant.

The build pipeline (mft/build/pipeline.py) swaps the chosen nn.Linear layers of a meta-built
model for empty QuantizedLinear layers (packed buffers only), so a dense copy of them never
exists; a loader or the random init then quantises each tensor on the device as it arrives.
`quantize_model_` instead converts an already materialised dense model in place.
"""

from dataclasses import asdict
from typing import Optional, Sequence

import torch
from torch import nn

from mft.quant.formats import QuantSpec
from mft.quant.linear import QuantizedLinear, quantized_layers
from mft.utils.errors import MftError

LINEAR_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
QUANTIZABLE = LINEAR_TARGETS + ("output",)


def check_modules(modules: Sequence[str]) -> list:
    unknown = sorted(set(modules) - set(QUANTIZABLE))
    if unknown or not modules:
        raise MftError(
            f"quant.modules: {unknown or 'empty list'} not allowed; expected a non-empty subset of {list(QUANTIZABLE)} "
            "(embeddings and norms stay in the compute dtype)."
        )
    return list(modules)


@torch.no_grad()
def quantize_model_(model: nn.Module, spec: QuantSpec, modules: Sequence[str] = LINEAR_TARGETS) -> list:
    """Replace materialised nn.Linear layers by quantised copies, in place; returns their names."""
    modules = check_modules(modules)
    replaced = []
    for name, module in list(model.named_modules()):
        parent_name, _, leaf = name.rpartition(".")
        if leaf in modules and isinstance(module, nn.Linear):
            setattr(model.get_submodule(parent_name) if parent_name else model, leaf,
                    QuantizedLinear.from_dense(module.weight.detach(), spec))
            replaced.append(name)
    return replaced


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
