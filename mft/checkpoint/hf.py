"""The Hugging Face layout of a Mistral checkpoint: config.json, tensor names, rotary permutation.

Families (config.json's model_type): "mistral" (7B, Nemo, Small 3, Codestral, Devstral,
Magistral: one window or none), "mixtral" (a mixture of experts), "ministral" (Ministral 8B: `layer_types` interleave sliding and
full layers), "ministral3" (Ministral 3: YaRN rope and Llama 4's query scale) and "mistral3"
(Small 3.1+, Ministral 3 checkpoints with a vision encoder: the text model is `text_config`, its
tensors are under language_model.model. (the hub's files, and what transformers writes) or
model.language_model. (transformers 5's module names); the vision tensors are skipped).
"""

import re
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import torch

from mft.checkpoint.consolidated import check_args
from mft.model.args import ModelArgs, MoeArgs, QueryScalingArgs, YarnArgs
from mft.utils.errors import MftError
from mft.utils.jsonfile import (
    NUMBER,
    POSITIVE_INT,
    POSITIVE_NUMBER,
    STRING,
    Field,
    check_fields,
    read_json_object,
)

# (HF name, consolidated name) templates; {i} is the layer index.
_NAME_PAIRS = [
    ("model.embed_tokens.weight", "tok_embeddings.weight"),
    ("model.norm.weight", "norm.weight"),
    ("lm_head.weight", "output.weight"),
    ("model.layers.{i}.self_attn.q_proj.weight", "layers.{i}.attention.wq.weight"),
    ("model.layers.{i}.self_attn.k_proj.weight", "layers.{i}.attention.wk.weight"),
    ("model.layers.{i}.self_attn.v_proj.weight", "layers.{i}.attention.wv.weight"),
    ("model.layers.{i}.self_attn.o_proj.weight", "layers.{i}.attention.wo.weight"),
    ("model.layers.{i}.mlp.gate_proj.weight", "layers.{i}.feed_forward.w1.weight"),
    ("model.layers.{i}.mlp.down_proj.weight", "layers.{i}.feed_forward.w2.weight"),
    ("model.layers.{i}.mlp.up_proj.weight", "layers.{i}.feed_forward.w3.weight"),
    ("model.layers.{i}.input_layernorm.weight", "layers.{i}.attention_norm.weight"),
    ("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.ffn_norm.weight"),
    # Mixtral as the hub's files (and transformers' save_pretrained) name it: one tensor per expert.
    ("model.layers.{i}.block_sparse_moe.gate.weight", "layers.{i}.feed_forward.gate.weight"),
    ("model.layers.{i}.block_sparse_moe.experts.{j}.w1.weight", "layers.{i}.feed_forward.experts.{j}.w1.weight"),
    ("model.layers.{i}.block_sparse_moe.experts.{j}.w2.weight", "layers.{i}.feed_forward.experts.{j}.w2.weight"),
    ("model.layers.{i}.block_sparse_moe.experts.{j}.w3.weight", "layers.{i}.feed_forward.experts.{j}.w3.weight"),
]
# transformers 5's in-memory Mixtral names, found in files some tools write from a model's state
# dict: the router, and the experts fused into (E, 2 * hidden, dim) gate_up_proj (w1's rows, then
# w3's) and (E, dim, hidden) down_proj (w2 stacked). (HF name, model name, half of gate_up's rows.)
_FUSED_EXPERT_NAMES = [
    ("model.layers.{i}.mlp.gate.weight", "layers.{i}.feed_forward.gate.weight", None),
    ("model.layers.{i}.mlp.experts.down_proj", "layers.{i}.feed_forward.w2.weight", None),
    ("model.layers.{i}.mlp.experts.gate_up_proj", "layers.{i}.feed_forward.w1.weight", 0),
    ("model.layers.{i}.mlp.experts.gate_up_proj", "layers.{i}.feed_forward.w3.weight", 1),
]


def _template_regex(template: str) -> re.Pattern:
    pattern = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{j\}", r"(?P<j>\d+)")
    return re.compile(pattern + "$")


_HF_TO_MFT = [(_template_regex(hf), mft) for hf, mft in _NAME_PAIRS]
_MFT_TO_HF = [(_template_regex(mft), hf) for hf, mft in _NAME_PAIRS]


