"""Build a Transformer in five steps, the order torchtitan's `parallelize` uses:

1. construct on the meta device (shapes only: a 7B model costs no memory yet);
2. convert: quantise the chosen linear layers (QLoRA bases), then wrap the LoRA targets;
3. parallelise (mft/build/parallelize.py): activation checkpointing (none, selective or full per
   block; `auto` plans the mix from activations measured on meta, mft/build/memory.py), torch.compile per block,
   fully_shard per block and root when world > 1, or autocast for mixed precision in one process;
4. materialise: allocate every tensor once, directly on the device (a rank only its shards);
5. fill: load a checkpoint folder tensor by tensor, or draw random weights from the seed
   (mft/build/init.py), then draw the new LoRA factors from seed + 1.

Precision: the frozen base is held in the compute dtype. Parameters that train keep fp32 masters
and compute in `Runtime.dtype`: LoRA factors always; for full fine-tuning the whole model, cast
per forward by FSDP2's mixed precision policy under torchrun (every parameter in bf16) and by
autocast in one process (matmuls in bf16, norms in fp32), so an update smaller than bf16's
spacing is applied, not rounded away, on one GPU as on many.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from mft.build.init import init_weights_
from mft.build.parallelize import parallelize
from mft.checkpoint.load import detect_format, load_weights, read_model_args
from mft.checkpoint.quantized import read_quant_config
from mft.model.args import ModelArgs
from mft.model.transformer import Transformer
from mft.peft.lora import LoRASettings, apply_lora, init_lora_
from mft.quant.formats import QuantSpec
from mft.quant.model import LINEAR_TARGETS, check_modules, replace_linears
from mft.utils.distributed import World
from mft.utils.errors import MftError


@dataclass(frozen=True)
class ModelSpec:
    """What to build: the architecture, its conversions, and where its weights come from."""

    args: ModelArgs
    attn_backend: str = "auto"  # mft.model.attention backend name
    quant: Optional[QuantSpec] = None  # store `quant_modules` in 4 bits (a frozen QLoRA base); None: dense
    quant_modules: tuple[str, ...] = LINEAR_TARGETS  # which linear layers `quant` applies to
    lora: Optional[LoRASettings] = None  # new LoRA adapters (the base is then frozen); None: none
    weights: Optional[str | Path] = None  # checkpoint folder (HF, consolidated or mft quantised); None: random
    seed: int = 0  # random weights are drawn from it, new LoRA factors from seed + 1
    init_std: float = 0.02  # random weights: std of linear and embedding weights (the head: dim ** -0.5)


@dataclass(frozen=True)
class Runtime:
    """Where and how the model runs."""

    device: torch.device | str = "cpu"
    dtype: torch.dtype = torch.float32  # compute dtype (and storage of the frozen base)
    train: bool = False  # parameters that train (all of them without LoRA) keep fp32 masters
    world: World = field(default_factory=World)  # > 1 process: parameters sharded with FSDP2
    # Per block: "none" | "full" (the block's forward again in backward) | "selective" (matmul and
    # attention outputs kept, cheap ops recomputed) | "auto" (the least recomputation that fits
    # memory_budget_gib; on CUDA only, none elsewhere). See mft/build/memory.py.
    activation_checkpointing: str = "none"
    memory_budget_gib: Optional[float] = None  # auto's budget; None: the device's free memory minus a margin
    tokens_per_microbatch: int = 0  # auto: tokens of one micro-batch (batch_size * seq_len)
    loss_chunk_tokens: int = 0  # auto: the loss's chunk (TrainConfig.loss_chunk_tokens; 0: all tokens at once)
    compile: bool = False  # torch.compile each block


def checkpoint_spec(folder: str | Path, *, dense: bool = False, **overrides) -> ModelSpec:
    """The spec that loads `folder` as it is: its args, and its int4/NF4 layers for an mft quantised
    checkpoint (dequantised into the compute dtype instead with `dense`)."""
    args = read_model_args(folder)
    quant = {}
    if not dense and detect_format(folder) == "quantized":
        spec, modules, _ = read_quant_config(folder)
        quant = {"quant": spec, "quant_modules": tuple(modules)}
    return ModelSpec(args, weights=folder, **quant, **overrides)


def build_model(spec: ModelSpec, runtime: Runtime = Runtime()) -> Transformer:
    """The model `spec` describes, ready on `runtime.device` (see the module docstring)."""
    full_fine_tuning = runtime.train and spec.lora is None
    param_dtype = torch.float32 if full_fine_tuning else runtime.dtype
    with torch.device("meta"):
        model = Transformer(spec.args, attn_backend=spec.attn_backend)
    model.to(dtype=param_dtype)  # free on meta; quantised buffers and LoRA factors keep their own dtypes
    if spec.quant is not None:
        if "output" in spec.quant_modules and spec.args.tied_embeddings:
            raise MftError("quant.modules includes 'output', but this model's head is its token embedding "
                           "(tied_embeddings), which stays in the compute dtype; leave 'output' out.")
        replace_linears(model, spec.quant, check_modules(spec.quant_modules), device=torch.device("meta"))
    if spec.lora is not None:
        apply_lora(model, spec.lora)
    parallelize(model, runtime, param_dtype)
    if torch.device(runtime.device).type == "meta":
        return model  # shapes only: to count parameters, or to plan memory
    model.to_empty(device=runtime.device)
    if spec.weights is not None:
        load_weights(model, spec.weights)
    else:
        init_weights_(model, spec.seed, runtime.dtype, spec.init_std)
    if spec.lora is not None:
        init_lora_(model, spec.seed + 1)
    return model
