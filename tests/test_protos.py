"""The generated stubs are what the .proto files say (stale stubs fail here), and they
import as the `protos` package."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STUBS = ROOT / "protos" / "vmad" / "v1"


def test_committed_stubs_match_a_fresh_generation(tmp_path: Path) -> None:
    subprocess.run([str(ROOT / "scripts" / "gen_protos.sh"), str(tmp_path)], check=True)
    fresh = sorted(p.name for p in (tmp_path / "protos" / "vmad" / "v1").glob("*_pb2*"))
    assert fresh, "protoc generated nothing"
    committed = sorted(p.name for p in STUBS.glob("*_pb2*"))
    assert fresh == committed
    for name in fresh:
        new = (tmp_path / "protos" / "vmad" / "v1" / name).read_text()
        assert (STUBS / name).read_text() == new, (
            f"protos/vmad/v1/{name} is stale: run scripts/gen_protos.sh"
        )


def test_stubs_import_and_round_trip() -> None:
    from vmad.protos.vmad.v1 import bundle_pb2, control_pb2, telemetry_pb2, telemetry_pb2_grpc

    batch = telemetry_pb2.TelemetryBatch(
        vm_id="vm-1", metrics=["cpu"], samples=[telemetry_pb2.Sample(seq=1, values=[0.5])]
    )
    again = telemetry_pb2.TelemetryBatch.FromString(batch.SerializeToString())
    assert again.samples[0].seq == 1 and again.vm_id == "vm-1"
    assert hasattr(telemetry_pb2_grpc, "TelemetryServiceStub")
    assert bundle_pb2.ModelBundle(version="v1").version == "v1"
    assert control_pb2.ActionKind.Value("RESET_FINETUNE") == 4
    state = control_pb2.VMState(vm_id="vm")
    assert not state.HasField("seconds_since_training")  # "never trained"