def _rename(name: str, table: list[tuple[re.Pattern, str]]) -> Optional[str]:
    for pattern, template in table:
        match = pattern.match(name)
        if match:
            return template.format(**match.groupdict())
    return None


# Where a Mistral3 (vision + text) checkpoint keeps its text model's tensors: (prefix, replacement
# giving a MistralForCausalLM name): transformers 5's module names, then the names on disk.
_MULTIMODAL_TEXT_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."),
                             ("language_model.lm_head.", "lm_head."))
# Prefixes of a Mistral3 checkpoint's vision tensors (skipped: mft trains the text model).
MULTIMODAL_VISION_PREFIXES = ("model.vision_tower.", "vision_tower.", "model.multi_modal_projector.",
                              "multi_modal_projector.")


def hf_to_mft_name(name: str) -> Optional[str]:
    """Consolidated name of an HF tensor name (a Mistral3 checkpoint's text tensors included); None
    when the name is not part of a Mistral text model."""
    for prefix, replacement in _MULTIMODAL_TEXT_PREFIXES:
        if name.startswith(prefix):
            name = replacement + name[len(prefix):]
            break
    return _rename(name, _HF_TO_MFT)


def mft_to_hf_name(name: str) -> Optional[str]:
    return _rename(name, _MFT_TO_HF)


def fused_expert_targets(name: str) -> list[tuple[str, Optional[int]]]:
    """For a transformers 5 in-memory Mixtral name (see _FUSED_EXPERT_NAMES): the model tensors it
    fills, each with the half of the file tensor's rows it takes (None: all). Empty otherwise."""
    targets = []
    for hf_template, mft_template, half in _FUSED_EXPERT_NAMES:
        match = _template_regex(hf_template).match(name)
        if match:
            targets.append((mft_template.format(**match.groupdict()), half))
    return targets


def is_ignored_hf_name(name: str) -> bool:
    """Tensors some old HF checkpoints carry that are derived, not learnt."""
    return name.endswith("rotary_emb.inv_freq")


def is_vision_hf_name(name: str) -> bool:
    """A Mistral3 checkpoint's vision encoder or projector tensor."""
    return name.startswith(MULTIMODAL_VISION_PREFIXES)


def unpermute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo HF's conversion of wq/wk from interleaved rotary pairs to the rotate_half layout.

    HF's conversion script applied w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2):
    per head, the two members of each pair went to the two halves. Swapping the axes back
    restores pairs (2i, 2i + 1).
    """
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def permute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The HF permutation itself (for exports to HF); inverse of unpermute_rotary."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def is_hf_folder(folder: Path) -> bool:
    """Whether transformers' from_pretrained can read `folder`'s weights: config.json + safetensors."""
    return (folder / "config.json").is_file() and any(
        (folder / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json"))


def read_hf_config(path: Path) -> dict[str, Any]:
    return read_json_object(path, "Hugging Face config")


def is_multimodal_folder(folder: Path) -> bool:
    """A Mistral3 (vision + text) checkpoint: peft adapters for mft's text model do not apply to it as is."""
    return read_hf_config(folder / "config.json").get("model_type") == "mistral3"


TEXT_MODEL_TYPES = ("mistral", "llama", "ministral", "ministral3", "mixtral")
# rope_parameters (rope_scaling in transformers 4) keys mft reads, checked before any is used.
_ROPE_FIELDS = {
    "rope_type": Field(STRING),
    "type": Field(STRING),
    "rope_theta": Field(POSITIVE_NUMBER),
    "factor": Field(NUMBER),
    "original_max_position_embeddings": Field(POSITIVE_INT),
    "beta_fast": Field(NUMBER),
    "beta_slow": Field(NUMBER),
    "mscale": Field(NUMBER),
    "mscale_all_dim": Field(NUMBER),
    "llama_4_scaling_beta": Field(NUMBER),
}


