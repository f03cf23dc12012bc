"""mft's Hydra configs: where they are (CONFIG_PATH), composing them outside an app, and the one
conversion of a composed config into the schema's dataclasses.

The configs are the repository's top-level conf/ folder. pyproject.toml installs it as the
package `mft.conf`, so a wheel or a non-editable install carries them (`pkg://mft.conf`). A
source checkout reads its own conf/ in place: that also covers a checkout that is only on
PYTHONPATH, over another checkout's editable install.
"""

import dataclasses
import difflib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

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
    entry point. A key the schema does not have, a value left unset (data.train_files, say) or a
    failing interpolation is a user error."""
    check_known_keys(composed)
    try:
        return OmegaConf.to_object(composed)
    except OmegaConfBaseException as e:
        raise MftError(f"config: {e}") from None


def check_known_keys(composed: DictConfig) -> None:
    """Refuse keys the schema does not have. Hydra rejects `optim.lrr=...`, but its own hint, `+optim.lrr=...`,
    adds the key to the composed config, and converting to the dataclasses would then drop it unseen.
    Nodes typed by a dataclass are closed; a Dict[str, Any] or Any field holds whatever it is given."""
    unknown = next(_unknown_keys(composed, ""), None)
    if unknown is None:
        return
    key, known = unknown
    parent, _, name = key.rpartition(".")
    near = difflib.get_close_matches(name, known, n=1)
    hint = f"did you mean '{f'{parent}.' if parent else ''}{near[0]}'? " if near else ""
    raise MftError(
        f"config: unknown key '{key}' (added with '+' on the command line or in a config file); {hint}"
        f"the keys of {parent or 'the top level'} are: {', '.join(known)}."
    )


def _unknown_keys(node: DictConfig, prefix: str) -> Iterator[tuple[str, list[str]]]:
    schema = OmegaConf.get_type(node)
    known = [f.name for f in dataclasses.fields(schema)] if dataclasses.is_dataclass(schema) else None
    for key, value in node.items_ex(resolve=False):
        if known is not None and key not in known:
            yield f"{prefix}{key}", known
        elif isinstance(value, DictConfig) and not OmegaConf.is_missing(node, key) and node[key] is not None:
            yield from _unknown_keys(value, f"{prefix}{key}.")
