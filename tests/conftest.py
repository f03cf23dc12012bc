"""Shared test helpers: tiny models built through mft's one build pipeline, and tokenizers.

Tests build every model with `build` (mft.build.build_model underneath), so they exercise the
same construct -> convert -> materialise -> load/init path as mft-train and mft-generate.
"""

import dataclasses

import pytest
import torch

from mft.build import ModelSpec, Runtime, build_model
from mft.model.args import ModelArgs
from mft.model.transformer import Transformer

# A Mistral small enough for every CPU test: GQA (4 query heads share 2 KV heads), a window
# shorter than the test sequences. Test files derive their shapes from it with tiny_args(...).
TINY = ModelArgs(dim=64, n_layers=2, head_dim=16, hidden_dim=96, n_heads=4, n_kv_heads=2, vocab_size=128,
                 norm_eps=1e-5, rope_theta=10000.0, sliding_window=8)


def tiny_args(**changes) -> ModelArgs:
    return dataclasses.replace(TINY, **changes)


def build(args: ModelArgs = TINY, *, device="cpu", dtype: torch.dtype = torch.float32, seed: int = 0,
          std: float = 0.02, **spec) -> Transformer:
    """`args` through the build pipeline: random weights from `seed` (std `std`) unless
    `weights=<folder>`; other ModelSpec fields (quant, quant_modules, lora, attn_backend) by name."""
    return build_model(ModelSpec(args, seed=seed, init_std=std, **spec), Runtime(device=device, dtype=dtype))


@pytest.fixture
def tiny_model() -> Transformer:
    return build(TINY)


@pytest.fixture(scope="session")
def v3_tokenizer():
    from mft.data.tokenizer import load_tokenizer

    return load_tokenizer("v3")
