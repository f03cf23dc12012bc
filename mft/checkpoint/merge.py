"""Merge LoRA adapters into their base: the dense tensors of a model, adapters included.

The merged weight of an adapted layer is W + scale * B @ A computed in fp32 and rounded once
into the output dtype; a quantised base is dequantised to fp32 first (so an adapter trained
with QLoRA merges into the dequantised weights it was trained against). A mixture of experts'
stacked projections are merged and given out one expert at a time, under the files' per-expert
names. mft/checkpoint/export.py writes the result (Hugging Face or Mistral consolidated folders);
`mft-export` (mft/cli/export.py) drives it.
"""

from typing import Iterator, Optional

import torch
from torch import nn

from mft.checkpoint import consolidated
from mft.peft.lora import GroupedLoRALinear, LoRALayer
from mft.quant.dequant import dequantize_stack
from mft.quant.linear import dense_weight, quantized_stack_of


def _merged_weight(module: nn.Module, expert: Optional[int]) -> torch.Tensor:
    """The fp32 weight of a linear layer with its adapter merged: the whole weight, or one
    expert's (out, in) slice of a stacked one."""
    if getattr(module, "quant_spec", None) is not None:
        if expert is None:
            weight = dense_weight(module, torch.float32)
            return weight + module.delta_weight().to(weight.device) if isinstance(module, LoRALayer) else weight
        # One expert of a 4-bit stack: only its weights dequantised, only its delta formed.
        weight = dequantize_stack(quantized_stack_of(module), torch.float32,
                                  groups=torch.tensor([expert], device=module.weight_q.device))[0]
        return weight + module.delta_weight(expert).to(weight.device) if isinstance(module, LoRALayer) else weight
    weight = module.weight if expert is None else module.weight[expert]
    if module.merged:
        return weight.float()
    delta = module.delta_weight(expert) if isinstance(module, GroupedLoRALinear) else module.delta_weight()
    return weight.float() + delta


@torch.no_grad()
def merged_tensor(model: nn.Module, file_name: str, dtype: torch.dtype) -> torch.Tensor:
    """The dense CPU tensor in `dtype` of the consolidated file's `file_name` (one expert's slice of
    a stacked projection: `layers.{i}.feed_forward.experts.{j}.w1.weight`), LoRA merged."""
    name, expert = consolidated.expert_of(file_name)
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if leaf == "weight" and (isinstance(module, LoRALayer) or getattr(module, "quant_spec", None) is not None):
        tensor = _merged_weight(module, expert).to(dtype)
    else:
        param = model.get_parameter(name).detach()
        tensor = (param if expert is None else param[expert]).to(dtype)
    return tensor.to("cpu").contiguous()


def merged_tensors(model: nn.Module, dtype: Optional[torch.dtype] = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(consolidated file name, merged_tensor) for every tensor of `model`, one at a time, in the
    order and under the names of `consolidated.file_shapes`. `dtype` defaults to the embeddings'
    dtype. The model is left as it is (adapters unmerged)."""
    dtype = dtype or model.tok_embeddings.weight.dtype
    for file_name in consolidated.file_shapes(model.args):
        yield file_name, merged_tensor(model, file_name, dtype)
