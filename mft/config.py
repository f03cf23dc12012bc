"""Structured configs: the schema behind every Hydra config group.

`TrainConfig` is registered in Hydra's ConfigStore as `train_schema` and sits first in
conf/train.yaml's defaults, so every YAML file and command-line override is merged into
these dataclasses: a misspelt key or a value of the wrong type fails at compose time with
Hydra's one-line message. The comments in conf/ document each knob for users.
"""

from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from mft.data.bundled import bundled_path
from hydra_plugins.mft_torchrun_launcher import register_torchrun_launcher
from mft.model.args import ModelArgs
from mft.utils.distributed import run_stamp


@dataclass
class ModelConfig(ModelArgs):
    """Architecture (the ModelArgs fields) plus where weights and tokenizer come from."""

    name: str = MISSING
    # Hugging Face folder (config.json) or Mistral consolidated folder (params.json); None = random init.
    checkpoint: Optional[str] = None
    # "v1" | "v3" | "v7" (files shipped in mistral-common) or a path to a tokenizer file / model folder.
    tokenizer: str = "v3"
    attn_backend: str = "auto"


@dataclass
class DataConfig:
    # Each entry: a path, or {file: path, weight: w, format: ..., text_column: ..., alpaca: ...}.
    train_files: List[Any] = MISSING
    valid_files: List[Any] = field(default_factory=list)
    valid_fraction: float = 0.0
    seq_len: int = 256
    too_long: str = "truncate"  # truncate | drop | split (chats longer than seq_len)
    seed: int = 0
    format: str = "auto"  # auto | text | chat | alpaca (per row: messages / text column / instruction+output)
    text_column: str = "text"
    alpaca: str = "chat"  # chat | prompt (the classic "Below is an instruction..." template, as text)
    control_tokens: str = "warn"  # warn | map: literal "<s>", "[INST]", ... in text samples
    on_error: str = "raise"  # raise | skip (bad rows logged and counted)
    cache_dir: Optional[str] = "~/.cache/mft/data"  # tokenized files; null = tokenize in memory every run
    num_workers: Optional[int] = None  # tokenizer processes; null = auto (several for files over 16 MiB)


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    min_lr_ratio: float = 0.0


@dataclass
class PeftConfig:
    method: str = "lora"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: List[str] = field(default_factory=lambda: ["wq", "wk", "wv", "wo", "w1", "w2", "w3"])


@dataclass
class QuantConfig:
    """The frozen base's storage (conf/quant/): none | nf4 | int4 (QLoRA; see mft/quant/formats.py)."""

    format: str = "none"
    block_size: int = 64  # nf4: weights per absmax (64); int4: group size (128)
    double_quant: bool = False  # nf4: 8-bit absmax in blocks of double_quant_block_size
    double_quant_block_size: int = 256
    modules: List[str] = field(default_factory=lambda: ["wq", "wk", "wv", "wo", "w1", "w2", "w3"])


@dataclass
class LoggerConfig:
    name: str = "console"
    log_every: int = 10
    project: str = "mft"
    entity: Optional[str] = None
    # auto: online when WANDB_API_KEY is set or `wandb login` was run, else offline.
    mode: str = "auto"


@dataclass
class TrainConfig:
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    optim: OptimConfig = MISSING
    peft: PeftConfig = MISSING
    logger: LoggerConfig = MISSING
    quant: QuantConfig = field(default_factory=QuantConfig)
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    batch_size: int = 8
    grad_accum: int = 1
    max_steps: Optional[int] = None
    epochs: Optional[float] = None
    max_grad_norm: float = 1.0
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile each transformer block (attention kernels run eagerly between graphs)
    loss_chunk_tokens: int = 2048
    eval_every: int = 50
    eval_batches: Optional[int] = None
    save_every: Optional[int] = None
    progress: bool = True
    resume: Optional[str] = None


def register_configs() -> None:
    """Register the schema and the `mft_data` / `mft_percent_of` resolvers (idempotent)."""
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
    register_torchrun_launcher()
    if not OmegaConf.has_resolver("mft_stamp"):
        OmegaConf.register_new_resolver("mft_stamp", run_stamp)
    if not OmegaConf.has_resolver("mft_data"):
        OmegaConf.register_new_resolver("mft_data", bundled_path)
    if not OmegaConf.has_resolver("mft_percent_of"):
        # ${mft_percent_of:${max_steps},10}: every 10% of the steps (at least 1), e.g. for eval_every.
        OmegaConf.register_new_resolver("mft_percent_of", lambda total, percent: max(1, int(total) * int(percent) // 100))
