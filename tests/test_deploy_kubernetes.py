"""deploy/kubernetes without a cluster: every manifest passes schema validation, every
ConfigMap passes `vmad validate` with the environment its pod gives it, and the base's
controller, trainer and agent start on loopback from exactly those ConfigMaps, pod
environments, init steps, container commands and Secrets (certificates made by the
documented init-secrets.sh), pass their own probes, and talk: telemetry is acknowledged
and a state report is answered.

What is rewritten, and only that: mounted paths move under a temporary folder (as the
kubelet would mount them), listen addresses move to loopback and the well-known ports
to free ones (several tests may run at once), and the controller's cluster DNS name
becomes 127.0.0.1 (its certificate is checked for the real name separately).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT
from vmad.launch import Process, free_port

K8S = REPO_ROOT / "deploy" / "kubernetes"
BASE = K8S / "base"
VENV_BIN = Path(sys.executable).parent
# What the downward API gives each pod in the test's one-node "cluster".
FIELD_VALUES = {"spec.nodeName": "node-1", "status.hostIP": "127.0.0.1"}
PORTS = (50061, 50062, 50071, 50072, 50073, 50081)
CONTROLLER_DNS = "vmad-controller-0.vmad-controller.vmad.svc"
WORKLOADS = {"controller": ("StatefulSet", "vmad-controller"),
             "trainer": ("DaemonSet", "vmad-trainer"),
             "agent": ("DaemonSet", "vmad-agent")}


def _documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _manifest_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


def _base_objects() -> dict[tuple[str, str], dict]:
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    objects = {}
    for resource in kustomization["resources"]:
        for doc in _documents(BASE / resource):
            objects[(doc["kind"], doc["metadata"]["name"])] = doc
    return objects


def _config_maps() -> Iterator[tuple[str, str, str, str]]:
    """(file, ConfigMap name, key, text) of every ConfigMap in deploy/kubernetes."""
    for path in _manifest_files():
        for doc in _documents(path):
            if doc["kind"] == "ConfigMap":
                for key, text in doc["data"].items():
                    yield str(path.relative_to(K8S)), doc["metadata"]["name"], key, text


def _pod(role: str) -> dict:
    return _base_objects()[WORKLOADS[role]]["spec"]["template"]["spec"]


def _secret_env() -> dict[str, str]:
    return {"VMAD_TRAINER_TOKEN": "trainer-token-for-tests"}


def _container_env(container: dict, secrets: dict[str, str]) -> dict[str, str]:
    env = {}
    for item in container.get("env", []):
        source = item.get("valueFrom", {})
        if "fieldRef" in source:
            env[item["name"]] = FIELD_VALUES[source["fieldRef"]["fieldPath"]]
        elif "secretKeyRef" in source:
            env[item["name"]] = secrets[source["secretKeyRef"]["key"]]
        else:
            env[item["name"]] = item["value"]
    return env


def _shell_env_names(container: dict) -> set[str]:
    """Variables a `sh -c` command sets before it execs vmad."""
    command = " ".join(container.get("command", []))
    return set(re.findall(r"\b([A-Z_][A-Z0-9_]*)=\"\$\(", command))


def _role_of_config_map(name: str) -> str:
    return name.removeprefix("vmad-")


# -- static checks ----------------------------------------------------------------------


def test_every_manifest_passes_kubernetes_schema_validation():
    files = [str(p) for p in _manifest_files()]
    result = subprocess.run([str(VENV_BIN / "kubernetes-validate"), "--strict", "--quiet",
                             *files], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("role", list(WORKLOADS))
def test_every_config_map_validates_with_its_pods_environment(tmp_path, role):
    """Base and overlay ConfigMaps of a role, in one `vmad validate` run (each run
    imports the role's schema, PyTorch included for the trainer)."""
    container = _pod(role)["containers"][0]
    provided = set(_container_env(container, _secret_env())) | _shell_env_names(container)
    files = []
    for where, name, key, text in _config_maps():
        if _role_of_config_map(name) != role:
            continue
        needed = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", text))
        assert needed <= provided, f"{where}: {sorted(needed - provided)} never set in the pod"
        folder = tmp_path / where.replace("/", "_")
        folder.mkdir()
        (folder / key).write_text(text)
        files.append(str(folder / key))
    assert len(files) == 2, files  # base and demo overlay
    env = {**os.environ, **_container_env(container, _secret_env()),
           **{n: f"{n.lower()}-value" for n in _shell_env_names(container)}}
    result = subprocess.run([str(VENV_BIN / "vmad"), "validate", *files], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(f"({role})") == len(files)


def test_kustomization_lists_files_that_exist_and_one_secret_per_role():
    for folder in (BASE, K8S / "overlays" / "demo"):
        kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
        for entry in kustomization.get("resources", []):
            assert (folder / entry).exists(), f"{folder}: {entry}"
        for patch in kustomization.get("patches", []):
            assert (folder / patch["path"]).exists(), f"{folder}: {patch['path']}"
    generated = {g["name"]: g for g in
                 yaml.safe_load((BASE / "kustomization.yaml").read_text())["secretGenerator"]}
    mounted = {}
    for role in WORKLOADS:
        secrets = {v["secret"]["secretName"] for v in _pod(role)["volumes"] if "secret" in v}
        assert len(secrets) == 1, f"{role} mounts {secrets}"
        mounted[role] = secrets.pop()
    assert len(set(mounted.values())) == 3, "each role has its own TLS Secret"
    agent_files = {Path(f).name for f in generated[mounted["agent"]]["files"]}
    assert not any(name.startswith("server") for name in agent_files), agent_files
    assert "client-key.pem" in agent_files
    for role in ("controller", "trainer"):
        assert "server-key.pem" in {Path(f).name for f in generated[mounted[role]]["files"]}
    for role in WORKLOADS:  # nobody gets the CA's private key
        assert not any("ca-key" in f for f in generated[mounted[role]]["files"])


# -- the base, started ------------------------------------------------------------------


@dataclass
class Pod:
    role: str
    root: Path
    mounts: dict[str, Path]
    env: dict[str, str]
    container: dict


def _make_secrets(tmp_path: Path) -> Path:
    """Run the documented init-secrets.sh (a copy, so nothing is written into the
    repo)."""
    folder = tmp_path / "kustomize"
    folder.mkdir()
    shutil.copy(BASE / "init-secrets.sh", folder / "init-secrets.sh")
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(["sh", str(folder / "init-secrets.sh")], env=env, check=True,
                   capture_output=True, timeout=120)
    return folder / "secrets"


def _rewrite(text: str, mounts: dict[str, Path], ports: dict[int, int]) -> str:
    if mounts:  # one pass, longest first: a rewritten path is never rewritten again
        pattern = "|".join(re.escape(m) for m in sorted(mounts, key=len, reverse=True))
        text = re.sub(rf"(?<![\w/.-])({pattern})(?![\w.-])",
                      lambda m: str(mounts[m.group(1)]), text)
    text = text.replace("0.0.0.0:", "127.0.0.1:").replace(CONTROLLER_DNS, "127.0.0.1")
    return re.sub(r"(?<=:)(\d{5})\b",
                  lambda m: str(ports.get(int(m.group(1)), m.group(1))), text)


def _prepare(role: str, tmp_path: Path, secrets: Path, ports: dict[int, int]) -> Pod:
    objects = _base_objects()
    generated = {g["name"]: g for g in
                 yaml.safe_load((BASE / "kustomization.yaml").read_text())["secretGenerator"]}
    spec = _pod(role)
    container = spec["containers"][0]
    root = tmp_path / role
    volumes = {v["name"]: v for v in spec["volumes"]}
    claims = {c["metadata"]["name"] for c in
              objects[WORKLOADS[role]]["spec"].get("volumeClaimTemplates", [])}
    mounts: dict[str, Path] = {}
    for mount in container["volumeMounts"]:
        volume = volumes.get(mount["name"])
        if volume is not None and "hostPath" in volume:  # shared by the node's pods
            mounts[mount["mountPath"]] = tmp_path / "node" / volume["hostPath"]["path"][1:]
        else:
            assert volume is not None or mount["name"] in claims, mount
            mounts[mount["mountPath"]] = root / mount["mountPath"][1:]
    for mount in container["volumeMounts"]:
        volume = volumes.get(mount["name"], {})
        target = mounts[mount["mountPath"]]
        if "configMap" in volume:
            config_map = objects[("ConfigMap", volume["configMap"]["name"])]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(_rewrite(config_map["data"][mount["subPath"]], mounts, ports))
        elif "secret" in volume:
            target.mkdir(parents=True, exist_ok=True)
            for name in generated[volume["secret"]["secretName"]]["files"]:
                shutil.copy(secrets / Path(name).name, target / Path(name).name)
        else:
            target.mkdir(parents=True, exist_ok=True)
    token_env = dict(line.split("=", 1) for line in
                     (secrets / "trainer-token.env").read_text().split())
    env = _container_env(container, token_env)
    for init in spec.get("initContainers", []):
        init_mounts = {m["mountPath"]: mounts[m["mountPath"]] for m in init["volumeMounts"]}
        script = _rewrite(init["command"][-1], init_mounts, ports)
        if os.geteuid() != 0:  # it hands node folders to uid 10001: only root may
            script = script.replace("chown 10001:10001", f"chown {os.getuid()}:{os.getgid()}")
        subprocess.run([*init["command"][:-1], script], check=True, timeout=30)
    return Pod(role, root, mounts, env, container)


def _launch(pod: Pod, ports: dict[int, int]) -> Process:
    env = {**os.environ, **pod.env, "PYTHONUNBUFFERED": "1",
           "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}
    if "command" in pod.container:
        command = [*pod.container["command"][:-1],
                   _rewrite(pod.container["command"][-1], pod.mounts, ports)]
    else:  # the image's entrypoint is vmad
        command = ["vmad", *(_rewrite(a, pod.mounts, ports) for a in pod.container["args"])]
    log_path = pod.root / f"{pod.role}.log"
    log = open(log_path, "ab")  # noqa: SIM115 - closed by Process.stop
    popen = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL)
    return Process(pod.role, popen, log_path, log)


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, ""
    except OSError:
        return 0, ""


def _wait_probe(process: Process, probe: dict, ports: dict[int, int], timeout: float) -> None:
    get = probe["httpGet"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.alive(), f"{process.name} exited:\n{process.log_text()[-3000:]}"
        if _get(ports[get["port"]], get["path"])[0] == 200:
            return
        time.sleep(0.3)
    raise AssertionError(f"{process.name}: probe {get} never passed\n"
                         f"{process.log_text()[-3000:]}")


def _metric(port: int, name: str) -> float:
    _status, text = _get(port, "/metrics")
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _server_names(certificate: Path) -> set[str]:
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(certificate.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(n.value) for n in names}


@pytest.mark.integration
@pytest.mark.slow
def test_base_manifests_start_probe_and_talk_on_loopback(tmp_path):
    secrets = _make_secrets(tmp_path)
    # The names the pods really use are in the server certificate.
    trainer_config = yaml.safe_load(_base_objects()[("ConfigMap", "vmad-trainer")]
                                    ["data"]["trainer.yaml"])
    agent_config = yaml.safe_load(_base_objects()[("ConfigMap", "vmad-agent")]
                                  ["data"]["agent.yaml"])
    names = _server_names(secrets / "server.pem")
    assert trainer_config["controller"]["address"].rsplit(":", 1)[0] in names
    assert agent_config["security"]["server_name"] in names

    ports = {p: free_port() for p in PORTS}
    pods = {role: _prepare(role, tmp_path, secrets, ports) for role in WORKLOADS}
    token_file = tmp_path / "node" / "var/lib/vmad/token/agent-token"
    assert len(token_file.read_text()) == 64  # 32 random bytes, hex; made once, kept
    assert token_file.stat().st_mode & 0o777 == 0o600
    processes: list[Process] = []
    try:
        for role in ("controller", "trainer", "agent"):
            process = _launch(pods[role], ports)
            processes.append(process)
            container = pods[role].container
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                if kind in container:
                    _wait_probe(process, container[kind], ports, 90)
        trainer_port, controller_port = ports[50062], ports[50072]
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            acked = _metric(trainer_port, 'vmad_trainer_samples_received_total{vm_id="node-1"}')
            answered = _metric(controller_port, "vmad_controller_reports_total")
            if acked > 0 and answered > 0:
                break
            for process in processes:
                assert process.alive(), f"{process.name}:\n{process.log_text()[-3000:]}"
            time.sleep(1)
        assert acked > 0, processes[2].log_text()[-3000:]
        assert answered > 0, processes[1].log_text()[-3000:]
        assert _metric(trainer_port, "vmad_trainer_report_seconds_count") > 0
    finally:
        for process in reversed(processes):
            process.stop()
