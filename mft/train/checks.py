"""Every check of a training config, in one place, before anything is tokenized or built.

mft-train runs `check_config` right after the composed config is converted into TrainConfig,
so a bad value fails in about a second, names its key and leaves no run dir; `train()` runs it
again for callers that skip the CLI. Sections go in the order a user reads the config: the
model and where its weights come from, the adapters, the 4-bit base, the optimizer, the data
files, the schedule of the run, resuming. The rest of the data group (file entries, seq_len,
valid_fraction) and the tokenizer's fit to the model are checked where they are read, before
anything is tokenized. torch is imported only by the
checks that read a checkpoint or need the 4-bit formats, so a plain config error never loads it.
"""

import re
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from mft.config import (
    LORA_TARGET_CHOICES,
    ModelConfig,
    OptimConfig,
    PeftConfig,
    QuantConfig,
    TrainConfig,
)
from mft.data.config import DataConfig
from mft.model.args import ModelArgs, arg_problems
from mft.utils.errors import MftError


def check_config(cfg: TrainConfig) -> None:
    """Raise MftError (one paragraph naming the key and what it must be) on the first bad setting."""
    model_args(cfg.model)
    _check_peft(cfg.peft)
    resolve_quant(cfg.quant, cfg.peft)
    _check_optim(cfg.optim)
    _check_data_files(cfg.data)
    _check_run(cfg)
    _check_resume(cfg.resume)


def _require(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise MftError(f"{key}={value!r}: expected {expected}.")


def model_args(mcfg: ModelConfig) -> ModelArgs:
    """The preset's args, checked; with a checkpoint, its own args, which must agree with the preset."""
    preset = ModelArgs(**{f.name: getattr(mcfg, f.name) for f in fields(ModelArgs)})
    for name in ("dim", "n_layers", "head_dim", "hidden_dim", "n_heads", "n_kv_heads", "vocab_size"):
        _require(getattr(preset, name) > 0, f"model.{name}", getattr(preset, name), "a positive integer")
    _require(preset.head_dim % 2 == 0, "model.head_dim", preset.head_dim, "an even number (rotary embeddings pair dims)")
    _require(preset.n_heads % preset.n_kv_heads == 0, "model.n_kv_heads", preset.n_kv_heads,
             f"a divisor of model.n_heads={preset.n_heads} (each KV head serves a group of query heads)")
    _require(preset.norm_eps > 0, "model.norm_eps", preset.norm_eps, "a positive number")
    for key, value, expected in arg_problems(preset):
        _require(False, f"model.{key}", value, expected)
    if not mcfg.checkpoint:
        return preset
    _require(Path(mcfg.checkpoint).expanduser().is_dir(), "model.checkpoint", mcfg.checkpoint,
             "an existing folder (Hugging Face config.json + safetensors, or Mistral params.json), or null")
    # torch: only when there is a checkpoint to read
    from mft.checkpoint.load import read_model_args

    found = read_model_args(mcfg.checkpoint)
    diff = [f"{f.name}: config {getattr(preset, f.name)!r} vs checkpoint {getattr(found, f.name)!r}"
            for f in fields(ModelArgs) if getattr(preset, f.name) != getattr(found, f.name)
            and not (f.name == "sliding_window" and preset.windows == found.windows)]  # [4096] is 4096
    if diff:
        raise MftError(
            f"model={mcfg.name} does not match the checkpoint {mcfg.checkpoint} ({'; '.join(diff)}). "
            "Pick the matching preset or override these model.* keys."
        )
    return found


def _check_peft(pcfg: PeftConfig) -> None:
    if pcfg.method == "none":
        return
    _require(pcfg.r > 0, "peft.r", pcfg.r, "a positive rank")
    _require(pcfg.alpha > 0, "peft.alpha", pcfg.alpha, "a positive number (the LoRA scale is alpha / r)")
    _require(0.0 <= pcfg.dropout < 1.0, "peft.dropout", pcfg.dropout, "a probability in [0, 1)")
    targets = list(pcfg.target_modules)
    _require(bool(targets) and set(targets) <= set(LORA_TARGET_CHOICES), "peft.target_modules", targets,
             f"a non-empty subset of {LORA_TARGET_CHOICES} (gate: a mixture of experts' router)")


def resolve_quant(qcfg: QuantConfig, pcfg: PeftConfig):
    """The base's QuantSpec (None for quant=none), refusing set-ups that cannot train."""
    if qcfg.format == "none":
        return None
    if pcfg.method != "lora":
        raise MftError(f"quant={qcfg.format} freezes the base: it needs peft=lora (got peft.method={pcfg.method!r}).")
    # torch: only for a 4-bit base
    from mft.quant.formats import QuantSpec
    from mft.quant.model import check_modules

    check_modules(qcfg.modules)
    return QuantSpec(format=str(qcfg.format), block_size=qcfg.block_size, double_quant=bool(qcfg.double_quant),
                     dq_block_size=qcfg.double_quant_block_size)


def _check_optim(ocfg: OptimConfig) -> None:
    _require(ocfg.lr > 0, "optim.lr", ocfg.lr, "a positive learning rate")
    betas = list(ocfg.betas)
    _require(len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas), "optim.betas", betas,
             "two numbers in [0, 1), e.g. [0.9, 0.95]")
    _require(ocfg.eps > 0, "optim.eps", ocfg.eps, "a positive number")
    _require(ocfg.weight_decay >= 0, "optim.weight_decay", ocfg.weight_decay, "a number >= 0")
    _require(0.0 <= ocfg.min_lr_ratio <= 1.0, "optim.min_lr_ratio", ocfg.min_lr_ratio, "a number in [0, 1]")
    if ocfg.warmup_steps is not None and ocfg.warmup_ratio is not None:
        raise MftError(
            f"optim.warmup_steps={ocfg.warmup_steps} and optim.warmup_ratio={ocfg.warmup_ratio} are both set; "
            "set one of them and leave the other null (optim.warmup_steps=null or optim.warmup_ratio=null)."
        )
    _require(ocfg.warmup_steps is None or ocfg.warmup_steps >= 0, "optim.warmup_steps", ocfg.warmup_steps,
             "a number of steps >= 0, or null")
    _require(ocfg.warmup_ratio is None or 0.0 <= ocfg.warmup_ratio < 1.0, "optim.warmup_ratio", ocfg.warmup_ratio,
             "a share of the steps in [0, 1), or null")


