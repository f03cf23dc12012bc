"""LoRA: a frozen linear layer plus a trainable low-rank update, y = W x + (alpha/r) B A dropout(x).

`LoRALinear` keeps the base weight under the name `weight`, so a model's state dict keeps
the Mistral parameter names whether or not adapters are applied; the adapter adds
`<module>.lora_a` (r, in) and `<module>.lora_b` (out, r). On a quantised base (QLoRA) it
takes over the QuantizedLinear's `weight_<part>` buffers under the same names instead of
`weight` (mft/quant/linear.py); everything else, the adapter files included, is identical.

A mixture of experts' stacked projections (`GroupedLinear`, mft/model/moe.py) get a
`GroupedLoRALinear`: one pair of factors per expert, stacked the same way, `lora_a` (E, r, in) and
`lora_b` (E, out, r), applied through the same grouped products as the experts themselves. The
router (`gate`) is an ordinary linear layer: an opt-in target that gets a LoRALinear.

The update runs in the input's dtype: A, and B with the scale folded in, are cast from their
fp32 masters, and one kernel adds x A^T (sB)^T into the base output (`add_lora_update`: mft's
memory-bound Triton kernel on CUDA, torch.addmm elsewhere). The
training loop makes those casts once per optimizer step (`lora_step_copies`) rather than once
per forward, and layers that read the same input share one product with their concatenated A
(`LoRALinear.project_together`, called through mft.model.transformer.project).
"""

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from mft.kernels import low_rank
from mft.model.moe import GroupedLinear, grouped_linear
from mft.model.names import canonical_name
from mft.quant.dequant import dequantize_stack
from mft.quant.formats import QuantSpec
from mft.quant.grouped import QuantizedGroupedLinear, quantized_grouped_linear
from mft.quant.linear import (
    QuantizedLinear,
    quantized_linear,
    quantized_stack_of,
    quantized_weight_of,
    register_quantized_weight,
)
from mft.utils.dtensor import copy_full_, full_tensor
from mft.utils.errors import MftError

# The default targets: every linear layer of a block (a mixture of experts: every expert's w1 w2 w3).
LORA_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
# What target_modules may name: the above and a mixture of experts' router, `gate` (never a default:
# adapting the router changes which experts a token reaches).
LORA_TARGET_CHOICES = (*LORA_TARGETS, "gate")


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


