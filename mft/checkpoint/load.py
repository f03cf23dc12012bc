"""Read ModelArgs and stream weights from a Hugging Face or a Mistral consolidated folder.

Weights are read tensor by tensor from memory-mapped safetensors (never pickle), after the
whole key set and every shape has been checked, so a wrong checkpoint fails in one message
before any data is read. A layer whose weight is quantised (mft.quant) receives its tensor on
its own device and quantises it there, one tensor at a time; mft's quantised checkpoints
(mft/checkpoint/quantized.py) load without any dense pass.
"""

import dataclasses
import logging
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import torch

from mft.checkpoint import consolidated, hf, quantized
from mft.checkpoint.consolidated import save_consolidated
from mft.checkpoint.quantized import assign_weight_, load_quantized, weight_target
from mft.model.args import ModelArgs
from mft.utils.errors import MftError
from mft.utils.jsonfile import (
    BOOL,
    NUMBER,
    OBJECT,
    POSITIVE_INT,
    POSITIVE_NUMBER,
    STRING,
    STRINGS,
    Field,
    check_fields,
    read_json_object,
)
from mft.utils.tensorfile import FLOATING, TensorInfo, open_safetensors, read_header

HF_CONFIG, HF_WEIGHTS, HF_INDEX = "config.json", "model.safetensors", "model.safetensors.index.json"
Format = Literal["hf", "consolidated", "quantized"]
# The config.json keys mft reads (hf.hf_config_to_args) and their types, checked before any is used.
HF_CONFIG_FIELDS = {
    "model_type": Field(STRING),
    "architectures": Field(STRINGS),
    "hidden_size": Field(POSITIVE_INT, required=True),
    "num_hidden_layers": Field(POSITIVE_INT, required=True),
    "num_attention_heads": Field(POSITIVE_INT, required=True),
    "num_key_value_heads": Field(POSITIVE_INT),
    "head_dim": Field(POSITIVE_INT),
    "intermediate_size": Field(POSITIVE_INT, required=True),
    "vocab_size": Field(POSITIVE_INT, required=True),
    "hidden_act": Field(STRING),
    "rms_norm_eps": Field(POSITIVE_NUMBER),
    "rope_theta": Field(POSITIVE_NUMBER),
    "rope_parameters": Field(OBJECT),
    "rope_scaling": Field(OBJECT),
    "sliding_window": Field(POSITIVE_INT),
    "layer_types": Field(STRINGS),
    "tie_word_embeddings": Field(BOOL),
    "num_local_experts": Field(POSITIVE_INT),
    "num_experts_per_tok": Field(POSITIVE_INT),
    "router_jitter_noise": Field(NUMBER),
}
log = logging.getLogger(__name__)
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
    if has_params and not has_config and not consolidated.weight_files(folder) and (folder / quantized.WEIGHTS_FILE).is_file():
        raise MftError(f"{folder} has {consolidated.PARAMS_FILE} and {quantized.WEIGHTS_FILE} but no "
                       f"{quantized.QUANT_CONFIG}: an mft quantised checkpoint whose quantisation config is missing")
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
    config = _read_hf_config(path)
    args = hf.hf_config_to_args(config, path)
    if not hf.is_hf_folder(folder):
        return args  # a config without weights (yet): the config alone
    has_head = any(hf.hf_to_mft_name(key) == "output.weight" for key in _file_tensors(_hf_weight_files(folder)))
    # transformers 5 keeps a head the files hold even when the config says "tied", and ties a
    # Mistral3 model whose config.json does not say (its default); the files settle both cases.
    if args.tied_embeddings and has_head:
        args = dataclasses.replace(args, tied_embeddings=False)
    elif not has_head and config.get("model_type") == "mistral3" and "tie_word_embeddings" not in config:
        args = dataclasses.replace(args, tied_embeddings=True)
    return args


def _read_hf_config(path: Path) -> dict:
    """config.json, its text model's keys checked (a Mistral3 checkpoint's are under text_config)."""
    config = hf.read_hf_config(path)
    check_fields(config, {"model_type": Field(STRING), "text_config": Field(OBJECT)}, path)
    text = hf.text_config(config, path)
    check_fields(text, HF_CONFIG_FIELDS, path)
    quantization = config.get("quantization_config") or text.get("quantization_config")
    if quantization is not None:
        method = quantization.get("quant_method") if isinstance(quantization, dict) else quantization
        raise MftError(f"{path}: a checkpoint quantised by another tool (quantization_config: {method!r}) cannot be "
                       "loaded; use the model's bf16 / fp16 / fp32 release (mft-quantize makes a 4-bit base of it).")
    return config


