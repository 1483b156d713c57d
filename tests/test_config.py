"""vmad/config.py: errors name the file and the key; ${ENV} substitution; vmad validate."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from vmad.config import ConfigError, component_of, load_config
from vmad.edge_agent.config import AgentConfig

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str, name: str = "agent.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_unknown_key_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, "vm_id: vm-1\nspool:\n  max_bytse: 10\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, AgentConfig)
    assert "agent.yaml: spool.max_bytse: unknown key" in str(info.value)


def test_wrong_type_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, "vm_id: vm-1\nspool:\n  max_bytes: lots\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, AgentConfig)
    assert "agent.yaml: spool.max_bytes: Input should be a valid integer" in str(info.value)


def test_missing_env_var_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VMAD_TEST_TOKEN_UNSET", raising=False)
    path = write(tmp_path, "vm_id: vm-1\nsecurity:\n  token: ${VMAD_TEST_TOKEN_UNSET}\n")
    with pytest.raises(ConfigError, match="VMAD_TEST_TOKEN_UNSET is not set"):
        load_config(path, AgentConfig)


def test_env_substitution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMAD_TEST_TOKEN", "s3cret")
    path = write(tmp_path, "vm_id: vm-1\nsecurity:\n  token: ${VMAD_TEST_TOKEN}\n"
                           "  client_id: $${LITERAL}\n")
    config = load_config(path, AgentConfig)
    assert config.security.token == "s3cret"
    assert config.security.client_id == "${LITERAL}"


def test_missing_required_key_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="vm_id: required key is missing"):
        load_config(write(tmp_path, "interval_s: 5\n"), AgentConfig)
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "vm_id: [\n"), AgentConfig)


def test_component_detection(tmp_path: Path) -> None:
    assert component_of(write(tmp_path, "vm_id: a\n", "my-agent.yaml")) == "agent"
    assert component_of(write(tmp_path, "component: agent\nvm_id: a\n", "x.yaml")) == "agent"
    declared = write(tmp_path, "component: agent\nvm_id: a\n", "x.yaml")
    assert load_config(declared, AgentConfig).vm_id == "a"


def test_vmad_validate_command(tmp_path: Path) -> None:
    good = write(tmp_path, "vm_id: vm-1\n", "agent.yaml")
    bad = write(tmp_path, "vm_id: vm-1\nnope: 1\n", "bad-agent.yaml")
    result = subprocess.run([sys.executable, "-m", "vmad.cli", "validate", str(good), str(bad)],
                            capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 1
    assert "ok" in result.stdout and "(agent)" in result.stdout
    assert "bad-agent.yaml: nope: unknown key" in result.stderr


def test_deploy_agent_example_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMAD_VM_ID", "vm-example")
    monkeypatch.setenv("VMAD_AGENT_TOKEN", "example-token")
    path = ROOT / "deploy" / "agent.yaml"
    if not path.exists():
        pytest.skip("deploy/agent.yaml not written yet")
    assert load_config(path, AgentConfig).vm_id


@pytest.mark.parametrize("component", ["agent", "trainer", "controller", "planner"])
def test_each_deploy_config_lists_every_key_of_its_schema(component: str) -> None:
    """deploy/*.yaml are the reference an operator copies: a key missing there is a
    setting nobody finds."""
    import yaml
    from pydantic import BaseModel

    from vmad.config import schema_for

    def missing(schema: type[BaseModel], data: object, prefix: str = "") -> list[str]:
        absent = []
        for name, field in schema.model_fields.items():
            key = field.alias or name
            if not isinstance(data, dict) or key not in data:
                absent.append(prefix + key)
            elif isinstance(field.annotation, type) and issubclass(field.annotation,
                                                                   BaseModel):
                absent += missing(field.annotation, data[key], f"{prefix}{key}.")
        return absent

    data = yaml.safe_load((ROOT / "deploy" / f"{component}.yaml").read_text())
    assert missing(schema_for(component), data) == []
