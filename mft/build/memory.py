"""Activation memory per block and policy, measured on the meta device, and the `auto` plan.

Each TransformerBlock runs under one of three policies, from most memory to most recomputation:

- ``none``: autograd keeps what backward needs (norm inputs in fp32, SwiGLU's hidden-size
  tensors, attention's inputs and outputs, ...);
- ``selective``: the outputs of the expensive ops are kept (matmuls, attention) and the cheap
  ones (norms, activations, rope, casts, LoRA's add) are recomputed in backward
  (`keeps_output` says which; torch's selective checkpointing applies it);
- ``full``: only the block's input is kept; backward runs the block's forward again.

`measure_blocks` runs each block's forward once on meta tensors of the real token count and
records the bytes it would keep under each policy: for ``none`` the tensors autograd saves
(`saved_tensors_hooks`), for ``selective`` the outputs `keeps_output` keeps, for ``full`` the
block's input. `plan_policies` then picks, per block, the least recomputation whose estimated
peak fits a budget. The plan itself is pure arithmetic over those measurements.
"""

import copy
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from mft.model.attention import PackedDocs
from mft.model.rope import rope_tables

GIB = 2**30
POLICIES = ("none", "selective", "full")
# Recomputation of one block, relative to its forward: selective re-runs only elementwise ops
# (memory-bound, a small share of a block's time); full re-runs everything.
RECOMPUTE_COST = {"none": 0.0, "selective": 0.1, "full": 1.0}
# The budget when none is given: the device's free memory at start minus this share and this
# many bytes, for the allocator's fragmentation, the CUDA context, cuBLAS/NCCL workspaces and
# the estimate's own error.
BUDGET_MARGIN_SHARE = 0.10
BUDGET_MARGIN_BYTES = GIB

aten = torch.ops.aten
# op -> index of its first factor; the grouped GEMM is a mixture of experts' products (mft/model/moe.py).
MATMULS = {aten.mm.default: 0, aten.bmm.default: 0, aten.addmm.default: 1, aten._grouped_mm.default: 0}
# mft's custom matmuls, by name: the 4-bit one (mft/quant/linear.py) and the 4-bit experts' grouped
# one (where it is registered).
MFT_MATMULS = ("mft::quantized_matmul", "mft::quantized_grouped_mm")
ATTENTION_OPS = {
    aten._scaled_dot_product_flash_attention.default,
    aten._scaled_dot_product_efficient_attention.default,
    aten._scaled_dot_product_cudnn_attention.default,
    aten._scaled_dot_product_flash_attention_for_cpu.default,
    aten._flash_attention_forward.default,
    aten._efficient_attention_forward.default,
}


def keeps_output(op, args) -> bool:
    """Whether selective checkpointing keeps `op`'s output rather than recompute it.

    Kept: attention (aten's fused kernels, torch's varlen_attn, mft's own custom ops named
    *attention*), and matmuls (the experts' grouped products and mft's quantised ones among them),
    except a low-rank product, whose inner dimension is under a quarter of both output
    dimensions (LoRA's B, rank r): at 2r FLOPs per output element it costs about what reading a
    kept copy costs, and keeping it would double what each adapted layer keeps."""
    if op in MATMULS:
        a, b = args[MATMULS[op]], args[MATMULS[op] + 1]
        return 4 * a.shape[-1] >= min(a.shape[-2], b.shape[-1])
    if op in ATTENTION_OPS:
        return True
    namespace = getattr(op, "namespace", "")
    name = op.name() if namespace in ("mft", "torch_attn") else ""  # torch_attn: torch's varlen_attn
    return "attention" in name or "attn" in name or name in MFT_MATMULS


@dataclass(frozen=True)
class BlockActivations:
    """Bytes one block keeps from forward to backward under each policy, and its backward's
    own transient: gradients of its largest intermediates, plus the recomputed activations
    when the block is checkpointed."""

    none: int
    selective: int
    full: int
    largest: int  # bytes of the largest tensor autograd saves in the block

    def kept(self, policy: str) -> int:
        return getattr(self, policy)

    def transient(self, policy: str) -> int:
        # Backward of SwiGLU's product holds its incoming gradient and two outgoing ones.
        return 3 * self.largest + (self.none if policy != "none" else 0)


