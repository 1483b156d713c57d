"""The agent's two long-lived calls to its trainer, each in its own thread.

- `stream_loop`: TelemetryService.Stream. On every (re)connect it replays the spool from
  the oldest unacknowledged sample, then sends new samples every `flush_s`. Each Ack's
  `acked_seq` deletes spool rows <= it (see the Ack comment in telemetry.proto); the
  trainer de-duplicates replays by (vm_id, seq), so replaying is always safe.
- `watch_loop`: TelemetryService.WatchBundles; each pushed bundle goes to
  `BundleSlot.install`, which refuses (and counts) anything that fails verification.

Both reconnect with exponential backoff and full jitter up to `backoff_max_s`, and reset
the backoff once a call has made progress. Deadlines: connecting and each ack get
`timeout_s` (a batch unacked for longer reopens the stream); keepalive pings
(vmad/security.py) find a dead connection on either side. A trainer that is full answers
RESOURCE_EXHAUSTED: logged as an error, retried with backoff.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator

import grpc

from vmad import security
from vmad.bundle import BundleError
from vmad.edge_agent.config import AgentConfig
from vmad.edge_agent.detector import BundleSlot
from vmad.edge_agent.spool import Spool
from vmad.protos.vmad.v1 import telemetry_pb2, telemetry_pb2_grpc

__all__ = ["ActiveCalls", "Backoff", "stream_loop", "watch_loop"]

log = logging.getLogger(__name__)


class ActiveCalls:
    """The calls in flight, so that stopping the agent cancels them at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: list[grpc.Future] = []

    def add(self, call: grpc.Future) -> None:
        with self._lock:
            self._calls = [c for c in self._calls if not c.done()] + [call]

    def cancel_all(self) -> None:
        with self._lock:
            calls, self._calls = self._calls, []
        for call in calls:
            call.cancel()


class Backoff:
    """Exponential backoff with full jitter: uniform(0, min(cap, initial * 2**n))."""

    def __init__(self, initial: float, cap: float, rng: random.Random | None = None) -> None:
        self.initial, self.cap = initial, cap
        self.attempt = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        ceiling = min(self.cap, self.initial * 2 ** min(self.attempt, 30))
        self.attempt += 1
        return self._rng.uniform(0, ceiling)

    def reset(self) -> None:
        self.attempt = 0


