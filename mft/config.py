"""Structured configs: the schema behind every Hydra config group, with every default.

`TrainConfig` is registered in Hydra's ConfigStore as `train_schema` and sits first in
conf/train.yaml's defaults, so every YAML file and command-line override is merged into
these dataclasses: a misspelt key, a value of the wrong type or a choice that is not one of
its Enum's fails at compose time with Hydra's one-line message, and a key added with `+` that the
schema does not have fails when the config is converted (mft.compose.to_dataclass). The defaults here suit a real
7B fine-tuning run; YAML files only override them (the tiny CPU run's settings live in
conf/per_model/tiny.yaml, applied whenever model=tiny). mft-train converts the composed config
into these dataclasses once (mft.compose.to_dataclass) and passes them down.
"""

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from hydra_plugins.mft_torchrun_launcher import register_torchrun_launcher
from omegaconf import MISSING, OmegaConf

from mft.data.bundled import bundled_path
from mft.data.config import DataConfig
from mft.data.tokenizer_files import model_tokenizer
from mft.model.args import ModelArgs
from mft.utils.choice import Choice, Precision
from mft.utils.world import run_stamp

# The linear layers of a transformer block: attention (wq wk wv wo) and MLP (w1 w2 w3).
BLOCK_LINEARS = ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]
# What peft.target_modules may name: those, and a mixture of experts' router (gate), never a default
# (mft.peft.lora.LORA_TARGET_CHOICES, which needs torch).
LORA_TARGET_CHOICES = [*BLOCK_LINEARS, "gate"]


class AttnBackend(Choice):
    auto = "auto"  # per device at call time: triton on CUDA, sdpa on CPU
    sdpa = "sdpa"  # torch scaled_dot_product_attention
    triton = "triton"  # mft's sliding-window varlen kernel (mft/kernels/swa_attention.py)
    flex = "flex"  # torch flex_attention with a block mask
    xformers = "xformers"  # used when it imports and works, else auto's choice


@dataclass
class ModelConfig(ModelArgs):
    """Architecture (the ModelArgs fields, set by every conf/model/ preset) plus where weights and tokenizer come from."""

    # Preset name, recorded with adapters and in logs.
    name: str = MISSING
    # Hugging Face folder (config.json) or Mistral consolidated folder (params.json); null: random init (seeded).
    checkpoint: Optional[str] = None
    # v1 | v2 | v3 | v7 | v7-mm | v3-tekken | v3-tekken-mm (files shipped in mistral-common) or a path to
    # a tokenizer file (tekken.json of any version, tokenizer.model.vN) / model folder. The presets use
    # ${mft_tokenizer:${model.checkpoint},vN}: the checkpoint folder's own tokenizer when it has one.
    tokenizer: str = "v3"
    # Attention kernel: auto (triton on CUDA, sdpa on CPU) | triton | flex | xformers | sdpa.
    attn_backend: AttnBackend = AttnBackend.auto


class Schedule(Choice):
    """Learning rate after warmup."""

    cosine = "cosine"  # half a cosine from lr down to lr * min_lr_ratio
    linear = "linear"  # a straight line from lr down to lr * min_lr_ratio
    constant = "constant"


@dataclass
class OptimConfig:
    """AdamW with linear warmup, then the schedule."""

    # Peak learning rate: usual for LoRA on a 7B model (full fine-tuning wants ~1e-5).
    lr: float = 1e-4
    # Adam betas; beta2 0.95 is the usual choice for LLM training (steadier than 0.999 on loss spikes).
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    # Adam epsilon.
    eps: float = 1e-8
    # Decoupled weight decay, never on norms or biases.
    weight_decay: float = 0.0
    schedule: Schedule = Schedule.cosine
    # Linear warmup from 0 over this many optimizer steps; null: no warmup, or warmup_ratio's (set at most one).
    warmup_steps: Optional[int] = None
    # ... or over this share of all steps, in [0, 1); a per-model file's warmup_steps default gives way to it.
    warmup_ratio: Optional[float] = None
    # The cosine or linear decay ends at lr * min_lr_ratio.
    min_lr_ratio: float = 0.0


class PeftMethod(Choice):
    lora = "lora"  # low-rank adapters on target_modules; the base stays frozen
    none = "none"  # full fine-tuning: every parameter trains


