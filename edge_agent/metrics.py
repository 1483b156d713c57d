"""What the agent exports besides its live instruments (AgentMetrics in agent.py), read
at scrape time: `vmad_agent_info{vm_id}` (join on `instance` to name a VM's series), and
the counts its spool and bundle slot keep themselves, as counters.

`vmad_agent_spool_dropped_total` is persisted in the spool (it survives restarts);
`vmad_agent_spool_drops_total{reason}`, `vmad_agent_bundles_rejected_total` and
`vmad_agent_bundle_run_failures_total` count since start. Both only ever grow, so they are
counters, which is what their `_total` names promise to `rate()` and `promtool`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client.core import CounterMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from vmad.http_endpoint import counts_by

__all__ = ["PersistedCounters"]


class PersistedCounters(Collector):
    def __init__(self, spool: Any, slot: Any, vm_id: str) -> None:
        self.spool = spool
        self.slot = slot
        self.vm_id = vm_id

    def collect(self) -> Iterable[Any]:
        yield InfoMetricFamily("vmad_agent", "this agent's VM", value={"vm_id": self.vm_id})
        yield CounterMetricFamily(
            "vmad_agent_spool_dropped",
            "samples dropped from the full spool (oldest first), ever", value=self.spool.dropped)
        yield counts_by(
            "vmad_agent_spool_drops", "samples not spooled or dropped from the spool, "
            "by reason (spool full, disk full, ...)", "reason", self.spool.drops)
        yield CounterMetricFamily(
            "vmad_agent_bundles_rejected", "bundles refused by verification",
            value=self.slot.rejected)
        yield CounterMetricFamily(
            "vmad_agent_bundle_run_failures",
            "bundles that failed while scoring (rolled back to the previous one)",
            value=self.slot.run_failures)