def text_config(config: dict[str, Any], path: Path) -> dict[str, Any]:
    """The text model's config: config.json itself, or a Mistral3 checkpoint's `text_config`."""
    model_type = config.get("model_type", "mistral")
    if model_type == "mistral3":
        text = config.get("text_config")
        if not isinstance(text, dict):
            raise MftError(f"{path}: a model_type 'mistral3' config needs a 'text_config' object (its text model)")
        # transformers 5 reads the top-level key, transformers 4 the text model's; the hub's files
        # hold at most one of them. Whether the files hold a head of its own settles it on load.
        tied = {"tie_word_embeddings": config["tie_word_embeddings"]} if "tie_word_embeddings" in config else {}
        return {"model_type": "mistral", **text, **tied}
    if model_type not in TEXT_MODEL_TYPES:
        raise MftError(f"{path}: model_type {model_type!r} is not supported; expected one of "
                       f"{', '.join(TEXT_MODEL_TYPES)} or mistral3")
    return config


def hf_config_to_args(config: dict[str, Any], path: Path) -> ModelArgs:
    """ModelArgs from a transformers config dict (transformers 4 or 5 layout) of any family above."""
    config = text_config(config, path)
    model_type = config.get("model_type", "mistral")
    required = ["hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"]
    missing = [key for key in required if config.get(key) is None]
    if missing:
        raise MftError(f"{path}: missing required keys {missing}")
    if config.get("hidden_act", "silu") != "silu":
        raise MftError(f"{path}: hidden_act {config['hidden_act']!r} is not supported; expected 'silu'")
    # transformers 5 moved rope_theta into rope_parameters; older configs keep it at top level.
    # rope_scaling is the transformers 4 name of a non-default rope (llama3, yarn, ...).
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    check_fields(rope, _ROPE_FIELDS, path, within="rope_parameters.")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "yarn"):
        raise MftError(f"{path}: rope type {rope_type!r} is not supported; expected 'default' or 'yarn'")
    rope_theta = rope.get("rope_theta", config.get("rope_theta")) or 10000.0
    n_layers, n_heads = config["num_hidden_layers"], config["num_attention_heads"]
    args = ModelArgs(
        dim=config["hidden_size"],
        n_layers=n_layers,
        head_dim=config.get("head_dim") or config["hidden_size"] // n_heads,
        hidden_dim=config["intermediate_size"],
        n_heads=n_heads,
        n_kv_heads=config.get("num_key_value_heads") or n_heads,
        vocab_size=config["vocab_size"],
        norm_eps=config.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope_theta),
        sliding_window=_windows(config, n_layers, path),
        yarn=_yarn(rope, path) if rope_type == "yarn" else YarnArgs(),
        # transformers applies Llama 4's query scale in Ministral3 models only.
        query_scaling=_query_scaling(rope, path) if model_type == "ministral3" else QueryScalingArgs(),
        tied_embeddings=bool(config.get("tie_word_embeddings", False)),
        moe=_moe(config, path) if model_type == "mixtral" else None,
    )
    check_args(args, path)
    return args


def _moe(config: dict[str, Any], path: Path) -> MoeArgs:
    """A Mixtral config's experts (transformers' defaults, 8 and 2, where a key is missing)."""
    if config.get("router_jitter_noise"):
        raise MftError(f"{path}: router_jitter_noise {config['router_jitter_noise']!r} is not supported; expected 0")
    return MoeArgs(num_experts=config.get("num_local_experts") or 8, num_experts_per_tok=config.get("num_experts_per_tok") or 2)


def _windows(config: dict[str, Any], n_layers: int, path: Path) -> Any:
    """`sliding_window`, or with Ministral's `layer_types` the per-layer pattern (its shortest period)."""
    window = config.get("sliding_window")
    layer_types = config.get("layer_types") if config.get("model_type") == "ministral" else None
    if layer_types is None:
        return window
    kinds = {"sliding_attention": window, "full_attention": None}
    if len(layer_types) != n_layers or any(kind not in kinds for kind in layer_types):
        raise MftError(f"{path}: layer_types must list one of {sorted(kinds)} for each of the {n_layers} layers")
    return compact_windows([kinds[kind] for kind in layer_types])


