"""Build a Transformer without ever holding a full-precision copy of it in host memory."""

import torch
from torch import nn

from mft.model.args import ModelArgs
from mft.model.transformer import Transformer


def build_model(
    args: ModelArgs,
    *,
    device: torch.device | str,
    dtype: torch.dtype,
    attn_backend: str = "auto",
    init: bool = True,
) -> Transformer:
    """A Transformer in `dtype` on `device`; random init when `init`, else left for a loader.

    Construction happens on the meta device (shapes only), so a 7B model costs no memory until
    to_empty() allocates it, once, directly in the target dtype and device. With device "meta"
    the model stays abstract (useful to count parameters or to let FSDP materialise shards).
    The model keeps no buffers (rope angles are computed per forward), so to_empty() leaves
    nothing behind that would need re-computing.
    """
    with torch.device("meta"):
        model = Transformer(args, attn_backend=attn_backend)
    model.to(dtype=dtype)  # free on meta
    if torch.device(device).type == "meta":
        return model
    model.to_empty(device=device)
    if init:
        model.init_weights()
    return model


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameter elements; works on meta models (numel needs no storage)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
