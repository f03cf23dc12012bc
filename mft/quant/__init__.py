"""Quantised (4-bit) frozen weights for QLoRA: formats, the linear layer, which layers are quantised (the build pipeline,
mft/build, builds quantised models)."""
