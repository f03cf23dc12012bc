"""Structured configs: the schema behind every Hydra config group.

`TrainConfig` is registered in Hydra's ConfigStore as `train_schema` and sits first in
conf/train.yaml's defaults, so every YAML file and command-line override is merged into
these dataclasses: a misspelt key or a value of the wrong type fails at compose time with
Hydra's one-line message. The comments in conf/ document each knob for users.
"""

from dataclasses import dataclass, field
from typing import List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from mft.data.bundled import bundled_path
from hydra_plugins.mft_torchrun_launcher import register_torchrun_launcher
from mft.model.args import ModelArgs


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
    train_files: List[str] = MISSING
    valid_files: List[str] = field(default_factory=list)
    valid_fraction: float = 0.0
    seq_len: int = 256
    too_long: str = "truncate"
    seed: int = 0


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
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    batch_size: int = 8
    grad_accum: int = 1
    max_steps: Optional[int] = None
    epochs: Optional[float] = None
    max_grad_norm: float = 1.0
    activation_checkpointing: bool = False
    eval_every: int = 50
    eval_batches: Optional[int] = None
    save_every: Optional[int] = None
    progress: bool = True


def register_configs() -> None:
    """Register the schema and the `mft_data` resolver (idempotent)."""
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
    register_torchrun_launcher()
    if not OmegaConf.has_resolver("mft_data"):
        OmegaConf.register_new_resolver("mft_data", bundled_path)
