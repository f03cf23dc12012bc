"""Shared test helpers: tiny models built through mft's one build pipeline, and tokenizers.

Tests build every model with `build` (mft.build.build_model underneath), so they exercise the
same construct -> convert -> materialise -> load/init path as mft-train and mft-generate.
"""

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from mft.build import ModelSpec, Runtime, build_model
from mft.model.args import ModelArgs
from mft.model.transformer import Transformer

# A Mistral small enough for every CPU test: GQA (4 query heads share 2 KV heads), a window
# shorter than the test sequences. Test files derive their shapes from it with tiny_args(...).
TINY = ModelArgs(dim=64, n_layers=2, head_dim=16, hidden_dim=96, n_heads=4, n_kv_heads=2, vocab_size=128,
                 norm_eps=1e-5, rope_theta=10000.0, sliding_window=8)


def run_in_triton_interpreter(script: str) -> subprocess.CompletedProcess:
    """`script` in a fresh Python with TRITON_INTERPRET=1 (it must be set before triton is first
    imported), the repository first on the path: how the CPU tests run mft's Triton kernels."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": repo + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)


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


# Tekken tokenizers newer than the v3 files the mistral-common wheel ships, written by
# tests/tekken_files.py: name -> (config version, with [THINK] tokens).
TEKKEN_VERSIONS = {
    "v7-tekken": ("v7", True),
    "v11-tekken": ("v11", True),
    "v13-tekken": ("v13", True),
    "v13-tekken-nothink": ("v13", False),
    "v15-tekken": ("v15", True),
}


@pytest.fixture(scope="session")
def tekken_files(tmp_path_factory) -> dict:
    """name -> the tekken.json of TEKKEN_VERSIONS, each alone in a model folder."""
    from tekken_files import write_tekken

    root = tmp_path_factory.mktemp("tekken")
    return {name: write_tekken(root / name, version, think) for name, (version, think) in TEKKEN_VERSIONS.items()}


def mask_runs(mask) -> list[tuple[int, int]]:
    """(start, end) of each maximal run of True in a supervision mask."""
    runs, start = [], None
    for i, m in enumerate([*mask, False]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append((start, i))
            start = None
    return runs
