"""mft's Hydra configs: where they are (CONFIG_PATH), composing them outside an app, and the one
conversion of a composed config into the schema's dataclasses.

The configs are the repository's top-level conf/ folder (the package is installed editable).
"""

from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mft.errors import MftError

CONFIG_PATH = str(Path(__file__).resolve().parents[1] / "conf")


def compose(config_name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """Compose conf/<config_name>.yaml as the app does (register its schema first)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(CONFIG_PATH, version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


def to_dataclass(composed: DictConfig) -> Any:
    """The composed config as its schema's dataclasses, interpolations resolved: done once, at the
    entry point. A value left unset (data.train_files, say) or a failing interpolation is a user error."""
    try:
        return OmegaConf.to_object(composed)
    except OmegaConfBaseException as e:
        raise MftError(f"config: {e}") from None
