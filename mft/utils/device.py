"""Where a run computes and in which precision: `device` and `precision` config values resolved."""

import torch

from mft.utils.errors import MftError

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """`auto`: this rank's GPU (LOCAL_RANK under torchrun) if there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise MftError(f"device={name!r} is not a device; expected auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MftError(f"device={name!r} but CUDA is not available on this machine; use device=cpu.")
    return device


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The compute dtype: `auto` is bf16 on CUDA and fp32 elsewhere (the schema admits only
    auto, bf16 and fp32, so the lookup cannot miss)."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[precision]
