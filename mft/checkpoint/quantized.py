"""mft's quantised checkpoint: params.json + quant_config.json + model.safetensors.

Written by `mft-quantize` (mft/cli/quantize.py), or for a randomly initialised quantised base.
The safetensors file holds, under the model's own state-dict names, the packed parts of every
quantised linear layer (`layers.0.attention.wq.weight_q`, `..._absmax`, ...; see
mft.quant.formats for the layout) and the remaining tensors (embeddings, norms, head unless
quantised, a mixture of experts' router) dense. A mixture of experts' projection is stored
stacked, as the model holds it: `layers.0.feed_forward.w1.weight_q` (G, out, in // 2), each
expert quantised on its own (unlike the per-expert files of dense checkpoints).
quant_config.json says how: {"format": "mft-quantized", "version": 1, "quant": {format,
block_size, double_quant, dq_block_size}, "modules": [...quantised kinds...], "source": ...}.

Loading is tensor by tensor and adapts to the model it fills:
- a layer quantised in both: the packed parts are copied as they are (no dense pass);
- a dense layer in the model: the parts are dequantised on the model's device (merging,
  bf16 inference);
- a quantised layer fed a dense tensor: quantised on the device.
A layer quantised with a different spec than the model's is an error, never requantised.
"""

import json
import os
import shutil
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from mft.checkpoint import consolidated
from mft.model.args import ModelArgs
from mft.model.names import canonical_name
from mft.quant.dequant import dequantize, dequantize_stack
from mft.quant.formats import QuantizedStack, QuantizedTensor, QuantSpec
from mft.quant.linear import PREFIX, load_dense_weight_
from mft.quant.model import QUANTIZABLE, model_quant
from mft.utils.atomic import atomic_dir
from mft.utils.dtensor import copy_full_, full_tensor
from mft.utils.errors import MftError
from mft.utils.jsonfile import (
    BOOL,
    OBJECT,
    POSITIVE_INT,
    STRING,
    STRINGS,
    Field,
    check_fields,
    read_json_object,
)
from mft.utils.tensorfile import (
    FLOATING,
    TORCH_DTYPES,
    TensorSlot,
    open_safetensors,
    read_header,
    write_streamed,
)

QUANT_CONFIG = "quant_config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_NAME = "mft-quantized"
# quant_config.json's "quant" entry: QuantSpec's fields.
_SPEC_FIELDS = {"format": Field(STRING, required=True), "block_size": Field(POSITIVE_INT, required=True),
                "double_quant": Field(BOOL), "dq_block_size": Field(POSITIVE_INT)}
PACKING = ("4-bit codes, two per uint8 byte, the even column in the high nibble; tensors row-major "
           "(out, in // 2) with one set of block constants per block_size elements of a row")


def is_quantized_folder(folder: Path) -> bool:
    return (Path(folder) / QUANT_CONFIG).is_file()


def read_quant_config(folder: str | os.PathLike) -> Tuple[QuantSpec, list, Dict[str, Any]]:
    """(spec, quantised module kinds, raw JSON) of a quantised checkpoint folder."""
    path = Path(folder) / QUANT_CONFIG
    config = read_json_object(path, "quantisation config")
    if config.get("format") != FORMAT_NAME or config.get("version") != 1:
        raise MftError(f"{path}: expected format {FORMAT_NAME!r} version 1, got {config.get('format')!r} "
                       f"version {config.get('version')!r}.")
    check_fields(config, {"quant": Field(OBJECT, required=True), "modules": Field(STRINGS, required=True)}, path)
    check_fields(config["quant"], _SPEC_FIELDS, path, within="quant.", only_known=True)
    try:
        spec = QuantSpec(**config["quant"])
    except MftError as e:  # its message names the setting; say which file holds it
        raise MftError(f"{path}: {e}") from None
    modules = config["modules"]
    if set(modules) - set(QUANTIZABLE):
        raise MftError(f"{path}: unknown quantised modules {sorted(set(modules) - set(QUANTIZABLE))}.")
    return spec, modules, config


def _layer_kind(name: str) -> str:
    """"wq" for "layers.3.attention.wq.weight", "output" for "output.weight"."""
    return name.rsplit(".", 2)[-2]


