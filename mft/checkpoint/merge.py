"""Merge LoRA adapters into their base and write the result as a plain dense checkpoint.

The merged weight of an adapted layer is W + scale * B @ A computed in fp32 and rounded once
into the output dtype; a quantised base is dequantised to fp32 first (so an adapter trained
with QLoRA merges into the dequantised weights it was trained against). The result is written
as a Hugging Face folder (config.json + model.safetensors, q/k in HF's rotary layout), which
both transformers and mft load, or as a Mistral consolidated folder.
"""

import json
import os
from pathlib import Path
from typing import Dict

import torch
from safetensors.torch import save_file
from torch import nn

from mft.checkpoint import consolidated, hf
from mft.checkpoint.atomic import atomic_dir
from mft.checkpoint.export import hf_config
from mft.model.args import ModelArgs
from mft.peft.lora import LoRALinear
from mft.quant.linear import dense_weight

HF_WEIGHTS = "model.safetensors"


@torch.no_grad()
def merged_state_dict(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> Dict[str, torch.Tensor]:
    """Every consolidated tensor of `model`, dense, with LoRA merged, in `dtype` on the CPU.

    A dense LoRALinear is merged in place (its weight then already holds the update), so a
    dense 7B base is not copied a second time when model and output share device and dtype.
    """
    args: ModelArgs = model.args
    state = {}
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
            if module.weight.dtype == dtype:
                module.merge()  # (W.float() + delta) rounded once, in place
                tensor = module.weight.detach()
            else:
                tensor = (module.weight.float() + (0 if module.merged else module.delta_weight())).to(dtype)
        else:
            tensor = model.get_parameter(name).detach().to(dtype)
        state[name] = tensor.to("cpu").contiguous()
    return state


def save_hf_folder(state: Dict[str, torch.Tensor], args: ModelArgs, folder: str | os.PathLike) -> Path:
    """Write consolidated-named tensors as an HF folder (names mapped, q/k rotary-permuted), atomically."""
    tensors = {}
    for name, tensor in state.items():
        if name.endswith("attention.wq.weight"):
            tensor = hf.permute_rotary(tensor, args.n_heads)
        elif name.endswith("attention.wk.weight"):
            tensor = hf.permute_rotary(tensor, args.n_kv_heads)
        tensors[hf.mft_to_hf_name(name)] = tensor.contiguous()
    dtype = next(iter(state.values())).dtype
    with atomic_dir(folder) as tmp:
        (tmp / "config.json").write_text(json.dumps(hf_config(args, dtype), indent=2) + "\n")
        save_file(tensors, str(tmp / HF_WEIGHTS), metadata={"format": "pt"})
    return Path(folder)


def merge_adapter(
    adapter: str | os.PathLike, base: str | os.PathLike | None = None, *, device: str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
) -> tuple[Dict[str, torch.Tensor], ModelArgs]:
    """(merged state dict, args) of an adapter folder on its base (default: the base it names).

    A quantised base (mft's quantised checkpoint) is built quantised, no dense pass, and each
    layer is dequantised to fp32 only while it is merged.
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
    return merged_state_dict(model, dtype), args
