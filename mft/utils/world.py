"""Which process this is and when the run started: read from the environment, without torch.

Kept apart from mft/utils/distributed.py (the process group, which needs torch) so that
composing and checking a config, and `mft-train --help`, never import torch.
"""

import os
import time
from dataclasses import dataclass

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


def quiet_overrides(world: World) -> list[str]:
    """Hydra overrides for ranks > 0: compose the same config, write nothing to the run dir."""
    if world.is_main:
        return []
    return ["hydra.output_subdir=null", "hydra/job_logging=none", "hydra/hydra_logging=none"]


def run_stamp(fmt: str) -> str:
    """The `mft_stamp` resolver: this run's start time (rank 0's under torchrun), formatted."""
    if STAMP_ENV not in os.environ:
        os.environ[STAMP_ENV] = repr(time.time())
    return time.strftime(fmt, time.localtime(float(os.environ[STAMP_ENV])))
