"""Quantised (4-bit) frozen weights for QLoRA: formats, the linear layer, model building."""
