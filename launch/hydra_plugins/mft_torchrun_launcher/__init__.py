"""A Hydra launcher that runs each sweep point as its own torch-elastic (torchrun) job.

    mft-train -m hydra/launcher=torchrun hydra.launcher.nproc_per_node=4 optim.lr=1e-4,2e-4

Hydra removed its contrib torchrun launcher; this one is ours, on torch.distributed's elastic
launch API. Each point runs `python -m mft.train <its overrides> hydra.run.dir=<its sweep
subdir>` in `nproc_per_node` worker processes (on every node of `nnodes`), one point after
the other, so every point gets one run dir shared by all of its ranks.

As with Hydra's own launcher under mft-train, a point that fails does not stop the sweep: its
run dir (made before it starts, so it is kept) records the failure, and the sweep ends with the
table of its points (mft.report.callback), after which mft-train exits 1.
"""

import logging
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)


@dataclass
class TorchrunLauncherConf:
    _target_: str = "hydra_plugins.mft_torchrun_launcher.TorchrunLauncher"
    nproc_per_node: int = 1  # worker processes per node (one per GPU)
    nnodes: str = "1"  # "N" or "MIN:MAX" for elastic jobs
    rdzv_backend: str = "c10d"  # torch's built-in rendezvous
    rdzv_endpoint: str = "localhost:0"  # host:port of the rendezvous; port 0 picks a free one (single node)
    rdzv_id: Optional[str] = None  # shared by the nodes of one job; null: a fresh id per sweep point
    max_restarts: int = 0  # restarts of the worker group on failure
    monitor_interval: float = 0.5  # seconds between the agent's checks of its workers
    shutdown_timeout: int = 100  # seconds the workers get to save a checkpoint after SIGTERM
    module: str = "mft.train"  # what each worker runs with `python -m`


def register_torchrun_launcher() -> None:
    ConfigStore.instance().store(group="hydra/launcher", name="torchrun", node=TorchrunLauncherConf)


class TorchrunLauncher(Launcher):
    def __init__(self, **settings) -> None:
        self.settings = TorchrunLauncherConf(**settings)
        self.config: Optional[DictConfig] = None
        self.hydra_context: Optional[HydraContext] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context = config, hydra_context

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        assert self.config is not None and self.hydra_context is not None
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        log.info("Launching %d torchrun jobs of %d process(es) per node", len(job_overrides), self.settings.nproc_per_node)
        results: List[JobReturn] = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(sweep_config):
                sweep_config.hydra.job.id = sweep_config.hydra.job.num = idx
            run_dir = Path(str(sweep_config.hydra.sweep.dir)) / str(sweep_config.hydra.sweep.subdir)
            log.info("\t#%d : %s -> %s", idx, " ".join(filter_overrides(overrides)), run_dir)
            results.append(self._run_point(list(overrides), sweep_config, run_dir))
        return results

    def _run_point(self, overrides: List[str], sweep_config: DictConfig, run_dir: Path) -> JobReturn:
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
        from torch.distributed.launcher.api import LaunchConfig, elastic_launch

        s = self.settings
        min_nodes, _, max_nodes = s.nnodes.partition(":")
        launch_config = LaunchConfig(
            min_nodes=int(min_nodes),
            max_nodes=int(max_nodes or min_nodes),
            nproc_per_node=s.nproc_per_node,
            run_id=s.rdzv_id or uuid.uuid4().hex,
            rdzv_backend=s.rdzv_backend,
            rdzv_endpoint=s.rdzv_endpoint,
            max_restarts=s.max_restarts,
            monitor_interval=s.monitor_interval,
            **({"shutdown_timeout": s.shutdown_timeout} if "shutdown_timeout" in LaunchConfig.__dataclass_fields__ else {}),
        )
        job_overrides = [o for o in overrides if not o.startswith(("hydra/launcher=", "hydra.launcher."))]
        args = ["-m", s.module, *job_overrides, f"hydra.run.dir={run_dir}"]
        result = JobReturn(overrides=overrides, working_dir=str(run_dir), task_name=sweep_config.hydra.job.name)
        result.cfg = OmegaConf.masked_copy(sweep_config, [k for k in sweep_config if k != "hydra"])
        result.hydra_cfg = sweep_config
        # Made here, so mft-train sees a folder it did not create and keeps it should the point fail on its config.
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            elastic_launch(launch_config, sys.executable)(*args)
        except ChildFailedError as e:
            # Not a failed JobReturn: Hydra would stop at it before the callbacks' on_multirun_end, which
            # prints the sweep's table (the point shows there as failed) and makes mft-train exit 1.
            from mft.report.callback import record_failed_point

            first = next(iter(e.failures.values()), None)
            log.error("sweep point %s failed (%s); its output is above%s", run_dir, e.name,
                      f" and in {run_dir / 'train.log'}" if (run_dir / "train.log").is_file() else "")
            reason = f"torchrun: {e.name} failed (exit code {first.exitcode})" if first else f"torchrun: {e.name} failed"
            record_failed_point(run_dir, reason, job_overrides)
        result.status, result.return_value = JobStatus.COMPLETED, None
        return result
