"""The names the trainer and controller services load their YAML by: the project's one
loader (`vmad/config.py`: `${ENV}` substitution, unknown keys and wrong types named with
file and key), under the names these services import."""

from __future__ import annotations

from vmad.config import ConfigError as ConfigFileError
from vmad.config import load_config as load_component_config

__all__ = ["ConfigFileError", "load_component_config"]
