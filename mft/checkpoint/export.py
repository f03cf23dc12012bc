"""Exports for other tools: a PEFT adapter, a merged Hugging Face model, Mistral consolidated + LoRA.

- `export_peft`: adapter_model.safetensors + adapter_config.json that peft loads onto
  transformers' MistralForCausalLM or MixtralForCausalLM (module names of transformers; wq/wk rows
  in HF's rotary layout; Mixtral's router and fused experts through peft's `target_parameters`);
  given the base model, also `base/`, that base as a Hugging Face folder, which
  adapter_config.json then names (for a base transformers cannot read: consolidated, random, 4-bit).
- `export_hf`: config.json, sharded model-*.safetensors + index, generation_config.json and
  tokenizer files, loadable by transformers' from_pretrained; LoRA layers are merged on the fly.
- `export_consolidated`: params.json + consolidated.safetensors (+ the tokenizer file), the
  layout of mistral-inference and of mft's own loader.
Model folders also get the files `AutoTokenizer.from_pretrained` reads (`_copy_tokenizer`).
- `export_mistral_lora`: lora.safetensors with mistral-inference's names, for its load_lora (a
  mixture of experts: the router and every expert by name).

Every folder is written atomically (a temporary folder, then one rename).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file
from torch import nn

from mft.checkpoint import consolidated, hf
from mft.checkpoint.adapter import ADAPTER_WEIGHTS, read_adapter_config
from mft.checkpoint.hf_tokenizer import (
    HF_TOKENIZER,
    HF_TOKENIZER_CONFIG,
    write_sentencepiece_as_hf,
    write_tekken_config,
)
from mft.checkpoint.merge import merged_tensor, merged_tensors
from mft.model.args import ModelArgs
from mft.utils.atomic import atomic_dir
from mft.utils.errors import MftError
from mft.utils.tensorfile import TensorSlot, open_safetensors, read_header, write_streamed

PEFT_WEIGHTS, PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"
MISTRAL_LORA = "lora.safetensors"
# mistral-inference's load_lora merges with `scaling` (2.0 unless the caller says otherwise).
MISTRAL_LORA_SCALING = 2.0
_LORA_KEY = re.compile(r"^(?P<module>layers\.\d+\.(?:attention|feed_forward)\.(?P<leaf>w[qkvo123]|gate))"
                       r"\.lora_(?P<ab>[ab])$")
# The linear layers mistral-inference's load_lora merges an adapter into (consolidated file names).
_MISTRAL_LORA_LAYER = re.compile(r"^layers\.\d+\.(?:attention\.w[qkvo]|feed_forward\.(?:gate|(?:experts\.\d+\.)?w[123]))\.weight$")
# transformers 5's Mixtral modules that peft adapts through `target_parameters`: the router (a
# MixtralTopKRouter holding `weight`, not an nn.Linear) and the experts (MixtralExperts holding
# gate_up_proj (E, 2 * hidden, dim), w1's rows then w3's, and down_proj (E, dim, hidden)).
HF_ROUTER, HF_EXPERTS = "model.layers.{i}.mlp.gate", "model.layers.{i}.mlp.experts"
_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
# safetensors' names of the floating dtypes a checkpoint's weights are stored in.
_STORED_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
PEFT_BASE = "base"  # the HF copy of a base transformers cannot read, inside a PEFT export
# A Hugging Face model folder's tokenizer files (besides Mistral's own), copied as they are.
HF_TOKENIZER_FILES = (HF_TOKENIZER, HF_TOKENIZER_CONFIG, "special_tokens_map.json", "tokenizer.model",
                      "chat_template.jinja", "chat_template.json")


def parse_size(size: str | int) -> int:
    """Bytes from 5GB / 500MB / 20KB / an int (decimal units, as transformers' max_shard_size)."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)?\s*", str(size).upper())
    if not match:
        raise MftError(f"max_shard_size {size!r}: expected e.g. 5GB, 500MB or a number of bytes.")
    unit = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1, None: 1}[match.group(2)]
    return int(float(match.group(1)) * unit)


