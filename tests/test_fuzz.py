"""Fuzzing in CI (bench/fuzz.py --quick: 200 hypothesis inputs per gRPC method and per
file reader, every one handled, a valid client served after each target) and the bad
files that used to end in a traceback."""

from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

import pytest

from vmad.config import ConfigError, load_config
from vmad.edge_agent.config import AgentConfig
from vmad.series import SeriesFormatError, read_series

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_fuzz_bench_quick_mode_finds_nothing_unhandled():
    result = subprocess.run([sys.executable, "bench/fuzz.py", "--quick"], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    rows = [line.split() for line in result.stdout.splitlines()[2:] if line[:1] != " "]
    assert len(rows) == 8
    for row in rows:
        # ... inputs, accepted, clean refusals, unhandled, served after, seconds
        assert int(row[-6]) == 200 and row[-3] == "0" and row[-2] == "yes", row


def test_corrupt_gzip_is_a_clear_error(tmp_path):
    good = gzip.compress(b"timestamp,cpu\n2024-01-01T00:00:00Z,1\n" * 50)
    corrupt = tmp_path / "bad.csv.gz"
    corrupt.write_bytes(good[:20] + bytes(b ^ 0xFF for b in good[20:60]) + good[60:])
    with pytest.raises(SeriesFormatError, match=r"bad\.csv\.gz.*cannot read"):
        read_series(corrupt)
    truncated = tmp_path / "short.csv.gz"
    truncated.write_bytes(good[: len(good) // 2])
    with pytest.raises(SeriesFormatError, match="cannot read"):
        read_series(truncated)


@pytest.mark.parametrize("data, message", [
    (b"vm_id: \xc3\x28\n", "not UTF-8 text: byte 7"),
    (b"vm_id: x\nspool: " + b"[" * 5000, "nested more than 64 levels deep"),
    (b"a:\n" + b"".join(b"  " * i + b"k:\n" for i in range(1, 200)), "nested more than 64"),
])
def test_bad_yaml_files_are_clear_errors(tmp_path, data, message):
    path = tmp_path / "agent.yaml"
    path.write_bytes(data)
    with pytest.raises(ConfigError, match=message) as error:
        load_config(path, AgentConfig)
    assert str(error.value).startswith("agent.yaml")


def test_value_beyond_float32_is_refused_not_made_infinite(tmp_path):
    path = tmp_path / "big.csv"
    path.write_text("timestamp,cpu\n2024-01-01T00:00:00Z,1\n2024-01-01T00:00:05Z,1e39\n")
    with pytest.raises(SeriesFormatError, match="out of range") as error:
        read_series(path)
    assert "line 3" in str(error.value)
