"""Fast int4 decoding: mft's int4 layers on torch's built-in int4 matmul (tinygemm), inference only.

Training dequantises a whole weight per matmul (mft.quant), which at one token per step moves
more bytes than a bf16 matmul. For decoding, each int4 layer (plain, or under an unmerged LoRA
adapter) is re-packed once for torch's `_weight_int4pack_mm`, which reads the 4-bit codes
directly. The codes are mft's own: uint8 (out, in / 2), even column in the high nibble (the
layout the kernel's packing takes); mft's w = (q - zero) * scale per group becomes the kernel's
w = (q - 8) * scale + (8 - zero) * scale. Each conversion is checked against mft's dequantised
matmul before use, so a layout mismatch fails loudly instead of generating garbage.

Mixtral's experts (an int4 stack: every `weight_<part>` buffer with a leading expert dim) become
one Int4GroupedLinear: each expert packed on its own, the packs stacked. It computes only the
experts that tokens chose: per non-empty expert for many tokens (a host sync reads the counts),
and at decoding (forward_rows, see mft/model/moe.py) the chosen experts' packs are gathered, with
no host sync, so the compiled decode step stays one graph. Experts under a LoRA adapter keep
mft.quant's dequantising path (logged): no int4 kernel path for them yet.
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


def _pack(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, unpacked: bool, pack) -> tuple:
    """(packed codes, scales_and_zeros) of one (out, in) int4 weight in mft's layout, for the kernel."""
    out_features, in_features = q.shape[0], q.shape[1] * 2
    codes = q
    if unpacked:  # the CPU kernel takes one int32 code per element
        codes = torch.stack([q >> 4, q & 15], dim=-1).reshape(out_features, in_features).to(torch.int32)
    packed = pack(codes.contiguous(), INNER_K_TILES if not unpacked else 2)
    scale32, zero32 = scale.float(), zero.float()
    scales_and_zeros = torch.stack([scale32, (8 - zero32) * scale32], dim=-1)  # (out, groups, 2)
    return packed, scales_and_zeros.transpose(0, 1).contiguous().to(torch.bfloat16)


