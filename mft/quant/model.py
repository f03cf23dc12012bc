"""Build a Transformer whose linear layers are quantised, without ever materialising them dense.

The model is constructed on the meta device, the targeted nn.Linear layers are swapped for
QuantizedLinear (packed buffers only), and to_empty() allocates everything once on the target
device: quantised storage for those layers, `dtype` for embeddings, norms and the head. The
weights then come from a loader (mft.checkpoint.load.load_weights quantises each tensor as it
streams in) or from `init_weights_`, which draws each dense weight on the device one at a
time and quantises it.
"""

from dataclasses import asdict
from typing import Optional, Sequence

import torch
from torch import nn

from mft.errors import MftError
from mft.model.args import ModelArgs
from mft.model.transformer import RMSNorm, Transformer
from mft.quant.formats import QuantSpec
from mft.quant.linear import QuantizedLinear, load_dense_weight_, quantized_layers, replace_linears

LINEAR_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
QUANTIZABLE = LINEAR_TARGETS + ("output",)


def quant_spec_from_config(qcfg) -> Optional[QuantSpec]:
    """QuantSpec of a `quant` config group (None for format none); bad values are MftErrors."""
    if qcfg is None or qcfg.format == "none":
        return None
    return QuantSpec(
        format=qcfg.format,
        block_size=qcfg.block_size,
        double_quant=bool(qcfg.double_quant),
        dq_block_size=qcfg.double_quant_block_size,
    )


def check_modules(modules: Sequence[str]) -> list:
    unknown = sorted(set(modules) - set(QUANTIZABLE))
    if unknown or not modules:
        raise MftError(
            f"quant.modules: {unknown or 'empty list'} not allowed; expected a non-empty subset of {list(QUANTIZABLE)} "
            "(embeddings and norms stay in the compute dtype)."
        )
    return list(modules)


def build_quantized_model(
    args: ModelArgs,
    spec: QuantSpec,
    *,
    device: torch.device | str,
    dtype: torch.dtype,
    modules: Optional[Sequence[str]] = None,
    attn_backend: str = "auto",
    init: bool = True,
) -> Transformer:
    """A Transformer with `modules` (default: every block linear) quantised in `spec`, the rest in `dtype`."""
    modules = check_modules(LINEAR_TARGETS if modules is None else modules)
    with torch.device("meta"):
        model = Transformer(args, attn_backend=attn_backend)
    model.to(dtype=dtype)  # free on meta; quantised buffers are created afterwards, in their own dtypes
    replace_linears(model, spec, modules, device=torch.device("meta"))
    if torch.device(device).type != "meta":
        model.to_empty(device=device)
        if init:
            init_weights_(model, dtype)
    return model


@torch.no_grad()
def init_weights_(model: Transformer, dtype: torch.dtype, std: float = 0.02) -> None:
    """Transformer.init_weights for a partly quantised model: same draws, in the same order.

    A quantised layer's dense weight is drawn in `dtype` on the device (one layer at a time)
    and quantised, so with the same seed the model equals quantize(dense random model).
    """
    head_std = model.args.dim**-0.5
    for module in model.modules():
        module_std = head_std if module is model.output else std
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=module_std)
        elif isinstance(module, QuantizedLinear):
            weight = torch.empty(module.out_features, module.in_features, dtype=dtype, device=module.weight_q.device)
            load_dense_weight_(module, nn.init.normal_(weight, mean=0.0, std=module_std))
        elif isinstance(module, RMSNorm):
            module.reset_parameters()


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
