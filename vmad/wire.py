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

__all__ = ["BadStateReport", "decision_from_message", "decision_to_message",
           "labels_from_messages",
           "state_from_message", "state_to_message"]

# The longest text a state report may carry in one field (a VM id, a bundle version, the
# metrics to blame, the detector's line): each is tens of characters; a longer one is a
# broken or hostile trainer filling the controller's registry.
MAX_STATE_TEXT = 1000
# The most floats of a state's per-metric summary (2 per metric).
MAX_SUMMARY_FLOATS = 2 * 1024
_SHARES = ("accuracy", "f1", "flagged_share", "labelled_anomalous_share")


class BadStateReport(ValueError):
    """A state report the controller refuses; `reason` is one of a few words, for a
    counter's label: missing_trainer_id (raised by the controller), missing_vm_id,
    non_finite, out_of_range, too_long, summary."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason

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


def _check_state(message: control_pb2.VMState) -> None:
    """Refuse what no trainer computes: a value that is not finite or lies outside its
    range, a summary that is not 2 floats per metric, a text field too long."""
    if not message.vm_id:
        raise BadStateReport("missing_vm_id", "state report has no vm_id")
    for name in ("vm_id", "model_version", "blamed", "detector"):
        if len(getattr(message, name)) > MAX_STATE_TEXT:
            raise BadStateReport("too_long", f"state report's {name} is "
                                 f"{len(getattr(message, name))} characters, at most "
                                 f"{MAX_STATE_TEXT}")
    numbers = {name: getattr(message, name) for name in (
        "timestamp", "loss", "drift", *_SHARES)}
    if message.HasField("seconds_since_training"):
        numbers["seconds_since_training"] = message.seconds_since_training
    for name, value in numbers.items():
        if not math.isfinite(value):
            raise BadStateReport("non_finite", f"state report of {message.vm_id!r}: {name} "
                                 f"is {value}")
        if value < 0 or (name in _SHARES and value > 1):
            raise BadStateReport("out_of_range", f"state report of {message.vm_id!r}: "
                                 f"{name} is {value}, outside "
                                 f"{'[0, 1]' if name in _SHARES else '[0, inf)'}")
    summary = message.summary
    if len(summary) % 2 or len(summary) > MAX_SUMMARY_FLOATS:
        raise BadStateReport("summary", f"state report of {message.vm_id!r}: summary holds "
                             f"{len(summary)} floats, not 2 per metric (at most "
                             f"{MAX_SUMMARY_FLOATS})")
    if not all(math.isfinite(value) for value in summary):
        raise BadStateReport("non_finite", f"state report of {message.vm_id!r}: summary "
                             "holds a NaN or infinite value")


def state_from_message(message: control_pb2.VMState) -> VMState:
    """The VM state a report carries; `BadStateReport` (a ValueError) names what is
    wrong with one the controller must not act on."""
    _check_state(message)
    since = (message.seconds_since_training if message.HasField("seconds_since_training")
             else math.inf)
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
