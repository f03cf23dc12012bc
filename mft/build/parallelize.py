"""Step 3 of the build pipeline: how a meta-built model runs, applied from outside the model.

In torchtitan's order: activation checkpointing, then torch.compile, then FSDP2, each per
TransformerBlock. Activation checkpointing is chosen per block (`block_policies`): none, selective
(torch's selective checkpointing keeps the outputs mft.build.memory.keeps_output names and
recomputes the cheap ops) or full (the block's forward again in backward); `auto` picks the mix
with the least recomputation whose estimated peak fits the memory budget (mft/build/memory.py).
Under torchrun (world > 1) every block and the root become fully_shard units:
parameters sharded on dim 0, gathered in the compute dtype for forward and backward, gradients
reduced in fp32, so the sharded parameters (fp32 masters for full fine-tuning) and their AdamW
states stay in their own dtype. One process with fp32 masters and a lower compute dtype gets
the same split from autocast around the model's forward.
"""

import functools
import logging

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper, checkpoint_wrapper
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from mft.build import memory
from mft.kernels import grouped
from mft.model import moe
from mft.model.attention import compiles_whole

log = logging.getLogger(__name__)


def parallelize(model: nn.Module, runtime, param_dtype: torch.dtype) -> None:
    """Wrap `model`'s blocks in place as `runtime` (mft.build.Runtime) asks; works on meta models."""
    device = torch.device(runtime.device)
    for i, policy in enumerate(block_policies(model, runtime, param_dtype)):
        if policy == "full":
            model.layers[i] = checkpoint_wrapper(model.layers[i])
        elif policy == "selective":
            model.layers[i] = checkpoint_wrapper(model.layers[i], context_fn=selective_contexts)
    if runtime.compile:
        compile_blocks(model, device, dtype=runtime.dtype)
    if runtime.world.distributed:
        shard(model, runtime.world.size, device, runtime.dtype)
    elif param_dtype != runtime.dtype:
        compute_under_autocast(model, device.type, runtime.dtype)


def block_policies(model: nn.Module, runtime, param_dtype: torch.dtype) -> tuple[str, ...]:
    """Each block's activation checkpointing: runtime.activation_checkpointing for every block, or
    for `auto` the plan of mft.build.memory (none on a device other than CUDA), logged once."""
    choice = str(runtime.activation_checkpointing)
    if choice not in ("auto", *memory.POLICIES):
        raise ValueError(f"activation_checkpointing {choice!r}: expected none, full, selective or auto")
    n = len(model.layers)
    if choice != "auto":
        return (choice,) * n
    device = torch.device(runtime.device)
    if device.type != "cuda":
        return ("none",) * n
    if runtime.tokens_per_microbatch <= 0:
        raise ValueError("activation_checkpointing auto needs Runtime.tokens_per_microbatch (batch_size * seq_len)")
    tokens = runtime.tokens_per_microbatch
    budget = (int(runtime.memory_budget_gib * memory.GIB) if runtime.memory_budget_gib is not None
              else memory.default_budget(device))
    one_process_autocast = not runtime.world.distributed and param_dtype != runtime.dtype
    blocks = memory.measure_blocks(model, tokens, runtime.dtype, autocast=one_process_autocast)
    head = memory.head_bytes(model.args.dim, model.args.vocab_size, tokens, runtime.loss_chunk_tokens, runtime.dtype)
    plan = memory.plan_policies(memory.fixed_bytes(model, runtime.world.size, runtime.dtype), blocks, head, budget)
    log.log(logging.INFO if plan.fits else logging.WARNING, "activation checkpointing auto, %d tokens per "
            "micro-batch: %s", tokens, plan.summary())
    return plan.policies


def _selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if memory.keeps_output(op, args) else CheckpointPolicy.PREFER_RECOMPUTE


# torch.utils.checkpoint's context_fn for selective blocks (a fresh pair of contexts per call).
selective_contexts = functools.partial(create_selective_checkpoint_contexts, _selective_policy)


def compile_blocks(model: nn.Module, device: torch.device, backend: str = "inductor",
                   dtype: torch.dtype = torch.bfloat16) -> None:
    """torch.compile each block in place, as one graph (fullgraph) where the attention backend allows
    (`compiles_whole`: its kernels are custom ops and the document boundaries never reach the
    block, since the backend's `prepare` runs before it) and, for a mixture of experts, where the
    experts run as the grouped GEMM in the compute `dtype` (the per-expert loop reads the offsets
    on the host: a graph break). The blocks share their compiled graphs (nn modules are inlined,
    their weights are inputs)."""
    fullgraph = compiles_whole(model.attn_fn, device)
    if fullgraph and model.args.moe is not None and not grouped.grouped_gemm_runs(device, dtype):
        log.warning("torch.compile: the experts run as a per-expert loop on %s in %s (the grouped GEMM needs "
                    "bf16 on sm90+), so each block compiles with graph breaks around it", device, dtype)
        fullgraph = False
    if fullgraph:
        # Graphs per (grad mode, first block or not, auto's choice and its one dynamic recompile):
        # about 10, past dynamo's default of 8, where a fullgraph block fails instead of running eagerly.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
    # Dynamo refuses a Python side effect inside a checkpointed region (its checkpoint is a higher-order
    # op): a checkpointed, compiled MoE block keeps no routing statistics for the metrics.
    silenced = [m for block in model.layers if isinstance(block, CheckpointWrapper)
                for m in block.modules() if isinstance(m, moe.MoEFeedForward)]
    for layer in silenced:
        layer.record_routing = False
    if silenced:
        log.warning("torch.compile with activation checkpointing: the %d checkpointed mixture-of-experts blocks log "
                    "no expert token counts or router aux loss (dynamo allows no side effect inside a checkpoint); "
                    "the aux loss, when on, still trains", len(silenced))
    for i, block in enumerate(model.layers):
        model.layers[i] = torch.compile(block, backend=backend, fullgraph=fullgraph)


def compile_seconds() -> float:
    """Seconds this process has spent in torch.compile so far: dynamo and the backend, the forward
    graphs and the backward ones (compiled at the first backward)."""
    return torch._dynamo.utils.calculate_time_spent().get("total_wall_time", 0.0)


def compute_under_autocast(model: nn.Module, device_type: str, dtype: torch.dtype) -> None:
    """Every forward of `model` runs under autocast to `dtype`: hooks, not a wrapped `forward`, so
    the model keeps its own forward (and a deepcopy of it runs its own parameters)."""
    contexts: list[torch.autocast] = []

    def enter(module, args):
        contexts.append(torch.autocast(device_type, dtype=dtype))
        contexts[-1].__enter__()

    def leave(module, args, output):
        contexts.pop().__exit__(None, None, None)

    model.register_forward_pre_hook(enter)
    model.register_forward_hook(leave, always_call=True)  # also when forward raises


def shard(model: nn.Module, world_size: int, device: torch.device, compute_dtype: torch.dtype) -> None:
    """fully_shard per block, then the root (embeddings, final norm, head)."""
    mesh = init_device_mesh(device.type, (world_size,))
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    # The root stays gathered after forward, since backward starts there at once.
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
