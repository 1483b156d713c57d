"""The metrics modules without processes: what the trainer's stream wrapper counts, the
bounded refusal labels, persisted counts read at scrape time, the controller's Q-values
and registry collector, and the HTTP endpoint's probes and failure to bind."""

from __future__ import annotations

import logging
import socket
import time
import urllib.error
import urllib.request

from prometheus_client import generate_latest

from tests.test_trainer_service_store import METRICS, _batch, tiny_models  # noqa: F401
from vmad.actions import CONTROL_ACTIONS, Action, Decision
from vmad.controller.metrics import ControllerMetrics
from vmad.controller.registry import Registry
from vmad.http_endpoint import HttpEndpoint, open_endpoint, process_registry, token_refusals
from vmad.protos.vmad.v1 import telemetry_pb2
from vmad.security import TokenInterceptor
from vmad.state import VMState
from vmad.trainer.core import TrainerCore
from vmad.trainer.metrics import TrainerMetrics, refusal_reason


def sample(registry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels or None)


def test_refusal_reasons_are_a_bounded_set():
    assert refusal_reason("bad batch: batch has no vm_id") == "missing_vm_id"
    assert refusal_reason("bad batch: batch holds a NaN or infinite metric value") == \
        "non_finite"
    assert refusal_reason("bad batch: VM x sends metrics ['a']; ...") == "metrics_mismatch"
    # Each refusal of a VM's own metrics (trainer/intake.py) has its reason.
    from vmad.schema import DEFAULT_METRICS
    from vmad.trainer.intake import MAX_METRICS, metrics_problem

    assert metrics_problem(DEFAULT_METRICS, DEFAULT_METRICS) == ""
    assert metrics_problem((*DEFAULT_METRICS, "load_1", "tcp.retrans"), DEFAULT_METRICS) == ""
    for metrics, reason in (
            (DEFAULT_METRICS[::-1], "metrics_mismatch"),
            (("load_1", *DEFAULT_METRICS), "metrics_mismatch"),
            (DEFAULT_METRICS[:3], "metrics_mismatch"),
            ((*DEFAULT_METRICS, *(f"m{i}" for i in range(MAX_METRICS))), "too_many_metrics"),
            ((*DEFAULT_METRICS, "load 1"), "bad_metric_name"),
            ((*DEFAULT_METRICS, ""), "bad_metric_name"),
            ((*DEFAULT_METRICS, "x" * 65), "bad_metric_name"),
            ((*DEFAULT_METRICS, "load_1", "load_1"), "metric_twice"),
            ((*DEFAULT_METRICS, "cpu_percent"), "metric_twice")):
        problem = metrics_problem(metrics, DEFAULT_METRICS)
        assert refusal_reason(f"bad batch: {problem}") == reason, (metrics[-1:], problem)
    assert refusal_reason("bad batch: client 'a' may not send for 'b'") == "vm_id_not_client"
    assert refusal_reason("anything else, naming vm-123") == "other"
    interceptor = TokenInterceptor({"vm-1": "secret"})
    interceptor.refused.update({"missing bearer token": 2, "unknown client id 'vm-9'": 1,
                                "wrong token for 'vm-1'": 3, "wrong token for 'vm-2'": 1})
    assert token_refusals(interceptor) == {"missing_token": 2, "unknown_client": 1,
                                           "wrong_token": 4}
    assert token_refusals(None) == {}


def test_trainer_metrics_count_streams_acks_and_persisted_samples(tiny_models):  # noqa: F811
    models, store = tiny_models
    core = TrainerCore(store, models)
    metrics = TrainerMetrics(store, core, None)
    seqs, ts, values = _batch(1, 30)
    store.ingest("vm-a", METRICS, seqs, ts, values)
    store.ingest("vm-a", METRICS, seqs[:10], ts[:10], values[:10])  # replayed: duplicates
    acks = [telemetry_pb2.Ack(batch_id=1, stored=30),
            telemetry_pb2.Ack(batch_id=2, error="bad batch: batch has no vm_id"),
            telemetry_pb2.Ack(batch_id=3, error="bad batch: holds a NaN or infinite value")]
    for ack in acks:
        metrics.count_ack(ack)
    r = metrics.registry
    assert sample(r, "vmad_trainer_batches_total") == 1.0
    assert sample(r, "vmad_trainer_batches_refused_total", reason="missing_vm_id") == 1.0
    assert sample(r, "vmad_trainer_batches_refused_total", reason="non_finite") == 1.0
    assert sample(r, "vmad_trainer_samples_received_total", vm_id="vm-a") == 30.0
    assert sample(r, "vmad_trainer_samples_duplicate_total", vm_id="vm-a") == 10.0
    assert sample(r, "vmad_trainer_vms") == 1.0
    assert sample(r, "process_resident_memory_bytes") > 0

    def slow_report(state):
        time.sleep(0.01)
        return Decision(Action.KEEP)

    metrics.timed_report(slow_report)(None)
    assert sample(r, "vmad_trainer_report_seconds_count") == 1.0
    assert sample(r, "vmad_trainer_report_seconds_sum") >= 0.01


