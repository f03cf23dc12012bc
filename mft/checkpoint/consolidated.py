"""Mistral's native layout: params.json + consolidated.safetensors, tensors named as in our model.

One difference: a mixture-of-experts model (Mixtral) holds each projection's experts stacked,
`layers.{i}.feed_forward.w1.weight` (E, out, in), where the files store one tensor per expert,
`layers.{i}.feed_forward.experts.{j}.w1.weight` (mistral-inference's names). `expected_shapes`
names the model's tensors, `file_shapes` the file's; `expert_of` and `expert_file_name` map
between them.
"""

import json
import os
import re
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Optional

import torch

from mft.model.args import ModelArgs, MoeArgs, QueryScalingArgs, YarnArgs, arg_problems
from mft.model.names import canonical_name
from mft.utils.atomic import atomic_dir
from mft.utils.dtensor import full_tensor
from mft.utils.errors import MftError
from mft.utils.jsonfile import (
    BOOL,
    NUMBER,
    OBJECT,
    POSITIVE_INT,
    POSITIVE_NUMBER,
    WINDOWS,
    Field,
    check_fields,
    read_json_object,
)
from mft.utils.tensorfile import TensorSlot, write_streamed

PARAMS_FILE = "params.json"
WEIGHTS_FILE = "consolidated.safetensors"
# params.json's keys and their types; older files lack the optional ones. Mistral's names: a
# per-layer `sliding_window` list, "yarn" {factor, original_max_position_embeddings, beta, alpha},
# "llama_4_scaling" {original_max_position_embeddings, beta}, "tied_embeddings".
_SHAPE_FIELDS = {
    "dim": Field(POSITIVE_INT, required=True),
    "n_layers": Field(POSITIVE_INT, required=True),
    "head_dim": Field(POSITIVE_INT),
    "hidden_dim": Field(POSITIVE_INT, required=True),
    "n_heads": Field(POSITIVE_INT, required=True),
    "n_kv_heads": Field(POSITIVE_INT),
    "vocab_size": Field(POSITIVE_INT, required=True),
    "norm_eps": Field(POSITIVE_NUMBER),
    "rope_theta": Field(POSITIVE_NUMBER),
    "sliding_window": Field(WINDOWS),
}
PARAMS_FIELDS = {**_SHAPE_FIELDS, "yarn": Field(OBJECT), "llama_4_scaling": Field(OBJECT), "tied_embeddings": Field(BOOL),
                 "moe": Field(OBJECT)}
_MOE_FIELDS = {"num_experts": Field(POSITIVE_INT, required=True), "num_experts_per_tok": Field(POSITIVE_INT, required=True)}
_PARAMS_YARN_FIELDS = {
    "factor": Field(POSITIVE_NUMBER, required=True),
    "original_max_position_embeddings": Field(POSITIVE_INT, required=True),
    "beta": Field(POSITIVE_NUMBER),
    "alpha": Field(POSITIVE_NUMBER),
    "mscale": Field(NUMBER),
    "mscale_all_dim": Field(NUMBER),
    "apply_scale": Field(BOOL),
}
_PARAMS_LLAMA4_FIELDS = {"original_max_position_embeddings": Field(POSITIVE_INT, required=True),
                         "beta": Field(NUMBER, required=True)}
# ModelArgs as mft itself writes it (dataclasses.asdict: an adapter's base_model.args).
ARGS_FIELDS = {**_SHAPE_FIELDS, "yarn": Field(OBJECT), "query_scaling": Field(OBJECT), "tied_embeddings": Field(BOOL),
               "moe": Field(OBJECT)}
