"""The controller's Prometheus metrics (served on `metrics.listen`, docs/operations.md).

Live instruments are updated by one hook in controller/service.py (`decided`, after each
answered report): reports answered, the latest decision's Q-values by action. The counts
the registry already keeps are read at scrape time by `_RegistryCollector`, so they are
persisted and survive restarts: decisions by action, transitions, the recent mean reward,
registry size (trainers, VMs, decisions, file bytes), seconds since each trainer last
reported, and token refusals. `_CoreCollector` exports the live policy's own counters
(`ControlCore.gauges()`: budget refusals, exploration, learning progress, the shadow
verdict) under `vmad_controller_<name>`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from prometheus_client import Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from vmad.actions import CONTROL_ACTIONS, Decision
from vmad.controller.core import ControlCore
from vmad.controller.registry import Registry
from vmad.http_endpoint import ServedMetrics, counts_by, token_refusals
from vmad.security import TokenInterceptor

__all__ = ["REWARD_WINDOW", "ControllerMetrics"]

# Transitions averaged by vmad_controller_reward_recent.
REWARD_WINDOW = 100


class ControllerMetrics(ServedMetrics):
    def __init__(self, registry: Registry, database: Path,
                 token_check: TokenInterceptor | None, core: ControlCore | None = None) -> None:
        super().__init__()
        r = self.registry
        if core is not None:
            r.register(_CoreCollector(core))
        self.reports = Counter("vmad_controller_reports", "state reports answered", registry=r)
        self.reports_refused = Counter(
            "vmad_controller_reports_refused", "state reports refused (each logged), by "
            "reason: missing_trainer_id, missing_vm_id, non_finite, out_of_range, too_long, "
            "summary", ["reason"], registry=r)
        self.q_value = Gauge("vmad_controller_q_value",
                             "policy Q-value of each action for the latest decided state",
                             ["action"], registry=r)
        r.register(_RegistryCollector(registry, database, token_check))

    def decided(self, decision: Decision) -> None:
        self.reports.inc()
        for action, value in zip(CONTROL_ACTIONS, decision.q_values, strict=False):
            self.q_value.labels(action.label).set(value)



class _RegistryCollector(Collector):
    def __init__(self, registry: Registry, database: Path,
                 token_check: TokenInterceptor | None) -> None:
        self.registry = registry
        self.database = Path(database)
        self.token_check = token_check

    def collect(self) -> Iterable[Any]:
        yield counts_by("vmad_controller_decisions", "decisions recorded, by action (persisted)",
                        "action", self.registry.action_counts())
        counts = self.registry.counts()
        yield CounterMetricFamily("vmad_controller_transitions",
                                  "transitions (state, decision, reward, next state) recorded",
                                  value=counts["transitions"])
        size = GaugeMetricFamily("vmad_controller_registry_rows", "rows in the registry",
                                 labels=["table"])
        for table in ("trainers", "vms", "decisions", "transitions"):
            size.add_metric([table], counts[table])
        yield size
        try:
            db_bytes = self.database.stat().st_size
        except OSError:
            db_bytes = 0
        yield GaugeMetricFamily("vmad_controller_registry_bytes", "registry file size",
                                value=db_bytes)
        recent = self.registry.transitions(REWARD_WINDOW, newest=True)
        reward = GaugeMetricFamily("vmad_controller_reward_recent",
                                   f"mean reward of the newest {REWARD_WINDOW} transitions")
        if recent:  # no sample before the first transition: no reward is not reward 0
            reward.add_metric([], sum(t.reward for t in recent) / len(recent))
        yield reward
        age = GaugeMetricFamily("vmad_controller_trainer_report_age_seconds",
                                "seconds since each trainer last reported",
                                labels=["trainer_id"])
        now = time.time()
        for trainer in self.registry.trainers():
            age.add_metric([trainer.trainer_id], max(0.0, now - trainer.last_seen))
        yield age
        yield counts_by("vmad_controller_calls_unauthenticated",
                        "calls refused for a missing or wrong token, by reason", "reason",
                        token_refusals(self.token_check))


class _CoreCollector(Collector):
    """The control core's counters (names ending `_total`) and gauges, read at scrape
    time from the objects that keep them, so exploration and the budget are visible."""

    def __init__(self, core: ControlCore) -> None:
        self.core = core

    def collect(self) -> Iterable[Any]:
        for name, value in sorted(self.core.gauges().items()):
            if name == "decisions_total":  # the persisted count by action says it already
                continue
            if name.endswith("_total"):
                yield CounterMetricFamily(f"vmad_controller_{name[:-len('_total')]}",
                                          f"control core: {name}", value=value)
            else:
                yield GaugeMetricFamily(f"vmad_controller_{name}", f"control core: {name}",
                                        value=value)