@dataclass(frozen=True)
class MemoryPlan:
    """Per-block policies and the peak they are estimated to reach (bytes)."""

    policies: tuple[str, ...]
    peak: int
    budget: int
    fixed: int

    @property
    def fits(self) -> bool:
        return self.peak <= self.budget

    def summary(self) -> str:
        runs, start = [], 0
        for i in range(1, len(self.policies) + 1):
            if i == len(self.policies) or self.policies[i] != self.policies[start]:
                span = f"{start}" if i - 1 == start else f"{start}-{i - 1}"
                runs.append(f"{span} {self.policies[start]}")
                start = i
        verdict = "fits" if self.fits else "does NOT fit (the most recomputation there is)"
        return (f"blocks {', '.join(runs)}; estimated peak {self.peak / GIB:.2f} GiB "
                f"(weights, gradients, optimizer {self.fixed / GIB:.2f} GiB) {verdict} in a budget of "
                f"{self.budget / GIB:.2f} GiB")


def peak_bytes(fixed: int, blocks: list[BlockActivations], policies: tuple[str, ...], head: int) -> int:
    """Estimated peak of a training step: what stays (`fixed`), every block's kept activations,
    and the larger of the head's working set and one block's backward (both at backward's start,
    when everything kept is still alive)."""
    kept = sum(b.kept(p) for b, p in zip(blocks, policies))
    transient = max((b.transient(p) for b, p in zip(blocks, policies)), default=0)
    return fixed + kept + max(head, transient)


def plan_policies(fixed: int, blocks: list[BlockActivations], head: int, budget: int) -> MemoryPlan:
    """The mix with the least recomputation whose estimated peak fits `budget`: the first blocks
    none, the next selective, the last full. All full when nothing fits (the plan says so)."""
    n = len(blocks)
    best: Optional[tuple[float, int, tuple[str, ...]]] = None
    for n_full in range(n + 1):
        for n_selective in range(n - n_full + 1):
            policies = ("none",) * (n - n_full - n_selective) + ("selective",) * n_selective + ("full",) * n_full
            peak = peak_bytes(fixed, blocks, policies, head)
            cost = n_selective * RECOMPUTE_COST["selective"] + n_full * RECOMPUTE_COST["full"]
            if peak <= budget and (best is None or (cost, peak) < best[:2]):
                best = (cost, peak, policies)
    if best is None:
        policies = ("full",) * n
        return MemoryPlan(policies, peak_bytes(fixed, blocks, policies, head), budget, fixed)
    return MemoryPlan(best[2], best[1], budget, fixed)


def fixed_bytes(model: nn.Module, world_size: int, compute_dtype: torch.dtype) -> int:
    """Weights, quantised buffers, gradients and AdamW states (two per trainable element, in the
    parameter's dtype) of a meta-built model. Under FSDP2 parameters are sharded over the ranks,
    and each rank also holds two gathered blocks (the current and the prefetched one) and the
    gathered root (embeddings, head) in the compute dtype; buffers stay whole on every rank."""
    params = sum(p.numel() * p.element_size() * (4 if p.requires_grad else 1) for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    if world_size <= 1:
        return params + buffers
    itemsize = torch.empty((), dtype=compute_dtype).element_size()
    block = max(sum(p.numel() for p in layer.parameters()) for layer in model.layers)
    root = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("layers."))
    return params // world_size + buffers + (2 * block + root) * itemsize


def head_bytes(dim: int, vocab: int, tokens: int, loss_chunk: int, compute_dtype: torch.dtype) -> int:
    """The head and loss's working set (mft.kernels.cross_entropy): the final norm's fp32 input
    and normed output, the hidden states (or, for a frozen head, their gradient) the loss keeps,
    and one chunk's logits (compute dtype), their fp32 copy and fp32 gradient (an upper bound for
    a frozen head, whose gradient takes the fp32 copy's place)."""
    itemsize = torch.empty((), dtype=compute_dtype).element_size()
    chunk = min(tokens, loss_chunk) if loss_chunk > 0 else tokens
    return tokens * dim * (4 + 2 * itemsize) + chunk * vocab * (itemsize + 8)


class _FlashShapedAttention(torch.autograd.Function):
    """Stands in for the attention backend on meta tensors: keeps what a flash-style kernel keeps
    for backward (q, k, v, the output and an fp32 log-sum-exp per head and token), as mft's Triton
    kernel and SDPA's flash and cuDNN kernels on CUDA do. (SDPA on meta would take its math path
    and keep a tokens x tokens matrix; the Triton kernel does not run on meta.)"""

    @staticmethod
    def forward(ctx, q, k, v, outputs: list):
        out = torch.empty_like(q)
        lse = q.new_empty(q.shape[:2], dtype=torch.float32)
        outputs.extend((out, lse))
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), None


