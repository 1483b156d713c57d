"""Fuzz every gRPC method and every file reader with hypothesis; print, per target, the
inputs tried, the clean refusals, the unhandled failures (must be 0) and whether a valid
client is served afterwards.

gRPC targets run against a real trainer (TelemetryService: Stream, Label, WatchBundles,
with tokens on) and a real controller (ControlService: Report, Fleet) on loopback, in
this process; each input is one call. A clean refusal is an Ack naming the problem or a
status the service chose (INVALID_ARGUMENT, PERMISSION_DENIED, UNAUTHENTICATED,
RESOURCE_EXHAUSTED); UNKNOWN (an exception escaped a handler) or INTERNAL (gRPC's own
"Exception deserializing request!", with a traceback in the server's log) is unhandled,
and so is any exception from a file reader other than its documented error
(SeriesFormatError, ConfigError, BundleError). Inputs mix well-formed messages with
hostile values (NaN, infinities, seqs past 2^63, huge and empty ids) and raw bytes that
are not a valid message at all.

    .venv/bin/python bench/fuzz.py --quick          # 200 inputs per target (CI)
    .venv/bin/python bench/fuzz.py                  # 10,000 inputs per target
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vmad.protos.vmad.v1 import (
    control_pb2,
    control_pb2_grpc,
    telemetry_pb2_grpc,
)
from vmad.protos.vmad.v1 import telemetry_pb2 as pb
from vmad.schema import DEFAULT_METRICS

CLEAN_CODES = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED,
               grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.RESOURCE_EXHAUSTED,
               grpc.StatusCode.DEADLINE_EXCEEDED}
TOKEN = (("vmad-client-id", "vm-f"), ("authorization", "Bearer fuzz"))

floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                   st.sampled_from([0.0, 1.0, 1e9, 1.7e9, -1.0, 2.0, 1e39]))
seqs = st.one_of(st.integers(0, 2**64 - 1), st.integers(1, 50))
texts = st.one_of(st.text(max_size=20), st.just("vm-f"), st.text(min_size=100, max_size=300))


def samples() -> st.SearchStrategy:
    return st.builds(lambda s, t, v: pb.Sample(seq=s, timestamp=t, values=v), seqs, floats,
                     st.lists(floats, max_size=6))


def batches() -> st.SearchStrategy:
    return st.builds(
        lambda vm, metrics, ss, vs, ls, fs, sid: pb.TelemetryBatch(
            vm_id=vm, metrics=metrics, samples=ss, verdicts=vs, labels=ls, first_seq=fs,
            spool_id=sid, batch_id=1),
        st.one_of(st.just("vm-f"), texts),
        st.one_of(st.just(list(DEFAULT_METRICS)), st.lists(st.text(max_size=8), max_size=5)),
        st.lists(samples(), max_size=8),
        st.lists(st.builds(lambda e, t, s, m: pb.Verdict(end_seq=e, timestamp=t, score=s,
                                                         model_version=m),
                           seqs, floats, floats, texts), max_size=4),
        st.lists(labels(), max_size=3), seqs, texts)


def labels() -> st.SearchStrategy:
    return st.builds(lambda a, b, k, i, src: pb.LabelInterval(start=a, end=b, kind=k, id=i,
                                                              source=src),
                     floats, floats, texts, texts, st.integers(0, 2))


class Stats:
    def __init__(self) -> None:
        self.inputs = 0
        self.accepted = 0
        self.refused = 0
        self.unhandled: Counter[str] = Counter()

    def record(self, outcome: str) -> None:
        self.inputs += 1
        if outcome == "accepted":
            self.accepted += 1
        elif outcome == "refused":
            self.refused += 1
        else:
            self.unhandled[outcome[:120]] += 1


def _status(error: grpc.RpcError) -> str:
    return "refused" if error.code() in CLEAN_CODES else f"{error.code().name}: {error.details()}"


def run_target(n: int, strategy: st.SearchStrategy, attempt: Callable[[Any], str]) -> Stats:
    stats = Stats()

    @settings(max_examples=n, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck), phases=["generate"])
    @given(strategy)
    def body(value: Any) -> None:
        try:
            stats.record(attempt(value))
        except Exception as error:
            stats.record(f"{type(error).__name__}: {error}")

    body()
    return stats


# -- gRPC targets ------------------------------------------------------------------------

def grpc_targets(folder: Path) -> tuple[dict[str, tuple], Callable[[], None]]:
    from tests.trainer_fixtures import small_checkpoint
    from vmad.controller.config import ControllerConfig
    from vmad.controller.service import ControllerServer
    from vmad.trainer.config import TrainerConfig
    from vmad.trainer.service import TrainerServer

    trainer = TrainerServer(TrainerConfig.model_validate({
        "trainer_id": "fuzz", "listen": "127.0.0.1:0", "data_dir": str(folder / "trainer"),
        "log_level": "ERROR", "security": {"insecure": True, "tokens": {"vm-f": "fuzz"}}}),
        small_checkpoint())
    trainer.start()
    controller = ControllerServer(ControllerConfig.model_validate({
        "listen": "127.0.0.1:0", "database": str(folder / "registry.sqlite"),
        "log_level": "ERROR", "policy": {"kind": "rules"}, "security": {"insecure": True}}))
    controller.start()
    t_channel = grpc.insecure_channel(trainer.address)
    c_channel = grpc.insecure_channel(controller.address)
    telemetry = telemetry_pb2_grpc.TelemetryServiceStub(t_channel)
    control = control_pb2_grpc.ControlServiceStub(c_channel)
    raw_stream = t_channel.stream_stream("/vmad.v1.TelemetryService/Stream",
                                         request_serializer=lambda b: b,
                                         response_deserializer=pb.Ack.FromString)
    raw_report = c_channel.unary_unary("/vmad.v1.ControlService/Report",
                                       request_serializer=lambda b: b,
                                       response_deserializer=control_pb2.Decision.FromString)
    seq = [0]

    def stream(message: Any) -> str:
        try:
            if isinstance(message, bytes):
                acks = list(raw_stream(iter([message]), timeout=10, metadata=TOKEN))
            else:
                acks = list(telemetry.Stream(iter([message]), timeout=10, metadata=TOKEN))
        except grpc.RpcError as error:
            return _status(error)
        if len(acks) != 1:
            return f"{len(acks)} acks for one batch"
        return "refused" if acks[0].error or acks[0].refused else "accepted"

    def label(request: pb.LabelRequest) -> str:
        try:
            telemetry.Label(request, timeout=10, metadata=TOKEN)
        except grpc.RpcError as error:
            return _status(error)
        return "accepted"

    def watch(request: pb.WatchBundlesRequest) -> str:
        call = telemetry.WatchBundles(request, timeout=10, metadata=TOKEN)
        try:
            bundle = next(call)
        except grpc.RpcError as error:
            return _status(error)
        finally:
            call.cancel()
        return "accepted" if bundle.version else "empty bundle"

    def report(message: Any) -> str:
        try:
            if isinstance(message, bytes):
                raw_report(message, timeout=10)
            else:
                control.Report(message, timeout=10)
        except grpc.RpcError as error:
            return _status(error)
        return "accepted"

    def fleet(request: control_pb2.FleetRequest) -> str:
        try:
            control.Fleet(request, timeout=10)
        except grpc.RpcError as error:
            return _status(error)
        return "accepted"

    def valid_trainer_client() -> bool:
        seq[0] += 1
        good = pb.TelemetryBatch(vm_id="vm-f", metrics=list(DEFAULT_METRICS), batch_id=1,
                                 samples=[pb.Sample(seq=10**6 + seq[0], timestamp=time.time(),
                                                    values=[1.0, 2.0, 3.0, 4.0])])
        (ack,) = telemetry.Stream(iter([good]), timeout=10, metadata=TOKEN)
        # Stored, or a duplicate when a fuzzed batch already pushed the VM's seqs past it.
        return not ack.error and ack.stored + ack.duplicates == 1

    def valid_controller_client() -> bool:
        state = control_pb2.VMState(vm_id="vm-ok", timestamp=time.time())
        control.Report(control_pb2.StateReport(trainer_id="t", state=state), timeout=10)
        return True

    states = st.builds(
        lambda vm, t, a, f, d, s: control_pb2.VMState(vm_id=vm, timestamp=t, accuracy=a, f1=f,
                                                      drift=d, summary=s),
        texts, floats, floats, floats, floats, st.lists(floats, max_size=20))
    targets = {
        "Trainer.Stream": (st.one_of(batches(), st.binary(max_size=200)), stream,
                           valid_trainer_client),
        "Trainer.Label": (st.builds(lambda vm, ls: pb.LabelRequest(vm_id=vm, labels=ls),
                                    st.one_of(st.just("vm-f"), texts),
                                    st.lists(labels(), max_size=4)), label,
                          valid_trainer_client),
        "Trainer.WatchBundles": (st.builds(
            lambda vm, v: pb.WatchBundlesRequest(vm_id=vm, running_version=v),
            st.one_of(st.just("vm-f"), texts), texts), watch, valid_trainer_client),
        # Fleet first: its reply grows with every VM the fuzzed reports register.
        "Controller.Fleet": (st.builds(lambda n: control_pb2.FleetRequest(decisions=n),
                                       st.integers(0, 2**32 - 1)), fleet,
                             valid_controller_client),
        "Controller.Report": (st.one_of(st.builds(
            lambda t, a, s: control_pb2.StateReport(trainer_id=t, address=a, state=s),
            texts, texts, states), st.binary(max_size=200)), report, valid_controller_client),
    }

    def close() -> None:
        t_channel.close()
        c_channel.close()
        trainer.stop(0)
        controller.stop(0)

    return targets, close


# -- file readers ------------------------------------------------------------------------

def file_targets(folder: Path) -> dict[str, tuple]:
    from vmad.bundle import BundleError, BundleMetadata
    from vmad.config import ConfigError, load_config
    from vmad.edge_agent.config import AgentConfig
    from vmad.series import SeriesFormatError, read_series

    def csv_text() -> st.SearchStrategy:
        cells = st.one_of(st.text(max_size=10), floats.map(str),
                          st.sampled_from(["2024-01-01T00:00:00Z", "1", "", "nan", "label"]))
        rows = st.lists(st.lists(cells, min_size=1, max_size=5), max_size=8)
        return rows.map(lambda rs: "timestamp,cpu,label\n" + "\n".join(",".join(r) for r in rs))

    def series(value: Any) -> str:
        kind, data = value
        path = folder / ("fuzz.csv.gz" if kind != "plain" else "fuzz.csv")
        if kind == "gzip":
            data = gzip.compress(data)
        elif kind == "truncated-gzip":
            data = gzip.compress(data)[: max(1, len(data) // 2)]
        path.write_bytes(data)
        try:
            read_series(path)
        except SeriesFormatError:
            return "refused"
        return "accepted"

    def yaml_file(data: bytes) -> str:
        path = folder / "agent.yaml"
        path.write_bytes(data)
        try:
            load_config(path, AgentConfig)
        except ConfigError:
            return "refused"
        return "accepted"

    def bundle_json(data: bytes) -> str:
        try:
            BundleMetadata.from_json(data)
        except BundleError:
            return "refused"
        return "accepted"

    payloads = st.one_of(st.binary(max_size=300), csv_text().map(str.encode))
    yaml_inputs = st.one_of(
        st.binary(max_size=300), st.text(max_size=300).map(str.encode),
        st.integers(1, 500).map(lambda n: b"a: " + b"[" * n),  # the limit is 64 levels
        st.integers(1, 20_000).map(lambda n: b"a:\n" + b"".join(
            b"  " * i + b"k:\n" for i in range(min(n, 300)))),
        st.sampled_from([b"\xff\xfe\x00bad utf-8", b"vm_id: \xc3\x28", b"vm_id: x\nspool: 3"]))
    json_inputs = st.one_of(
        st.binary(max_size=300),
        st.integers(1, 5_000).map(lambda n: b"[" * n + b"]" * n),
        st.dictionaries(st.sampled_from(["format_version", "version", "metrics", "window",
                                         "normalization", "threshold", "onnx_sha256"]),
                        st.one_of(st.integers(), floats, st.text(max_size=5),
                                  st.lists(st.text(max_size=3), max_size=3)))
        .map(lambda d: json.dumps(d).encode()))
    return {
        "read_series (.csv, .csv.gz)": (
            st.tuples(st.sampled_from(["plain", "gzip", "truncated-gzip", "raw-as-gz"]),
                      payloads), series, lambda: True),
        "agent.yaml (load_config)": (yaml_inputs, yaml_file, lambda: True),
        "bundle.json (BundleMetadata)": (json_inputs, bundle_json, lambda: True),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200 inputs per target")
    parser.add_argument("--inputs", type=int, help="inputs per target (default 10,000)")
    parser.add_argument("--only", help="run targets whose name contains this")
    args = parser.parse_args()
    n = args.inputs or (200 if args.quick else 10_000)
    import logging

    logging.basicConfig(level=logging.CRITICAL)  # refusals are logged by design
    print(f"fuzz: up to {n} inputs per target (hypothesis, derandomized)")
    print(f"{'target':<30} {'inputs':>7} {'accepted':>9} {'clean refusals':>15} "
          f"{'unhandled':>10} {'valid client served after':>26} {'seconds':>8}", flush=True)
    failed = False
    with tempfile.TemporaryDirectory(prefix="vmad-fuzz-") as tmp:
        folder = Path(tmp)
        targets, close = grpc_targets(folder)
        targets.update(file_targets(folder))
        try:
            for name, (strategy, attempt, served) in targets.items():
                if args.only and args.only not in name:
                    continue
                started = time.perf_counter()
                stats = run_target(n, strategy, attempt)
                try:
                    ok = served()
                except Exception:
                    ok = False
                unhandled = sum(stats.unhandled.values())
                failed |= unhandled > 0 or not ok
                print(f"{name:<30} {stats.inputs:>7} {stats.accepted:>9} {stats.refused:>15} "
                      f"{unhandled:>10} {'yes' if ok else 'NO':>26} "
                      f"{time.perf_counter() - started:>8.1f}", flush=True)
                for what, count in stats.unhandled.most_common(5):
                    print(f"    unhandled x{count}: {what}", flush=True)
        finally:
            close()
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
