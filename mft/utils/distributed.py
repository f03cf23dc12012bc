"""Process-group set-up under torchrun (or SLURM), and the facts every rank must agree on.

Under `torchrun` every rank runs the same Hydra app. Before Hydra composes, the ranks join
one process group and rank 0's start time is broadcast, so `${mft_stamp:...}` in the run dir
resolves to the same folder on every rank. Ranks other than 0 compose the same config but
write nothing: no .hydra/, no log file, no metrics, no W&B.
"""

import os
import subprocess
import time
from dataclasses import dataclass
from typing import Any, List

import torch
import torch.distributed as dist

STAMP_ENV = "MFT_RUN_STAMP"


@dataclass(frozen=True)
class World:
    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world_from_env() -> World:
    """torchrun's variables, else SLURM's (one task per GPU), else a single process."""
    env = os.environ
    if "WORLD_SIZE" in env:
        return World(int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"]))
    # Only inside an srun step (one task per GPU): a batch script itself also sees SLURM_PROCID.
    if "SLURM_STEP_ID" in env and int(env.get("SLURM_STEP_NUM_TASKS", "1")) > 1:
        return World(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), int(env["SLURM_STEP_NUM_TASKS"]))
    return World()


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


def quiet_overrides(world: World) -> List[str]:
    """Hydra overrides for ranks > 0: compose the same config, write nothing to the run dir."""
    if world.is_main:
        return []
    return ["hydra.output_subdir=null", "hydra/job_logging=none", "hydra/hydra_logging=none"]


def run_stamp(fmt: str) -> str:
    """The `mft_stamp` resolver: this run's start time (rank 0's under torchrun), formatted."""
    if STAMP_ENV not in os.environ:
        os.environ[STAMP_ENV] = repr(time.time())
    return time.strftime(fmt, time.localtime(float(os.environ[STAMP_ENV])))


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(value: float, device: torch.device) -> float:
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


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
