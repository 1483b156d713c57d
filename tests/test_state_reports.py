"""No bad state report reaches the controller's policy or registry: a real controller
process refuses each by name, logs and counts it, and goes on deciding; a trainer whose
state for one VM is refused goes on reporting the others."""

from __future__ import annotations

import math
import re
import urllib.request

import grpc
import pytest
import yaml

from vmad.actions import Action, Decision
from vmad.protos.vmad.v1 import control_pb2
from vmad.state import VMState
from vmad.wire import MAX_STATE_TEXT, BadStateReport, state_from_message, state_to_message

GOOD = VMState(vm_id="vm-1", timestamp=1.7e9, accuracy=0.9, f1=0.8, loss=0.3,
               labelled_windows=10, flagged_share=0.1, drift=0.5,
               summary=(0.5, 0.25, 1.0, 1.5), detector="fit 1 on 720 samples")

BAD = {  # field -> (value, reason, words the refusal names)
    "f1": (math.nan, "non_finite", "f1 is nan"),
    "drift": (math.inf, "non_finite", "drift is inf"),
    "accuracy": (1.5, "out_of_range", "accuracy is 1.5, outside [0, 1]"),
    "loss": (-0.1, "out_of_range", "loss is -0.1"),
    "summary": ((0.5, 0.25, 1.0), "summary", "summary holds 3 floats"),
    "detector": ("x" * (MAX_STATE_TEXT + 1), "too_long", "detector is 1001 characters"),
    "vm_id": ("", "missing_vm_id", "no vm_id"),
}


def _message(**fields: object) -> control_pb2.VMState:
    state = VMState(**{**GOOD.__dict__, **fields})
    return state_to_message(state)


def test_each_bad_state_field_is_refused_by_name() -> None:
    assert state_from_message(_message()) == GOOD
    for field, (value, reason, words) in BAD.items():
        with pytest.raises(BadStateReport, match=re.escape(words)) as refused:
            state_from_message(_message(**{field: value}))
        assert refused.value.reason == reason, field
    message = _message()
    message.summary[1] = math.nan
    with pytest.raises(BadStateReport, match="summary holds a NaN"):
        state_from_message(message)
    message = _message()
    message.seconds_since_training = -5.0
    with pytest.raises(BadStateReport, match=re.escape("seconds_since_training is -5.0")):
        state_from_message(message)


@pytest.mark.integration
def test_a_controller_refuses_bad_reports_counts_them_and_goes_on(tmp_path) -> None:
    from vmad.launch import free_port, start, wait_serving
    from vmad.protos.vmad.v1 import control_pb2_grpc
    from vmad.wire import decision_from_message

    port, metrics_port = free_port(), free_port()
    config = tmp_path / "controller.yaml"
    config.write_text(yaml.safe_dump({
        "listen": f"127.0.0.1:{port}", "database": str(tmp_path / "registry.sqlite"),
        "metrics": {"listen": f"127.0.0.1:{metrics_port}"}, "security": {"insecure": True}}))
    process = start("controller", ["controller", "--config", str(config)], tmp_path / "logs")
    try:
        wait_serving(f"127.0.0.1:{port}", 60, process=process)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = control_pb2_grpc.ControlServiceStub(channel)
            for field in ("f1", "accuracy", "detector"):
                value, _, words = BAD[field]
                with pytest.raises(grpc.RpcError) as refused:
                    stub.Report(control_pb2.StateReport(
                        trainer_id="node-1", state=_message(**{field: value})), timeout=10)
                assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
                assert words in refused.value.details()
            with pytest.raises(grpc.RpcError, match="no trainer_id"):
                stub.Report(control_pb2.StateReport(state=_message()), timeout=10)
            answer = stub.Report(control_pb2.StateReport(trainer_id="node-1",
                                                         state=_message()), timeout=10)
            assert decision_from_message(answer).action in Action
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                        timeout=10) as reply:
                text = reply.read().decode()
    finally:
        assert process.stop() == 0, process.log_text()[-2000:]
    for line in ('vmad_controller_reports_refused_total{reason="non_finite"} 1.0',
                 'vmad_controller_reports_refused_total{reason="out_of_range"} 1.0',
                 'vmad_controller_reports_refused_total{reason="too_long"} 1.0',
                 'vmad_controller_reports_refused_total{reason="missing_trainer_id"} 1.0',
                 "vmad_controller_reports_total 1.0"):
        assert line in text, line
    log = process.log_text()
    assert "state report from trainer 'node-1' refused:" in log and "f1 is nan" in log


def test_a_trainer_goes_on_reporting_when_one_vms_state_is_refused(
        small_checkpoint, tmp_path) -> None:
    import numpy as np

    from vmad.schema import DEFAULT_METRICS
    from vmad.trainer.config import TrainingSettings
    from vmad.trainer.core import ReportRefused, TrainerCore
    from vmad.trainer.store import TelemetryStore
    from vmad.trainer.transfer import VMModels

    store = TelemetryStore(tmp_path / "s.sqlite")
    models = VMModels(small_checkpoint, store, tmp_path / "models", TrainingSettings())
    for vm_id in ("vm-a", "vm-b", "vm-c"):
        store.ingest(vm_id, DEFAULT_METRICS, np.arange(1, 11), 1.7e9 + np.arange(10.0),
                     np.ones((10, 4)))
    core = TrainerCore(store, models)

    def report(state: VMState) -> Decision:
        if state.vm_id == "vm-a":
            raise ReportRefused("bad state report: ...")
        return Decision(Action.KEEP)

    answered = core.report_round(report)
    assert [vm for vm, _ in answered] == ["vm-b", "vm-c"]
    assert (core.stats.refused, core.stats.failures, core.stats.reports) == (1, 0, 2)