def _check_data_files(dcfg: DataConfig) -> None:
    """Every data file exists (the data layer checks the rest of each entry when it reads them)."""
    for key in ("train_files", "valid_files"):
        entries = getattr(dcfg, key)
        for entry in [entries] if isinstance(entries, (str, Mapping)) else list(entries or []):
            file = entry.get("file", entry.get("path")) if isinstance(entry, Mapping) else entry
            if isinstance(file, str) and not Path(file).is_file():
                raise MftError(f"data.{key}: data file not found: {file} (relative paths start at {Path.cwd()}).")


def _check_run(cfg: TrainConfig) -> None:
    _require(cfg.data.seq_len > 0, "data.seq_len", cfg.data.seq_len, "a positive number of tokens")
    _require(cfg.data.pack_buffer > 0, "data.pack_buffer", cfg.data.pack_buffer,
             "a positive number of open sequences (1: greedy packing in order)")
    _require(0 <= cfg.data.valid_fraction < 1, "data.valid_fraction", cfg.data.valid_fraction,
             "a share of each training file in [0, 1)")
    _require(re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", cfg.device) is not None, "device", cfg.device,
             "auto, cpu, cuda, cuda:N or mps")
    _require(cfg.batch_size > 0, "batch_size", cfg.batch_size, "a positive number of sequences")
    _require(cfg.grad_accum > 0, "grad_accum", cfg.grad_accum, "a positive number of micro-steps")
    _require(cfg.memory_budget_gib is None or cfg.memory_budget_gib > 0, "memory_budget_gib", cfg.memory_budget_gib,
             "a positive number of GiB, or null for the GPU's free memory at start minus a margin")
    _require(cfg.loss_chunk_tokens >= 0, "loss_chunk_tokens", cfg.loss_chunk_tokens,
             "a number of tokens >= 0 (0: the whole head at once)")
    if cfg.max_steps is not None:
        _require(cfg.max_steps > 0, "max_steps", cfg.max_steps, "a positive number of steps, or null to use epochs")
    else:
        _require(cfg.epochs is not None and cfg.epochs > 0, "epochs", cfg.epochs,
                 "a positive number of passes over the data (max_steps is null)")
    _require(cfg.max_grad_norm >= 0, "max_grad_norm", cfg.max_grad_norm, "a number >= 0 (0: no clipping)")
    _require(cfg.router_aux_loss_coef >= 0, "router_aux_loss_coef", cfg.router_aux_loss_coef,
             "a number >= 0 (0: no load-balancing loss)")
    _require(cfg.peft.method == "none" or "gate" not in cfg.peft.target_modules or cfg.model.moe is not None,
             "peft.target_modules", list(cfg.peft.target_modules),
             f"no 'gate' for model={cfg.model.name}, which has no mixture of experts (model.moe is null)")
    _require(cfg.router_aux_loss_coef == 0 or cfg.model.moe is not None, "router_aux_loss_coef",
             cfg.router_aux_loss_coef, f"0 for model={cfg.model.name}, which has no mixture of experts (model.moe is null)")
    _require(cfg.max_nonfinite_steps >= 1, "max_nonfinite_steps", cfg.max_nonfinite_steps,
             "a positive number of non-finite steps in a row")
    _require(cfg.eval_every >= 0, "eval_every", cfg.eval_every, "a number of steps >= 0 (0: first and last step)")
    _require(cfg.eval_batches is None or cfg.eval_batches > 0, "eval_batches", cfg.eval_batches,
             "a positive number of batches, or null for the whole validation set")
    _require(cfg.save_every is None or cfg.save_every > 0, "save_every", cfg.save_every,
             "a positive number of steps, or null to save at the end only")
    _require(cfg.logger.log_every > 0, "logger.log_every", cfg.logger.log_every, "a positive number of steps")


def _check_resume(resume: str | None) -> None:
    """A resume path must hold a complete checkpoint (resume=auto may find none: a fresh start)."""
    if resume in (None, "", "auto"):
        return
    _require(Path(resume).expanduser().exists(), "resume", resume,
             "auto, null, or an existing run dir or its checkpoints/step_N folder")
    # torch: only when resuming from a path
    from mft.checkpoint.train_state import resolve_resume

    resolve_resume(resume, None)
