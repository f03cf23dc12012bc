"""What to generate with: resolve a base model, adapters and tokenizer from folders, then load them.

Accepted sources:
- a Hugging Face folder (config.json + safetensors) or a Mistral consolidated folder
  (params.json + consolidated.safetensors), e.g. a merged export; or an mft quantised
  checkpoint (quant_config.json, int4/NF4 layers kept packed; its adapter stays unmerged);
- an mft run dir (checkpoints/step_N/ + resolved_config.yaml): its latest checkpoint (or a
  chosen step); a LoRA checkpoint names its base in adapter_config.json, a full fine-tuning
  checkpoint is itself the model;
- an mft adapter folder (adapter.safetensors + adapter_config.json), whose config names its base.
Extra adapters (folder or run dir, each with a scale) go on top, in order.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
import yaml

from mft.build import Runtime, build_model, checkpoint_spec
from mft.checkpoint.adapter import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    load_adapter,
    read_adapter_config,
)
from mft.checkpoint.load import detect_format
from mft.model.transformer import Transformer
from mft.peft.lora import merge_and_unload
from mft.utils.errors import MftError

log = logging.getLogger(__name__)

RUN_CONFIG = "resolved_config.yaml"
_STEP = re.compile(r"step_(\d+)$")
# Tokenizer by vocabulary size, for a bare weights folder: the Mistral tokenizers of that size.
_TOKENIZER_BY_VOCAB = {32000: "v1", 32768: "v3", 131072: "v3-tekken"}


@dataclass
class AdapterRef:
    path: Path
    scale: float = 1.0


@dataclass
class ModelSource:
    base: Path  # an HF or consolidated weights folder
    adapters: list[AdapterRef] = field(default_factory=list)
    tokenizer: Optional[str] = None  # as recorded by the run or adapter; None: find one

    def describe(self) -> str:
        extra = "".join(f" + adapter {a.path} (scale {a.scale:g})" for a in self.adapters)
        return f"{self.base}{extra}"


def is_run_dir(path: Path) -> bool:
    return (path / "checkpoints").is_dir()


def is_adapter_dir(path: Path) -> bool:
    return (path / ADAPTER_CONFIG).is_file()


def run_checkpoint(run_dir: Path, step: Optional[int] = None) -> Path:
    """checkpoints/step_N of a run: the latest, or the given step."""
    steps = {}
    for folder in (run_dir / "checkpoints").iterdir():
        match = _STEP.match(folder.name)
        if match and folder.is_dir():
            steps[int(match.group(1))] = folder
    if not steps:
        raise MftError(f"run dir {run_dir} has no checkpoints/step_N folder yet (did the run save one?).")
    if step is None:
        return steps[max(steps)]
    if step not in steps:
        raise MftError(f"run dir {run_dir} has no checkpoint for step {step}; it has steps {sorted(steps)}.")
    return steps[step]


def _run_tokenizer(run_dir: Path) -> Optional[str]:
    path = run_dir / RUN_CONFIG
    if not path.is_file():
        return None
    try:
        config = yaml.safe_load(path.read_bytes().decode("utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError, OSError) as e:
        raise MftError(f"{path}: not readable YAML ({e})") from None
    model = config.get("model") if isinstance(config, dict) else None
    tokenizer = model.get("tokenizer") if isinstance(model, dict) else None
    if tokenizer is not None and not isinstance(tokenizer, str):
        raise MftError(f"{path}: model.tokenizer must be a string, got {tokenizer!r}")
    return tokenizer


def _adapter_base(adapter: Path) -> tuple[Path, Optional[str]]:
    """The base checkpoint and tokenizer an adapter folder names in its config."""
    base = read_adapter_config(adapter).get("base_model") or {}
    recorded = base.get("checkpoint")
    candidates = []
    if recorded:
        candidates.append(Path(recorded))
        # A relative path was relative to where training ran; try the run dir too.
        run_dir = adapter.parent.parent if adapter.parent.name == "checkpoints" else None
        if run_dir is not None and not Path(recorded).is_absolute():
            candidates.append(run_dir / recorded)
    if adapter.parent.name == "checkpoints":
        candidates.append(adapter.parent.parent / "base_model")  # a random-init base saved by the run
    for candidate in candidates:
        if candidate.is_dir():
            return candidate, base.get("tokenizer")
    if (base.get("random_draw") or {}).get("saved") is False:
        raise MftError(
            f"{adapter}/{ADAPTER_CONFIG}: the adapter was trained on a random base that its run did not keep "
            "(save_random_base=false), so there is no base to load it onto. Train again with "
            "save_random_base=true (the default) to get a usable adapter."
        )
    raise MftError(
        f"{adapter}/{ADAPTER_CONFIG} names base checkpoint {recorded!r}, which is not a folder here; "
        "pass the base model with base=<folder> and the adapter with adapters=[{path: <adapter>}]."
    )


def _adapter_folder(path: Path, step: Optional[int] = None) -> Path:
    """An adapter folder given directly or as a run dir (its latest LoRA checkpoint)."""
    folder = run_checkpoint(path, step) if is_run_dir(path) else path
    if not is_adapter_dir(folder):
        raise MftError(f"{path}: not an mft adapter folder (no {ADAPTER_CONFIG}) nor a run dir with LoRA checkpoints.")
    return folder


def _from_folder(path: Path, step: Optional[int]) -> ModelSource:
    """A source for `path`, whichever of run dir, adapter folder or weights folder it is."""
    if not path.exists():
        raise MftError(f"{path} does not exist.")
    if is_run_dir(path):
        checkpoint = run_checkpoint(path, step)
        if is_adapter_dir(checkpoint):
            base, tokenizer = _adapter_base(checkpoint)
            return ModelSource(base, [AdapterRef(checkpoint)], tokenizer or _run_tokenizer(path))
        return ModelSource(checkpoint, [], _run_tokenizer(path))  # a full fine-tuning checkpoint
    if is_adapter_dir(path):
        base, tokenizer = _adapter_base(path)
        return ModelSource(base, [AdapterRef(path)], tokenizer)
    if (path / ADAPTER_WEIGHTS).is_file():
        raise MftError(f"{path}: {ADAPTER_CONFIG} is missing next to {ADAPTER_WEIGHTS}; an mft adapter folder needs both.")
    try:
        detect_format(path)
    except MftError as e:
        raise MftError(
            f"{e}. mft-generate loads Hugging Face and Mistral consolidated folders, mft quantised "
            "(int4/NF4) checkpoints, mft run dirs and mft adapter folders."
        ) from None
    return ModelSource(path, [], None)


def resolve_source(
    base: Optional[str] = None,
    run_dir: Optional[str] = None,
    adapters: Sequence[tuple[str, float]] = (),
    step: Optional[int] = None,
) -> ModelSource:
    """One ModelSource from the user's `base` / `run_dir` plus extra (adapter path, scale) pairs.

    A run dir's own adapter comes first; `adapters` are added after it.
    """
    if base and run_dir:
        raise MftError("give base=<model folder> or run_dir=<run dir>, not both (a run dir knows its base).")
    if not base and not run_dir:
        raise MftError("nothing to load: set run_dir=<an mft run dir> or base=<a model folder>.")
    source = _from_folder(Path(run_dir or base).expanduser(), step)
    for path, scale in adapters:
        source.adapters.append(AdapterRef(_adapter_folder(Path(path).expanduser()), float(scale)))
    return source


def guess_tokenizer(source: ModelSource, vocab_size: int) -> str:
    """The tokenizer: recorded by the run, else the model folder's own file, else by vocab size."""
    if source.tokenizer:
        return source.tokenizer
    from mft.data.tokenizer import (
        load_tokenizer,  # mistral-common only when a tokenizer is needed
    )

    try:
        load_tokenizer(source.base)
        return str(source.base)
    except MftError:
        pass
    guess = _TOKENIZER_BY_VOCAB.get(vocab_size)
    if guess is None:
        raise MftError(f"{source.base} has no tokenizer file and vocab_size {vocab_size} names none; set tokenizer=...")
    log.warning("%s has no tokenizer file; using %s (vocab %d). Set tokenizer=... to choose.", source.base, guess, vocab_size)
    return guess