_ARGS_YARN_FIELDS = {f.name: Field(NUMBER, required=True) for f in fields(YarnArgs)}
_ARGS_QUERY_SCALING_FIELDS = {f.name: Field(NUMBER, required=True) for f in fields(QueryScalingArgs)}


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every tensor of the model for `args`, with its shape: those of a consolidated checkpoint,
    except that a mixture of experts' projections are stacked over the experts (see file_shapes)."""
    q_rows, kv_rows = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    experts = () if args.moe is None else (args.moe.num_experts,)
    shapes = {"tok_embeddings.weight": (args.vocab_size, args.dim)}
    for i in range(args.n_layers):
        prefix = f"layers.{i}."
        shapes[prefix + "attention.wq.weight"] = (q_rows, args.dim)
        shapes[prefix + "attention.wk.weight"] = (kv_rows, args.dim)
        shapes[prefix + "attention.wv.weight"] = (kv_rows, args.dim)
        shapes[prefix + "attention.wo.weight"] = (args.dim, q_rows)
        if args.moe is not None:
            shapes[prefix + "feed_forward.gate.weight"] = (args.moe.num_experts, args.dim)
        shapes[prefix + "feed_forward.w1.weight"] = (*experts, args.hidden_dim, args.dim)
        shapes[prefix + "feed_forward.w2.weight"] = (*experts, args.dim, args.hidden_dim)
        shapes[prefix + "feed_forward.w3.weight"] = (*experts, args.hidden_dim, args.dim)
        shapes[prefix + "attention_norm.weight"] = (args.dim,)
        shapes[prefix + "ffn_norm.weight"] = (args.dim,)
    shapes["norm.weight"] = (args.dim,)
    if not args.tied_embeddings:
        shapes["output.weight"] = (args.vocab_size, args.dim)
    return shapes


_EXPERT_FILE_NAME = re.compile(r"^(?P<stem>layers\.\d+\.feed_forward)\.experts\.(?P<expert>\d+)\.(?P<leaf>w[123]\.weight)$")


def expert_of(file_name: str) -> tuple[str, Optional[int]]:
    """(model tensor name, expert index) of a consolidated file's tensor name; the index is None
    for a tensor the model holds as it is."""
    match = _EXPERT_FILE_NAME.match(file_name)
    if match is None:
        return file_name, None
    return f"{match['stem']}.{match['leaf']}", int(match["expert"])


def expert_file_name(name: str, expert: int) -> str:
    """The file's name of expert `expert`'s slice of the stacked model tensor `name`."""
    stem, _, leaf = name.rpartition(".feed_forward.")
    return f"{stem}.feed_forward.experts.{expert}.{leaf}"


def is_stacked(name: str, args: ModelArgs) -> bool:
    """Whether the model holds `name` stacked over the experts (one tensor per expert in files)."""
    return args.moe is not None and ".feed_forward.w" in name