class Int4Linear(nn.Module):
    """y = x W^T with W int4 group-wise, on torch's int4 kernel; bf16 in, the input's dtype out."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int):
        super().__init__()
        pack, self._mm, unpacked = _kernel(q.device)
        self.out_features, self.in_features = q.shape[0], q.shape[1] * 2
        self.group_size = group_size
        packed, scales_and_zeros = _pack(q, scale, zero, unpacked, pack)
        self.register_buffer("packed", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        out = self._mm(flat, self.packed, self.group_size, self.scales_and_zeros)
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


class Int4GroupedLinear(nn.Module):
    """G int4 layers of one shape (the experts of a projection) on torch's int4 kernel, called as
    GroupedLinear is: forward(x, offsets) and forward_rows(x, group); only chosen groups run."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int):
        super().__init__()
        pack, self._mm, unpacked = _kernel(q.device)
        self.groups, self.out_features, self.in_features = q.shape[0], q.shape[1], q.shape[2] * 2
        self.group_size = group_size
        packs = [_pack(q[g], scale[g], zero[g], unpacked, pack) for g in range(self.groups)]
        self.register_buffer("packed", torch.stack([p for p, _ in packs]))
        self.register_buffer("scales_and_zeros", torch.stack([sz for _, sz in packs]))

    def product(self, x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor) -> torch.Tensor:
        """x (N, in) times one group's weight, given as its pack and constants."""
        return self._mm(x.to(torch.bfloat16), packed, self.group_size, scales_and_zeros).to(x.dtype)

    def forward(self, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        ends = offsets.tolist()
        out = x.new_empty((x.shape[0], self.out_features))
        for g, (start, end) in enumerate(zip([0] + ends[:-1], ends)):
            if end > start:
                out[start:end] = self.product(x[start:end], self.packed[g], self.scales_and_zeros[g])
        return out

    def forward_rows(self, x: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
        packed, scales_and_zeros = self.packed[group], self.scales_and_zeros[group]
        return torch.cat([self.product(x[n:n + 1], packed[n], scales_and_zeros[n]) for n in range(x.shape[0])])

    def extra_repr(self) -> str:
        return f"groups={self.groups}, in={self.in_features}, out={self.out_features}, int4 g{self.group_size}"


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


def _is_int4(module: nn.Module) -> bool:
    """Whether the module holds an int4 weight (QuantizedLinear, an expert stack, or LoRA over one)."""
    return getattr(module, "quant_spec", None) is not None and module.quant_spec.format == "int4"


@torch.no_grad()
def _check(matmul, qweight, name: str) -> None:
    """A converted weight's product (`matmul`: x -> x W^T) against mft's dequantised weight, on random inputs."""
    from mft.quant.formats import dequantize

    x = torch.randn(4, qweight.shape[1], device=qweight.parts["q"].device, dtype=torch.bfloat16)
    reference = x.float() @ dequantize(qweight, torch.float32).T
    error = (matmul(x).float() - reference).abs().max().item()
    tolerance = 0.02 * reference.abs().max().item() + 1e-3  # bf16 accumulation
    if not error <= tolerance:
        raise MftError(f"{name}: torch's int4 kernel disagrees with mft's int4 weights ({error:.3g} > {tolerance:.3g}); "
                       "this torch's int4 layout is not supported.")


def _int4_experts(module: nn.Module, name: str) -> Optional[Int4GroupedLinear]:
    """The kernel layer of an int4 expert stack (buffers weight_q, weight_scale, weight_zero with a
    leading expert dim), each expert checked; None (logged) under a LoRA adapter."""
    from mft.quant.formats import QuantizedTensor

    if hasattr(module, "lora_a"):
        log.info("%s: int4 experts under a LoRA adapter stay on mft.quant's dequantising path "
                 "(a decoding step dequantises the chosen experts; no int4 kernel path for adapted experts yet).", name)
        return None
    q, scale, zero = module.weight_q, module.weight_scale, module.weight_zero
    layer = Int4GroupedLinear(q, scale, zero, module.quant_spec.block_size)
    for g in range(layer.groups):
        expert = QuantizedTensor(module.quant_spec, (layer.out_features, layer.in_features),
                                 {"q": q[g], "scale": scale[g], "zero": zero[g]})
        _check(lambda x, g=g: layer.product(x, layer.packed[g], layer.scales_and_zeros[g]), expert, f"{name} expert {g}")
    return layer


@torch.no_grad()
def use_int4_kernels(model: nn.Module) -> list[str]:
    """Swap every int4 layer of an inference model for the kernel path; returns their names.

    A no-op (empty list) when the model has no int4 layers or torch has no int4 kernel for the
    device. Expert stacks become Int4GroupedLinear (one per projection). Not for training: the
    new layers keep no gradients and no dequantisable weight.
    """
    replaced = []
    for name, module in list(model.named_modules()):
        if not _is_int4(module):
            continue
        if _kernel(module.weight_q.device) is None:
            return replaced
        if module.weight_q.dim() == 3:  # an expert stack
            new = _int4_experts(module, name)
            if new is None:
                continue
        else:
            new = _int4_linear(module, name)
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, leaf, new)
        replaced.append(name)
    if replaced:
        log.info("int4 decoding: %d layers on torch's int4 matmul", len(replaced))
    return replaced


def _int4_linear(module: nn.Module, name: str) -> nn.Module:
    """The kernel layer of a 2-D int4 layer (QuantizedLinear, or LoRALinear over one), checked."""
    from mft.peft.lora import LoRALinear
    from mft.quant.linear import quantized_weight_of

    qweight = quantized_weight_of(module)
    base = Int4Linear(qweight.parts["q"], qweight.parts["scale"], qweight.parts["zero"], qweight.spec.block_size)
    _check(base, qweight, name)
    if not isinstance(module, LoRALinear):
        return base
    if module.merged:
        raise MftError(f"{name}: a merged adapter on an int4 layer cannot be converted.")
    return Int4LoRALinear(base, module.lora_a, module.lora_b, module.scale)
