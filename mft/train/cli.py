"""`mft-train`, `python -m mft.train` and `torchrun -m mft.train`: the Hydra entry point.

Thin on purpose: join the process group when launched by torchrun (before Hydra, so that all
ranks agree on one run dir), compose the config (conf/train.yaml, typed by mft.config), convert
it once into the TrainConfig dataclass, check it (mft.train.checks) and hand it to
mft.train.loop.train, and turn user errors (MftError) into one paragraph and exit 1, removing the
run dir Hydra made for this job when nothing was written into it (mft.train.run_dir).

Composing and checking need neither torch nor mistral-common: the training loop, and with it
both, is imported only once the config is good, and torch.distributed only under several
processes, so `--help` and a config error answer in about a second.
"""

import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from mft.compose import CONFIG_PATH, to_dataclass
from mft.config import TrainConfig, register_configs
from mft.train.checks import check_config
from mft.train.run_dir import is_new_run_dir, remove_unused_run_dir
from mft.utils.errors import MftError
from mft.utils.world import World, quiet_overrides, world_from_env

if TYPE_CHECKING:
    from mft.train.loop import RunResult


def _join(world: World) -> None:
    """Join the process group; one process has none (and does not import torch.distributed here)."""
    if world.distributed:
        from mft.utils.distributed import init_distributed

        init_distributed(world)


def _leave(world: World) -> None:
    if world.distributed:
        from mft.utils.distributed import shutdown

        shutdown()


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def _run(composed: DictConfig) -> None:
    world = world_from_env()
    _join(world)  # joined already in main(), except for SLURM tasks started by submitit, say
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    new_run_dir = world.is_main and is_new_run_dir(run_dir)
    try:
        cfg: TrainConfig = to_dataclass(composed)
        check_config(cfg)
        if world.is_main:
            (run_dir / "resolved_config.yaml").write_text(OmegaConf.to_yaml(cfg))
        # torch, mistral-common and the model, now that the config is good
        from mft.train.loop import train

        result = train(cfg, run_dir, world)
    except MftError as e:
        if new_run_dir:
            remove_unused_run_dir(run_dir)
        print(f"mft-train: error: {e}", file=sys.stderr)
        sys.exit(1)
    if world.is_main:
        _report(result)


def _report(result: "RunResult") -> None:
    run_dir = result.run_dir
    print(f"\nRun dir: {run_dir}")
    print(f"Metrics: {run_dir / 'metrics.jsonl'}")
    if result.preempted:
        overrides = " ".join(shlex.quote(o) for o in HydraConfig.get().overrides.task
                             if not o.startswith(("hydra.run.dir=", "resume=")))
        print(f"Stopped by SIGTERM at step {result.metrics['step']}; checkpoint: {result.checkpoint}")
        print(f"Resume with: mft-train {overrides} hydra.run.dir={shlex.quote(str(run_dir))} resume=auto")
        return
    if result.first_valid_loss is not None and "valid_loss" in result.metrics:
        print(f"valid_loss: {result.first_valid_loss:.4f} at step 0 -> {result.metrics['valid_loss']:.4f} "
              f"at step {result.metrics['step']} (mean token accuracy "
              f"{result.metrics['valid_mean_token_accuracy']:.3f})")
    kind = "Adapter" if result.is_adapter else "Model (Mistral consolidated format)"
    print(f"{kind}: {result.checkpoint}")
    print(f"Chat with it: mft-generate run_dir={shlex.quote(str(run_dir))}")


def main() -> None:
    world = world_from_env()
    _join(world)
    sys.argv += quiet_overrides(world)
    register_configs()
    try:
        _run()
    finally:
        _leave(world)
