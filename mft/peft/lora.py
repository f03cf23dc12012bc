"""LoRA: a frozen linear layer plus a trainable low-rank update, y = W x + (alpha/r) B A dropout(x).

`LoRALinear` keeps the base weight under the name `weight`, so a model's state dict keeps
the Mistral parameter names whether or not adapters are applied; the adapter adds
`<module>.lora_a` (r, in) and `<module>.lora_b` (out, r). On a quantised base (QLoRA) it
takes over the QuantizedLinear's `weight_<part>` buffers under the same names instead of
`weight` (mft/quant/linear.py); everything else, the adapter files included, is identical.
"""

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from mft.model.names import canonical_name
from mft.quant.linear import (
    QuantizedLinear,
    quantized_linear,
    quantized_weight_of,
    register_quantized_weight,
)
from mft.utils.dtensor import copy_full_, full_tensor
from mft.utils.errors import MftError

LORA_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


@dataclass
class LoRASettings:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: List[str] = field(default_factory=lambda: list(LORA_TARGETS))

    @property
    def scale(self) -> float:
        return self.alpha / self.r


@torch.no_grad()
def init_lora_factors_(a: torch.Tensor, b: torch.Tensor, generator: Optional[torch.Generator] = None) -> None:
    """A as nn.Linear initialises its weight (the LoRA paper's reference code), B zero."""
    nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
    nn.init.zeros_(b)


class LoRALinear(nn.Module):
    """A bias-free linear layer whose frozen `weight` is adapted by `lora_b @ lora_a`.

    A starts kaiming-uniform and B at zero, so the layer equals its base at init. The LoRA
    parameters keep their own dtype (fp32 by default) and are cast to the input's dtype in
    forward, so a bf16 base still gets fp32 adapter weights and optimizer states.
    """

    def __init__(
        self, weight: nn.Parameter | QuantizedLinear, settings: LoRASettings, lora_dtype: torch.dtype = torch.float32
    ):
        super().__init__()
        self.quant_spec = None
        if isinstance(weight, QuantizedLinear):  # QLoRA: share the packed buffers, same names
            self.out_features, self.in_features = weight.out_features, weight.in_features
            register_quantized_weight(self, weight.quant_spec, self.out_features, self.in_features, device="meta")
            for name, tensor in quantized_weight_of(weight).parts.items():
                setattr(self, "weight_" + name, tensor)
            device = weight.weight_q.device
        else:
            self.out_features, self.in_features = weight.shape
            self.weight = weight
            self.weight.requires_grad_(False)
            device = weight.device
        self.r = settings.r
        self.scale = settings.scale
        self.dropout = nn.Dropout(settings.dropout) if settings.dropout > 0 else nn.Identity()
        self.lora_a = nn.Parameter(torch.empty(self.r, self.in_features, device=device, dtype=lora_dtype))
        self.lora_b = nn.Parameter(torch.empty(self.out_features, self.r, device=device, dtype=lora_dtype))
        self.merged = False
        self.reset_lora_parameters()

    @torch.no_grad()
    def reset_lora_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        """Drawn whole on the CPU, then copied (a sharded factor keeps its own rows): the factors
        are the same on every device and under any number of ranks."""
        if self.lora_a.is_meta:
            return
        a, b = torch.empty(self.lora_a.shape), torch.empty(self.lora_b.shape)
        init_lora_factors_(a, b, generator)
        copy_full_(self.lora_a, a)
        copy_full_(self.lora_b, b)

    def base_linear(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen base: a plain matmul, or dequantise + matmul (dense weight not kept for backward)."""
        if self.quant_spec is not None:
            return quantized_linear(x, quantized_weight_of(self))
        return F.linear(x, self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_linear(x)
        if self.merged:
            return out
        a, b = self.lora_a.to(x.dtype), self.lora_b.to(x.dtype)
        return out + F.linear(F.linear(self.dropout(x), a), b) * self.scale

    def delta_weight(self) -> torch.Tensor:
        """scale * B @ A in fp32."""
        return (self.lora_b.float() @ self.lora_a.float()) * self.scale

    def _check_mergeable(self) -> None:
        if self.quant_spec is not None:
            raise MftError(
                "Cannot merge a LoRA adapter into a quantised base in place; write a merged model with "
                "`mft-export hf` (it dequantises the base first)."
            )

    @torch.no_grad()
    def merge(self) -> None:
        self._check_mergeable()
        if not self.merged:
            self.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        self._check_mergeable()
        if self.merged:
            self.weight.copy_((self.weight.float() - self.delta_weight()).to(self.weight.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        quant = f", base={self.quant_spec.describe()}" if self.quant_spec is not None else ""
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, scale={self.scale:g}, merged={self.merged}{quant}"


def apply_lora(model: nn.Module, settings: LoRASettings) -> List[str]:
    """Freeze `model` and replace each targeted nn.Linear by a LoRALinear; returns their names."""
    unknown = sorted(set(settings.target_modules) - set(LORA_TARGETS))
    if unknown or not settings.target_modules:
        raise MftError(
            f"peft.target_modules: {unknown or 'empty list'} not allowed; "
            f"expected a non-empty subset of {list(LORA_TARGETS)}."
        )
    if settings.r <= 0:
        raise MftError(f"peft.r must be a positive rank, got {settings.r}.")
    for p in model.parameters():
        p.requires_grad_(False)
    replaced = []
    for name, module in list(model.named_modules()):
        leaf = name.rsplit(".", 1)[-1]
        if leaf in settings.target_modules and isinstance(module, (nn.Linear, QuantizedLinear)):
            if getattr(module, "bias", None) is not None:
                raise MftError(f"LoRA target {name} has a bias; Mistral linear layers have none.")
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            setattr(parent, leaf, LoRALinear(module if isinstance(module, QuantizedLinear) else module.weight, settings))
            replaced.append(name)
    if not replaced:
        raise MftError(f"peft.target_modules {settings.target_modules} matched no linear layer of the model.")
    return replaced


def init_lora_(model: nn.Module, seed: int) -> None:
    """Draw every LoRA factor of `model` afresh, in module order, from one CPU generator."""
    generator = torch.Generator().manual_seed(seed)
    for module in lora_modules(model).values():
        module.reset_lora_parameters(generator)


def lora_modules(model: nn.Module) -> Dict[str, LoRALinear]:
    return {canonical_name(name): m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: nn.Module) -> None:
    for m in lora_modules(model).values():
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    for m in lora_modules(model).values():
        m.unmerge()


def merge_and_unload(model: nn.Module) -> List[str]:
    """Merge every LoRALinear into its weight and put a plain nn.Linear back in its place.

    For inference (no adapter matmuls left) and to stack adapters: after this, load_adapter
    applies the next adapter onto the merged weights. Returns the replaced module names.
    """
    replaced = []
    for name, module in lora_modules(model).items():
        module.merge()
        linear = nn.Linear(module.in_features, module.out_features, bias=False, device="meta")
        linear.weight = module.weight
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, leaf, linear)
        replaced.append(name)
    return replaced


def lora_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The adapter tensors only: `<module>.lora_a` and `<module>.lora_b`, whole even when sharded
    (gathering them is a collective under FSDP: every rank must call this)."""
    state = {}
    for name, m in lora_modules(model).items():
        state[f"{name}.lora_a"] = full_tensor(m.lora_a.detach())
        state[f"{name}.lora_b"] = full_tensor(m.lora_b.detach())
    return state
