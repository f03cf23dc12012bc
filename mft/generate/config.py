"""Structured config of mft-generate, registered in Hydra's ConfigStore as `generate_schema`.

conf/generate.yaml lists it first in its defaults, so a misspelt key, a value of the wrong type
or an unknown choice fails at compose time with Hydra's one-line message (the pattern of
mft/config.py). Every default is here; conf/generate.yaml holds only Hydra's settings.
"""

from dataclasses import dataclass, field
from typing import List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from mft.utils.choice import Choice, Precision


class Mode(Choice):
    auto = "auto"  # prompt if `prompt` or `prompt_file` is set, batch if `input` is, else chat
    prompt = "prompt"  # one answer to `prompt`, streamed
    chat = "chat"  # interactive (/reset, /exit)
    batch = "batch"  # JSONL requests in `input`, JSONL answers to `output`


@dataclass
class AdapterConfig:
    path: str = MISSING  # an mft adapter folder, or a run dir (its latest adapter)
    scale: float = 1.0  # multiplies the adapter's update; 0 turns it off


@dataclass
class GenerateConfig:
    # What to load
    # An mft run dir: its base model, tokenizer and latest adapter (or full checkpoint).
    run_dir: Optional[str] = None
    # Or a model folder: Hugging Face, Mistral consolidated, mft quantised, an mft adapter folder or a run dir.
    base: Optional[str] = None
    # With a run dir: the checkpoint step to load; null: the latest.
    step: Optional[int] = None
    # More LoRA adapters on top, in order: [{path: <adapter folder or run dir>, scale: 1.0}].
    adapters: List[AdapterConfig] = field(default_factory=list)
    # Merge adapters into the weights (fastest); false keeps one adapter as LoRA layers.
    merge_adapters: bool = True
    # a name (v1 v2 v3 v7 v7-mm v3-tekken v3-tekken-mm) or a tokenizer file; null: the run's, the folder's, or by vocab size.
    tokenizer: Optional[str] = None

    # What to do
    mode: Mode = Mode.auto
    # Prompt mode: the user message (or the text to complete with raw=true), any text, taken verbatim.
    prompt: Optional[str] = None
    # Prompt mode: read the prompt from this UTF-8 file (- : standard input), less one final line break.
    prompt_file: Optional[str] = None
    # System prompt (chat, prompt and batch modes), any text, taken verbatim.
    system: Optional[str] = None
    # JSON file with a list of tool definitions ({"type": "function", "function": {...}}).
    tools: Optional[str] = None
    # Prompt/batch: complete plain text (BOS + text) instead of the instruct chat format.
    raw: bool = False
    # Batch mode: JSONL, one request a line: {"prompt": ...} | {"messages": [...], "tools": [...]} | {"text": ...}.
    input: Optional[str] = None
    # Batch mode: JSONL out, one line per request in input order; null: stdout.
    output: Optional[str] = None
    # Batch mode: requests generated together.
    batch_size: int = 8

    # How to decode
    # Generated tokens per answer at most.
    max_new_tokens: int = 256
    # 0: greedy; > 0 samples from softmax(logits / temperature).
    temperature: float = 0.0
    # Nucleus sampling mass (1.0: off).
    top_p: float = 1.0
    # Sample among the k most likely tokens (0: off).
    top_k: int = 0
    # Seeds sampling.
    seed: int = 0
    # Stop strings (the answer ends before the first one); EOS always stops.
    stop: List[str] = field(default_factory=list)
    # Print tokens as they come (prompt and chat modes).
    stream: bool = True

    # Where and how fast
    # auto (cuda if available, else cpu) | cpu | cuda | cuda:N
    device: str = "auto"
    precision: Precision = Precision.auto
    # torch.compile the decode step (CUDA graphs on GPU): fast after a warm-up.
    compile: bool = False
    # Prompt tokens per prefill forward (bounds activation memory).
    prefill_chunk: int = 512


def register_generate_configs() -> None:
    ConfigStore.instance().store(name="generate_schema", node=GenerateConfig)
