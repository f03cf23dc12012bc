"""Mistral's native layout: params.json + consolidated.safetensors, tensors named as in our model."""

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from mft.model.args import ModelArgs
from mft.model.names import canonical_name
from mft.utils.atomic import atomic_dir
from mft.utils.dtensor import full_tensor
from mft.utils.errors import MftError
from mft.utils.jsonfile import (
    POSITIVE_INT,
    POSITIVE_NUMBER,
    Field,
    check_fields,
    read_json_object,
)
from mft.utils.tensorfile import save_safetensors

PARAMS_FILE = "params.json"
WEIGHTS_FILE = "consolidated.safetensors"
# params.json's keys (ModelArgs' names) and their types; older files lack the optional ones.
PARAMS_FIELDS = {
    "dim": Field(POSITIVE_INT, required=True),
    "n_layers": Field(POSITIVE_INT, required=True),
    "head_dim": Field(POSITIVE_INT),
    "hidden_dim": Field(POSITIVE_INT, required=True),
    "n_heads": Field(POSITIVE_INT, required=True),
    "n_kv_heads": Field(POSITIVE_INT),
    "vocab_size": Field(POSITIVE_INT, required=True),
    "norm_eps": Field(POSITIVE_NUMBER),
    "rope_theta": Field(POSITIVE_NUMBER),
    "sliding_window": Field(POSITIVE_INT),
}


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every tensor of a consolidated checkpoint for `args`, with its shape."""
    q_rows, kv_rows = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    shapes = {"tok_embeddings.weight": (args.vocab_size, args.dim)}
    for i in range(args.n_layers):
        prefix = f"layers.{i}."
        shapes[prefix + "attention.wq.weight"] = (q_rows, args.dim)
        shapes[prefix + "attention.wk.weight"] = (kv_rows, args.dim)
        shapes[prefix + "attention.wv.weight"] = (kv_rows, args.dim)
        shapes[prefix + "attention.wo.weight"] = (args.dim, q_rows)
        shapes[prefix + "feed_forward.w1.weight"] = (args.hidden_dim, args.dim)
        shapes[prefix + "feed_forward.w2.weight"] = (args.dim, args.hidden_dim)
        shapes[prefix + "feed_forward.w3.weight"] = (args.hidden_dim, args.dim)
        shapes[prefix + "attention_norm.weight"] = (args.dim,)
        shapes[prefix + "ffn_norm.weight"] = (args.dim,)
    shapes["norm.weight"] = (args.dim,)
    shapes["output.weight"] = (args.vocab_size, args.dim)
    return shapes


def read_params(path: Path) -> dict[str, Any]:
    return read_json_object(path, "Mistral params")


def params_to_args(params: dict[str, Any], path: Path) -> ModelArgs:
    """ModelArgs from params.json; older files lack head_dim, n_kv_heads, rope_theta, sliding_window."""
    if params.get("moe"):
        raise MftError(f"{path}: mixture-of-experts checkpoints ('moe' key) are not supported yet")
    check_fields(params, PARAMS_FIELDS, path)
    return ModelArgs(
        dim=params["dim"],
        n_layers=params["n_layers"],
        head_dim=params.get("head_dim") or params["dim"] // params["n_heads"],
        hidden_dim=params["hidden_dim"],
        n_heads=params["n_heads"],
        n_kv_heads=params.get("n_kv_heads") or params["n_heads"],
        vocab_size=params["vocab_size"],
        norm_eps=params.get("norm_eps") or 1e-5,
        rope_theta=float(params.get("rope_theta") or 10000.0),
        sliding_window=params.get("sliding_window"),
    )


def weight_files(folder: Path) -> list[Path]:
    """consolidated.safetensors, else consolidated.NN.safetensors shards (one is loadable)."""
    if (folder / WEIGHTS_FILE).is_file():
        return [folder / WEIGHTS_FILE]
    return sorted(folder.glob("consolidated.*.safetensors"))


def find_weights_file(folder: Path) -> Path:
    files = weight_files(folder)
    if not files:
        raise MftError(f"{folder}: {WEIGHTS_FILE} is missing (next to {PARAMS_FILE})")
    if len(files) > 1:
        raise MftError(
            f"{folder}: {len(files)} tensor-parallel shards ({files[0].name}, ...) are not supported; "
            f"expected a single {WEIGHTS_FILE}"
        )
    return files[0]


def save_consolidated(model: torch.nn.Module, folder: str | os.PathLike) -> Path:
    """Write params.json + consolidated.safetensors for `model` (a Transformer), atomically.

    The files appear together or not at all (see atomic_dir; an existing folder is replaced).
    Only the base tensors are written, under their consolidated names: extra parameters such as
    LoRA factors are not part of this format.
    """
    return write_consolidated(consolidated_state(model), model.args, folder)


def consolidated_state(model: torch.nn.Module, keep: bool = True) -> dict[str, torch.Tensor]:
    """The base tensors under their consolidated names, whole, on the CPU.

    Under FSDP gathering is a collective, so every rank calls this; tensors are gathered one at
    a time and moved to the CPU at once, and only a rank with `keep` (rank 0) holds on to them.
    """
    params = {canonical_name(n): p for n, p in model.named_parameters()}
    state = {}
    for name in expected_shapes(model.args):
        tensor = full_tensor(params[name].detach())
        if keep:
            state[name] = tensor.cpu()
    return state


def write_consolidated(state: dict[str, torch.Tensor], args: ModelArgs, folder: str | os.PathLike) -> Path:
    tensors = {name: t.to("cpu").contiguous() for name, t in state.items()}
    with atomic_dir(folder) as tmp:
        (tmp / PARAMS_FILE).write_text(json.dumps(asdict(args), indent=2) + "\n")
        save_safetensors(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
    return Path(folder)
