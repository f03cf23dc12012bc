"""Structured config of mft-generate, registered in Hydra's ConfigStore as `generate_schema`.

conf/generate.yaml lists it first in its defaults, so a misspelt key or a value of the wrong
type fails at compose time with Hydra's one-line message (the pattern of mft/config.py).
"""

from dataclasses import dataclass, field
from typing import List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class AdapterConfig:
    path: str = MISSING  # an mft adapter folder, or a run dir (its latest adapter)
    scale: float = 1.0  # multiplies the adapter's update; 0 turns it off


@dataclass
class GenerateConfig:
    # What to load
    run_dir: Optional[str] = None
    base: Optional[str] = None
    step: Optional[int] = None
    adapters: List[AdapterConfig] = field(default_factory=list)
    merge_adapters: bool = True
    tokenizer: Optional[str] = None
    # What to do
    mode: str = "auto"
    prompt: Optional[str] = None
    system: Optional[str] = None
    tools: Optional[str] = None
    raw: bool = False
    input: Optional[str] = None
    output: Optional[str] = None
    batch_size: int = 8
    # How to decode
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop: List[str] = field(default_factory=list)
    stream: bool = True
    # Where and how fast
    device: str = "auto"
    precision: str = "auto"
    compile: bool = False
    prefill_chunk: int = 512


def register_generate_configs() -> None:
    ConfigStore.instance().store(name="generate_schema", node=GenerateConfig)
