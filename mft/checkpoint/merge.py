"""Merge LoRA adapters into their base: the dense tensors of a model, adapters included.

The merged weight of an adapted layer is W + scale * B @ A computed in fp32 and rounded once
into the output dtype; a quantised base is dequantised to fp32 first (so an adapter trained
with QLoRA merges into the dequantised weights it was trained against). mft/checkpoint/export.py
writes the result (Hugging Face or Mistral consolidated folders); `mft-export` (mft/cli/export.py)
drives it.
"""

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