def test_trainer_metrics_survive_a_restart_through_the_store(tiny_models):  # noqa: F811
    models, store = tiny_models
    store.ingest("vm-a", METRICS, *_batch(1, 20))
    first = TrainerMetrics(store, TrainerCore(store, models), None)
    again = TrainerMetrics(store, TrainerCore(store, models), None)  # a new process's view
    for metrics in (first, again):
        assert sample(metrics.registry, "vmad_trainer_samples_received_total",
                      vm_id="vm-a") == 20.0


def test_controller_metrics_read_the_registry_and_latest_q_values(tmp_path):
    registry = Registry(tmp_path / "registry.sqlite")
    try:
        metrics = ControllerMetrics(registry, tmp_path / "registry.sqlite", None)
        text = generate_latest(metrics.registry).decode()
        assert "# TYPE vmad_controller_reward_recent gauge" in text  # declared, no sample
        q = tuple(float(i) for i in range(len(CONTROL_ACTIONS)))
        for i in range(3):
            state = VMState(vm_id="vm-a", timestamp=100.0 + i)
            decision = Decision(Action.FINETUNE, 50, "poor", q)
            registry.record_report("node-1", state, decision, "dqn",
                                   reward_of=lambda d, s: 0.5)
            metrics.decided(decision)
        r = metrics.registry
        assert sample(r, "vmad_controller_reports_total") == 3.0
        assert sample(r, "vmad_controller_decisions_total", action="finetune") == 3.0
        assert sample(r, "vmad_controller_transitions_total") == 2.0
        assert sample(r, "vmad_controller_reward_recent") == 0.5
        assert sample(r, "vmad_controller_registry_rows", table="vms") == 1.0
        assert sample(r, "vmad_controller_registry_bytes") > 0
        assert sample(r, "vmad_controller_q_value", action="ft50") == 2.0
        assert sample(r, "vmad_controller_q_value", action="reset+ft50") == 5.0
    finally:
        registry.close()


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return reply.status
    except urllib.error.HTTPError as error:
        return error.code


def test_endpoint_probes_follow_their_checks_and_a_taken_port_is_logged(caplog):
    ready = {"now": False}
    endpoint = HttpEndpoint("127.0.0.1:0", process_registry(),
                            ready=lambda: ready["now"],
                            alive=lambda: 1 / 0)  # a failing check is "not ok", no crash
    try:
        base = f"http://127.0.0.1:{endpoint.port}"
        assert _get(f"{base}/readyz") == 503
        ready["now"] = True
        assert _get(f"{base}/readyz") == 200
        assert _get(f"{base}/healthz") == 503
        assert _get(f"{base}/metrics") == 200
        with socket.create_connection(("127.0.0.1", endpoint.port)):
            pass
        with caplog.at_level(logging.ERROR, logger="vmad.http"):
            assert open_endpoint(f"127.0.0.1:{endpoint.port}", None) is None
        assert "cannot listen" in caplog.text
    finally:
        endpoint.close()


def test_agent_healthz_fails_when_sampling_stalls_and_counters_are_counters(tmp_path):
    from tests.agent_fixtures import tiny_bundle
    from tests.test_agent import agent_config
    from vmad.edge_agent.agent import Agent
    from vmad.edge_agent.detector import BundleSlot
    from vmad.edge_agent.sampler import METRICS as AGENT_METRICS
    from vmad.schema import DEFAULT_WINDOW

    BundleSlot(tmp_path / "bundles", AGENT_METRICS, DEFAULT_WINDOW).install(*tiny_bundle())
    agent = Agent(agent_config(tmp_path, None, metrics={"listen": "127.0.0.1:0"}))
    agent.start()
    try:
        base = f"http://127.0.0.1:{agent._http.port}"
        agent.tick()
        assert _get(f"{base}/healthz") == 200
        agent._last_tick -= 3600  # the sampling loop has not run for an hour
        assert _get(f"{base}/healthz") == 503
        r = agent.metrics.registry
        assert sample(r, "vmad_agent_spool_dropped_total") == 0.0
        assert sample(r, "vmad_agent_info", vm_id="vm-1") == 1.0
        assert sample(r, "vmad_agent_last_sample_timestamp_seconds") > 0
        text = generate_latest(r).decode()
        assert "# TYPE vmad_agent_bundles_rejected_total counter" in text
    finally:
        agent.stop()


def test_trainer_metrics_time_async_reports_too(tiny_models):  # noqa: F811
    import asyncio

    models, store = tiny_models
    metrics = TrainerMetrics(store, TrainerCore(store, models), None)

    async def report(state):
        await asyncio.sleep(0.01)
        return Decision(Action.KEEP)

    asyncio.run(metrics.timed_report(report)(None))
    assert sample(metrics.registry, "vmad_trainer_report_seconds_count") == 1.0
