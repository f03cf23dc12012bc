"""The Hugging Face layout of a Mistral checkpoint: config.json, tensor names, rotary permutation."""

import re
from pathlib import Path
from typing import Any, Optional

import torch

from mft.model.args import ModelArgs
from mft.utils.errors import MftError
from mft.utils.jsonfile import read_json_object

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
]


def _template_regex(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)") + "$")


_HF_TO_MFT = [(_template_regex(hf), mft) for hf, mft in _NAME_PAIRS]
_MFT_TO_HF = [(_template_regex(mft), hf) for hf, mft in _NAME_PAIRS]


def _rename(name: str, table: list[tuple[re.Pattern, str]]) -> Optional[str]:
    for pattern, template in table:
        match = pattern.match(name)
        if match:
            return template.format(**match.groupdict())
    return None


def hf_to_mft_name(name: str) -> Optional[str]:
    """Consolidated name of an HF tensor name; None when the name is not part of a Mistral model."""
    return _rename(name, _HF_TO_MFT)


def mft_to_hf_name(name: str) -> Optional[str]:
    return _rename(name, _MFT_TO_HF)


def is_ignored_hf_name(name: str) -> bool:
    """Tensors some old HF checkpoints carry that are derived, not learnt."""
    return name.endswith("rotary_emb.inv_freq")


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


def hf_config_to_args(config: dict[str, Any], path: Path) -> ModelArgs:
    """ModelArgs from a transformers MistralConfig dict (transformers 4 or 5 layout)."""
    model_type = config.get("model_type", "mistral")
    if model_type not in ("mistral", "llama"):
        raise MftError(f"{path}: model_type {model_type!r} is not supported; expected 'mistral' (or 'llama')")
    required = ["hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"]
    missing = [key for key in required if config.get(key) is None]
    if missing:
        raise MftError(f"{path}: missing required keys {missing}")
    if config.get("hidden_act", "silu") != "silu":
        raise MftError(f"{path}: hidden_act {config['hidden_act']!r} is not supported; expected 'silu'")
    # transformers 5 moved rope_theta into rope_parameters; older configs keep it at top level.
    # rope_scaling is the transformers 4 name of a non-default rope (llama3, yarn, ...).
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise MftError(f"{path}: rope type {rope_type!r} is not supported; expected 'default' (plain rope_theta)")
    rope_theta = rope.get("rope_theta", config.get("rope_theta")) or 10000.0
    n_heads = config["num_attention_heads"]
    return ModelArgs(
        dim=config["hidden_size"],
        n_layers=config["num_hidden_layers"],
        head_dim=config.get("head_dim") or config["hidden_size"] // n_heads,
        hidden_dim=config["intermediate_size"],
        n_heads=n_heads,
        n_kv_heads=config.get("num_key_value_heads") or n_heads,
        vocab_size=config["vocab_size"],
        norm_eps=config.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope_theta),
        sliding_window=config.get("sliding_window"),
    )