def stored_dtype(folder: str | Path) -> Optional[torch.dtype]:
    """The dtype a checkpoint folder stores its weights in: the floating dtype holding the most
    elements over its safetensors files (a 4-bit checkpoint: that of its dense tensors); None when
    it has none (loading it will say what is missing)."""
    folder = Path(folder)
    counts: dict[torch.dtype, int] = {}
    for path in sorted(folder.glob("*.safetensors")):
        for info in read_header(path).values():
            dtype = _STORED_DTYPES.get(info.dtype)
            if dtype is not None:
                counts[dtype] = counts.get(dtype, 0) + int(torch.Size(info.shape).numel())
    return max(counts, key=counts.get) if counts else None


def has_hf_tokenizer(folder: str | Path) -> bool:
    """Whether a model folder carries Hugging Face tokenizer files of its own."""
    return any((Path(folder) / name).is_file() for name in (HF_TOKENIZER, HF_TOKENIZER_CONFIG))


# -- adapters ---------------------------------------------------------------------------------
def _adapter(folder: str | Path) -> tuple[dict, ModelArgs, dict[str, torch.Tensor]]:
    """(config, the base's ModelArgs, {module: (lora_a, lora_b)}) of an mft adapter folder."""
    folder = Path(folder)
    config = read_adapter_config(folder)
    saved_args = (config.get("base_model") or {}).get("args")
    if not saved_args:
        raise MftError(f"{folder}: adapter_config.json has no base_model.args; cannot name its tensors for export.")
    args = ModelArgs(**saved_args)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    with open_safetensors(folder / ADAPTER_WEIGHTS, "adapter weights") as f:
        for key in f.keys():
            match = _LORA_KEY.match(key)
            if not match:
                raise MftError(f"{folder}/{ADAPTER_WEIGHTS}: unexpected tensor {key!r}")
            pairs.setdefault(match.group("module"), {})[match.group("ab")] = f.get_tensor(key).float()
    incomplete = [m for m, ab in pairs.items() if set(ab) != {"a", "b"}]
    if incomplete or not pairs:
        raise MftError(f"{folder}/{ADAPTER_WEIGHTS}: needs lora_a and lora_b for every module (incomplete: {incomplete[:5]})")
    shapes, r = consolidated.expected_shapes(args), config["r"]
    for module, ab in pairs.items():
        weight = shapes.get(f"{module}.weight")
        want = None if weight is None else ((*weight[:-2], r, weight[-1]), (*weight[:-2], weight[-2], r))
        if want != (tuple(ab["a"].shape), tuple(ab["b"].shape)):
            raise MftError(f"{folder}/{ADAPTER_WEIGHTS}: {module}'s factors {list(ab['a'].shape)}, {list(ab['b'].shape)} "
                           f"do not fit its base model (expected {'no such layer' if want is None else list(map(list, want))}).")
    return config, args, {m: (ab["a"], ab["b"]) for m, ab in pairs.items()}


def _rotary_heads(module: str, args: ModelArgs) -> Optional[int]:
    leaf = module.rsplit(".", 1)[-1]
    return {"wq": args.n_heads, "wk": args.n_kv_heads}.get(leaf)


