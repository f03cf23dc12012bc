"""mft: fine-tune Mistral models with PyTorch, composed with Hydra."""

__version__ = "0.1.0"
