"""mft's Hydra configs, installed as the package `mft.conf` (see pyproject.toml and mft/compose.py)."""
