"""LoRA adapters on disk: adapter.safetensors + adapter_config.json (settings and base model)."""

import json
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Dict, Optional

from torch import nn

from mft.checkpoint.consolidated import args_from_dict
from mft.model.args import ModelArgs
from mft.peft.lora import LoRASettings, apply_lora, lora_modules, lora_state_dict
from mft.utils.atomic import atomic_dir
from mft.utils.errors import MftError
from mft.utils.jsonfile import (
    COUNT,
    FRACTION,
    OBJECT,
    POSITIVE_INT,
    POSITIVE_NUMBER,
    STRING,
    STRINGS,
    Field,
    check_fields,
    read_json_object,
)
from mft.utils.tensorfile import (
    FLOATING,
    open_safetensors,
    read_header,
    save_safetensors,
)

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# adapter_config.json's keys and their types (write_adapter writes them all).
CONFIG_FIELDS = {
    "format": Field(STRING, required=True),
    "version": Field(POSITIVE_INT),
    "r": Field(POSITIVE_INT, required=True),
    "alpha": Field(POSITIVE_NUMBER, required=True),
    "dropout": Field(FRACTION),
    "target_modules": Field(STRINGS, required=True),
    "base_model": Field(OBJECT),
    "step": Field(COUNT),
}
# "random_draw" {"seed", "saved"}: the base was drawn at random by mft-train ("saved": false, not kept).
BASE_FIELDS = {"name": Field(STRING), "checkpoint": Field(STRING), "tokenizer": Field(STRING), "args": Field(OBJECT),
               "random_draw": Field(OBJECT)}


def save_adapter(
    model: nn.Module, folder: str | Path, settings: LoRASettings, base: Dict[str, Any], step: Optional[int] = None
) -> Path:
    """Write the model's LoRA tensors and a JSON of the settings and `base` (its args and source)."""
    return write_adapter(lora_state_dict(model), folder, settings, base, step)


def write_adapter(
    state: Dict[str, Any], folder: str | Path, settings: LoRASettings, base: Dict[str, Any], step: Optional[int] = None
) -> Path:
    """Write adapter tensors (`lora_state_dict`'s output) and their settings, atomically."""
    state = {k: v.contiguous().cpu() for k, v in state.items()}
    config = {"format": "mft-lora", "version": 1, **asdict(settings), "base_model": base, "step": step}
    with atomic_dir(folder) as tmp:
        save_safetensors(state, tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return Path(folder)


def read_adapter_config(folder: str | Path) -> Dict[str, Any]:
    """The adapter's settings, each of its type, once the folder is known to be whole.

    The weights file's header is read too (not its tensors), so a folder whose adapter.safetensors
    is missing, cut short or not safetensors fails here, before any model is built for it.
    """
    folder = Path(folder)
    path = folder / ADAPTER_CONFIG
    if not path.is_file():
        raise MftError(f"{folder}: not an mft adapter folder (expected {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}).")
    config = read_json_object(path, "adapter config")
    if config.get("format") != "mft-lora":
        raise MftError(f"{path}: 'format' is {config.get('format')!r}, expected 'mft-lora'.")
    check_fields(config, CONFIG_FIELDS, path)
    base = config.get("base_model") or {}
    check_fields(base, BASE_FIELDS, path, within="base_model.")
    if base.get("args") is not None:
        args_from_dict(base["args"], path, within="base_model.args.")
    read_header(folder / ADAPTER_WEIGHTS, "adapter weights")
    return config


def load_adapter(
    model: nn.Module, folder: str | Path, args: Optional[ModelArgs] = None, *, scale: float = 1.0
) -> LoRASettings:
    """Apply LoRA with the folder's settings to `model` and load its tensors (strict).

    `scale` multiplies the adapter's update (alpha / r * scale): 0 turns it off, 0.5 halves it.
    It changes the loaded layers only, never the adapter files.
    """
    config = read_adapter_config(folder)
    saved_args = (config.get("base_model") or {}).get("args")
    if args is not None and saved_args is not None:
        saved = ModelArgs(**saved_args)
        diff = {f.name: (getattr(saved, f.name), getattr(args, f.name)) for f in fields(ModelArgs)
                if getattr(saved, f.name) != getattr(args, f.name)
                and not (f.name == "sliding_window" and saved.windows == args.windows)}
        if diff:
            details = ", ".join(f"{k}: adapter {a!r} vs model {b!r}" for k, (a, b) in diff.items())
            raise MftError(f"{folder}: adapter was trained on a different model shape ({details}).")
    settings = LoRASettings(
        r=config["r"], alpha=config["alpha"], dropout=config.get("dropout") or 0.0,
        target_modules=config["target_modules"],
    )
    if not lora_modules(model):
        apply_lora(model, settings)
    params = {f"{name}.{p}": getattr(m, p) for name, m in lora_modules(model).items() for p in ("lora_a", "lora_b")}
    path = Path(folder) / ADAPTER_WEIGHTS
    header = read_header(path, "adapter weights")
    missing, unexpected = sorted(set(params) - set(header)), sorted(set(header) - set(params))
    if missing or unexpected:
        raise MftError(
            f"{path}: keys do not match the model "
            f"(missing {len(missing)}: {missing[:5]}; unexpected {len(unexpected)}: {unexpected[:5]})."
        )
    wrong = [f"{key} {header[key].dtype}{list(header[key].shape)} (expected float{list(param.shape)})"
             for key, param in params.items()
             if header[key].shape != tuple(param.shape) or header[key].dtype not in FLOATING]
    if wrong:
        raise MftError(f"{path}: tensors of the wrong shape or dtype ({len(wrong)}): {', '.join(wrong[:5])}.")
    with open_safetensors(path, "adapter weights") as f:
        for key, param in params.items():
            param.data.copy_(f.get_tensor(key))
    for module in lora_modules(model).values():
        module.scale = settings.scale * scale
    return settings