class _ScaledCasts(torch.autograd.Function):
    """(t_i * scale_i).to(dtype) for every master t_i, multiplied in the master's precision before
    the cast, in a few multi-tensor kernels (torch._foreach_*): lora_step_copies casts all 448
    factors of a 7B model at once (one or two small kernels per factor kept the GPU idle for
    milliseconds a step, measured on an H200). Saves no tensor, so the several backward passes of
    one optimizer step (micro-steps, checkpoint recomputes) may all go through copies made once;
    backward casts the gradients back and scales them the same way."""

    @staticmethod
    def forward(ctx, scales: List[float], dtype: torch.dtype, *masters: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        ctx.scales, ctx.master_dtypes = scales, [t.dtype for t in masters]
        ctx.set_materialize_grads(False)  # a copy no forward used gets no zero-filled gradient
        casts = [torch.empty_like(t, dtype=dtype) for t in masters]
        torch._foreach_copy_(casts, torch._foreach_mul(list(masters), scales))
        return tuple(casts)

    @staticmethod
    def backward(ctx, *grads: Optional[torch.Tensor]):
        used = [i for i, g in enumerate(grads) if g is not None]
        wide = [torch.empty_like(grads[i], dtype=ctx.master_dtypes[i]) for i in used]
        if used:
            torch._foreach_copy_(wide, [grads[i] for i in used])
            torch._foreach_mul_(wide, [ctx.scales[i] for i in used])
        result: List[Optional[torch.Tensor]] = [None] * len(grads)
        for i, g in zip(used, wide):
            result[i] = g
        return (None, None, *result)


def scaled_cast(t: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """`t * scale` in `dtype`, multiplied in t's own (master) precision before the cast: the cast
    a forward makes when there are no step copies (evaluation, or a loop without
    lora_step_copies). Plain ops, not _ScaledCasts: that node's backward, traced inside a
    compiled block by torch 2.11's inductor on an H200, gave B gradients of zero; a per-forward
    cast is backpropagated once, so autograd's own nodes serve."""
    return (t * scale).to(dtype)


def add_lora_update(base_out: torch.Tensor, xa: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """base_out + xa @ b^T in one pass over the base output (xa (..., r), b (out, r)): mft's
    memory-bound kernel on CUDA (mft.kernels.low_rank), one addmm elsewhere."""
    base2d, xa2d = base_out.reshape(-1, base_out.shape[-1]), xa.reshape(-1, xa.shape[-1])
    if low_rank.kernel_available(base2d, xa2d, b):
        out2d = low_rank.add_low_rank(base2d, xa2d, b)
    else:
        out2d = torch.addmm(base2d, xa2d, b.t())
    return out2d.view(base_out.shape)


class LoRALayer(nn.Module):
    """What LoRALinear and GroupedLoRALinear share: the fp32 factors `lora_a` and `lora_b`, the
    scale, this step's casts of them (`step_copies`) and merging into the base weight."""

    quant_spec: Optional[QuantSpec] = None  # the base's 4-bit format; None: a dense `weight`
    r: int
    scale: float
    lora_a: nn.Parameter
    lora_b: nn.Parameter

    def _add_factors(self, settings: LoRASettings, a_shape: Tuple[int, ...], b_shape: Tuple[int, ...],
                     device: torch.device, lora_dtype: torch.dtype) -> None:
        """Registered after the base weight, so parameters keep the order weight, lora_a, lora_b."""
        self.r = settings.r
        self.scale = settings.scale
        self.dropout = nn.Dropout(settings.dropout) if settings.dropout > 0 else nn.Identity()
        self.lora_a = nn.Parameter(torch.empty(a_shape, device=device, dtype=lora_dtype))
        self.lora_b = nn.Parameter(torch.empty(b_shape, device=device, dtype=lora_dtype))
        self.merged = False
        # (A, scale * B) in the compute dtype, with autograd to the masters; set only inside
        # lora_step_copies. A plain attribute: never in the state dict, never moved or saved.
        self.step_copies: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        self.reset_lora_parameters()

    def reset_lora_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        """scale * B @ A in fp32, the shape of the base weight."""
        raise NotImplementedError

    def lora_factors(self, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        """A and scale * B in `dtype`: this step's copies when there are some, else cast now."""
        if self.step_copies is not None and self.step_copies[0].dtype == dtype:
            return self.step_copies
        return self.lora_a.to(dtype), scaled_cast(self.lora_b, self.scale, dtype)

    def _check_mergeable(self) -> None:
        if self.quant_spec is not None:
            raise MftError(
                "Cannot merge a LoRA adapter into a quantised base in place; write a merged model with "
                "`mft-export hf` (it dequantises the base first)."
            )

    @torch.no_grad()
    def _add_delta_(self, sign: float) -> None:
        self.weight.copy_((self.weight.float() + sign * self.delta_weight()).to(self.weight.dtype))

    def merge(self) -> None:
        self._check_mergeable()
        if not self.merged:
            self._add_delta_(1.0)
            self.merged = True

    def unmerge(self) -> None:
        self._check_mergeable()
        if self.merged:
            self._add_delta_(-1.0)
            self.merged = False


class LoRALinear(LoRALayer):
    """A bias-free linear layer whose frozen `weight` is adapted by `lora_b @ lora_a`.

    A starts kaiming-uniform and B at zero, so the layer equals its base at init. The LoRA
    parameters keep their own dtype (fp32 by default) and are cast to the input's dtype in
    forward, so a bf16 base still gets fp32 adapter weights and optimizer states. Inside
    `lora_step_copies`, `step_copies` holds those casts, made once for the whole step.
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
        self._add_factors(settings, (settings.r, self.in_features), (self.out_features, settings.r), device, lora_dtype)

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
        a, b = self.lora_factors(x.dtype)
        return add_lora_update(out, F.linear(self.dropout(x), a), b)

    @staticmethod
    def project_together(x: torch.Tensor, layers: Sequence["LoRALinear"]) -> List[torch.Tensor]:
        """The outputs of `layers` that all read `x`, with one x @ cat(A_1, .., A_n)^T for all
        their A products (then each its own B); the base products stay separate (dense or
        quantised). Layers with an active dropout run one by one instead: peft draws a separate
        mask per layer, so their A products do not read the same input. Merged layers also."""
        if any(layer.merged or (layer.training and isinstance(layer.dropout, nn.Dropout)) for layer in layers):
            return [layer(x) for layer in layers]
        outs = [layer.base_linear(x) for layer in layers]
        factors = [layer.step_copies for layer in layers]
        if all(f is not None and f[0].dtype == x.dtype for f in factors):
            a = torch.cat([f[0] for f in factors])
            bs = [f[1] for f in factors]
        else:  # one cast of the concatenated masters instead of one per layer
            a = torch.cat([layer.lora_a for layer in layers]).to(x.dtype)
            bs = [scaled_cast(layer.lora_b, layer.scale, x.dtype) for layer in layers]
        parts = F.linear(x, a).split([layer.r for layer in layers], dim=-1)
        return [add_lora_update(out, xa, b) for out, xa, b in zip(outs, parts, bs)]

    def delta_weight(self) -> torch.Tensor:
        """scale * B @ A in fp32."""
        return (self.lora_b.float() @ self.lora_a.float()) * self.scale

    def extra_repr(self) -> str:
        quant = f", base={self.quant_spec.describe()}" if self.quant_spec is not None else ""
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, scale={self.scale:g}, merged={self.merged}{quant}"


class GroupedLoRALinear(LoRALayer):
    """A GroupedLinear (a mixture of experts' projection: G stacked (out, in) weights) whose group g
    is adapted by its own `lora_b[g] @ lora_a[g]`.

    The frozen `weight` (G, out, in) keeps the GroupedLinear's name; `lora_a` is (G, r, in),
    `lora_b` (G, out, r), fp32 like LoRALinear's, drawn per group as LoRALinear draws its own.
    forward(x, offsets) takes the rows sorted by group: the base's grouped product, then the update
    as two more grouped products over the same rows (x A_g^T, then that times (scale B_g)^T), so a
    row meets only its own group's factors and no (G, out, in) delta is ever formed.
    """

    def __init__(self, base: GroupedLinear | QuantizedGroupedLinear, settings: LoRASettings,
                 lora_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.groups, self.in_features, self.out_features = base.groups, base.in_features, base.out_features
        self.quant_spec = None
        if isinstance(base, QuantizedGroupedLinear):  # QLoRA: share the packed buffers, same names
            register_quantized_weight(self, base.quant_spec, self.out_features, self.in_features, device="meta",
                                      groups=self.groups)
            for name, tensor in base.quantized_weights().parts.items():
                setattr(self, "weight_" + name, tensor)
            device = base.weight_q.device
        else:
            self.weight = base.weight
            self.weight.requires_grad_(False)
            device = self.weight.device
        self._add_factors(settings, (self.groups, settings.r, self.in_features),
                          (self.groups, self.out_features, settings.r), device, lora_dtype)

    @torch.no_grad()
    def reset_lora_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        """Group by group, each slice drawn as a LoRALinear of its shape draws (A's fan-in is `in`),
        from one CPU generator, then copied whole (a sharded factor keeps its own rows)."""
        if self.lora_a.is_meta:
            return
        a, b = torch.empty(self.lora_a.shape), torch.empty(self.lora_b.shape)
        for g in range(self.groups):
            init_lora_factors_(a[g], b[g], generator)
        copy_full_(self.lora_a, a)
        copy_full_(self.lora_b, b)

    def base_linear(self, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """The frozen base's grouped product (4-bit: dequantised inside one op, not kept for backward)."""
        if self.quant_spec is not None:
            return quantized_grouped_linear(x, offsets, quantized_stack_of(self))
        return grouped_linear(x, self.weight, offsets)

    def grouped_factors(self, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        """lora_factors with the rank padded by zeros to a multiple of 8 (exact: zero rows of A meet
        zero columns of B): torch's grouped GEMM takes only rows of 16-byte multiples, and a rank
        it refuses would send the products to the per-expert loop, whose host sync a compiled
        block cannot hold."""
        a, b = self.lora_factors(dtype)
        pad = -self.r % 8
        if pad == 0:
            return a, b
        return F.pad(a, (0, 0, 0, pad)), F.pad(b, (0, pad))

    def forward(self, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        out = self.base_linear(x, offsets)
        if self.merged:
            return out
        a, b = self.grouped_factors(x.dtype)
        return out + grouped_linear(grouped_linear(self.dropout(x), a, offsets), b, offsets)

    def forward_rows(self, x: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
        """Row n of x (N, in) through expert group[n] alone, adapter included: the base's weights of
        only those experts (dequantised, for a 4-bit base), for decoding (mft.model.moe)."""
        if self.quant_spec is not None:
            weight = dequantize_stack(quantized_stack_of(self), x.dtype, groups=group)
        else:
            weight = self.weight[group]
        out = torch.bmm(weight, x[:, :, None])
        if not self.merged:
            a, b = self.lora_factors(x.dtype)
            out = out + torch.bmm(b[group], torch.bmm(a[group], x[:, :, None]))
        return out[:, :, 0]

    @staticmethod
    def project_grouped_together(x: torch.Tensor, offsets: torch.Tensor,
                                 layers: Sequence["GroupedLoRALinear"]) -> List[torch.Tensor]:
        """The outputs of expert `layers` that all read `x` (w1 and w3), with one grouped product
        for all their A factors (concatenated per expert), then each its own B; as
        LoRALinear.project_together (one by one with an active dropout, or once merged)."""
        if any(layer.merged or (layer.training and isinstance(layer.dropout, nn.Dropout)) for layer in layers):
            return [layer(x, offsets) for layer in layers]
        outs = [layer.base_linear(x, offsets) for layer in layers]
        factors = [layer.grouped_factors(x.dtype) for layer in layers]
        xa = grouped_linear(x, torch.cat([a for a, _ in factors], dim=1), offsets)
        # Each layer's columns made dense: torch's grouped GEMM takes no strided rows.
        parts = [part.contiguous() for part in xa.split([a.shape[1] for a, _ in factors], dim=-1)]
        return [out + grouped_linear(part, b, offsets) for out, part, (_, b) in zip(outs, parts, factors)]

    def delta_weight(self, group: Optional[int] = None) -> torch.Tensor:
        """scale * B_g @ A_g in fp32: every group's, (G, out, in), or only `group`'s, (out, in)."""
        if group is not None:
            return (self.lora_b[group].float() @ self.lora_a[group].float()) * self.scale
        return torch.bmm(self.lora_b.float(), self.lora_a.float()) * self.scale

    @torch.no_grad()
    def _add_delta_(self, sign: float) -> None:
        for g in range(self.groups):  # one group at a time: no fp32 copy of the whole stack
            self.weight[g].copy_((self.weight[g].float() + sign * self.delta_weight(g)).to(self.weight.dtype))

    def extra_repr(self) -> str:
        quant = f", base={self.quant_spec.describe()}" if self.quant_spec is not None else ""
        return (f"groups={self.groups}, in={self.in_features}, out={self.out_features}, r={self.r}, "
                f"scale={self.scale:g}, merged={self.merged}{quant}")


def apply_lora(model: nn.Module, settings: LoRASettings) -> List[str]:
    """Freeze `model` and replace each targeted layer by its adapted form: an nn.Linear (or a
    QuantizedLinear) by a LoRALinear, a mixture of experts' GroupedLinear by a GroupedLoRALinear.
    Returns their names."""
    unknown = sorted(set(settings.target_modules) - set(LORA_TARGET_CHOICES))
    if unknown or not settings.target_modules:
        raise MftError(
            f"peft.target_modules: {unknown or 'empty list'} not allowed; "
            f"expected a non-empty subset of {list(LORA_TARGET_CHOICES)} ('gate': a mixture of experts' router)."
        )
    if settings.r <= 0:
        raise MftError(f"peft.r must be a positive rank, got {settings.r}.")
    for p in model.parameters():
        p.requires_grad_(False)
    replaced = []
    for name, module in list(model.named_modules()):
        leaf = name.rsplit(".", 1)[-1]
        if leaf not in settings.target_modules:
            continue
        if isinstance(module, (GroupedLinear, QuantizedGroupedLinear)):
            adapted: nn.Module = GroupedLoRALinear(module, settings)
        elif isinstance(module, (nn.Linear, QuantizedLinear)):
            if getattr(module, "bias", None) is not None:
                raise MftError(f"LoRA target {name} has a bias; Mistral linear layers have none.")
            adapted = LoRALinear(module if isinstance(module, QuantizedLinear) else module.weight, settings)
        else:
            continue
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        setattr(parent, leaf, adapted)
        replaced.append(name)
    unmatched = sorted(set(settings.target_modules) - {name.rsplit(".", 1)[-1] for name in replaced})
    if unmatched:
        raise MftError(f"peft.target_modules {unmatched} matched no layer of the model ('gate' is a mixture of "
                       "experts' router: a dense model has none); leave them out.")
    return replaced


def compute_dtype(model: nn.Module) -> Optional[torch.dtype]:
    """The dtype the model computes in: that of its base's floating-point parameters (a LoRA
    model runs without autocast). None when it has none."""
    for name, p in model.named_parameters():
        if not name.endswith(("lora_a", "lora_b")) and p.is_floating_point():
            return p.dtype
    return None


@contextmanager
def lora_step_copies(model: nn.Module) -> Iterator[None]:
    """Inside, every LoRA layer whose factors are kept in a wider dtype than the model computes
    in uses copies cast once on entry (A, and B with the scale folded in), not once per forward.

    Wrap all micro-steps (forward and backward) of one optimizer step, never optimizer.step():
    the copies are made with autograd on, so every backward pass still reaches the fp32
    masters (the cast nodes save no tensors, so micro-steps and checkpoint recomputes may all
    go through them), and they are dropped on exit, so they never outlive the weights they were
    cast from. Nothing changes for factors FSDP2 shards (DTensors): its mixed-precision policy
    already gathers them in the compute dtype. Outside the context, forward casts per call.
    """
    dtype = compute_dtype(model)
    copied = [
        m for m in lora_modules(model).values()
        if dtype is not None and m.step_copies is None and not isinstance(m.lora_a, DTensor)
        and m.lora_a.is_floating_point() and torch.finfo(dtype).bits < torch.finfo(m.lora_a.dtype).bits
    ]
    if copied:
        with torch.enable_grad():
            masters = [t for m in copied for t in (m.lora_a, m.lora_b)]
            casts = _ScaledCasts.apply([s for m in copied for s in (1.0, m.scale)], dtype, *masters)
        for i, m in enumerate(copied):
            m.step_copies = (casts[2 * i], casts[2 * i + 1])
    try:
        yield
    finally:
        for m in copied:
            m.step_copies = None


def init_lora_(model: nn.Module, seed: int) -> None:
    """Draw every LoRA factor of `model` afresh, in module order, from one CPU generator."""
    generator = torch.Generator().manual_seed(seed)
    for module in lora_modules(model).values():
        module.reset_lora_parameters(generator)


def lora_modules(model: nn.Module) -> Dict[str, LoRALayer]:
    """Every LoRALinear and GroupedLoRALinear of `model`, by canonical module name, in module order."""
    return {canonical_name(name): m for name, m in model.named_modules() if isinstance(m, LoRALayer)}


def merge_lora(model: nn.Module) -> None:
    for m in lora_modules(model).values():
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    for m in lora_modules(model).values():
        m.unmerge()


def merge_and_unload(model: nn.Module) -> List[str]:
    """Merge every LoRA layer into its weight and put the plain layer back in its place (an
    nn.Linear, or a GroupedLinear for a mixture of experts' projection).

    For inference (no adapter matmuls left) and to stack adapters: after this, load_adapter
    applies the next adapter onto the merged weights. Returns the replaced module names.
    """
    replaced = []
    for name, module in lora_modules(model).items():
        module.merge()
        with torch.device("meta"):
            if isinstance(module, GroupedLoRALinear):
                plain: nn.Module = GroupedLinear(module.groups, module.in_features, module.out_features)
            else:
                plain = nn.Linear(module.in_features, module.out_features, bias=False)
        plain.weight = module.weight
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, leaf, plain)
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
