"""The one way mft builds a model (mft/build/pipeline.py): construct on meta -> convert (quantise
linear layers, apply LoRA) -> parallelise (activation checkpointing, compile, fully_shard) ->
materialise -> load weights or draw them. Training (one process and torchrun), generation,
exports and benchmarks all build through it; nothing else constructs a Transformer."""

from mft.build.pipeline import ModelSpec, Runtime, build_model, checkpoint_spec

__all__ = ["ModelSpec", "Runtime", "build_model", "checkpoint_spec"]
