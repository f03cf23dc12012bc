"""Merge LoRA adapters into their base: the dense tensors of a model, adapters included.

The merged weight of an adapted layer is W + scale * B @ A computed in fp32 and rounded once
into the output dtype; a quantised base is dequantised to fp32 first (so an adapter trained
with QLoRA merges into the dequantised weights it was trained against). mft/checkpoint/export.py
writes the result (Hugging Face or Mistral consolidated folders); tools/merge_lora.py and
tools/export.py drive it.
"""

import os
from typing import Iterator, Optional

import torch
from torch import nn

from mft.checkpoint import consolidated
from mft.model.args import ModelArgs
from mft.peft.lora import LoRALinear
from mft.quant.linear import dense_weight


@torch.no_grad()
def merged_tensors(model: nn.Module, dtype: Optional[torch.dtype] = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(consolidated name, dense CPU tensor in `dtype`) for every tensor of `model`, LoRA merged, one at a time.

    `dtype` defaults to the embeddings' dtype. The model is left as it is (adapters unmerged).
    """
    args: ModelArgs = model.args
    dtype = dtype or model.tok_embeddings.weight.dtype
    for name in consolidated.expected_shapes(args):
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        quantised = getattr(module, "quant_spec", None) is not None
        if leaf == "weight" and quantised:
            weight = dense_weight(module, torch.float32)
            if isinstance(module, LoRALinear):
                weight += module.delta_weight().to(weight.device)
            tensor = weight.to(dtype)
        elif leaf == "weight" and isinstance(module, LoRALinear):
            tensor = (module.weight.float() + (0 if module.merged else module.delta_weight())).to(dtype)
        else:
            tensor = model.get_parameter(name).detach().to(dtype)
        yield name, tensor.to("cpu").contiguous()


def adapted_model(
    adapter: str | os.PathLike, base: str | os.PathLike | None = None, *, device: str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
) -> nn.Module:
    """The base an adapter folder names (or `base`) with the adapter loaded as LoRA layers, unmerged.

    A quantised base (mft's quantised checkpoint) is built quantised, no dense pass; merged_tensors
    then dequantises each layer to fp32 only while it is merged.
    """
    from mft.checkpoint.adapter import load_adapter, read_adapter_config
    from mft.checkpoint.load import detect_format, load_weights, read_model_args
    from mft.checkpoint.quantized import read_quant_config
    from mft.errors import MftError
    from mft.model.build import build_model
    from mft.quant.model import build_quantized_model

    if base is None:
        base = (read_adapter_config(adapter).get("base_model") or {}).get("checkpoint")
        if not base:
            raise MftError(f"{adapter}: adapter_config.json names no base checkpoint; pass the base folder.")
    args = read_model_args(base)
    if detect_format(base) == "quantized":
        spec, modules, _ = read_quant_config(base)
        model = build_quantized_model(args, spec, device=device, dtype=dtype, modules=modules, init=False)
    else:
        model = build_model(args, device=device, dtype=dtype, init=False)
    load_weights(model, base)
    load_adapter(model, adapter, args)
    return model