def file_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every tensor of a consolidated checkpoint for `args`, with its shape (one per expert)."""
    shapes = {}
    for name, shape in expected_shapes(args).items():
        if is_stacked(name, args):
            shapes.update({expert_file_name(name, j): shape[1:] for j in range(shape[0])})
        else:
            shapes[name] = shape
    return shapes


# The vision encoder's tensors in a multimodal consolidated checkpoint (Small 3.1+, Ministral 3).
_VISION_PREFIXES = ("vision_encoder.", "vision_language_adapter.", "patch_merger.", "pre_mm_projector_norm.")


def is_vision_name(name: str) -> bool:
    return name.startswith(_VISION_PREFIXES)


def read_params(path: Path) -> dict[str, Any]:
    return read_json_object(path, "Mistral params")


def params_to_args(params: dict[str, Any], path: Path) -> ModelArgs:
    """ModelArgs from params.json; older files lack head_dim, n_kv_heads, rope_theta, sliding_window.

    YaRN's attention factor follows transformers' conversion of these files (mscale 1, and
    mscale_all_dim 1 for a checkpoint with a vision encoder, whose factor is then 1, else 0, whose
    factor is 0.1 ln(factor) + 1); "apply_scale" true / false, when the file has it, asks for the
    second / the first (vLLM's reading); mscale / mscale_all_dim in the file win over both.
    """
    check_fields(params, PARAMS_FIELDS, path)
    yarn, llama4, moe = params.get("yarn"), params.get("llama_4_scaling"), params.get("moe")
    if moe is not None:  # mistral-inference's MoeArgs: other keys (routing options) are not read
        check_fields(moe, _MOE_FIELDS, path, within="moe.")
    if yarn is not None:
        check_fields(yarn, _PARAMS_YARN_FIELDS, path, within="yarn.")
    if llama4 is not None:
        check_fields(llama4, _PARAMS_LLAMA4_FIELDS, path, within="llama_4_scaling.")
    args = ModelArgs(
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
        yarn=YarnArgs() if yarn is None else YarnArgs(
            factor=float(yarn["factor"]),
            original_max_position_embeddings=yarn["original_max_position_embeddings"],
            beta_fast=float(yarn.get("beta") or 32.0),
            beta_slow=float(yarn.get("alpha") or 1.0),
            mscale=float(yarn.get("mscale", 1.0)),
            mscale_all_dim=float(yarn.get("mscale_all_dim", _yarn_mscale_all_dim(yarn, params))),
        ),
        query_scaling=QueryScalingArgs() if llama4 is None else QueryScalingArgs(
            beta=float(llama4["beta"]), original_max_position_embeddings=llama4["original_max_position_embeddings"]),
        tied_embeddings=bool(params.get("tied_embeddings", False)),
        moe=None if moe is None else MoeArgs(moe["num_experts"], moe["num_experts_per_tok"]),
    )
    check_args(args, path)
    return args


def _yarn_mscale_all_dim(yarn: dict[str, Any], params: dict[str, Any]) -> float:
    if "apply_scale" in yarn:
        return 0.0 if yarn["apply_scale"] else 1.0
    return 1.0 if params.get("vision_encoder") else 0.0


def args_to_params(args: ModelArgs) -> dict[str, Any]:
    """params.json for `args`, in Mistral's names (params_to_args reads it back to `args`)."""
    params: dict[str, Any] = {name: getattr(args, name) for name in _SHAPE_FIELDS}
    if args.yarn.active:
        y = args.yarn
        params["yarn"] = {"factor": y.factor, "original_max_position_embeddings": y.original_max_position_embeddings,
                          "beta": y.beta_fast, "alpha": y.beta_slow, "mscale": y.mscale, "mscale_all_dim": y.mscale_all_dim}
    if args.query_scaling.active:
        params["llama_4_scaling"] = asdict(args.query_scaling)
    if args.tied_embeddings:
        params["tied_embeddings"] = True
    if args.moe is not None:
        params["moe"] = asdict(args.moe)
    return params


def args_from_dict(saved: dict[str, Any], path: Path, within: str = "") -> ModelArgs:
    """ModelArgs from mft's own record of them (dataclasses.asdict), every key and type checked."""
    check_fields(saved, ARGS_FIELDS, path, within=within, only_known=True)
    for key, nested in (("yarn", _ARGS_YARN_FIELDS), ("query_scaling", _ARGS_QUERY_SCALING_FIELDS), ("moe", _MOE_FIELDS)):
        if saved.get(key) is not None:
            check_fields(saved[key], nested, path, within=f"{within}{key}.", only_known=True)
    args = ModelArgs(**saved)
    check_args(args, path)
    return args


def check_args(args: ModelArgs, path: Path) -> None:
    """One MftError naming `path` when its windows or rope settings cannot work."""
    problems = arg_problems(args)
    if problems:
        raise MftError(f"{path}: " + "; ".join(f"{key} is {value!r}, expected {expected}"
                                               for key, value, expected in problems) + ".")


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
    return stream_consolidated(model, Path(folder))


def stream_consolidated(model: torch.nn.Module, folder: Path | None) -> Path | None:
    """save_consolidated tensor by tensor: each base tensor is gathered (a collective for an FSDP
    shard, so every rank calls this) and written at once, never a whole state in memory. Rank 0
    passes the folder, the other ranks None (they gather and write nothing)."""
    params = {canonical_name(n): p for n, p in model.named_parameters()}
    layout = {}
    for file_name in file_shapes(model.args):
        param = params[expert_of(file_name)[0]]
        layout[file_name] = TensorSlot(param.dtype, tuple(param.shape[1:] if param.dim() == 3 else param.shape))
    # The file orders a layer's experts before its projections (experts.0.w1, experts.0.w2, ...):
    # keep the layer's stacked tensors once gathered, until the next layer's are.
    gathered: dict[str, torch.Tensor] = {}

    def fetch(file_name: str) -> torch.Tensor:
        name, expert = expert_of(file_name)
        if expert is None:
            return full_tensor(params[name].detach())
        if name not in gathered:
            layer = name.rpartition(".feed_forward.")[0]
            for other in [n for n in gathered if n.rpartition(".feed_forward.")[0] != layer]:
                del gathered[other]
            gathered[name] = full_tensor(params[name].detach()).cpu()  # the GPU holds no extra stacks
        return gathered[name][expert]

    if folder is None:
        write_streamed(None, layout, fetch)
        return None
    with atomic_dir(folder) as tmp:
        (tmp / PARAMS_FILE).write_text(json.dumps(args_to_params(model.args), indent=2) + "\n")
        write_streamed(tmp / WEIGHTS_FILE, layout, fetch, metadata={"format": "pt"})
    return Path(folder)
