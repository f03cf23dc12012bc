"""What the training benchmarks (tools/bench_qlora.py, tools/bench_train.py) share: model shapes
from conf/model/, the 4-bit formats they compare, the MFU count, and the facts of a table's header."""

import importlib.metadata
import subprocess
from dataclasses import fields
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf

from mft.model.args import ModelArgs
from mft.quant.formats import QuantSpec

GIB = 2**30
PEAK_TFLOPS = 790.0  # bf16 dense matmul measured on the lent H100/H200 (DESIGN.md)
REPO = Path(__file__).resolve().parent.parent
PRESETS = REPO / "conf" / "model"

SPECS = {
    "nf4": QuantSpec("nf4", 64, double_quant=True),
    "nf4-fp32-absmax": QuantSpec("nf4", 64, double_quant=False),
    "int4": QuantSpec("int4", 128),
}


def preset_names() -> list[str]:
    """The presets of conf/model/, by file name."""
    return sorted(p.stem for p in PRESETS.glob("*.yaml"))


def preset_args(name: str) -> ModelArgs:
    """The architecture of conf/model/<name>.yaml (its ModelArgs fields; the rest is ignored), read as
    Hydra reads it (OmegaConf's YAML takes 1.0e6 for a number, PyYAML for a string)."""
    values = OmegaConf.to_container(OmegaConf.load(PRESETS / f"{name}.yaml"), resolve=False)
    return ModelArgs(**{f.name: values[f.name] for f in fields(ModelArgs) if f.name in values})


def mean_keys(doc_len: int, window: Optional[int]) -> float:
    """Keys a query attends to, averaged over the positions of one causal document of `doc_len`
    tokens, a query seeing itself and the previous window - 1 (None: every earlier token)."""
    if window is None or window >= doc_len:
        return (doc_len + 1) / 2
    return (window * (window + 1) / 2 + (doc_len - window) * window) / doc_len


def active_feed_forward_params(args: ModelArgs) -> int:
    """Feed-forward weights one token goes through in one block: the SwiGLU's three matrices, or
    for a mixture (Mixtral) those of its num_experts_per_tok experts plus the router."""
    swiglu = 3 * args.dim * args.hidden_dim
    if args.moe is None:
        return swiglu
    return args.moe.num_experts_per_tok * swiglu + args.dim * args.moe.num_experts


def flops_per_token(args: ModelArgs, doc_len: int) -> float:
    """Matmul FLOPs of one trained token: forward (2N) + backward to the activations (2N) over the
    linear layers and the head (no weight gradients for a frozen base), N counting only the
    weights the token goes through (a mixture's chosen experts and router: active parameters),
    plus attention: forward 2 x 2 x keys x n_heads x head_dim per layer (QK^T and PV), backward
    twice that, keys averaged over the document (mean_keys: (doc_len + 1) / 2 when causal within
    the window). LoRA's small matmuls and activation-checkpointing recompute are not counted (the
    MFU convention)."""
    q, kv = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    linear = args.n_layers * (2 * args.dim * q + 2 * args.dim * kv + active_feed_forward_params(args))
    head = args.dim * args.vocab_size
    attention = sum(3 * 2 * 2 * q * mean_keys(doc_len, w) for w in args.windows)
    return 4 * (linear + head) + attention


def commit(override: Optional[str] = None) -> str:
    """`override`, else the checkout's short hash, marked when the working tree differs from it."""
    if override:
        return override
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=REPO)
    except OSError:
        return "unknown"
    if head.returncode:
        return "unknown"
    return head.stdout.strip() + (" + uncommitted changes" if dirty.stdout.strip() else "")


def package_version(name: str) -> str:
    """The installed version of the distribution `name`, or "not installed"."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"
