"""Turn a composed config into the objects a run needs: device, dtype, model, datasets."""

from dataclasses import asdict, fields
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from mft.checkpoint.consolidated import save_consolidated
from mft.checkpoint.load import load_weights, read_model_args
from mft.checkpoint.quantized import save_quantized
from mft.errors import MftError
from mft.model.args import ModelArgs
from mft.model.build import build_model
from mft.peft.lora import LoRASettings, apply_lora
from mft.quant.formats import QuantSpec
from mft.quant.linear import quantized_layers
from mft.quant.model import build_quantized_model, quant_spec_from_config

PRECISIONS = {"bf16": torch.bfloat16, "fp32": torch.float32}


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """`auto`: this rank's GPU (LOCAL_RANK under torchrun) if there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise MftError(f"device={name!r} is not a device; expected auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MftError(f"device={name!r} but CUDA is not available on this machine; use device=cpu.")
    return device


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if precision not in PRECISIONS:
        raise MftError(f"precision={precision!r}; expected auto, {', '.join(PRECISIONS)}.")
    return PRECISIONS[precision]


def model_args(mcfg) -> ModelArgs:
    """The preset's args; with a checkpoint, its own args, which must agree with the preset."""
    preset = ModelArgs.from_mapping(mcfg)
    if not mcfg.checkpoint:
        return preset
    found = read_model_args(mcfg.checkpoint)
    diff = [f"{f.name}: config {getattr(preset, f.name)!r} vs checkpoint {getattr(found, f.name)!r}"
            for f in fields(ModelArgs) if getattr(preset, f.name) != getattr(found, f.name)]
    if diff:
        raise MftError(
            f"model={mcfg.name} does not match the checkpoint {mcfg.checkpoint} ({'; '.join(diff)}). "
            "Pick the matching preset or override these model.* keys."
        )
    return found


def resolve_quant(qcfg, pcfg) -> Optional[QuantSpec]:
    """The base's QuantSpec (None for quant=none), refusing set-ups that cannot train."""
    spec = quant_spec_from_config(qcfg)
    if spec is None:
        return None
    if pcfg.method != "lora":
        raise MftError(f"quant={spec.format} freezes the base: it needs peft=lora (got peft.method={pcfg.method!r}).")
    return spec


def build_base_model(
    mcfg, device: torch.device, dtype: torch.dtype, quant: Optional[QuantSpec] = None, quant_modules=None
) -> tuple[nn.Module, ModelArgs]:
    """Build on the meta device, materialise once on `device`, then load or seed-initialise.

    With `quant`, the `quant_modules` linear layers are built quantised and each checkpoint
    tensor is quantised on `device` as it is read (no dense copy of those layers ever exists).
    """
    args = model_args(mcfg)
    model = build_architecture(args, mcfg.attn_backend, quant, quant_modules, device, dtype, init=not mcfg.checkpoint)
    if mcfg.checkpoint:
        load_weights(model, mcfg.checkpoint)
    return model, args


def build_architecture(args: ModelArgs, attn_backend: str, quant: Optional[QuantSpec], quant_modules,
                       device, dtype: torch.dtype, init: bool = True) -> nn.Module:
    """The Transformer, with its `quant_modules` linear layers quantised when `quant` is set."""
    if quant is None:
        return build_model(args, device=device, dtype=dtype, attn_backend=attn_backend, init=init)
    return build_quantized_model(args, quant, device=device, dtype=dtype, modules=quant_modules,
                                 attn_backend=attn_backend, init=init)


def check_vocab(args: ModelArgs, tokenizer, model_name: str, tokenizer_spec: str) -> None:
    if tokenizer.vocab_size > args.vocab_size:
        raise MftError(
            f"tokenizer {tokenizer_spec!r} has {tokenizer.vocab_size} tokens but model={model_name} has "
            f"vocab_size={args.vocab_size}; use the model's own tokenizer or set model.vocab_size."
        )


def apply_peft(model: nn.Module, pcfg) -> LoRASettings | None:
    if pcfg.method == "none":
        return None
    if pcfg.method != "lora":
        raise MftError(f"peft.method={pcfg.method!r}; expected 'lora' or 'none'.")
    settings = LoRASettings(r=pcfg.r, alpha=pcfg.alpha, dropout=pcfg.dropout, target_modules=list(pcfg.target_modules))
    apply_lora(model, settings)
    return settings


def save_base_model(model: nn.Module, folder: Path) -> Path:
    """Keep a randomly initialised base: quantised checkpoint when quantised, else consolidated."""
    if quantized_layers(model):
        return save_quantized(model, folder, source="random init")
    return save_consolidated(model, folder)


def describe_base(mcfg, args: ModelArgs, checkpoint: str, quant: Optional[QuantSpec] = None) -> dict:
    base = {"name": mcfg.name, "checkpoint": checkpoint, "tokenizer": mcfg.tokenizer, "args": asdict(args)}
    if quant is not None:  # what the adapter was trained against; it loads onto the dense base as well
        base["quant"] = asdict(quant)
    return base
