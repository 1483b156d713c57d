"""Load a component's YAML into its pydantic schema, errors naming file and key.

Uses vmad/config.py (the project's loader, with `${ENV}` substitution) when it is
present; until it lands, this minimal loader does the same checks without substitution.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

__all__ = ["ConfigFileError", "load_component_config"]

Schema = TypeVar("Schema", bound=BaseModel)
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class ConfigFileError(ValueError):
    """A config file that cannot be read or does not fit its schema."""


def load_component_config(path: str | Path, schema: type[Schema]) -> Schema:
    try:
        from vmad import config as project_config  # type: ignore[attr-defined]

        loader = getattr(project_config, "load_config", None)
    except ImportError:
        loader = None
    if loader is not None:
        return loader(path, schema)
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigFileError(f"{path}: cannot read: {error.strerror}") from None

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in os.environ:
            raise ConfigFileError(f"{path}: environment variable {name} is not set")
        return os.environ[name]

    try:
        data = yaml.safe_load(_ENV.sub(substitute, text)) or {}
    except yaml.YAMLError as error:
        raise ConfigFileError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigFileError(f"{path}: the top level must be a mapping")
    try:
        return schema.model_validate(data)
    except ValidationError as error:
        problems = []
        for item in error.errors():
            key = ".".join(str(p) for p in item["loc"])
            message = "unknown key" if item["type"] == "extra_forbidden" else item["msg"]
            problems.append(f"{key}: {message}")
        raise ConfigFileError(f"{path}: " + "; ".join(problems)) from None
