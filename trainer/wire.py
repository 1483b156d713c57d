"""Interim wire format: JSON messages over gRPC generic handlers.

The contracts belong in `protos/vmad/v1/*.proto` (issue 3); they had not landed when the
trainer and controller services were written, so these services speak JSON over real
gRPC (HTTP/2, deadlines, health service, message size limits) with method names matching
the planned services. Replacing this module's codec with the generated stubs changes no
service logic: trainer/core.py and controller/core.py never see the wire.

Messages (all JSON objects):
- TelemetryService/Telemetry (stream -> stream): {"vm_id", "metrics": [...],
  "samples": [[seq, ts, [values...]], ...], "verdicts": [[ts, score, anomalous, version]],
  "labels": [[start, end, anomalous, source]]} -> {"acked", "stored", "duplicates",
  "lost"} or {"error": "..."} (the stream stays open after a bad batch).
- TelemetryService/Label (unary): {"vm_id", "labels": [...]} -> {"ok": true}.
- TelemetryService/WatchBundles (unary -> stream): {"vm_id", "running_version"} ->
  {"version", "metadata": "<bundle.json>", "onnx_b64": "..."} each time the VM's model
  changes.
- ControlService/Report (unary): {"trainer_id", "address", "state": VMState.to_dict()}
  -> {"decision_id", "action", "batches", "reason"}.
- ControlService/Fleet (unary): {"decisions": N} -> the fleet as `vmad status` prints it.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["CONTROL_SERVICE", "MAX_MESSAGE_BYTES", "TELEMETRY_SERVICE", "decode", "encode",
           "server_options"]

TELEMETRY_SERVICE = "vmad.v1.TelemetryService"
CONTROL_SERVICE = "vmad.v1.ControlService"
# A telemetry batch of a few hundred samples is a few tens of kB; a bundle is under
# 1 MB. 16 MB leaves room and still refuses a runaway client before it costs memory.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


def encode(message: Any) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode()


def decode(data: bytes) -> Any:
    return json.loads(data)


def server_options() -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


def method(service: str, name: str) -> str:
    return f"/{service}/{name}"
