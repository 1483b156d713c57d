"""The shared CSV format: round trip, named errors for bad files, the forward-fill repair."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmad.series import (
    Series,
    SeriesFormatError,
    list_series_folders,
    read_series,
    read_series_folder,
    write_series,
)
from vmad.synthetic import generate_vm


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_round_trip_gzip(tmp_path: Path) -> None:
    series, _ = generate_vm(3, 500)
    write_series(tmp_path / "s.csv.gz", series)
    back = read_series(tmp_path / "s.csv.gz")
    assert back.metrics == series.metrics
    np.testing.assert_array_equal(back.timestamps, series.timestamps)
    np.testing.assert_allclose(back.values, series.values, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(back.labels, series.labels)


def test_iso_and_epoch_timestamps(tmp_path: Path) -> None:
    iso = read_series(write(tmp_path / "a.csv", "timestamp,x\n2024-01-17T10:54:00Z,1\n"
                                                 "2024-01-17 10:55:00,2\n"))
    assert iso.timestamps.tolist() == [1705488840, 1705488900]
    epoch = read_series(write(tmp_path / "b.csv", "timestamp,x,label\n10,1,0\n20,2,1\n"))
    assert epoch.timestamps.tolist() == [10, 20] and epoch.labels.tolist() == [0, 1]


@pytest.mark.parametrize(
    ("text", "line", "column", "words"),
    [
        ("timestamp,x\n1,2\n2,abc\n", 3, "x", "not a number"),
        ("timestamp,x\n1,2\n1,3\n", 3, "timestamp", "duplicate"),
        ("timestamp,x\n2,2\n1,3\n", 3, "timestamp", "out-of-order"),
        ("timestamp,x\n1,2\n2\n", 3, None, "cells"),
        ("timestamp,x,label\n1,2,0\n2,3,7\n", 3, "label", "0 or 1"),
        ("timestamp,x\n1,\n2,3\n", 2, "x", "first value"),
        ("timestamp,x\n1,1\n2,\n3,nan\n4,\n5,\n6,1\n", 3, "x", "missing values in a row"),
        ("timestamp,x\n1,1\n2,-4\n", 3, "x", "negative"),
        ("timestamp,x\n1,1\nnoon,2\n", 3, "timestamp", "ISO-8601"),
        ("time,x\n1,1\n", 1, "time", "timestamp"),
        ("", 1, None, "empty"),
        ("timestamp,x\n", 2, None, "no data rows"),
    ],
)
def test_bad_files_name_line_and_column(tmp_path: Path, text: str, line: int,
                                        column: str | None, words: str) -> None:
    path = write(tmp_path / "bad.csv", text)
    with pytest.raises(SeriesFormatError) as caught:
        read_series(path)
    error = caught.value
    assert error.path == str(path) and error.line == line and error.column == column
    assert words in str(error) and str(path) in str(error)


def test_short_gaps_are_forward_filled(tmp_path: Path) -> None:
    path = write(tmp_path / "gap.csv", "timestamp,x,y\n1,1,5\n2,,6\n3,nan,7\n4,4,\n")
    series = read_series(path)
    assert series.values[:, 0].tolist() == [1, 1, 1, 4]
    assert series.values[:, 1].tolist() == [5, 6, 7, 7]
    with pytest.raises(SeriesFormatError, match="forward-filled"):
        read_series(path, max_fill=1)


def test_missing_required_metric(tmp_path: Path) -> None:
    path = write(tmp_path / "m.csv", "timestamp,cpu_percent\n1,1\n")
    with pytest.raises(SeriesFormatError, match="memory_percent"):
        read_series(path, required_metrics=["cpu_percent", "memory_percent"])


def test_corrupt_gzip(tmp_path: Path) -> None:
    path = tmp_path / "c.csv.gz"
    path.write_bytes(gzip.compress(b"timestamp,x\n1,2\n")[:12])
    with pytest.raises(SeriesFormatError, match="cannot read"):
        read_series(path)


def test_series_select_and_slice() -> None:
    series, _ = generate_vm(1, 100)
    part = series.select(["net_mb_s", "cpu_percent"]).slice(10, 20)
    assert part.metrics == ("net_mb_s", "cpu_percent") and len(part) == 10
    np.testing.assert_array_equal(part.values[:, 1], series.values[10:20, 0])
    with pytest.raises(ValueError, match="lacks metrics"):
        series.select(["gpu"])
    with pytest.raises(ValueError, match="shape"):
        Series("bad", np.arange(3), np.zeros((3, 2), np.float32), ("a",))


def test_folders(tmp_path: Path) -> None:
    for name in ("vm-b", "vm-a"):
        folder = tmp_path / name
        folder.mkdir()
        series, _ = generate_vm(len(name), 200)
        write_series(folder / "test.csv.gz", series)
        write_series(folder / "train.csv", series.__class__(
            series.name, series.timestamps, series.values, series.metrics))
    (tmp_path / "not-a-series").mkdir()
    folders = list_series_folders(tmp_path)
    assert [f.name for f in folders] == ["vm-a", "vm-b"]
    train, test = read_series_folder(folders[0])
    assert train.name == test.name == "vm-a" and train.labels is None and test.labels is not None


def test_smd_machine_reads(shared_datasets: Path) -> None:
    train, test = read_series_folder(shared_datasets / "smd" / "machine-1-2")
    assert len(train.metrics) == 38 and test.labels is not None
    assert 0 < test.labels.mean() < 0.2


cell = st.one_of(st.text(alphabet="0123456789.-e,naZT: \"\n", max_size=8),
                 st.floats(allow_nan=True).map(str))


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.lists(cell, min_size=1, max_size=4), max_size=6),
       header=st.sampled_from(["timestamp,x", "timestamp,x,label", "timestamp,x,y", "x,y", ""]))
def test_arbitrary_text_reads_or_fails_with_a_named_error(tmp_path: Path, rows: list[list[str]],
                                                         header: str) -> None:
    path = tmp_path / "fuzz.csv"
    path.write_text("\n".join([header, *(",".join(r) for r in rows)]) + "\n")
    try:
        series = read_series(path)
    except SeriesFormatError as error:
        assert str(path) in str(error)
        return
    assert np.isfinite(series.values).all() and (series.values >= 0).all()
    assert (np.diff(series.timestamps) > 0).all()
