"""Moving full tensors in and out of parameters that FSDP2 may have sharded (DTensors)."""

import torch
from torch.distributed.tensor import DTensor, distribute_tensor


@torch.no_grad()
def copy_full_(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a full (unsharded) tensor into a parameter, sharded or not.

    A DTensor parameter takes only its own slice: every rank holds the same `full` tensor (read
    from the same file, or drawn from the same seed), so no communication is needed.
    """
    if isinstance(param, DTensor):
        local = distribute_tensor(full.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
        param.to_local().copy_(local.to_local())
    else:
        param.copy_(full)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (a collective for a DTensor: every rank must call it)."""
    return t.full_tensor() if isinstance(t, DTensor) else t
