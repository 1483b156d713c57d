"""`agent.yaml`: the edge agent's configuration schema (validated at start-up by
vmad/config.py; every key documented here and in deploy/agent.yaml)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator

from vmad.config import StrictModel
from vmad.schema import DEFAULT_INTERVAL_S
from vmad.security import SecurityConfig

__all__ = ["AgentConfig", "InjectSettings", "MetricsSettings", "SpoolSettings",
           "TrainerLink"]


class SpoolSettings(StrictModel):
    """The on-disk queue of unacknowledged telemetry (edge_agent/spool.py). When either
    bound is reached the oldest entries are dropped first and counted
    (`vmad_agent_spool_drops_total{reason="spool full"}`). A disk that is full or
    unwritable drops samples (counted by reason) while detection goes on."""

    path: Path = Field(Path("/var/lib/vmad/agent/spool.db"), description="SQLite file")
    max_bytes: int = Field(64 * 1024 * 1024, ge=256 * 1024,
                           description="bound on the spool's files (database + WAL)")
    max_rows: int = Field(500_000, ge=10, description="bound on spooled samples")


class TrainerLink(StrictModel):
    """Where telemetry goes. `address: null` runs the agent alone (detect and spool)."""

    address: str | None = Field(None, description="trainer host:port")
    batch_max: int = Field(256, ge=1, le=10_000, description="samples per telemetry message")
    flush_s: float = Field(5.0, gt=0, description="seconds between sends")
    timeout_s: float = Field(10.0, gt=0, description="deadline for connecting and each ack")
    backoff_initial_s: float = Field(0.5, gt=0, description="first reconnect delay")
    backoff_max_s: float = Field(60.0, gt=0, description="reconnect delay cap (full jitter)")


class MetricsSettings(StrictModel):
    # All interfaces: an in-cluster Prometheus scrapes the node's address. 50081 sits
    # beside vmad's gRPC ports; docs/operations.md explains the choice.
    listen: str | None = Field("0.0.0.0:50081", description="/metrics and /healthz "
                               "host:port (plaintext); null = off")


class InjectSettings(StrictModel):
    """Where `vmad inject` / `vmad label --local` record intervals for this agent, and
    the safety caps of `vmad inject`."""

    labels_file: Path = Field(Path("/var/lib/vmad/agent/labels.jsonl"),
                              description="JSON-lines file of labelled intervals")
    max_memory_share: float = Field(0.25, gt=0, le=0.9, description="of total RAM")
    max_disk_share: float = Field(0.10, gt=0, le=0.9, description="of free disk")
    max_disk_bytes: int = Field(2 * 1024**3, ge=1024**2, description="absolute disk cap")


class AgentConfig(StrictModel):
    vm_id: str = Field(..., min_length=1, description="this VM's id (unique in the fleet)")
    interval_s: float = Field(DEFAULT_INTERVAL_S, gt=0, description="seconds between samples")
    alarm_first_reminder_s: float = Field(
        300.0, gt=0, description="an alarm that lasts this long is logged again with the "
        "command that labels it normal (5 min: when the VmadVMAlarming alert pages)")
    alarm_reminder_s: float = Field(
        3600.0, gt=0, description="... and again this often while it lasts (a new normal "
        "level alarms until it is labelled)")
    own_metrics: list[str] = Field(
        [], max_length=64,
        description="metrics sampled after the default four, of edge_agent/sampler.py's "
                    "OWN_METRICS (load_1, cpu_iowait_percent, tcp_retrans_segs_s, ...): the "
                    "trainer's detector reads them too (docs/agent.md); [] = the four only. "
                    "The trainer keeps a VM's metrics from its first batch: a change "
                    "needs a new vm_id")
    bundle: Path | None = Field(None, description="bundle folder; null = the packaged default")
    bundle_dir: Path = Field(Path("/var/lib/vmad/agent/bundles"),
                             description="where pushed bundles are kept (current + previous)")
    trainer: TrainerLink = Field(default_factory=TrainerLink)
    spool: SpoolSettings = Field(default_factory=SpoolSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    inject: InjectSettings = Field(default_factory=InjectSettings)
    security: SecurityConfig = Field(default_factory=SecurityConfig)

    @field_validator("own_metrics")
    @classmethod
    def _known_once(cls, names: list[str]) -> list[str]:
        from vmad.edge_agent.sampler import check_own_metrics

        return list(check_own_metrics(names))