@dataclass(frozen=True)
class _Source:
    """Where one model tensor, or one piece of it, lives on disk, and how to turn it into ours."""

    file: Path
    key: str  # the name in the file
    shape: tuple[int, ...]
    dtype: str  # safetensors' name of the stored dtype ("BF16", ...)
    rotary_heads: Optional[int] = None  # HF wq/wk: undo the rotary permutation over this many heads
    expert: Optional[int] = None  # one expert's slice of a stacked model tensor; None: the whole tensor
    half: Optional[int] = None  # a fused gate_up_proj: the first (0) or second (1) half of its rows

    @property
    def piece_shape(self) -> tuple[int, ...]:
        """The shape of what it fills (half the rows of a fused gate_up_proj)."""
        if self.half is None or len(self.shape) < 2:
            return self.shape
        return (*self.shape[:-2], self.shape[-2] // 2, self.shape[-1])

    def read(self, f) -> torch.Tensor:
        tensor = f.get_tensor(self.key)
        if self.half is not None:
            tensor = tensor.chunk(2, dim=-2)[self.half]
        return tensor


def _hf_weight_files(folder: Path) -> list[Path]:
    if (folder / HF_WEIGHTS).is_file():
        return [folder / HF_WEIGHTS]
    index_path = folder / HF_INDEX
    if not index_path.is_file():
        raise MftError(f"{folder}: {HF_WEIGHTS} (or the {HF_INDEX} of its shards) is missing; "
                       "only safetensors checkpoints are supported")
    weight_map = read_json_object(index_path, "shard index").get("weight_map")
    names = set(weight_map.values()) if isinstance(weight_map, dict) else {None}
    # A shard is a plain file name in this folder: the index may not point anywhere else.
    if not all(isinstance(name, str) and name and Path(name).name == name for name in names):
        raise MftError(f"{index_path}: expected 'weight_map' to map tensor names to shard file names in this folder")
    files = [folder / name for name in sorted(names)]
    absent = [f.name for f in files if not f.is_file()]
    if absent:
        raise MftError(f"{index_path} lists shards that are missing from the folder: {', '.join(absent)}")
    return files


def _file_tensors(files: list[Path]) -> dict[str, tuple[Path, TensorInfo]]:
    """Every key of every file with its shape and dtype, read from the headers only."""
    return {key: (path, info) for path in files for key, info in read_header(path).items()}


def _sources(folder: Path, fmt: Format, args: ModelArgs) -> tuple[dict[str, list[_Source]], list[str], dict[str, str]]:
    """(sources by our name: one, or one per expert of a stacked tensor; unexpected file keys;
    display name of each file-level name)."""
    expected = consolidated.expected_shapes(args)
    if fmt == "consolidated":
        files, rename = [consolidated.find_weights_file(folder)], (lambda key: key)
        display = {n: n for n in consolidated.file_shapes(args)}
    else:
        files, rename = _hf_weight_files(folder), hf.hf_to_mft_name
        display = {name: hf.mft_to_hf_name(name) for name in consolidated.file_shapes(args)}
    heads = {"attention.wq.weight": args.n_heads, "attention.wk.weight": args.n_kv_heads}
    sources: dict[str, list[_Source]] = defaultdict(list)
    unexpected, vision = [], 0
    for key, (path, info) in _file_tensors(files).items():
        if fmt == "hf" and hf.is_ignored_hf_name(key):
            continue
        if hf.is_vision_hf_name(key) if fmt == "hf" else consolidated.is_vision_name(key):
            vision += 1
            continue
        fused = hf.fused_expert_targets(key) if fmt == "hf" and args.moe is not None else []
        if fused:
            for name, half in fused:
                sources[name].append(_Source(path, key, info.shape, info.dtype, half=half))
            continue
        file_name = rename(key)
        if file_name == "output.weight" and args.tied_embeddings:
            continue  # a tied head's copy of the embedding, which some files store anyway
        name, expert = consolidated.expert_of(file_name) if file_name is not None else (None, None)
        if name not in expected or (expert is not None) != consolidated.is_stacked(name, args):
            unexpected.append(key)
            continue
        suffix = name.split(".", 2)[-1]  # "attention.wq.weight" for "layers.3.attention.wq.weight"
        sources[name].append(_Source(path, key, info.shape, info.dtype, heads.get(suffix) if fmt == "hf" else None,
                                     expert=expert))
    if vision:
        log.info("%s: skipped the %d tensors of the vision encoder (mft trains the text model)", folder, vision)
    return dict(sources), unexpected, display


def _listing(title: str, items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit]) + (f", ... and {len(items) - limit} more" if len(items) > limit else "")
    return f"\n  {title} ({len(items)}): {shown}"


