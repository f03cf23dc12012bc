"""mft's Hydra configs: where they are (CONFIG_PATH), composing them outside an app, and the one
conversion of a composed config into the schema's dataclasses.

The configs are the repository's top-level conf/ folder. pyproject.toml installs it as the
package `mft.conf`, so a wheel or a non-editable install carries them (`pkg://mft.conf`). A
source checkout reads its own conf/ in place: that also covers a checkout that is only on
PYTHONPATH, over another checkout's editable install.
"""

from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mft.utils.errors import MftError

_CHECKOUT_CONF = Path(__file__).resolve().parents[1] / "conf"
CONFIG_PATH = str(_CHECKOUT_CONF) if (_CHECKOUT_CONF / "train.yaml").is_file() else "pkg://mft.conf"


def compose(config_name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """Compose conf/<config_name>.yaml as the app does (register its schema first)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir, initialize_config_module

    if CONFIG_PATH.startswith("pkg://"):
        context = initialize_config_module(CONFIG_PATH.removeprefix("pkg://"), version_base="1.3")
    else:
        context = initialize_config_dir(CONFIG_PATH, version_base="1.3")
    with context:
        return hydra_compose(config_name=config_name, overrides=list(overrides))


def to_dataclass(composed: DictConfig) -> Any:
    """The composed config as its schema's dataclasses, interpolations resolved: done once, at the
    entry point. A value left unset (data.train_files, say) or a failing interpolation is a user error."""
    try:
        return OmegaConf.to_object(composed)
    except OmegaConfBaseException as e:
        raise MftError(f"config: {e}") from None