def load_model(
    source: ModelSource, *, device: torch.device | str, dtype: torch.dtype, merge: bool = True, dense: bool = False
) -> Transformer:
    """Build the base, load its weights and apply the adapters (merged into the weights when `merge`).

    Several adapters are always merged one after the other; merge=False keeps a single adapter
    as LoRA layers (e.g. to compare against an unmerged reference). A quantised base keeps its
    packed layers, so its one adapter stays unmerged (LoRA over the quantised matmul), unless
    `dense`: then it is dequantised into `dtype` on load (for merging and exports).
    """
    spec = checkpoint_spec(source.base, dense=dense)
    model = build_model(spec, Runtime(device=device, dtype=dtype))
    quantized = spec.quant is not None
    if quantized and merge and source.adapters:
        log.info("%s is quantised: its adapter stays unmerged (LoRA layers over the quantised weights).", source.base)
        merge = False
    if not merge and len(source.adapters) > 1:
        raise MftError(
            f"{len(source.adapters)} adapters can only be used merged (merge_adapters=true"
            + (", on a dense base: merge them onto the bf16 base first)." if quantized else ").")
        )
    for ref in source.adapters:
        load_adapter(model, ref.path, model.args, scale=ref.scale)
        if merge:
            merge_and_unload(model)
    return model.eval()
