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
from mft.model.args import ModelArgs
from mft.peft.lora import GroupedLoRALinear, LoRALayer
from mft.quant.linear import dense_weight


def _merged_weight(module: nn.Module, expert: Optional[int]) -> torch.Tensor:
    """The fp32 weight of a linear layer with its adapter merged: the whole weight, or one
    expert's (out, in) slice of a stacked one."""
    if getattr(module, "quant_spec", None) is not None:
        weight = dense_weight(module, torch.float32)
        if isinstance(module, LoRALayer):
            weight += module.delta_weight().to(weight.device)
        return weight if expert is None else weight[expert]
    weight = module.weight if expert is None else module.weight[expert]
    if module.merged:
        return weight.float()
    delta = module.delta_weight(expert) if isinstance(module, GroupedLoRALinear) else module.delta_weight()
    return weight.float() + delta


@torch.no_grad()
def merged_tensors(model: nn.Module, dtype: Optional[torch.dtype] = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(consolidated file name, dense CPU tensor in `dtype`) for every tensor of `model`, LoRA merged,
    one at a time, in the order and under the names of `consolidated.file_shapes`: a stacked
    experts' tensor comes out as one tensor per expert (`layers.{i}.feed_forward.experts.{j}.w1.weight`).

    `dtype` defaults to the embeddings' dtype. The model is left as it is (adapters unmerged).
    """
    args: ModelArgs = model.args
    dtype = dtype or model.tok_embeddings.weight.dtype
    for name, shape in consolidated.expected_shapes(args).items():
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        adapted = leaf == "weight" and (isinstance(module, LoRALayer) or getattr(module, "quant_spec", None) is not None)
        stacked = consolidated.is_stacked(name, args)
        for expert in range(shape[0]) if stacked else [None]:
            if adapted:
                tensor = _merged_weight(module, expert).to(dtype)
            else:
                param = model.get_parameter(name).detach()
                tensor = (param if expert is None else param[expert]).to(dtype)
            file_name = name if expert is None else consolidated.expert_file_name(name, expert)
            yield file_name, tensor.to("cpu").contiguous()