def _part_shapes(spec: QuantSpec, shape: Tuple[int, ...]) -> dict:
    """The stored parts of a dense (out, in) weight, or of stacked (G, out, in) experts."""
    return spec.part_shapes(*shape[-2:], groups=shape[0] if len(shape) == 3 else None)


def _dequantized(spec: QuantSpec, shape: Tuple[int, ...], parts: dict, dtype: torch.dtype) -> torch.Tensor:
    if len(shape) == 3:
        return dequantize_stack(QuantizedStack(spec, tuple(shape[1:]), parts), dtype)
    return dequantize(QuantizedTensor(spec, tuple(shape), parts), dtype)


def expected_tensors(args: ModelArgs, spec: QuantSpec, modules) -> Dict[str, Tuple[Tuple[int, ...], Optional[torch.dtype]]]:
    """Every tensor of a quantised checkpoint: name -> (shape, dtype; None for dense tensors). A
    mixture of experts' projection is stored stacked under the model's name, each part (G, ...)."""
    expected = {}
    for name, shape in consolidated.expected_shapes(args).items():
        if _layer_kind(name) in modules and name.endswith(".weight"):
            stem = name[: -len("weight")]
            for part, (part_shape, dtype) in _part_shapes(spec, shape).items():
                expected[stem + PREFIX + part] = (part_shape, dtype)
        else:
            expected[name] = (shape, None)
    return expected


def weight_target(model: torch.nn.Module, name: str):
    """Where a checkpoint tensor `name` goes: its parameter, or the layer when that layer is quantised."""
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if leaf == "weight" and getattr(module, "quant_spec", None) is not None:
        return module
    return model.get_parameter(name)


@torch.no_grad()
def assign_weight_(target, tensor: torch.Tensor) -> None:
    """Put a whole tensor where `weight_target` says: into a parameter (a sharded one keeps only
    its own rows), or quantised on the layer's device into a quantised layer's buffers."""
    if isinstance(target, torch.Tensor):
        copy_full_(target, tensor.to(target.dtype))
    else:
        load_dense_weight_(target, tensor.to(target.weight_q.device))


def save_quantized(model: torch.nn.Module, folder: str | os.PathLike, source: Optional[str] = None,
                   extra_files: Sequence[Path] = ()) -> Path:
    """Write a quantised Transformer (LoRA factors, if any, are left out) atomically, with copies
    of `extra_files` (the source's tokenizer file, say) in the same folder."""
    return stream_quantized(model, Path(folder), source, extra_files)