@dataclass
class PeftConfig:
    method: PeftMethod = PeftMethod.lora
    # LoRA rank.
    r: int = 8
    # LoRA scale = alpha / r.
    alpha: float = 16.0
    # Dropout on the LoRA branch's input.
    dropout: float = 0.0
    # Layers that get adapters (Mistral's names): wq wk wv wo w1 w2 w3 (a mixture of experts: every expert's
    # w1 w2 w3, one adapter each) and, MoE only, gate (the router; not in the default list).
    target_modules: List[str] = field(default_factory=lambda: list(BLOCK_LINEARS))


class QuantFormat(Choice):
    """The frozen base's storage (QLoRA; see mft/quant/formats.py)."""

    none = "none"  # the compute dtype
    nf4 = "nf4"  # 4-bit NormalFloat with an fp32 absmax per block_size weights
    int4 = "int4"  # asymmetric 4-bit integers with a bf16 scale and zero per block_size weights


@dataclass
class QuantConfig:
    format: QuantFormat = QuantFormat.none
    # nf4: weights per absmax (64 in QLoRA); int4: group size (conf/quant/int4.yaml: 128).
    block_size: int = 64
    # nf4: store the absmax in 8 bits, in blocks of double_quant_block_size (~0.37 bit per weight saved).
    double_quant: bool = False
    # nf4 with double_quant: absmax values per fp32 second-level scale.
    double_quant_block_size: int = 256
    # Linear layers to quantise; add "output" for the head (embeddings and norms stay dense).
    modules: List[str] = field(default_factory=lambda: list(BLOCK_LINEARS))


class LoggerName(Choice):
    console = "console"  # progress bar + metrics.jsonl
    wandb = "wandb"  # the same plus Weights & Biases (pip install -e ".[wandb]")


class WandbMode(Choice):
    auto = "auto"  # online when WANDB_API_KEY is set or `wandb login` was run, else offline
    online = "online"
    offline = "offline"
    disabled = "disabled"


class ActivationCheckpointing(Choice):
    """What each transformer block keeps for backward (mft/build/memory.py)."""

    none = "none"  # everything autograd saves: fastest, most memory
    full = "full"  # only the block's input; backward runs the block's forward again (~30% slower)
    selective = "selective"  # matmul and attention outputs; norms, activations, rope, casts recomputed
    auto = "auto"  # CUDA: per block, the least recomputation whose estimated peak fits memory_budget_gib; CPU: none


@dataclass
class LoggerConfig:
    """metrics.jsonl in the run dir is always written, whatever the logger."""

    name: LoggerName = LoggerName.console
    # Write train metrics every N optimizer steps.
    log_every: int = 10
    # W&B project.
    project: str = "mft"
    # W&B team or user; null: your default.
    entity: Optional[str] = None
    mode: WandbMode = WandbMode.auto