def compact_windows(windows: list[Optional[int]]) -> Any:
    """The shortest form of per-layer windows: one value when all agree, else the shortest
    repeating pattern (mistral-inference's params.json convention)."""
    if len(set(windows)) == 1:
        return windows[0]
    n = len(windows)
    period = next(p for p in range(1, n + 1) if n % p == 0 and windows == windows[:p] * (n // p))
    return windows[:period]


def _yarn(rope: dict[str, Any], path: Path) -> YarnArgs:
    missing = [key for key in ("factor", "original_max_position_embeddings") if rope.get(key) is None]
    if missing:
        raise MftError(f"{path}: a yarn rope needs {missing} in rope_parameters")
    if rope.get("attention_factor") is not None or rope.get("truncate", True) is not True:
        raise MftError(f"{path}: yarn's attention_factor and truncate=false are not supported; expected them unset")
    return YarnArgs(
        factor=float(rope["factor"]),
        original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
        beta_fast=float(rope.get("beta_fast") or 32.0),
        beta_slow=float(rope.get("beta_slow") or 1.0),
        mscale=float(rope.get("mscale") or 0.0),
        mscale_all_dim=float(rope.get("mscale_all_dim") or 0.0),
    )


def _query_scaling(rope: dict[str, Any], path: Path) -> QueryScalingArgs:
    beta = rope.get("llama_4_scaling_beta")
    if not beta:
        return QueryScalingArgs()
    if rope.get("original_max_position_embeddings") is None:
        raise MftError(f"{path}: llama_4_scaling_beta needs original_max_position_embeddings in rope_parameters")
    return QueryScalingArgs(beta=float(beta), original_max_position_embeddings=int(rope["original_max_position_embeddings"]))


def args_to_hf_config(args: ModelArgs, dtype: torch.dtype, bos_id: int = 1, eos_id: int = 2) -> dict:
    """transformers' config for `args`, in the family that computes what mft computes:
    "mixtral" with experts, "ministral3" with Llama 4's query scale, "ministral" when layers mix
    windows, else "mistral"
    (YaRN in rope_parameters either way). Rope is written in both the v4 and the v5 layout."""
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": args.rope_theta}
    if args.yarn.active:
        rope = {**rope, "rope_type": "yarn", **asdict(args.yarn)}
    if args.query_scaling.active:
        if args.yarn.active and args.yarn.original_max_position_embeddings != args.query_scaling.original_max_position_embeddings:
            raise MftError("transformers' Ministral3 reads yarn's and the query scale's original_max_position_embeddings "
                           "from one key; a model where they differ cannot be exported to Hugging Face")
        rope = {**rope, "llama_4_scaling_beta": args.query_scaling.beta,
                "original_max_position_embeddings": args.query_scaling.original_max_position_embeddings}
    windows = args.windows
    sliding = sorted({w for w in windows if w is not None})
    family: dict[str, Any] = {"model_type": "mistral", "architectures": ["MistralForCausalLM"],
                              "sliding_window": sliding[0] if sliding else None}
    if args.query_scaling.active:
        family = {**family, "model_type": "ministral3", "architectures": ["Ministral3ForCausalLM"]}
    if len(set(windows)) > 1:
        if len(sliding) > 1 or args.query_scaling.active:
            raise MftError(f"sliding_window {args.sliding_window}: transformers has no model with several window "
                           "lengths (or interleaved windows with Llama 4 scaling); cannot export to Hugging Face")
        family = {**family, "model_type": "ministral", "architectures": ["MinistralForCausalLM"],
                  "layer_types": ["full_attention" if w is None else "sliding_attention" for w in windows]}
    if args.moe is not None:
        if args.query_scaling.active or len(set(windows)) > 1:
            raise MftError("transformers' Mixtral has neither Llama 4 scaling nor interleaved windows; this mixture "
                           "of experts cannot be exported to Hugging Face")
        # Router aux loss off (output_router_logits false) and no jitter: what mft computes.
        family = {**family, "model_type": "mixtral", "architectures": ["MixtralForCausalLM"],
                  "num_local_experts": args.moe.num_experts, "num_experts_per_tok": args.moe.num_experts_per_tok,
                  "output_router_logits": False, "router_jitter_noise": 0.0}
    return {
        **family,
        "hidden_size": args.dim,
        "intermediate_size": args.hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "vocab_size": args.vocab_size,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "rope_parameters": rope,
        "max_position_embeddings": max(32768, int(args.yarn.factor * args.yarn.original_max_position_embeddings)
                                       if args.yarn.active else 0),
        "hidden_act": "silu",
        "tie_word_embeddings": args.tied_embeddings,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "use_cache": True,
        "dtype": str(dtype).removeprefix("torch."),
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
