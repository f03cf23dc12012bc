"""FSDP2 for the Mistral transformer: one fully_shard unit per block plus the root.

Applied from outside the model (the model file knows nothing of it). Parameters are sharded
on dim 0 across ranks; with `compute_dtype` bf16 they are gathered in bf16 for compute and
gradients are reduced in fp32, so full fine-tuning keeps fp32 master weights and AdamW
states, all sharded.
"""

from pathlib import Path

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from mft.checkpoint.load import load_weights
from mft.checkpoint.sharded import copy_full_
from mft.peft.lora import init_lora_factors_, lora_modules
from mft.train.distributed import World, barrier
from mft.train.setup import apply_peft, build_architecture, model_args, resolve_quant, save_base_model


def shard_model(model: nn.Module, world: World, device: torch.device, compute_dtype: torch.dtype) -> None:
    mesh = init_device_mesh(device.type, (world.size,))
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    # The root holds embeddings, final norm and head; it stays gathered after forward since
    # backward starts there at once.
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)


def build_sharded_model(cfg, world: World, device: torch.device, dtype: torch.dtype, run_dir: Path):
    """Meta model -> LoRA -> fully_shard -> to_empty -> each rank loads only its own rows.

    No rank ever holds the whole model: every tensor is read from the memory-mapped checkpoint
    one at a time and each rank keeps its slice. A random-init base is first written by rank 0
    (seeded as a single process would draw it) and then loaded like any checkpoint, so a sharded
    run starts from the same weights as a one-process run. Full fine-tuning keeps fp32 master
    weights (and so fp32 AdamW states), gathered in `dtype` for compute.
    Returns (model, args, base checkpoint folder, LoRA settings or None).
    """
    args = model_args(cfg.model)
    quant = resolve_quant(cfg.quant, cfg.peft)

    def build(device, dtype, init=True):
        return build_architecture(args, cfg.model.attn_backend, quant, cfg.quant.modules, device, dtype, init)

    base = cfg.model.checkpoint
    if base is None:
        base = str(Path(run_dir) / "base_model")
        if world.is_main:
            torch.manual_seed(cfg.seed)
            save_base_model(build("cpu", dtype), Path(base))
        barrier()
    param_dtype = torch.float32 if cfg.peft.method == "none" else dtype
    model = build("meta", param_dtype, init=False)
    lora = apply_peft(model, cfg.peft)
    shard_model(model, world, device, compute_dtype=dtype)
    model.to_empty(device=device)
    load_weights(model, base)
    if lora is not None:
        torch.manual_seed(cfg.seed + 1)  # the stream a one-process run draws its LoRA init from
        for m in lora_modules(model).values():
            a, b = torch.empty(m.lora_a.shape), torch.empty(m.lora_b.shape)
            init_lora_factors_(a, b)
            copy_full_(m.lora_a, a.to(m.lora_a.dtype))
            copy_full_(m.lora_b, b.to(m.lora_b.dtype))
    return model, args, base, lora