def stream_quantized(model: torch.nn.Module, folder: Optional[Path], source: Optional[str] = None,
                     extra_files: Sequence[Path] = ()) -> Optional[Path]:
    """save_quantized tensor by tensor: each tensor is gathered (a collective for an FSDP shard, so
    every rank calls this) and written at once, never a whole state in memory. Rank 0 passes the
    folder, the other ranks None (they gather and write nothing)."""
    spec, modules = _model_spec(model)
    state = {canonical_name(name): tensor for name, tensor in model.state_dict().items()}
    layout = {name: TensorSlot(state[name].dtype, tuple(state[name].shape))
              for name in expected_tensors(model.args, spec, modules)}

    def fetch(name: str) -> torch.Tensor:
        return full_tensor(state[name].detach())

    if folder is None:
        write_streamed(None, layout, fetch)
        return None
    config = {"format": FORMAT_NAME, "version": 1, "quant": asdict(spec), "modules": modules,
              "packing": PACKING, "source": source}
    with atomic_dir(folder) as tmp:
        (tmp / consolidated.PARAMS_FILE).write_text(json.dumps(consolidated.args_to_params(model.args), indent=2) + "\n")
        (tmp / QUANT_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        for extra in extra_files:
            shutil.copyfile(extra, tmp / Path(extra).name)
        write_streamed(tmp / WEIGHTS_FILE, layout, fetch, metadata={"format": "pt"})
    return Path(folder)


def _model_spec(model: torch.nn.Module) -> Tuple[QuantSpec, list]:
    quant = model_quant(model)
    if quant is None:
        raise ValueError("a quantised checkpoint needs a model with quantised layers")
    modules = quant.pop("modules")
    return QuantSpec(**quant), modules


def _check_file(folder: Path, expected: dict, found: dict) -> None:
    """`found`: the file's header, name -> TensorInfo. Dense tensors may be any float (cast on load)."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = [
        f"{name} {found[name].dtype}{list(found[name].shape)} (expected {dtype or 'float'}{list(shape)})"
        for name, (shape, dtype) in expected.items()
        if name in found and (found[name].shape != shape or not _dtype_fits(found[name].dtype, dtype))
    ]
    if missing or unexpected or wrong:
        raise MftError(
            f"Quantised checkpoint {folder} is incomplete or does not match its {QUANT_CONFIG}:"
            + (f"\n  missing ({len(missing)}): {', '.join(missing[:8])}" if missing else "")
            + (f"\n  unexpected ({len(unexpected)}): {', '.join(unexpected[:8])}" if unexpected else "")
            + (f"\n  wrong shape or dtype ({len(wrong)}): {', '.join(wrong[:8])}" if wrong else "")
        )


@torch.no_grad()
def load_quantized(model: torch.nn.Module, folder: str | os.PathLike, dtype: Optional[torch.dtype] = None) -> None:
    """Fill a (materialised) Transformer, quantised or dense, from a quantised checkpoint folder."""
    folder = Path(folder)
    spec, modules, _ = read_quant_config(folder)
    params_path = folder / consolidated.PARAMS_FILE
    saved_args = consolidated.params_to_args(consolidated.read_params(params_path), params_path)
    args: ModelArgs = model.args
    if saved_args != args:
        diff = [f"{f.name}: checkpoint {getattr(saved_args, f.name)!r} vs model {getattr(args, f.name)!r}"
                for f in fields(ModelArgs) if getattr(saved_args, f.name) != getattr(args, f.name)]
        raise MftError(f"Quantised checkpoint {folder} does not fit the model: {'; '.join(diff)}")
    names = list(consolidated.expected_shapes(args))
    targets = {name: weight_target(model, name) for name in names}
    for name, target in targets.items():
        is_layer = not isinstance(target, torch.Tensor)
        if (target.weight_q if is_layer else target).is_meta:
            raise ValueError("load_weights needs a materialised model: build it on a real device first")
        if is_layer and _layer_kind(name) in modules and target.quant_spec != spec:
            raise MftError(
                f"{folder} holds {spec.describe()} weights but the model's {_layer_kind(name)} layers are set up for "
                f"{target.quant_spec.describe()}; set the quant config to match the checkpoint "
                "(or quant=none to load it dequantised)."
            )
        if not is_layer and dtype is not None and target.is_floating_point() and target.dtype != dtype:
            raise ValueError(f"load_weights(dtype={dtype}): the model's parameters are {target.dtype}")

    path = folder / WEIGHTS_FILE
    _check_file(folder, expected_tensors(args, spec, modules), read_header(path, "quantised weights"))
    with open_safetensors(path, "quantised weights") as f:
        for name, target in targets.items():
            stored_quantized = _layer_kind(name) in modules and name.endswith(".weight")
            if isinstance(target, torch.Tensor):
                if stored_quantized:
                    stem = name[: -len("weight")]
                    parts = {part: f.get_tensor(stem + PREFIX + part).to(target.device)
                             for part in _part_shapes(spec, target.shape)}
                    copy_full_(target, _dequantized(spec, target.shape, parts, target.dtype))
                else:
                    copy_full_(target, f.get_tensor(name).to(target.dtype))  # an FSDP rank keeps its own rows
            elif stored_quantized:  # same spec (checked above): the packed parts as they are
                stem = name[: -len("weight")]
                for part in spec.part_shapes(target.out_features, target.in_features):  # stacked or not
                    getattr(target, PREFIX + part).copy_(f.get_tensor(stem + PREFIX + part))
            else:
                load_dense_weight_(target, f.get_tensor(name).to(target.weight_q.device))



def _dtype_fits(stored: str, expected: Optional[torch.dtype]) -> bool:
    """A packed part must have its exact dtype; a dense tensor (expected None) any float."""
    return stored in FLOATING if expected is None else TORCH_DTYPES.get(stored) == expected