class _InFlight:
    """Batches sent on one stream and not yet acked, with when each went out: the ack
    deadline. A trainer that takes the batches but never answers (overloaded, wedged)
    is noticed within `timeout_s` and the stream reopened."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.sent: dict[int, float] = {}
        self.labels: dict[int, list[str]] = {}
        self.call: grpc.Future | None = None

    def overdue(self) -> int | None:
        """The id of a batch unacked past the deadline, if any."""
        now = time.monotonic()
        for batch_id, at in self.sent.items():
            if now - at > self.timeout_s:
                return batch_id
        return None


def _batches(config: AgentConfig, spool: Spool, stop: threading.Event,
             version: Callable[[], str], flight: _InFlight,
             metrics: tuple[str, ...]) -> Iterator[telemetry_pb2.TelemetryBatch]:
    last_sent = 0  # a fresh stream replays everything still spooled
    batch_id = 0
    while not stop.is_set():
        late = flight.overdue()
        if late is not None:
            log.warning("no ack for batch %d within %.0f s: reopening the stream", late,
                        flight.timeout_s)
            if flight.call is not None:
                flight.call.cancel()
            return
        rows = spool.pending(last_sent, config.trainer.batch_max)
        labels = spool.labels() if batch_id % 10 == 0 or not rows else []
        if not rows and not labels:
            stop.wait(config.trainer.flush_s)
            continue
        batch_id += 1
        batch = telemetry_pb2.TelemetryBatch(
            vm_id=config.vm_id, metrics=list(metrics), interval_s=config.interval_s,
            model_version=version(), batch_id=batch_id, first_seq=spool.first_seq(),
            spool_id=spool.spool_id)
        for _seq, sample, verdict in rows:
            batch.samples.append(telemetry_pb2.Sample.FromString(sample))
            if verdict:
                batch.verdicts.append(telemetry_pb2.Verdict.FromString(verdict))
        for _id, payload in labels:
            batch.labels.append(telemetry_pb2.LabelInterval.FromString(payload))
        flight.labels[batch_id] = [label_id for label_id, _ in labels]
        flight.sent[batch_id] = time.monotonic()
        if rows:
            last_sent = rows[-1][0]
        yield batch
        if len(rows) < config.trainer.batch_max:
            stop.wait(config.trainer.flush_s)


def _log_call_end(what: str, config: AgentConfig, error: grpc.RpcError) -> None:
    code = error.code()
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        log.error("%s: trainer %s is full, retrying with backoff: %s", what,
                  config.trainer.address, error.details())
    elif code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        log.error("%s: trainer %s refused this agent (%s): %s", what, config.trainer.address,
                  code.name, error.details())
    else:
        log.warning("%s ended: %s %s", what, code, error.details())


def stream_loop(config: AgentConfig, spool: Spool, stop: threading.Event, active: ActiveCalls,
                version: Callable[[], str], metrics: tuple[str, ...],
                on_state: Callable[[bool], None] = lambda up: None) -> None:
    assert config.trainer.address is not None
    backoff = Backoff(config.trainer.backoff_initial_s, config.trainer.backoff_max_s)
    metadata = security.call_metadata(config.security)
    while not stop.is_set():
        try:
            with security.open_channel(config.trainer.address, config.security) as channel:
                grpc.channel_ready_future(channel).result(timeout=config.trainer.timeout_s)
                stub = telemetry_pb2_grpc.TelemetryServiceStub(channel)
                flight = _InFlight(config.trainer.timeout_s)
                calls = stub.Stream(_batches(config, spool, stop, version, flight, metrics),
                                    metadata=metadata)
                flight.call = calls
                active.add(calls)
                on_state(True)
                for ack in calls:
                    flight.sent.pop(ack.batch_id, None)
                    sent = flight.labels.pop(ack.batch_id, [])
                    if ack.error:
                        log.error("trainer refused batch %d: %s", ack.batch_id, ack.error)
                        continue
                    if ack.refused:
                        log.warning("trainer refused %d values of batch %d: %s", ack.refused,
                                    ack.batch_id, ack.refused_reason)
                    spool.ack(ack.acked_seq)
                    spool.remove_labels(sent)
                    backoff.reset()
                    if stop.is_set():
                        calls.cancel()
        except grpc.FutureTimeoutError:
            log.warning("trainer %s unreachable", config.trainer.address)
        except grpc.RpcError as error:
            if stop.is_set():
                break
            _log_call_end("telemetry stream", config, error)
        finally:
            on_state(False)
        if stop.wait(backoff.next_delay()):
            break


def watch_loop(config: AgentConfig, slot: BundleSlot, stop: threading.Event,
               active: ActiveCalls) -> None:
    assert config.trainer.address is not None
    backoff = Backoff(config.trainer.backoff_initial_s, config.trainer.backoff_max_s)
    metadata = security.call_metadata(config.security)
    while not stop.is_set():
        try:
            with security.open_channel(config.trainer.address, config.security) as channel:
                grpc.channel_ready_future(channel).result(timeout=config.trainer.timeout_s)
                stub = telemetry_pb2_grpc.TelemetryServiceStub(channel)
                current = slot.current.metadata.version if slot.current else ""
                calls = stub.WatchBundles(telemetry_pb2.WatchBundlesRequest(
                    vm_id=config.vm_id, running_version=current), metadata=metadata)
                active.add(calls)
                for bundle in calls:
                    backoff.reset()
                    # A refused bundle is logged and counted by the slot; the old one runs on.
                    with contextlib.suppress(BundleError):
                        slot.install(bundle.metadata_json, bundle.onnx, bundle.sha256)
        except grpc.FutureTimeoutError:
            pass
        except grpc.RpcError as error:
            if stop.is_set():
                break
            if error.code() != grpc.StatusCode.UNIMPLEMENTED:
                _log_call_end("bundle watch", config, error)
        if stop.wait(backoff.next_delay()):
            break