def _missing(name: str, shape: tuple[int, ...], found: list[_Source], args: ModelArgs, display: dict) -> list[str]:
    """The file-level names of what `found` leaves unfilled of the model tensor `name`."""
    if not consolidated.is_stacked(name, args):
        return [] if found else [display[name]]
    if any(src.expert is None for src in found):  # stacked in the file (transformers 5's fused names)
        return []
    have = {src.expert for src in found}
    return [display[consolidated.expert_file_name(name, j)] for j in range(shape[0]) if j not in have]


def _check(folder: Path, args: ModelArgs, sources: dict[str, list[_Source]], unexpected: list[str], display: dict) -> None:
    """One MftError naming every missing, unexpected, mis-shaped and non-floating tensor."""
    expected = consolidated.expected_shapes(args)
    missing = [m for name, shape in expected.items() for m in _missing(name, shape, sources.get(name, []), args, display)]
    misshaped, duplicated = [], []
    for name, found in sources.items():
        experts = [src.expert for src in found]
        if len(found) > 1 and (None in experts or len(set(experts)) < len(experts)):
            duplicated.append(f"{name} ({', '.join(sorted({src.key for src in found}))})")
        for src in found:
            want = expected[name] if src.expert is None else expected[name][1:]
            if src.piece_shape != want or (src.expert is not None and src.expert >= expected[name][0]):
                detail = f"expert {src.expert} of {expected[name][0]}" if src.expert is not None else list(want)
                misshaped.append(f"{src.key} {list(src.shape)} (model expects {detail if src.piece_shape == want else list(want)})")
    # Any floating dtype is cast on load; integers or booleans are not weights of this model.
    mistyped = sorted({f"{src.key} {src.dtype}" for found in sources.values() for src in found if src.dtype not in FLOATING})
    if missing or unexpected or misshaped or mistyped or duplicated:
        raise MftError(
            f"Checkpoint {folder} does not fit the model ({args}):"
            + (_listing("missing tensors", missing) if missing else "")
            + (_listing("unexpected tensors", sorted(unexpected)) if unexpected else "")
            + (_listing("tensors with the wrong shape", sorted(set(misshaped))) if misshaped else "")
            + (_listing("tensors stored twice", duplicated) if duplicated else "")
            + (_listing(f"tensors not stored as floats ({'/'.join(FLOATING)})", mistyped) if mistyped else "")
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

    # Tensors are read file by file; a stacked tensor whose experts span several shards is
    # assembled once all its pieces are read, so at most the stacked tensors in progress are held.
    by_file = defaultdict(list)
    for name, found in sources.items():
        for src in found:
            by_file[src.file].append((name, src))
    pending: dict[str, list[Optional[torch.Tensor]]] = {}
    for path, items in by_file.items():
        with open_safetensors(path) as f:
            for name, src in items:
                target = targets[name]
                # A quantised layer takes the tensor on its device, in the file's dtype; a parameter's
                # tensor is cast on the host (halving the transfer of an fp32 file into a bf16 model).
                tensor = src.read(f)
                tensor = tensor.to(target.weight_q.device) if name in layers else tensor.to(target.dtype)
                if src.rotary_heads is not None:
                    tensor = hf.unpermute_rotary(tensor, src.rotary_heads)
                if src.expert is None:
                    assign_weight_(target, tensor)  # a rank of an FSDP job keeps only its own rows
                    continue
                pieces = pending.setdefault(name, [None] * len(sources[name]))
                pieces[src.expert] = tensor
                if all(piece is not None for piece in pieces):
                    assign_weight_(target, torch.stack(pending.pop(name)))
