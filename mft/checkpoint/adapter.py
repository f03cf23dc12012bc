"""LoRA adapters on disk: adapter.safetensors + adapter_config.json (settings and base model)."""

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, Optional

from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from mft.model.args import ModelArgs
from mft.peft.lora import LoRASettings, apply_lora, lora_modules, lora_state_dict
from mft.utils.atomic import atomic_dir
from mft.utils.errors import MftError
from mft.utils.jsonfile import read_json_object

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


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
        save_file(state, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return Path(folder)


def read_adapter_config(folder: str | Path) -> Dict[str, Any]:
    path = Path(folder) / ADAPTER_CONFIG
    if not path.is_file():
        raise MftError(f"{folder}: not an mft adapter folder (expected {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}).")
    config = read_json_object(path, "adapter config")
    if config.get("format") != "mft-lora":
        raise MftError(f"{path}: 'format' is {config.get('format')!r}, expected 'mft-lora'.")
    return config


def load_adapter(
    model: nn.Module, folder: str | Path, args: Optional[ModelArgs] = None, *, scale: float = 1.0
) -> LoRASettings:
    """Apply LoRA with the folder's settings to `model` and load its tensors (strict).

    `scale` multiplies the adapter's update (alpha / r * scale): 0 turns it off, 0.5 halves it.
    It changes the loaded layers only, never the adapter files.
    """
    config = read_adapter_config(folder)
    saved_args = config.get("base_model", {}).get("args")
    if args is not None and saved_args is not None:
        diff = {k: (v, getattr(args, k)) for k, v in saved_args.items() if getattr(args, k, v) != v}
        if diff:
            details = ", ".join(f"{k}: adapter {a!r} vs model {b!r}" for k, (a, b) in diff.items())
            raise MftError(f"{folder}: adapter was trained on a different model shape ({details}).")
    settings = LoRASettings(
        r=config["r"], alpha=config["alpha"], dropout=config["dropout"], target_modules=config["target_modules"]
    )
    if not lora_modules(model):
        apply_lora(model, settings)
    params = {f"{name}.{p}": getattr(m, p) for name, m in lora_modules(model).items() for p in ("lora_a", "lora_b")}
    with safe_open(str(Path(folder) / ADAPTER_WEIGHTS), framework="pt", device="cpu") as f:
        keys = set(f.keys())
        missing, unexpected = sorted(set(params) - keys), sorted(keys - set(params))
        if missing or unexpected:
            raise MftError(
                f"{folder}/{ADAPTER_WEIGHTS}: keys do not match the model "
                f"(missing {len(missing)}: {missing[:5]}; unexpected {len(unexpected)}: {unexpected[:5]})."
            )
        for key, param in params.items():
            tensor = f.get_tensor(key)
            if tensor.shape != param.shape:
                raise MftError(f"{folder}/{ADAPTER_WEIGHTS}: {key} has shape {tuple(tensor.shape)}, expected {tuple(param.shape)}.")
            param.data.copy_(tensor)
    for module in lora_modules(model).values():
        module.scale = settings.scale * scale
    return settings
