"""Simulated agents for the trainer benchmarks: the real agent's call pattern, async.

Each simulated agent has its own gRPC channel (its own TCP + TLS connection) and its own
identity (client id + token, and its own certificate when `certs` holds one per VM), opens
one `WatchBundles` and one `Stream` call and keeps both open, and sends telemetry batches
on the stream: every `period_s` seconds (the fleet benchmark: the agent's 5 s flush), or
back to back as soon as the previous one is acked (`period_s=0`, the ingest benchmark).
Batches carry `samples` samples and as many verdicts, the agent's message shape.

A load process runs `agents` of them on one asyncio event loop (`run_load`, started with
multiprocessing) and returns what it saw: agents connected, agents with every batch
acked, acks, ack latencies (write to ack), errors by status code.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class LoadSpec:
    address: str
    first: int  # index of this process's first agent
    agents: int
    seconds: float  # how long each agent sends after the common start
    start_at: float  # time.time() at which every agent starts sending
    period_s: float  # 0: back to back
    samples: int = 1
    running_version: str = ""
    certs: str | None = None  # folder from vmad certs; None = plaintext
    per_vm_certs: bool = False  # certs/vms/<vm>.pem + -key.pem for each agent
    tokens: bool = False  # vmad-client-id + bearer token "token-<vm>"
    ramp_s: float = 5.0  # connections are spread over this long


@dataclass
class LoadResult:
    connected: int = 0
    all_acked: int = 0
    acks: int = 0
    sent: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)


def vm_name(i: int) -> str:
    return f"vm-{i:05d}"


def _credentials(spec: LoadSpec, vm: str) -> Any:
    import grpc

    if spec.certs is None:
        return None
    folder = Path(spec.certs)
    if spec.per_vm_certs:  # vmad certs issue --vm
        cert, key = folder / "vms" / f"{vm}.pem", folder / "vms" / f"{vm}-key.pem"
    else:
        cert, key = folder / "client.pem", folder / "client-key.pem"
    return grpc.ssl_channel_credentials((folder / "ca.pem").read_bytes(), key.read_bytes(),
                                        cert.read_bytes())


def _batch(vm: str, seq: int, n: int, rng: np.random.Generator) -> Any:
    from vmad.protos.vmad.v1 import telemetry_pb2 as pb
    from vmad.schema import DEFAULT_METRICS

    now = time.time()
    values = rng.normal(30, 3, (n, len(DEFAULT_METRICS)))
    return pb.TelemetryBatch(
        vm_id=vm, metrics=list(DEFAULT_METRICS), interval_s=5.0, batch_id=seq,
        first_seq=seq, spool_id=f"bench-{vm}", model_version="bench",
        samples=[pb.Sample(seq=seq + k, timestamp=now - 5.0 * (n - k),
                           values=values[k].tolist()) for k in range(n)],
        verdicts=[pb.Verdict(end_seq=seq + k, timestamp=now - 5.0 * (n - k), score=0.1,
                             anomalous=False, model_version="bench") for k in range(n)])


async def _agent(spec: LoadSpec, i: int, result: LoadResult) -> None:
    import grpc

    from vmad.protos.vmad.v1 import telemetry_pb2 as pb
    from vmad.protos.vmad.v1 import telemetry_pb2_grpc
    from vmad.security import channel_options

    vm = vm_name(i)
    rng = np.random.default_rng(i)
    await asyncio.sleep(max(0.0, spec.start_at - time.time() - spec.ramp_s)
                        + random.uniform(0, spec.ramp_s))
    metadata = (("vmad-client-id", vm), ("authorization", f"Bearer token-{vm}")) \
        if spec.tokens else ()
    credentials = _credentials(spec, vm)
    options = channel_options("localhost" if credentials is not None else None)
    channel = (grpc.aio.secure_channel(spec.address, credentials, options=options)
               if credentials is not None
               else grpc.aio.insecure_channel(spec.address, options=options))
    sent = acked_all = 0
    watch = None
    try:
        stub = telemetry_pb2_grpc.TelemetryServiceStub(channel)
        watch = stub.WatchBundles(pb.WatchBundlesRequest(
            vm_id=vm, running_version=spec.running_version), metadata=metadata)
        call = stub.Stream(metadata=metadata)
        connected = False
        seq = 1
        # Agents start sending at a random phase of their period, as real ones do.
        next_send = spec.start_at + random.uniform(0, spec.period_s)
        stop_at = spec.start_at + spec.seconds
        while True:
            now = time.time()
            if next_send >= stop_at:
                break
            if next_send > now:
                await asyncio.sleep(next_send - now)
            batch = _batch(vm, seq, spec.samples, rng)
            begin = time.perf_counter()
            await call.write(batch)
            sent += 1
            ack = await call.read()
            if ack is grpc.aio.EOF:
                result.errors["stream ended"] += 1
                break
            result.latencies_ms.append((time.perf_counter() - begin) * 1000)
            if not connected:
                connected = True
                result.connected += 1
            if ack.error or ack.acked_seq != seq + spec.samples - 1:
                result.errors[f"bad ack: {ack.error or ack.acked_seq}"[:80]] += 1
            else:
                result.acks += 1
                acked_all += 1
            seq += spec.samples
            next_send = (next_send + spec.period_s) if spec.period_s else time.time()
        await call.done_writing()
        if sent and acked_all == sent:
            result.all_acked += 1
    except grpc.aio.AioRpcError as error:
        result.errors[error.code().name] += 1
    finally:
        result.sent += sent
        if watch is not None:
            watch.cancel()
        await channel.close()


def run_load(spec: LoadSpec) -> dict[str, Any]:
    """One load process: `spec.agents` agents on one event loop (the target of a
    multiprocessing pool); returns a plain dict so it pickles."""
    result = LoadResult()

    async def main() -> None:
        await asyncio.gather(*(_agent(spec, spec.first + k, result)
                               for k in range(spec.agents)))

    asyncio.run(main())
    return {"connected": result.connected, "all_acked": result.all_acked,
            "acks": result.acks, "sent": result.sent, "errors": dict(result.errors),
            "latencies_ms": result.latencies_ms}


def merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    errors: Counter[str] = Counter()
    for part in parts:
        errors.update(part["errors"])
    latencies = np.concatenate([np.asarray(p["latencies_ms"], dtype=np.float64)
                                for p in parts]) if parts else np.zeros(0)
    return {"connected": sum(p["connected"] for p in parts),
            "all_acked": sum(p["all_acked"] for p in parts),
            "acks": sum(p["acks"] for p in parts), "sent": sum(p["sent"] for p in parts),
            "errors": dict(errors), "latencies_ms": latencies}


def pretrained_checkpoint(folder: Path) -> Path:
    """The shipped pretrained checkpoint (a random small one if the package has none)."""
    from vmad.schema import DEFAULT_METRICS
    from vmad.trainer.checkpoint import DEFAULT_CHECKPOINT_DIR, Checkpoint, save_checkpoint
    from vmad.trainer.models import build_model
    from vmad.windows import Normalizer

    if (DEFAULT_CHECKPOINT_DIR / "checkpoint.json").is_file():
        return DEFAULT_CHECKPOINT_DIR
    normalizer = Normalizer.fit(np.random.default_rng(0).normal(30, 3, (200, 4)))
    save_checkpoint(folder, Checkpoint(build_model("zoom-cnn", 4, 64), "zoom-cnn",
                                       DEFAULT_METRICS, 64, normalizer, 0.5))
    return folder


def start_trainer(folder: Path, agents: int, *, tls: bool, max_agents: int | None = None,
                  per_vm_certs: bool = False) -> tuple[Any, str, str | None]:
    """A real `vmad trainer` process (mTLS + a token per agent when `tls`; a certificate
    per agent too with `per_vm_certs`), serving. Returns (process, address, certs folder
    or None)."""
    import yaml

    from vmad.launch import free_port, start, wait_serving
    from vmad.security import make_certs

    port = free_port()
    certs = None
    security: dict[str, Any] = {"insecure": True}
    credentials = None
    if tls:
        import grpc

        certs = folder / "certs"
        paths = make_certs(certs)
        if per_vm_certs:
            from vmad.certs import issue_certificate

            for i in range(agents):
                issue_certificate(certs, "vm", vm_name(i))
        security = {"ca": str(paths["ca"]), "cert": str(paths["server"]),
                    "key": str(paths["server-key"]),
                    "tokens": {vm_name(i): f"token-{vm_name(i)}" for i in range(agents)}}
        credentials = grpc.ssl_channel_credentials(
            paths["ca"].read_bytes(), paths["client-key"].read_bytes(),
            paths["client"].read_bytes())
    config = folder / "trainer.yaml"
    config.write_text(yaml.safe_dump({
        "trainer_id": "bench", "listen": f"127.0.0.1:{port}",
        "data_dir": str(folder / "data"), "log_level": "WARNING",
        "controller": {"address": None},
        "model": {"pretrained": str(pretrained_checkpoint(folder / "pretrained"))},
        "serving": {"max_agents": max_agents or max(agents, 1)},
        "security": security}))
    trainer = start("trainer", ["trainer", "--config", str(config)], folder)
    address = f"127.0.0.1:{port}"
    wait_serving(address if credentials is None else f"localhost:{port}", 120,
                 process=trainer, credentials=credentials)
    return trainer, address, str(certs) if certs else None


def running_version(address: str, certs: str | None, per_vm_certs: bool = False) -> str:
    """The bundle version the trainer pushes first (its pretrained one); simulated
    agents announce it, as real agents running the shipped bundle do, so the benchmark
    measures telemetry rather than 2,000 copies of a bundle."""
    spec = LoadSpec(address, 0, 1, 0, time.time(), 0, certs=certs, tokens=certs is not None,
                    per_vm_certs=per_vm_certs)

    async def probe() -> str:
        import grpc

        from vmad.protos.vmad.v1 import telemetry_pb2 as pb
        from vmad.protos.vmad.v1 import telemetry_pb2_grpc
        from vmad.security import channel_options

        vm = vm_name(0)
        credentials = _credentials(spec, vm)
        metadata = (("vmad-client-id", vm), ("authorization", f"Bearer token-{vm}")) \
            if spec.tokens else ()
        options = channel_options("localhost" if credentials is not None else None)
        async with (grpc.aio.secure_channel(address, credentials, options=options)
                    if credentials is not None
                    else grpc.aio.insecure_channel(address, options=options)) as channel:
            stub = telemetry_pb2_grpc.TelemetryServiceStub(channel)
            call = stub.WatchBundles(pb.WatchBundlesRequest(vm_id=vm), metadata=metadata,
                                     timeout=60)
            bundle = await call.read()
            call.cancel()
            return str(bundle.version)

    return asyncio.run(probe())
