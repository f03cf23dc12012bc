"""Step 3 of the build pipeline: how a meta-built model runs, applied from outside the model.

In torchtitan's order: activation checkpointing, then torch.compile, then FSDP2, each per
TransformerBlock. Under torchrun (world > 1) every block and the root become fully_shard units:
parameters sharded on dim 0, gathered in the compute dtype for forward and backward, gradients
reduced in fp32, so the sharded parameters (fp32 masters for full fine-tuning) and their AdamW
states stay in their own dtype. One process with fp32 masters and a lower compute dtype gets
the same split from autocast around the model's forward.
"""

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    apply_activation_checkpointing,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from mft.model.attention import compiles_whole
from mft.model.transformer import TransformerBlock


def parallelize(model: nn.Module, runtime, param_dtype: torch.dtype) -> None:
    """Wrap `model`'s blocks in place as `runtime` (mft.build.Runtime) asks; works on meta models."""
    device = torch.device(runtime.device)
    if runtime.activation_checkpointing:
        apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, TransformerBlock))
    if runtime.compile:
        compile_blocks(model, device)
    if runtime.world.distributed:
        shard(model, runtime.world.size, device, runtime.dtype)
    elif param_dtype != runtime.dtype:
        compute_under_autocast(model, device.type, runtime.dtype)


def compile_blocks(model: nn.Module, device: torch.device, backend: str = "inductor") -> None:
    """torch.compile each block in place, as one graph (fullgraph) where the attention backend allows
    (`compiles_whole`: its kernels are custom ops and the document boundaries never reach the
    block, since the backend's `prepare` runs before it). The blocks share their compiled graphs
    (nn modules are inlined, their weights are inputs)."""
    fullgraph = compiles_whole(model.attn_fn, device)
    if fullgraph:
        # Graphs per (grad mode, first block or not, auto's choice and its one dynamic recompile):
        # about 10, past dynamo's default of 8, where a fullgraph block fails instead of running eagerly.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
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
