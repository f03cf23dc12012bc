"""`mft-train`, `python -m mft.train` and `torchrun -m mft.train`: the Hydra entry point.

Thin on purpose: compose the config (conf/train.yaml, typed by mft.config), hand it to
mft.train.loop.train, and turn user errors (MftError) into one paragraph and exit code 1.
"""

import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from mft.config import register_configs
from mft.errors import MftError
from mft.train.loop import train

# The repository's top-level conf/ (the package is installed editable: pip install -e .).
CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def _run(cfg: DictConfig) -> None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        (run_dir / "resolved_config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        result = train(cfg, run_dir)
    except MftError as e:
        print(f"mft-train: error: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"\nRun dir: {run_dir}")
    print(f"Metrics: {run_dir / 'metrics.jsonl'}")
    if result.first_valid_loss is not None and "valid_loss" in result.metrics:
        print(f"valid_loss: {result.first_valid_loss:.4f} at step 0 -> {result.metrics['valid_loss']:.4f} "
              f"at step {result.metrics['step']} (mean token accuracy "
              f"{result.metrics['valid_mean_token_accuracy']:.3f})")
    if result.is_adapter:
        print(f"Adapter: {result.checkpoint}")
        print(f"Use it: mft.checkpoint.adapter.load_adapter(model, '{result.checkpoint}') onto the base "
              "it names in adapter_config.json (a chat command, mft-generate, is not part of mft yet).")
    else:
        print(f"Model: {result.checkpoint} (Mistral consolidated format: model.checkpoint=<this folder>)")


def main() -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.exit("mft-train: error: several processes (WORLD_SIZE > 1) need FSDP training, which is not part of mft yet; run one process.")
    register_configs()
    _run()
