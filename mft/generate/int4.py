"""Fast int4 decoding: mft's int4 layers on torch's built-in int4 matmul (tinygemm), inference only.

Training dequantises a whole weight per matmul (mft.quant), which at one token per step moves
more bytes than a bf16 matmul. For decoding, each int4 layer (plain, or under an unmerged LoRA
adapter) is re-packed once for torch's `_weight_int4pack_mm`, which reads the 4-bit codes
directly. The codes are mft's own: uint8 (out, in / 2), even column in the high nibble (the
layout the kernel's packing takes); mft's w = (q - zero) * scale per group becomes the kernel's
w = (q - 8) * scale + (8 - zero) * scale. Each conversion is checked against mft's dequantised
matmul before use, so a layout mismatch fails loudly instead of generating garbage.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from mft.utils.errors import MftError

log = logging.getLogger(__name__)
INNER_K_TILES = 8  # the kernel's tiling of the input dimension (2, 4 or 8); 8 is the fastest


def _kernel(device: torch.device) -> Optional[tuple]:
    """(pack, matmul, packs_unpacked_int32) for the device, or None when torch has none."""
    if device.type == "cuda" and hasattr(torch, "_weight_int4pack_mm"):
        return torch._convert_weight_to_int4pack, torch._weight_int4pack_mm, False
    if device.type == "cpu" and hasattr(torch, "_weight_int4pack_mm_for_cpu"):
        return torch._convert_weight_to_int4pack_for_cpu, torch._weight_int4pack_mm_for_cpu, True
    return None


class Int4Linear(nn.Module):
    """y = x W^T with W int4 group-wise, on torch's int4 kernel; bf16 in, the input's dtype out."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int):
        super().__init__()
        pack, self._mm, unpacked = _kernel(q.device)
        self.out_features, self.in_features = q.shape[0], q.shape[1] * 2
        self.group_size = group_size
        codes = q
        if unpacked:  # the CPU kernel takes one int32 code per element
            codes = torch.stack([q >> 4, q & 15], dim=-1).reshape(self.out_features, self.in_features).to(torch.int32)
        self.register_buffer("packed", pack(codes.contiguous(), INNER_K_TILES if not unpacked else 2))
        scale32, zero32 = scale.float(), zero.float()
        scales_and_zeros = torch.stack([scale32, (8 - zero32) * scale32], dim=-1)  # (out, groups, 2)
        self.register_buffer("scales_and_zeros", scales_and_zeros.transpose(0, 1).contiguous().to(torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        out = self._mm(flat, self.packed, self.group_size, self.scales_and_zeros)
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


class Int4LoRALinear(nn.Module):
    """An unmerged LoRA adapter over an Int4Linear: base(x) + scale * B A x."""

    def __init__(self, base: Int4Linear, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float):
        super().__init__()
        self.base = base
        self.register_buffer("lora_a", lora_a.detach())
        self.register_buffer("lora_b", lora_b.detach())
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(x, self.lora_a.to(x.dtype)), self.lora_b.to(x.dtype))
        return self.base(x) + update * self.scale


def _int4_parts(module: nn.Module):
    """(QuantizedTensor) of an int4 layer (QuantizedLinear or LoRALinear over one), else None; a
    mixture of experts' stacked int4 weights keep the dequantising grouped product."""
    if getattr(module, "quant_spec", None) is None or module.quant_spec.format != "int4":
        return None
    from mft.quant.linear import is_stacked, quantized_weight_of

    return None if is_stacked(module) else quantized_weight_of(module)


@torch.no_grad()
def _check(layer: nn.Module, qweight, name: str) -> None:
    """The converted layer against mft's dequantised weight, on random inputs."""
    from mft.quant.formats import dequantize

    x = torch.randn(4, layer.in_features, device=layer.packed.device, dtype=torch.bfloat16)
    reference = x.float() @ dequantize(qweight, torch.float32).T
    error = (layer(x).float() - reference).abs().max().item()
    tolerance = 0.02 * reference.abs().max().item() + 1e-3  # bf16 accumulation
    if not error <= tolerance:
        raise MftError(f"{name}: torch's int4 kernel disagrees with mft's int4 weights ({error:.3g} > {tolerance:.3g}); "
                       "this torch's int4 layout is not supported.")


@torch.no_grad()
def use_int4_kernels(model: nn.Module) -> list[str]:
    """Swap every int4 layer of an inference model for the kernel path; returns their names.

    A no-op (empty list) when the model has no int4 layers or torch has no int4 kernel for the
    device. Not for training: the new layers keep no gradients and no dequantisable weight.
    """
    from mft.peft.lora import LoRALinear

    replaced = []
    for name, module in list(model.named_modules()):
        qweight = _int4_parts(module)
        if qweight is None:
            continue
        q = qweight.parts["q"]
        if _kernel(q.device) is None:
            return replaced
        base = Int4Linear(q, qweight.parts["scale"], qweight.parts["zero"], qweight.spec.block_size)
        _check(base, qweight, name)
        new = base
        if isinstance(module, LoRALinear):
            if module.merged:
                raise MftError(f"{name}: a merged adapter on an int4 layer cannot be converted.")
            new = Int4LoRALinear(base, module.lora_a, module.lora_b, module.scale)
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, leaf, new)
        replaced.append(name)
    if replaced:
        log.info("int4 decoding: %d layers on torch's int4 matmul", len(replaced))
    return replaced
