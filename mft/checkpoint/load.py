"""Read ModelArgs and stream weights from a Hugging Face or a Mistral consolidated folder.

Weights are read tensor by tensor from memory-mapped safetensors (never pickle), after the
whole key set and every shape has been checked, so a wrong checkpoint fails in one message
before any data is read. A layer whose weight is quantised (mft.quant) receives its tensor on
its own device and quantises it there, one tensor at a time; mft's quantised checkpoints
(mft/checkpoint/quantized.py) load without any dense pass.
"""

import json
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import torch
from safetensors import safe_open

from mft.checkpoint import consolidated, hf, quantized
from mft.checkpoint.consolidated import save_consolidated
from mft.checkpoint.quantized import assign_weight_, load_quantized, weight_target
from mft.model.args import ModelArgs
from mft.utils.errors import MftError

HF_CONFIG, HF_WEIGHTS, HF_INDEX = "config.json", "model.safetensors", "model.safetensors.index.json"
Format = Literal["hf", "consolidated", "quantized"]
__all__ = ["detect_format", "read_model_args", "load_weights", "save_consolidated"]


def detect_format(folder: str | os.PathLike) -> Format:
    """"quantized" (mft's quantised checkpoint) when quant_config.json is there, "consolidated" when
    params.json (with its weights) is, else "hf" when config.json is."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MftError(f"Checkpoint folder {folder} does not exist or is not a folder")
    if quantized.is_quantized_folder(folder):
        return "quantized"
    has_params = (folder / consolidated.PARAMS_FILE).is_file()
    has_config = (folder / HF_CONFIG).is_file()
    # Mistral's HF repos ship both layouts; the native one needs no renaming or permutation.
    if has_params and (consolidated.weight_files(folder) or not has_config):
        return "consolidated"
    if has_config:
        return "hf"
    raise MftError(
        f"{folder} is not a model checkpoint: expected {HF_CONFIG} (Hugging Face) or "
        f"{consolidated.PARAMS_FILE} + {consolidated.WEIGHTS_FILE} (Mistral consolidated)"
    )


def read_model_args(folder: str | os.PathLike) -> ModelArgs:
    folder = Path(folder)
    if detect_format(folder) in ("consolidated", "quantized"):
        path = folder / consolidated.PARAMS_FILE
        return consolidated.params_to_args(consolidated.read_params(path), path)
    path = folder / HF_CONFIG
    return hf.hf_config_to_args(hf.read_hf_config(path), path)


@dataclass(frozen=True)
class _Source:
    """Where one model tensor lives on disk, and how to turn it into ours."""

    file: Path
    key: str  # the name in the file
    shape: tuple[int, ...]
    rotary_heads: Optional[int] = None  # HF wq/wk: undo the rotary permutation over this many heads


def _hf_weight_files(folder: Path) -> list[Path]:
    if (folder / HF_WEIGHTS).is_file():
        return [folder / HF_WEIGHTS]
    index_path = folder / HF_INDEX
    if not index_path.is_file():
        raise MftError(f"{folder}: no {HF_WEIGHTS} nor {HF_INDEX} (only safetensors checkpoints are supported)")
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise MftError(f"{index_path}: expected a JSON object with a 'weight_map' ({e})") from e
    files = [folder / name for name in sorted(set(weight_map.values()))]
    absent = [f.name for f in files if not f.is_file()]
    if absent:
        raise MftError(f"{index_path} lists shards that are not in the folder: {', '.join(absent)}")
    return files


def _file_shapes(files: list[Path]) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """Every key of every file with its shape, read from the headers only."""
    found = {}
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                found[key] = (path, tuple(f.get_slice(key).get_shape()))
    return found


def _sources(folder: Path, fmt: Format, args: ModelArgs) -> tuple[dict[str, _Source], list[str], dict[str, str]]:
    """(sources by our name, unexpected file keys, display name of each of our names)."""
    expected = consolidated.expected_shapes(args)
    if fmt == "consolidated":
        files, rename, display = [consolidated.find_weights_file(folder)], (lambda key: key), {n: n for n in expected}
    else:
        files, rename = _hf_weight_files(folder), hf.hf_to_mft_name
        display = {name: hf.mft_to_hf_name(name) for name in expected}
    heads = {"attention.wq.weight": args.n_heads, "attention.wk.weight": args.n_kv_heads}
    sources, unexpected = {}, []
    for key, (path, shape) in _file_shapes(files).items():
        if fmt == "hf" and hf.is_ignored_hf_name(key):
            continue
        name = rename(key)
        if name not in expected:
            unexpected.append(key)
            continue
        suffix = name.split(".", 2)[-1]  # "attention.wq.weight" for "layers.3.attention.wq.weight"
        sources[name] = _Source(path, key, shape, heads.get(suffix) if fmt == "hf" else None)
    if fmt == "hf" and "output.weight" not in sources and "tok_embeddings.weight" in sources:
        if hf.read_hf_config(folder / HF_CONFIG).get("tie_word_embeddings", False):
            sources["output.weight"] = sources["tok_embeddings.weight"]  # our head stays untied: a copy
    return sources, unexpected, display


def _listing(title: str, items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit]) + (f", ... and {len(items) - limit} more" if len(items) > limit else "")
    return f"\n  {title} ({len(items)}): {shown}"


def _check(folder: Path, args: ModelArgs, sources: dict[str, _Source], unexpected: list[str], display: dict) -> None:
    """One MftError naming every missing, unexpected and mis-shaped tensor."""
    expected = consolidated.expected_shapes(args)
    missing = [display[name] for name in expected if name not in sources]
    misshaped = [
        f"{src.key} {list(src.shape)} (model expects {list(expected[name])})"
        for name, src in sources.items()
        if src.shape != expected[name]
    ]
    if missing or unexpected or misshaped:
        raise MftError(
            f"Checkpoint {folder} does not fit the model ({args}):"
            + (_listing("missing tensors", missing) if missing else "")
            + (_listing("unexpected tensors", sorted(unexpected)) if unexpected else "")
            + (_listing("tensors with the wrong shape", misshaped) if misshaped else "")
        )


@torch.no_grad()
def load_weights(model: torch.nn.Module, folder: str | os.PathLike, *, dtype: Optional[torch.dtype] = None) -> None:
    """Fill the (materialised) parameters of a Transformer from a checkpoint folder.

    Each tensor is read from the memory map, renamed/unpermuted as its format needs, cast to its
    parameter's dtype on the host (halving the transfer of an fp32 file into a bf16 model) and
    copied into the parameter on its device. A quantised layer instead receives the tensor on
    its device, in the file's dtype, and quantises it there. `dtype`, when given, is a guard:
    the floating parameters must have it, so a model built in the wrong precision fails before
    any reading.
    """
    folder = Path(folder)
    fmt = detect_format(folder)
    if fmt == "quantized":
        return load_quantized(model, folder, dtype=dtype)
    args: ModelArgs = model.args
    targets = {name: weight_target(model, name) for name in consolidated.expected_shapes(args)}
    layers = {name: t for name, t in targets.items() if not isinstance(t, torch.Tensor)}  # quantised
    params = {name: t for name, t in targets.items() if name not in layers}
    if any(p.is_meta for p in params.values()) or any(m.weight_q.is_meta for m in layers.values()):
        raise ValueError("load_weights needs materialised parameters: build the model on a real device first")
    if dtype is not None:
        wrong = sorted({str(p.dtype) for p in params.values() if p.is_floating_point() and p.dtype != dtype})
        if wrong:
            raise ValueError(f"load_weights(dtype={dtype}): the model's parameters are {', '.join(wrong)}")
    sources, unexpected, display = _sources(folder, fmt, args)
    _check(folder, args, sources, unexpected, display)

    by_file = defaultdict(list)
    for name, src in sources.items():
        by_file[src.file].append((name, src))
    for path, items in by_file.items():
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name, src in items:
                target = targets[name]
                tensor = f.get_tensor(src.key)
                # A quantised layer takes the tensor on its device, in the file's dtype; a parameter's
                # tensor is cast on the host (halving the transfer of an fp32 file into a bf16 model).
                tensor = tensor.to(target.weight_q.device) if name in layers else tensor.to(target.dtype)
                if src.rotary_heads is not None:
                    tensor = hf.unpermute_rotary(tensor, src.rotary_heads)
                assign_weight_(target, tensor)  # a rank of an FSDP job keeps only its own rows
