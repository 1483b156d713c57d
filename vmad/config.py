"""Loading component configs: YAML -> pydantic v2 model, errors that name file and key.

Every component (agent, trainer, controller, planner) has one schema, a pydantic model
with `extra="forbid"`, so an unknown key is an error rather than a silently ignored
typo. `load_config(path, schema)` is the single loader:

- the file is read as text and every `${NAME}` is replaced by the environment variable
  NAME (secrets such as agent tokens stay out of files); an unset variable is an error
  naming it; `$${NAME}` is left as the literal `${NAME}`;
- the result is parsed with `yaml.safe_load` (no Python object tags);
- validation errors become one `ConfigError` whose message lists every problem as
  `<file name>: <key.path>: <message>`, e.g.
  `agent.yaml: spool.max_bytes: Input should be a valid integer`.

`component_of(path)` tells which component a file configures (by a top-level
`component:` key when present, else by file name, else by which schema accepts it);
`vmad validate CONFIG...` (edge_agent/commands.py) uses it.
"""

from __future__ import annotations

import importlib
import os
import re
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from vmad.errors import InputError

__all__ = ["COMPONENT_SCHEMAS", "ConfigError", "StrictModel", "component_of", "load_config",
           "read_yaml", "schema_for", "validate_file"]

Schema = TypeVar("Schema", bound=BaseModel)


class StrictModel(BaseModel):
    """The one base of every config section: an unknown key is an error, not a typo
    silently ignored, and a loaded config cannot be changed behind the loader's back."""

    model_config = ConfigDict(extra="forbid", frozen=True)

# "module:Class" so that importing this module imports no component (and no torch).
COMPONENT_SCHEMAS: dict[str, str] = {
    "agent": "vmad.edge_agent.config:AgentConfig",
    "trainer": "vmad.trainer.config:TrainerConfig",
    "controller": "vmad.controller.config:ControllerConfig",
    "planner": "vmad.planner.config:PlannerConfig",
}

_ENV = re.compile(r"\$(\$?)\{([A-Za-z_][A-Za-z0-9_]*)\}")


class ConfigError(InputError):
    """A config file that cannot be read, is not YAML, or does not fit its schema.

    The message always starts with the file name; `problems` holds one
    `key.path: message` string per problem.
    """

    def __init__(self, path: str | Path, problems: list[str]) -> None:
        self.path = Path(path)
        self.problems = problems
        super().__init__("; ".join(f"{self.path.name}: {p}" for p in problems))


def _substitute(text: str, path: Path) -> str:
    def replace(match: re.Match[str]) -> str:
        escaped, name = match.group(1), match.group(2)
        if escaped:
            return "${" + name + "}"
        value = os.environ.get(name)
        if value is None:
            line = text.count("\n", 0, match.start()) + 1
            raise ConfigError(path, [f"line {line}: environment variable {name} is not set"])
        return value

    return _ENV.sub(replace, text)


MAX_YAML_DEPTH = 64  # a config is a few levels deep; far deeper is an attack or an accident


def _bounded_loader() -> type:
    """yaml.SafeLoader (no Python object tags) that refuses nesting past MAX_YAML_DEPTH
    at once, instead of recursing until Python's limit (slow, then RecursionError)."""
    import yaml

    class BoundedSafeLoader(yaml.SafeLoader):
        depth = 0

        def compose_node(self, parent: Any, index: Any) -> Any:
            self.depth += 1
            try:
                if self.depth > MAX_YAML_DEPTH:
                    raise yaml.YAMLError(f"nested more than {MAX_YAML_DEPTH} levels deep")
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1

    return BoundedSafeLoader


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The file's top-level mapping after `${ENV}` substitution (empty file = {})."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(path, [f"cannot read: {error.strerror}"]) from None
    except UnicodeDecodeError as error:
        raise ConfigError(path, [f"not UTF-8 text: byte {error.start} is "
                                 f"{error.object[error.start:error.start + 1]!r}"]) from None
    try:
        data = yaml.load(_substitute(text, path), Loader=_bounded_loader())
    except yaml.YAMLError as error:
        raise ConfigError(path, [f"not valid YAML: {error}"]) from None
    except RecursionError:
        raise ConfigError(path, ["not valid YAML: nested too deeply"]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(path, ["the top level must be a mapping of keys"])
    return data


def _problems(error: ValidationError) -> list[str]:
    problems = []
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        elif item["type"] == "missing":
            message = "required key is missing"
        else:
            message = item["msg"]
        problems.append(f"{key}: {message}")
    return problems


def load_config(path: str | Path, schema: type[Schema],
                overrides: dict[str, Any] | None = None) -> Schema:
    """Load `path` into `schema`; `overrides` (top-level keys) win over the file.

    A top-level `component:` key, if present, is checked against the schema's
    component and then removed, so schemas need not declare it.
    """
    data = read_yaml(path)
    declared = data.pop("component", None)
    expected = _component_of_schema(schema)
    if declared is not None and expected is not None and declared != expected:
        raise ConfigError(path, [f"component: this file is for {declared!r}, "
                                 f"expected {expected!r}"])
    data.update(overrides or {})
    try:
        return schema.model_validate(data)
    except ValidationError as error:
        raise ConfigError(path, _problems(error)) from None


def schema_for(component: str) -> type[BaseModel]:
    """The schema class of a component name (imports that component's config module)."""
    try:
        target = COMPONENT_SCHEMAS[component]
    except KeyError:
        raise ValueError(f"unknown component {component!r}; "
                         f"known: {', '.join(COMPONENT_SCHEMAS)}") from None
    module_name, _, class_name = target.partition(":")
    return getattr(importlib.import_module(module_name), class_name)


def _component_of_schema(schema: type[BaseModel]) -> str | None:
    qualified = f"{schema.__module__}:{schema.__qualname__}"
    for component, target in COMPONENT_SCHEMAS.items():
        if target == qualified:
            return component
    return None


def component_of(path: str | Path) -> str:
    """Which component `path` configures.

    In order: a top-level `component:` key; a known component name in the file name
    (`agent.yaml`, `vmad-trainer.yaml`); else the one schema that accepts the file.
    """
    path = Path(path)
    data = read_yaml(path)
    declared = data.get("component")
    if isinstance(declared, str):
        if declared not in COMPONENT_SCHEMAS:
            raise ConfigError(path, [f"component: unknown component {declared!r}"])
        return declared
    stem = path.stem.lower()
    named = [c for c in COMPONENT_SCHEMAS if c in stem]
    if len(named) == 1:
        return named[0]
    fits = []
    for component in COMPONENT_SCHEMAS:
        try:
            schema_for(component).model_validate(data)
        except (ValidationError, ImportError):
            continue
        fits.append(component)
    if len(fits) == 1:
        return fits[0]
    raise ConfigError(path, ["cannot tell which component this file is for; add a top-level "
                             f"`component:` key ({', '.join(COMPONENT_SCHEMAS)})"])


def validate_file(path: str | Path, component: str | None = None) -> tuple[str, BaseModel]:
    """Load `path` with the schema of `component` (guessed when None); raise ConfigError."""
    component = component or component_of(path)
    return component, load_config(path, schema_for(component))
