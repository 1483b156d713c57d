"""What each piece of the agent costs in memory: RSS and USS after each import, and after
opening the shipped bundle's ONNX Runtime session with the agent's options and with
ONNX Runtime's defaults. Each step runs in a fresh interpreter that does everything up
to it, so a row's delta is that step's own cost.

    .venv/bin/python bench/agent_imports.py
"""

from __future__ import annotations

import json
import subprocess
import sys

STEPS = [
    ("python", ""),
    ("numpy", "import numpy"),
    ("psutil", "import psutil"),
    ("protobuf + vmad stubs", "from vmad.protos.vmad.v1 import telemetry_pb2"),
    ("grpc", "import grpc"),
    ("prometheus_client", "import prometheus_client"),
    ("pydantic + agent config", "import vmad.edge_agent.config"),
    ("onnxruntime", "import onnxruntime"),
    ("vmad.edge_agent.agent", "import vmad.edge_agent.agent"),
    ("ORT session, ORT defaults", "import onnxruntime as ort\n"
     "from vmad.bundle import DEFAULT_BUNDLE_DIR\n"
     "s = ort.InferenceSession(str(DEFAULT_BUNDLE_DIR / 'model.onnx'),"
     " providers=['CPUExecutionProvider'])\n"
     "import numpy as np; s.run(None, {s.get_inputs()[0].name: np.zeros((1, 4, 64), np.float32)})"),
    ("ORT session, agent options", "from vmad.bundle import load_default_bundle\n"
     "import numpy as np; b = load_default_bundle(); b.score(np.zeros((1, 4, 64), np.float32))"),
]

PROBE = """
import psutil, json, sys
{code}
m = psutil.Process().memory_full_info()
print(json.dumps({{"rss": m.rss, "uss": m.uss}}))
"""


def measure(code: str) -> dict[str, int]:
    out = subprocess.run([sys.executable, "-c", PROBE.format(code=code)], capture_output=True,
                         text=True, check=True, timeout=120).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    done: list[str] = []
    base = measure("")
    print(f"{'step':<28} {'RSS MB':>8} {'+RSS MB':>8} {'USS MB':>8} {'+USS MB':>8}")
    previous = base
    for name, code in STEPS:
        if name.startswith("ORT session"):
            sample = measure("\n".join([*done, code]))
        else:
            done.append(code)
            sample = measure("\n".join(done))
        print(f"{name:<28} {sample['rss'] / 2**20:>8.1f} "
              f"{(sample['rss'] - previous['rss']) / 2**20:>8.1f} "
              f"{sample['uss'] / 2**20:>8.1f} {(sample['uss'] - previous['uss']) / 2**20:>8.1f}")
        if not name.startswith("ORT session"):
            previous = sample
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