@dataclass
class TrainConfig:
    # The config groups (conf/<group>/): chosen in conf/train.yaml's defaults list.
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    optim: OptimConfig = MISSING
    peft: PeftConfig = MISSING
    logger: LoggerConfig = MISSING
    quant: QuantConfig = field(default_factory=QuantConfig)
    # Seeds the random base (when there is no checkpoint), LoRA init (seed + 1) and dropout; data.seed orders the data.
    seed: int = 0
    # auto (cuda if available, else cpu) | cpu | cuda | cuda:N
    device: str = "auto"
    precision: Precision = Precision.auto
    # Packed sequences of data.seq_len tokens per micro-step (per rank under torchrun).
    batch_size: int = 8
    # Micro-steps per optimizer step.
    grad_accum: int = 1
    # Optimizer steps; null: train for `epochs` instead.
    max_steps: Optional[int] = None
    # Passes over the training set (fractions allowed), used when max_steps is null.
    epochs: Optional[float] = 1.0
    # Gradient clipping by global norm; 0 disables it.
    max_grad_norm: float = 1.0
    # A step whose loss or gradient norm is NaN/inf is skipped (no update); stop after this many in a row.
    max_nonfinite_steps: int = 3
    # none | full | selective | auto (see ActivationCheckpointing). The true/false of older configs are refused
    # when the config is composed, with the allowed values: write full or none.
    activation_checkpointing: ActivationCheckpointing = ActivationCheckpointing.auto
    # auto's budget per GPU in GiB; null: the GPU's free memory at start minus 10% and 1 GiB.
    memory_budget_gib: Optional[float] = None
    # torch.compile each transformer block, one graph each (attention and 4-bit dequantise kernels are
    # custom ops; speed in docs/benchmarks.md); the first step pays the compile time (logged, and
    # compile_s in the summary). null: on for CUDA with attn_backend auto or triton, off otherwise.
    compile: Optional[bool] = None
    # Output head + cross-entropy over this many supervised tokens at a time (a frozen head's gradient
    # made in forward, else recomputed in backward), so no (tokens x vocab) fp32 logits are kept (GiBs
    # at long seq_len); 0: all at once.
    loss_chunk_tokens: int = 2048
    # Mixture of experts (model.moe): weight of the routers' load-balancing loss (Switch / Mixtral: 1 when
    # balanced), the mean over layers, added to the cross-entropy. 0: off, as in transformers' fine-tuning
    # (output_router_logits false) and mistral-finetune. When on, transformers' coefficient is 0.001 on a
    # loss k times this one (it pools the layers and divides by tokens, not tokens x k): 0.002 for top 2.
    router_aux_loss_coef: float = 0.0
    # Evaluate on the validation set every N optimizer steps; 0: only before the first step and after the last.
    eval_every: int = 50
    # Evaluate before the first step (the baseline of the report); false: start training at once.
    eval_at_start: bool = True
    # Cap on validation batches per evaluation; null: the whole validation set.
    eval_batches: Optional[int] = None
    # Write a checkpoint every N steps; null: only at the end.
    save_every: Optional[int] = None
    # LoRA on a random base (model.checkpoint=null): write that base to <run dir>/base_model with the first
    # checkpoint, which the adapter and a resume need; false saves the time and disk, and leaves an adapter
    # that nothing can load or resume.
    save_random_base: bool = True
    # Show the progress bar (loss, tokens/s, ETA).
    progress: bool = True
    # null | auto (latest complete checkpoint of this run dir) | a run dir or its checkpoints/step_N.
    resume: Optional[str] = None


def plain(cfg: Any) -> Dict[str, Any]:
    """A config dataclass as plain dicts, lists and strings (for resolved_config.yaml and W&B)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)


def unless_set(key: str, value: Any, _parent_: Any) -> Any:
    """The `mft_unless_set` resolver: `value`, or null when the sibling `key` is set. A file's default
    for one of two exclusive keys (optim.warmup_steps in conf/per_model/tiny.yaml) then gives way
    to the other (optim.warmup_ratio) set later, on the command line or by an experiment."""
    return value if _parent_[key] is None else None


def register_configs() -> None:
    """Register the schema and the `mft_stamp` / `mft_data` / `mft_percent_of` / `mft_unless_set` /
    `mft_tokenizer` resolvers (idempotent)."""
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
    register_torchrun_launcher()
    if not OmegaConf.has_resolver("mft_stamp"):
        OmegaConf.register_new_resolver("mft_stamp", run_stamp)
    if not OmegaConf.has_resolver("mft_data"):
        OmegaConf.register_new_resolver("mft_data", bundled_path)
    if not OmegaConf.has_resolver("mft_percent_of"):
        # ${mft_percent_of:${max_steps},10}: every 10% of the steps (at least 1), e.g. for eval_every.
        OmegaConf.register_new_resolver("mft_percent_of", lambda total, percent: max(1, int(total) * int(percent) // 100))
    if not OmegaConf.has_resolver("mft_unless_set"):
        # ${mft_unless_set:warmup_ratio,20}: 20, unless the sibling warmup_ratio is set (then null).
        OmegaConf.register_new_resolver("mft_unless_set", unless_set)
    if not OmegaConf.has_resolver("mft_tokenizer"):
        # ${mft_tokenizer:${model.checkpoint},v3}: the checkpoint folder when it holds a Mistral
        # tokenizer file (tekken.json, tokenizer.model.vN, tokenizer.model), else v3.
        OmegaConf.register_new_resolver("mft_tokenizer", model_tokenizer)
