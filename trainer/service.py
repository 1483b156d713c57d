"""The trainer's gRPC service (protos/vmad/v1/telemetry.proto: telemetry stream with
acks, labels, bundle push) and the client side that reports VM states to the
controller (control.proto).

A trainer holds every agent of its node: each agent keeps one `Stream` and one
`WatchBundles` call open for as long as it runs. The server is grpc.aio: an open call is
a coroutine on one event loop (thread "vmad-grpc"), not a thread, and batches from all
streams are committed together by one writer thread (trainer/writer.py). At most
`serving.max_agents` streams (and as many watches) are held; the next agent is refused
with RESOURCE_EXHAUSTED, a log line and a count in `stats.calls_refused`, and retries
later with backoff.

Every value is checked at this boundary (trainer/intake.py): a bad batch is answered
with an Ack whose `error` names the problem, a bad sample with `Ack.refused`; the stream
stays open. The logic behind the wire is in trainer/core.py.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError

from vmad.actions import Decision
from vmad.certs import authorize
from vmad.config import ConfigError, load_config
from vmad.protos.vmad.v1 import (
    bundle_pb2,
    control_pb2,
    control_pb2_grpc,
    telemetry_pb2,
    telemetry_pb2_grpc,
)
from vmad.security import (
    add_health,
    add_port,
    call_metadata,
    channel_credentials,
    make_aio_server,
    open_channel,
)
from vmad.state import VMState
from vmad.trainer.config import TrainerConfig
from vmad.trainer.core import ReportRefused, TrainerCore
from vmad.trainer.intake import MAX_ID_CHARS, BatchError, clean_batch, label_problem
from vmad.trainer.metrics import TrainerMetrics
from vmad.trainer.store import IngestBatch, TelemetryStore
from vmad.trainer.writer import GroupWriter
from vmad.wire import decision_from_message, labels_from_messages, state_to_message

__all__ = ["TELEMETRY_SERVICE", "ServiceStats", "TrainerServer", "serve_from_config"]

log = logging.getLogger("vmad.trainer")

TELEMETRY_SERVICE = "vmad.v1.TelemetryService"
T = TypeVar("T")


@dataclass
class ServiceStats:
    """Plain counters (exported by the metrics module)."""

    open_streams: int = 0
    open_watches: int = 0
    batches: int = 0
    bad_batches: int = 0
    # Samples, verdicts and labels refused one by one, by reason.
    refused: Counter[str] = field(default_factory=Counter)
    # Whole calls refused (too many agents, identity, idle), by reason.
    calls_refused: Counter[str] = field(default_factory=Counter)


class _Servicer(telemetry_pb2_grpc.TelemetryServiceServicer):
    def __init__(self, owner: TrainerServer) -> None:
        self.owner = owner

    async def Stream(self, request_iterator: AsyncIterator[telemetry_pb2.TelemetryBatch],
                     context: grpc.aio.ServicerContext) -> None:
        await self.owner.stream(context)

    async def WatchBundles(self, request: telemetry_pb2.WatchBundlesRequest,
                           context: grpc.aio.ServicerContext
                           ) -> AsyncIterator[bundle_pb2.ModelBundle]:
        async for bundle in self.owner.watch_bundles(request, context):
            yield bundle

    async def Label(self, request: telemetry_pb2.LabelRequest,
                    context: grpc.aio.ServicerContext) -> telemetry_pb2.LabelReply:
        return await self.owner.label(request, context)


class TrainerServer:
    """Construct (binds the port), `start()`, `stop()`; all from ordinary threads."""

    def __init__(self, config: TrainerConfig, checkpoint: Any | None = None) -> None:
        from vmad.trainer.transfer import VMModels

        self.config = config
        data_dir = Path(config.data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        if config.controller.address and not config.security.insecure:
            channel_credentials(config.security)  # unreadable TLS files: fail now, one line
        if checkpoint is None:
            checkpoint = _load_pretrained(config)
        self.store = TelemetryStore(
            data_dir / "store.sqlite", max_samples=config.store.max_samples_per_vm,
            max_verdicts=config.store.max_verdicts_per_vm,
            max_labels=config.store.max_labels_per_vm)
        self.models = VMModels(checkpoint, self.store, data_dir / "models",
                               config.training, seed=config.training.seed,
                               adaptation=config.adaptation)
        self.core = TrainerCore(self.store, self.models)
        self.core.on_model_changed = self._model_changed
        self.writer = GroupWriter(self.store)
        self.stats = ServiceStats()
        self.metrics = TrainerMetrics(self.store, self.core, None, self.stats)
        self._model_events: dict[str, asyncio.Event] = {}
        # Open streams (their handler tasks) -> when each last asked for a batch.
        self._last_read: dict[asyncio.Task, float] = {}
        self._reaper: asyncio.Task | None = None
        self._idle: set[asyncio.Task] = set()
        self._channel: grpc.Channel | None = None
        # The event loop that runs the gRPC server, in a thread of its own.
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self._loop.run_forever, name="vmad-grpc",
                                             daemon=True)
        self._loop_thread.start()
        try:
            self._run(self._build())
        except BaseException:
            self._close_loop()
            self.store.close()
            raise
        self.address = f"{config.listen.rsplit(':', 1)[0]}:{self.port}"

    def _run(self, coroutine: Coroutine[Any, Any, T], timeout: float | None = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    async def _build(self) -> None:
        self.server, self.token_check = make_aio_server(self.config.security)
        self.metrics.token_check = self.token_check
        telemetry_pb2_grpc.add_TelemetryServiceServicer_to_server(_Servicer(self), self.server)
        self.health = add_health(self.server, [TELEMETRY_SERVICE])
        self.port = add_port(self.server, self.config.listen, self.config.security)

    def _close_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._loop_thread.join(10)
        self._loop.close()

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        self.writer.start()

        async def serve() -> None:
            await self.server.start()
            await self.health.set_serving(True)
            self._reaper = asyncio.create_task(self._close_idle_streams())

        self._run(serve())
        link = self.config.controller
        report = None
        if link.address:
            self._channel = open_channel(link.address, self.config.security)
            stub = control_pb2_grpc.ControlServiceStub(self._channel)
            metadata = call_metadata(self.config.security)

            def report(state: VMState) -> Decision:
                try:
                    answer = stub.Report(control_pb2.StateReport(
                        trainer_id=self.config.trainer_id, address=self.address,
                        state=state_to_message(state)), timeout=link.timeout_s,
                        metadata=metadata)
                except grpc.RpcError as error:
                    if error.code() is grpc.StatusCode.INVALID_ARGUMENT:
                        raise ReportRefused(error.details()) from error
                    raise
                return decision_from_message(answer)

            report = self.metrics.timed_report(report)
        self.core.start(report, link.report_interval_s)
        self.metrics.serve(self.config.metrics.listen)

    def stop(self, grace: float = 5.0) -> None:
        self.metrics.close()
        async def drain() -> None:
            await self.health.set_serving(False)
            if self._reaper is not None:
                self._reaper.cancel()
            await self.server.stop(grace)

        try:
            self._run(drain(), timeout=grace + 10)
        except (concurrent.futures.TimeoutError, RuntimeError) as error:
            log.warning("gRPC server did not stop cleanly: %s", error)
        self.core.stop()
        self.writer.stop()
        self._close_loop()
        if self._channel is not None:
            self._channel.close()
        self.store.close()

    # -- admission and identity -------------------------------------------------------

    async def _refuse(self, context: grpc.aio.ServicerContext, code: grpc.StatusCode,
                      reason: str, message: str) -> None:
        self.stats.calls_refused[reason] += 1
        log.warning("refused %s from %s: %s", code.name, context.peer(), message)
        await context.abort(code, message)

    async def _check_caller(self, context: grpc.aio.ServicerContext, vm_id: str) -> None:
        """An agent acts only for its own VM: the one its certificate (`vm:<id>`) names,
        or its token vouches for (vmad/certs.py `authorize`)."""
        if not vm_id or len(vm_id) > MAX_ID_CHARS:
            await self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, "bad vm_id",
                               f"vm_id must be 1 to {MAX_ID_CHARS} characters")
        problem = authorize(context, "vm", vm_id, self.token_check is not None)
        if problem:
            await self._refuse(context, grpc.StatusCode.PERMISSION_DENIED, "not own VM",
                               problem)

    async def _admit(self, context: grpc.aio.ServicerContext, open_now: int,
                     what: str) -> None:
        limit = self.config.serving.max_agents
        if open_now >= limit:
            await self._refuse(
                context, grpc.StatusCode.RESOURCE_EXHAUSTED, "too many agents",
                f"this trainer holds at most {limit} agents ({what} open: {open_now}); "
                "retry later or add a trainer")

    # -- handlers ---------------------------------------------------------------------

    async def stream(self, context: grpc.aio.ServicerContext) -> None:
        await self._admit(context, self.stats.open_streams, "telemetry streams")
        self.stats.open_streams += 1
        checked: str | None = None  # the vm_id this stream was allowed to send for
        task = asyncio.current_task()
        assert task is not None
        try:
            while True:
                self._last_read[task] = time.monotonic()
                try:
                    batch = await context.read()
                except DecodeError:
                    await self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT,
                                       "undecodable", "not a TelemetryBatch message")
                except asyncio.CancelledError:
                    if task not in self._idle:
                        raise  # the server is stopping
                    await self._refuse(context, grpc.StatusCode.DEADLINE_EXCEEDED, "idle",
                                       f"no telemetry for {self.config.serving.stream_idle_s:g}"
                                       " s; reconnect when there is some")
                if batch is grpc.aio.EOF:
                    return
                # (An empty or over-long id is answered by the Ack: a bad batch.)
                if batch.vm_id != checked and 0 < len(batch.vm_id) <= MAX_ID_CHARS:
                    await self._check_caller(context, batch.vm_id)
                    checked = batch.vm_id
                ack = await self._ingest(batch)
                self.metrics.count_ack(ack)
                await context.write(ack)
        finally:
            self.stats.open_streams -= 1
            self._last_read.pop(task, None)
            self._idle.discard(task)

    async def _close_idle_streams(self) -> None:
        """Cancel streams that have sent nothing for `stream_idle_s` (a dead agent whose
        connection keepalive has not caught yet, or a stuck one): frees their slots."""
        idle = self.config.serving.stream_idle_s
        while True:
            await asyncio.sleep(min(idle / 4, 30.0))
            now = time.monotonic()
            for task, last in list(self._last_read.items()):
                if now - last > idle and task not in self._idle:
                    self._idle.add(task)  # the stream answers DEADLINE_EXCEEDED and ends
                    task.cancel()

    async def _ingest(self, batch: telemetry_pb2.TelemetryBatch) -> telemetry_pb2.Ack:
        self.stats.batches += 1
        try:
            clean = clean_batch(batch, self.models.metrics)
            result = await self.writer.ingest(IngestBatch(
                clean.vm_id, clean.metrics, clean.seqs, clean.timestamps, clean.values,
                clean.verdicts, clean.labels, clean.spool_id, clean.refused_seqs))
        except (BatchError, ValueError) as error:
            return self._bad_batch(batch, f"bad batch: {error}")
        except Exception as error:  # the store failed (disk full): the agent resends
            return self._bad_batch(batch, f"trainer could not store the batch: {error}")
        self.core.stored(clean.vm_id, result, clean.labels, clean.metrics)
        refused = sum(clean.refused.values())
        if refused:
            self.stats.refused.update(clean.refused)
            reason = next(iter(clean.refused))
            log.warning("VM %s: refused %d values of batch %d (%s)", clean.vm_id, refused,
                        batch.batch_id, ", ".join(f"{k}: {v}" for k, v in clean.refused.items()))
        else:
            reason = ""
        return telemetry_pb2.Ack(
            batch_id=batch.batch_id, acked_seq=max(0, result.acked), stored=result.stored,
            duplicates=result.duplicates, lost=result.lost, refused=refused,
            refused_reason=reason)

    def _bad_batch(self, batch: telemetry_pb2.TelemetryBatch, message: str
                   ) -> telemetry_pb2.Ack:
        self.stats.bad_batches += 1
        log.warning("telemetry batch %d from %r refused: %s", batch.batch_id,
                    batch.vm_id[:MAX_ID_CHARS], message)
        return telemetry_pb2.Ack(batch_id=batch.batch_id, error=message[:1000])

    async def label(self, request: telemetry_pb2.LabelRequest,
                    context: grpc.aio.ServicerContext) -> telemetry_pb2.LabelReply:
        await self._check_caller(context, request.vm_id)
        for message in request.labels:
            problem = label_problem(message)
            if problem:
                self.stats.refused[problem] += 1
                await self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, "bad label",
                                   f"bad labels: {problem}")
        labels = labels_from_messages(request.labels)
        try:
            await asyncio.to_thread(self.core.add_labels, request.vm_id, labels)
        except ValueError as error:
            await self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, "bad label",
                               f"bad labels: {error}")
        return telemetry_pb2.LabelReply(accepted=len(labels))

    def _model_changed(self, vm_id: str) -> None:
        """From the action worker thread: wake the watchers of `vm_id`."""
        def wake() -> None:
            event = self._model_events.pop(vm_id, None)
            if event is not None:
                event.set()

        with contextlib.suppress(RuntimeError):  # the loop is closed: the server stopped
            self._loop.call_soon_threadsafe(wake)

    async def watch_bundles(self, request: telemetry_pb2.WatchBundlesRequest,
                            context: grpc.aio.ServicerContext
                            ) -> AsyncIterator[bundle_pb2.ModelBundle]:
        await self._check_caller(context, request.vm_id)
        await self._admit(context, self.stats.open_watches, "bundle watches")
        self.stats.open_watches += 1
        try:
            running = request.running_version
            vm_id = request.vm_id
            while True:
                # Take the event before reading the version: a change in between wakes us.
                event = self._model_events.setdefault(vm_id, asyncio.Event())
                bundle = await asyncio.to_thread(self.models.bundle, vm_id)
                if bundle.metadata.version != running:
                    running = bundle.metadata.version
                    self.core.bundle_sent()
                    yield bundle_pb2.ModelBundle(
                        version=running, sha256=bundle.metadata.onnx_sha256,
                        onnx=bundle.onnx_bytes, metadata_json=bundle.metadata.to_json(),
                        vm_id=vm_id if bundle is not self.models.pretrained_bundle else "")
                await event.wait()
        finally:
            self.stats.open_watches -= 1


def _load_pretrained(config: TrainerConfig) -> Any:
    from vmad.trainer.checkpoint import load_checkpoint, load_default_checkpoint

    if config.model.pretrained is not None:
        return load_checkpoint(config.model.pretrained)
    return load_default_checkpoint()


def _allow_open_files(wanted: int) -> None:
    """Each agent holds a connection (a file descriptor); systems often start processes
    with a soft limit of 1,024. Raise it up to the hard limit, and say so if that is
    short of what `serving.max_agents` needs."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if hard != resource.RLIM_INFINITY and hard < wanted:
        log.warning("open-file limit %d is below the %d that serving.max_agents needs; "
                    "raise LimitNOFILE / ulimit -n", hard, wanted)


def serve_from_config(path: Path) -> int:
    from vmad.signals import run_until_signalled

    try:
        config = load_config(path, TrainerConfig)
    except (ConfigError, ValueError) as error:
        print(f"vmad trainer: config error: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    import torch

    torch.set_num_threads(config.training.threads)
    _allow_open_files(2 * config.serving.max_agents + 256)
    started = time.monotonic()
    try:
        server = TrainerServer(config)
    except Exception as error:
        print(f"vmad trainer: cannot start: {error}", file=sys.stderr)
        return 1
    server.start()
    print(f"vmad trainer: listening on {server.address}, data in {config.data_dir} "
          f"(ready in {time.monotonic() - started:.1f} s)", flush=True)
    run_until_signalled(server.stop)
    return 0