class _Recorder(TorchDispatchMode):
    """Records the outputs selective checkpointing would keep. It holds them (meta tensors cost
    nothing), so no storage is freed and its address reused while the block runs."""

    def __init__(self):
        super().__init__()
        self.kept: dict[int, torch.Tensor] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if keeps_output(func, args):
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    self.kept[_storage(t)] = t
        return out


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def _nbytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes()


def measure_block(block: nn.Module, x: torch.Tensor, rope, docs: PackedDocs, extra_none: int = 0) -> BlockActivations:
    """Run `block` (a meta copy: its attention is swapped for a stand-in) forward once on meta `x`
    and count what each policy keeps (see the module docstring). Parameters, buffers and the
    tensors all blocks share (rope tables) are not activations and are left out; `extra_none`
    adds bytes only `none` keeps."""
    shared = {_storage(t) for t in (*block.parameters(), *block.buffers(), *_rope_tensors(rope))}
    saved: dict[int, torch.Tensor] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[_storage(t)] = t
        return t

    attention_outputs: list[torch.Tensor] = []
    for attention in _attentions(block):
        attention.attn_fn = lambda q, k, v, docs, window: _FlashShapedAttention.apply(q, k, v, attention_outputs)
    recorder = _Recorder()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), recorder:
        block(x, rope, docs)
    recorder.kept.update((_storage(t), t) for t in attention_outputs)
    activations = [t for key, t in saved.items() if key not in shared]
    none = sum(map(_nbytes, activations)) + extra_none
    selective = _nbytes(x) + sum(_nbytes(t) for key, t in recorder.kept.items() if key not in shared)
    return BlockActivations(none=none, selective=selective, full=_nbytes(x),
                            largest=max(map(_nbytes, activations), default=0))


def measure_blocks(model: nn.Module, tokens: int, compute_dtype: torch.dtype, autocast: bool) -> list[BlockActivations]:
    """`measure_block` for each block of a meta-built `model`, on one packed document of `tokens`
    tokens (the saved tensors do not depend on how tokens split into documents). Blocks with fp32
    masters are measured on a copy in the compute dtype, as FSDP2 and autocast run them; under
    autocast (one process), `none` also keeps the compute-dtype copies of the weights that its
    matmuls saved."""
    args = model.args
    device = torch.device("meta")
    # The first block's input needs no gradient when the embedding is frozen (LoRA).
    first = torch.empty(tokens, args.dim, device=device, dtype=compute_dtype,
                        requires_grad=model.tok_embeddings.weight.requires_grad)
    later = torch.empty(tokens, args.dim, device=device, dtype=compute_dtype, requires_grad=True)
    rope = rope_tables(torch.arange(tokens, device=device), args)
    docs = PackedDocs(cu_seqlens=torch.empty(2, dtype=torch.int32, device=device), max_seqlen=tokens,
                      bounds=(0, tokens))
    itemsize = torch.empty((), dtype=compute_dtype).element_size()
    results = []
    for i, layer in enumerate(model.layers):
        block = copy.deepcopy(layer)
        cast = any(p.is_floating_point() and p.requires_grad and p.dtype != compute_dtype
                   and not _is_lora(name) for name, p in block.named_parameters())
        extra = 0
        if cast:
            extra = sum(p.numel() for p in block.parameters()) * itemsize if autocast else 0
            block.to(compute_dtype)
        results.append(measure_block(block, first if i == 0 else later, rope, docs, extra_none=extra))
    return results


def default_budget(device: torch.device) -> int:
    """The device's free memory now minus the margin (BUDGET_MARGIN_SHARE, BUDGET_MARGIN_BYTES)."""
    free, _ = torch.cuda.mem_get_info(device)
    return int(free * (1 - BUDGET_MARGIN_SHARE)) - BUDGET_MARGIN_BYTES


def _rope_tensors(rope) -> list[torch.Tensor]:
    return [t for t in (rope.cos, rope.sin, rope.query_scale) if t is not None]


def _attentions(block: nn.Module) -> list[nn.Module]:
    return [m for m in block.modules() if hasattr(m, "attn_fn")]


def _is_lora(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in ("lora_a", "lora_b")
