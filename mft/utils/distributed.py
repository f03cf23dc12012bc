"""Process-group set-up under torchrun (or SLURM), and the facts every rank must agree on.

Under `torchrun` every rank runs the same Hydra app. Before Hydra composes, the ranks join
one process group and rank 0's start time is broadcast, so `${mft_stamp:...}` in the run dir
resolves to the same folder on every rank. Ranks other than 0 compose the same config but
write nothing: no .hydra/, no log file, no metrics, no W&B. Which rank this is (World) and the
start stamp's resolver live in mft/utils/world.py, which does not need torch.
"""

import os
import subprocess
import time
from typing import Any, List

import torch
import torch.distributed as dist

from mft.utils.world import STAMP_ENV, World


def _slurm_rendezvous() -> None:
    """Under SLURM without torchrun (e.g. Hydra's submitit launcher, one task per GPU), the first
    node of the allocation hosts the rendezvous; the port is derived from the job id."""
    if "MASTER_ADDR" not in os.environ:
        nodes = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]],
                               capture_output=True, text=True, check=True).stdout.split()
        os.environ["MASTER_ADDR"] = nodes[0]
    os.environ.setdefault("MASTER_PORT", str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000))


def init_distributed(world: World) -> None:
    """Join the process group (NCCL on GPUs, gloo on CPUs) and agree on the run's start time."""
    if not world.distributed or dist.is_initialized():
        return
    if "WORLD_SIZE" not in os.environ:
        _slurm_rendezvous()
    if torch.cuda.is_available():
        torch.cuda.set_device(world.local_rank)
        dist.init_process_group("nccl", rank=world.rank, world_size=world.size,
                                device_id=torch.device("cuda", world.local_rank))
    else:
        dist.init_process_group("gloo", rank=world.rank, world_size=world.size)
    stamp = [os.environ.get(STAMP_ENV) or repr(time.time())]
    dist.broadcast_object_list(stamp, src=0)
    os.environ[STAMP_ENV] = stamp[0]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(value: float, device: torch.device) -> float:
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    """`t` summed over every rank, in place (unchanged in one process)."""
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def gather_objects(value: Any) -> List[Any]:
    """Every rank's `value` (small, JSON-like), in rank order, on every rank."""
    if not dist.is_initialized():
        return [value]
    values: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
