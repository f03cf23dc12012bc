"""From a checked training config (mft/train/checks.py) to what the build pipeline and the loop take."""

from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from mft.build import ModelSpec, Runtime
from mft.checkpoint.consolidated import stream_consolidated
from mft.checkpoint.quantized import stream_quantized
from mft.model.args import ModelArgs
from mft.model.attention import compiles_whole, get_attention_backend
from mft.peft.lora import LoRASettings
from mft.quant.formats import QuantSpec
from mft.quant.linear import quantized_layers
from mft.train.checks import model_args, resolve_quant
from mft.utils.distributed import World, barrier


def lora_settings(pcfg) -> Optional[LoRASettings]:
    """The adapters to train; None for peft=none (full fine-tuning)."""
    if pcfg.method == "none":
        return None
    return LoRASettings(r=pcfg.r, alpha=pcfg.alpha, dropout=pcfg.dropout, target_modules=list(pcfg.target_modules))


def model_spec(cfg) -> ModelSpec:
    """What mft-train builds: the preset (or checkpoint) with its quantisation and new adapters."""
    return ModelSpec(
        args=model_args(cfg.model),
        attn_backend=cfg.model.attn_backend,
        quant=resolve_quant(cfg.quant, cfg.peft),
        quant_modules=tuple(cfg.quant.modules),
        lora=lora_settings(cfg.peft),
        weights=cfg.model.checkpoint,
        seed=cfg.seed,
    )


def resolve_compile(compile: Optional[bool], device: torch.device, attn_backend: str = "auto") -> bool:
    """The config's `compile`: as set, or when null on for CUDA (compiled blocks train faster) with a
    backend whose blocks compile whole (auto, triton), off elsewhere: compiling on a CPU takes longer
    than the short runs it would speed up, and sdpa / flex / xformers blocks recompile per packing
    and break their graph under activation checkpointing."""
    if compile is not None:
        return compile
    return device.type == "cuda" and compiles_whole(get_attention_backend(attn_backend), device)


def train_runtime(cfg, device: torch.device, dtype: torch.dtype, world: World) -> Runtime:
    return Runtime(device=device, dtype=dtype, train=True, world=world,
                   activation_checkpointing=str(cfg.activation_checkpointing),
                   memory_budget_gib=cfg.memory_budget_gib, tokens_per_microbatch=cfg.batch_size * cfg.data.seq_len,
                   loss_chunk_tokens=cfg.loss_chunk_tokens,
                   compile=resolve_compile(cfg.compile, torch.device(device), str(cfg.model.attn_backend)))


def save_base_model(model: nn.Module, folder: Path, world: World) -> Path:
    """Keep a randomly initialised base, so the adapters trained on it stay usable: mft's quantised
    checkpoint when quantised, else consolidated. Every rank calls it (gathering a sharded tensor
    is a collective); rank 0 writes, one tensor at a time straight to the file."""
    target = folder if world.is_main else None
    if quantized_layers(model):
        stream_quantized(model, target, source="random init")
    else:
        stream_consolidated(model, target)
    barrier()
    return folder


def describe_base(mcfg, args: ModelArgs, checkpoint: Optional[str], quant: Optional[QuantSpec] = None,
                  random_draw: Optional[dict] = None) -> dict:
    """An adapter's base_model record. `random_draw` ({"seed", "saved"}) for a base drawn at random by
    the run; "saved": false (save_random_base=false) means no checkpoint of it exists anywhere."""
    base = {"name": mcfg.name, "checkpoint": checkpoint, "tokenizer": mcfg.tokenizer, "args": asdict(args)}
    if quant is not None:  # what the adapter was trained against; it loads onto the dense base as well
        base["quant"] = asdict(quant)
    if random_draw is not None:
        base["random_draw"] = random_draw
    return base