def _peft_layout(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked per-expert factors a (E, r, in), b (E, out, r) as peft's ParamWrapper holds them:
    lora_A (E * r, in), expert e's rows at e * r, and lora_B (out, r * E), expert e's column k at
    k * E + e."""
    experts, rank, _ = a.shape
    return a.reshape(experts * rank, -1), b.permute(1, 2, 0).reshape(b.shape[1], rank * experts)


def _peft_experts(pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], layer: int, args: ModelArgs,
                  scale: float) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """One layer's expert factors for transformers 5's fused parameters, {parameter: (A, scale * B)}
    in the stacked (E, r, in), (E, out, r) layout.

    gate_up_proj's rows are w1's then w3's, each with its own A: one adapter of rank r per half
    present, A = [A1; A3] and B = [[B1, 0], [0, B3]], whose product is exactly [[B1 A1], [B3 A3]]."""
    prefix, hidden = f"layers.{layer}.feed_forward.", args.hidden_dim
    adapted = {}
    halves = [(half, pairs[prefix + leaf]) for half, leaf in enumerate(("w1", "w3")) if prefix + leaf in pairs]
    if halves:
        experts, rank = halves[0][1][0].shape[:2]
        b = torch.zeros(experts, 2 * hidden, rank * len(halves))
        for k, (half, (_, half_b)) in enumerate(halves):
            b[:, half * hidden:(half + 1) * hidden, k * rank:(k + 1) * rank] = half_b * scale
        adapted["gate_up_proj"] = (torch.cat([half_a for _, (half_a, _) in halves], dim=1), b)
    if prefix + "w2" in pairs:
        a, b = pairs[prefix + "w2"]
        adapted["down_proj"] = (a, b * scale)
    return adapted


def export_peft(adapter_folder: str | Path, out: str | Path, *, scale: float = 1.0,
                base_name_or_path: Optional[str] = None, base_model: Optional[nn.Module] = None,
                **base_options) -> Path:
    """Write an mft adapter as a PEFT LoRA adapter for transformers' MistralForCausalLM or
    MixtralForCausalLM.

    peft computes W x + (lora_alpha / r) B A x, as mft does; `scale` is folded into B. B of
    q_proj/k_proj gets HF's rotary row permutation, as HF's q_proj/k_proj weights have it.
    Mixtral's router and experts are parameters in transformers 5, not linear layers, so they
    are named in `target_parameters` (peft's ParamWrapper): the router's `weight` as one LoRA, each
    expert's w2 as its slice of `down_proj`, w1 and w3 together as one adapter of `gate_up_proj`
    of twice the rank (exact, see _peft_experts; `rank_pattern` and `alpha_pattern` keep its scale).
    When a module holds both, peft nests gate_up_proj's wrapper inside down_proj's, so its tensors
    are under `experts.base_layer.`. peft refuses dropout on parameters: such adapters say 0.
    With `base_model`, that model is written to <out>/base as a Hugging Face folder
    (`base_options`: write_hf's keywords) and base_model_name_or_path is its absolute path.
    """
    config, args, pairs = _adapter(adapter_folder)
    tensors, targets, parameters = {}, set(), set()
    rank_pattern, alpha_pattern = {}, {}
    for module, (a, b) in sorted(pairs.items()):
        leaf = module.rsplit(".", 1)[-1]
        if consolidated.is_stacked(f"{module}.weight", args):
            continue  # the experts: per layer, below
        if leaf == "gate":
            hf_module = HF_ROUTER.format(i=module.split(".")[1])
            parameters.add("mlp.gate.weight")
        else:
            heads = _rotary_heads(module, args)
            if heads is not None:
                b = hf.permute_rotary(b, heads)
            hf_module = hf.mft_to_hf_name(f"{module}.weight").removesuffix(".weight")
            targets.add(hf_module.rsplit(".", 1)[-1])
        tensors[f"base_model.model.{hf_module}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{hf_module}.lora_B.weight"] = (b * scale).contiguous()
    for layer in range(args.n_layers if args.moe is not None else 0):
        adapted = _peft_experts(pairs, layer, args, scale)
        for parameter, (a, b) in adapted.items():
            nested = ".base_layer" if parameter == "gate_up_proj" and len(adapted) == 2 else ""
            hf_module = HF_EXPERTS.format(i=layer) + nested
            lora_a, lora_b = _peft_layout(a, b)
            tensors[f"base_model.model.{hf_module}.lora_A.weight"] = lora_a.contiguous()
            tensors[f"base_model.model.{hf_module}.lora_B.weight"] = lora_b.contiguous()
            parameters.add(f"mlp.experts.{parameter}")
            if a.shape[1] != config["r"]:
                rank_pattern[parameter] = a.shape[1]
                alpha_pattern[parameter] = config["alpha"] * a.shape[1] / config["r"]
    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_name_or_path,
        "r": config["r"],
        "lora_alpha": config["alpha"],
        "lora_dropout": 0.0 if parameters else config.get("dropout", 0.0),
        "target_modules": sorted(targets) or None,
        "target_parameters": sorted(parameters) or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
    }
    if base_model is not None:
        peft_config["base_model_name_or_path"] = str(Path(out).resolve() / PEFT_BASE)
    with atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / PEFT_WEIGHTS), metadata={"format": "pt"})
        (tmp / PEFT_CONFIG).write_text(json.dumps(peft_config, indent=2) + "\n")
        if base_model is not None:
            (tmp / PEFT_BASE).mkdir()
            write_hf(base_model, tmp / PEFT_BASE, **base_options)
    return Path(out)


def mistral_lora_tensors(adapter_folder: str | Path, *, scale: float = 1.0, dtype: torch.dtype = torch.bfloat16,
                         scaling: float = MISTRAL_LORA_SCALING) -> dict[str, torch.Tensor]:
    """mistral-inference's LoRA state dict: layers.{i}.<attention|feed_forward>.<w>.lora_{A,B}.weight,
    and for a mixture of experts layers.{i}.feed_forward.gate.lora_{A,B}.weight (the router) and
    layers.{i}.feed_forward.experts.{j}.<w1|w2|w3>.lora_{A,B}.weight (expert j's slice of the
    stacked factors).

    Its load_lora merges W + scaling * B @ A for every linear layer of every block (all must be
    present: untargeted ones get zeros) and wants one dtype, the model's. mft's
    alpha / r * scale is folded into B, divided by the `scaling` it will be loaded with.
    """
    config, args, pairs = _adapter(adapter_folder)
    factor = config["alpha"] / config["r"] * scale / scaling
    r = config["r"]
    tensors = {}
    for file_name, shape in consolidated.file_shapes(args).items():
        if not _MISTRAL_LORA_LAYER.match(file_name):
            continue
        out_features, in_features = shape
        name, expert = consolidated.expert_of(file_name)
        pair = pairs.get(name.removesuffix(".weight"))
        if pair is None:
            a, b = torch.zeros(r, in_features), torch.zeros(out_features, r)
        else:
            a, b = pair if expert is None else (pair[0][expert], pair[1][expert])
        module = file_name.removesuffix(".weight")
        tensors[f"{module}.lora_A.weight"] = a.to(dtype).contiguous()
        tensors[f"{module}.lora_B.weight"] = (b * factor).to(dtype).contiguous()
    return tensors


def export_mistral_lora(adapter_folder: str | Path, out_file: str | Path, **kwargs) -> Path:
    """Write mistral_lora_tensors(...) to `out_file` (lora.safetensors)."""
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    save_file(mistral_lora_tensors(adapter_folder, **kwargs), str(out_file), metadata={"format": "pt"})
    return out_file


# -- whole models -----------------------------------------------------------------------------
def _copy_tokenizer(folder: Path, tokenizer_file: Optional[str | Path], hf_from: Optional[Path] = None,
                    sentencepiece_copy: bool = True) -> None:
    """The Mistral tokenizer file under its Mistral name, and the files AutoTokenizer reads.

    Those are `hf_from`'s own (a Hugging Face base's tokenizer files, copied as they are), else,
    for a SentencePiece file, tokenizer.json + tokenizer_config.json built from it
    (mft/checkpoint/hf_tokenizer.py); transformers reads a tekken.json itself, through
    mistral-common, as tokenizer_config.json says. `sentencepiece_copy=False` leaves out a base's tokenizer.model: a consolidated
    folder holds one SentencePiece file, as mistral-inference expects.
    """
    if tokenizer_file is None:
        return
    src = Path(tokenizer_file)
    version = re.search(r"\.model(\.v\d+)?$", src.name)
    suffix = (version.group(1) or "") if version else ""
    # Mistral's own names: tekken.json, tokenizer.model.vN (mistral-common reads the version from it).
    name = "tekken.json" if src.suffix == ".json" else f"tokenizer.model{suffix}"
    shutil.copyfile(src, folder / name)
    if hf_from is not None and has_hf_tokenizer(hf_from):
        for hf_name in HF_TOKENIZER_FILES:
            if (hf_from / hf_name).is_file() and (sentencepiece_copy or hf_name != "tokenizer.model"):
                shutil.copyfile(hf_from / hf_name, folder / hf_name)
    elif src.suffix == ".json":
        write_tekken_config(folder)
    else:
        write_sentencepiece_as_hf(src, folder)


def export_hf(model: nn.Module, out: str | Path, **options) -> Path:
    """Write `model` (adapters merged) as a Hugging Face folder (MistralForCausalLM, or
    MixtralForCausalLM with the hub's per-expert names), atomically (`options`: write_hf's keywords)."""
    with atomic_dir(out) as tmp:
        write_hf(model, tmp, **options)
    return Path(out)


def write_hf(model: nn.Module, folder: Path, *, tokenizer_file: Optional[str | Path] = None,
             hf_tokenizer_from: Optional[Path] = None, dtype: Optional[torch.dtype] = None,
             max_shard_size: str | int = "5GB", bos_id: int = 1, eos_id: int = 2) -> None:
    """The files of export_hf in the existing folder `folder`.

    Shards hold whole tensors, in order, up to max_shard_size each; a single shard is named
    model.safetensors (no index), as transformers does. One shard is in host memory at a time.
    The weights are written in `dtype` (default: the model's), which config.json records.
    """
    args: ModelArgs = model.args
    limit = parse_size(max_shard_size)
    dtype = dtype or model.tok_embeddings.weight.dtype
    itemsize = torch.empty((), dtype=dtype).element_size()
    shapes = consolidated.file_shapes(args)
    plan: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = itemsize * int(torch.Size(shape).numel())
        if plan[-1] and size + nbytes > limit:
            plan.append([])
            size = 0
        plan[-1].append(name)
        size += nbytes
    names = ["model.safetensors"] if len(plan) == 1 else [
        f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))
    ]
    shard_of = {name: i for i, shard in enumerate(plan) for name in shard}
    heads = {"attention.wq.weight": args.n_heads, "attention.wk.weight": args.n_kv_heads}
    shard: dict[str, torch.Tensor] = {}
    current = 0
    weight_map = {}
    for name, tensor in merged_tensors(model, dtype):
        if shard_of[name] != current:
            save_file(shard, str(folder / names[current]), metadata={"format": "pt"})
            shard, current = {}, shard_of[name]
        rotary = heads.get(name.split(".", 2)[-1]) if name.startswith("layers.") else None
        if rotary is not None:
            tensor = hf.permute_rotary(tensor, rotary).contiguous()
        hf_name = hf.mft_to_hf_name(name)
        shard[hf_name] = tensor
        weight_map[hf_name] = names[current]
    save_file(shard, str(folder / names[current]), metadata={"format": "pt"})
    if len(plan) > 1:
        total = sum(itemsize * int(torch.Size(s).numel()) for s in shapes.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (folder / "config.json").write_text(json.dumps(hf.args_to_hf_config(args, dtype, bos_id, eos_id), indent=2) + "\n")
    generation = {"bos_token_id": bos_id, "eos_token_id": eos_id}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    _copy_tokenizer(folder, tokenizer_file, hf_tokenizer_from)


def export_consolidated(model: nn.Module, out: str | Path, *, tokenizer_file: Optional[str | Path] = None,
                        hf_tokenizer_from: Optional[Path] = None, dtype: Optional[torch.dtype] = None,
                        lora_from: Optional[str | Path] = None, lora_scale: float = 1.0) -> Path:
    """params.json + consolidated.safetensors of `model` (LoRA layers merged) + the tokenizer file
    (and AutoTokenizer's files).

    With `lora_from` (an mft adapter folder), also lora.safetensors for mistral-inference's
    load_lora (its default scaling, 2.0, reproduces the adapter at `lora_scale`); `model` is then
    expected to be the adapter's base.
    """
    dtype = dtype or model.tok_embeddings.weight.dtype
    with atomic_dir(out) as tmp:
        (tmp / consolidated.PARAMS_FILE).write_text(json.dumps(consolidated.args_to_params(model.args), indent=2) + "\n")
        layout = {name: TensorSlot(dtype, shape) for name, shape in consolidated.file_shapes(model.args).items()}
        write_streamed(tmp / consolidated.WEIGHTS_FILE, layout, lambda name: merged_tensor(model, name, dtype),
                       metadata={"format": "pt"})  # one tensor in memory at a time (a 93 GB 8x7B too)
        _copy_tokenizer(tmp, tokenizer_file, hf_tokenizer_from, sentencepiece_copy=False)
        if lora_from is not None:
            export_mistral_lora(lora_from, tmp / MISTRAL_LORA, scale=lora_scale, dtype=dtype)
    return Path(out)
