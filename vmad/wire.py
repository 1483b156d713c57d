"""Conversions between the gRPC messages (protos/vmad/v1/*.proto, the only definition of
every message) and the Python objects the trainer and controller logic use.

trainer/core.py and controller/core.py never see a message; the services convert here,
in one place. Message sizes and keepalive live in vmad/security.py, beside the servers
and channels they configure.
"""

from __future__ import annotations

import math

from vmad.actions import Action, Decision
from vmad.labels import LabelInterval
from vmad.protos.vmad.v1 import control_pb2, telemetry_pb2
from vmad.state import VMState

__all__ = ["decision_from_message", "decision_to_message",
           "labels_from_messages",
           "state_from_message", "state_to_message"]

_ACTIONS = {Action.KEEP: control_pb2.KEEP, Action.FINETUNE: control_pb2.FINETUNE,
            Action.RESET: control_pb2.RESET, Action.RESET_FINETUNE: control_pb2.RESET_FINETUNE}
_KINDS = {kind: action for action, kind in _ACTIONS.items()}
_SOURCES = {"injection": telemetry_pb2.LABEL_SOURCE_INJECTION,
            "operator": telemetry_pb2.LABEL_SOURCE_OPERATOR}
_SOURCE_NAMES = {value: name for name, value in _SOURCES.items()}


def state_to_message(state: VMState) -> control_pb2.VMState:
    message = control_pb2.VMState(
        vm_id=state.vm_id, timestamp=state.timestamp, accuracy=state.accuracy, f1=state.f1,
        loss=state.loss, labelled_windows=state.labelled_windows,
        recent_windows=state.recent_windows, flagged_share=state.flagged_share,
        labelled_anomalous_share=state.labelled_anomalous_share, drift=state.drift,
        summary=list(state.summary), samples_since_training=max(0, state.samples_since_training),
        batches_trained=state.batches_trained, finetuned=state.finetuned,
        model_version=state.model_version, blamed=state.blamed,
        detector=state.detector)
    if math.isfinite(state.seconds_since_training):
        message.seconds_since_training = state.seconds_since_training
    return message


def state_from_message(message: control_pb2.VMState) -> VMState:
    since = (message.seconds_since_training if message.HasField("seconds_since_training")
             else math.inf)
    if not message.vm_id:
        raise ValueError("state report has no vm_id")
    return VMState(
        vm_id=message.vm_id, timestamp=message.timestamp, accuracy=message.accuracy,
        f1=message.f1, loss=message.loss, labelled_windows=message.labelled_windows,
        recent_windows=message.recent_windows, flagged_share=message.flagged_share,
        labelled_anomalous_share=message.labelled_anomalous_share, drift=message.drift,
        summary=tuple(message.summary), seconds_since_training=since,
        samples_since_training=message.samples_since_training,
        batches_trained=message.batches_trained, finetuned=message.finetuned,
        model_version=message.model_version, blamed=message.blamed,
        detector=message.detector)


def decision_to_message(decision: Decision, decision_id: int = 0) -> control_pb2.Decision:
    return control_pb2.Decision(decision_id=decision_id, action=_ACTIONS[decision.action],
                                n_batches=decision.batches, reason=decision.reason)


def decision_from_message(message: control_pb2.Decision) -> Decision:
    if message.action not in _KINDS:
        raise ValueError(f"unknown action {message.action}")
    return Decision(_KINDS[message.action], int(message.n_batches), message.reason)


def labels_from_messages(messages: object) -> list[LabelInterval]:
    out = []
    for m in messages:  # type: ignore[attr-defined]
        source = _SOURCE_NAMES.get(m.source, "unspecified")
        out.append(LabelInterval(m.start, m.end, m.anomalous,
                                 f"{source}:{m.kind}" if m.kind else source, m.id))
    return out


def labels_to_messages(labels: list[LabelInterval]) -> list[telemetry_pb2.LabelInterval]:
    return [telemetry_pb2.LabelInterval(
        start=label.start, end=label.end, anomalous=label.anomalous,
        source=_SOURCES.get(label.source.split(":")[0], 0),
        kind=label.source.split(":", 1)[1] if ":" in label.source else "", id=label.id)
        for label in labels]
