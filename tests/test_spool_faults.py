"""The spool never stops detection: a full disk (a real, small tmpfs), a WAL kept inside
the bound, a corrupt spool moved aside, and a new spool that the trainer neither takes
for duplicates nor double-counts."""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import numpy as np
import pytest

from tests.agent_fixtures import tiny_bundle
from vmad.edge_agent.detector import BundleSlot
from vmad.edge_agent.sampler import METRICS
from vmad.edge_agent.spool import SPOOL_FULL, Spool
from vmad.schema import DEFAULT_METRICS, DEFAULT_WINDOW
from vmad.trainer.store import TelemetryStore


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 1 MiB tmpfs: a disk that really fills up. Needs root and mount rights."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_drops_counted_detection_goes_on_spooling_resumes(tmp_path, small_disk):
    from tests.test_agent import agent_config, fake_source
    from vmad.edge_agent.agent import Agent

    BundleSlot(tmp_path / "bundles", METRICS, DEFAULT_WINDOW).install(*tiny_bundle("v1"))
    config = agent_config(tmp_path, None, spool={"path": str(small_disk / "spool.db")})
    agent = Agent(config, source=fake_source())
    filler = small_disk / "filler"
    try:
        for _ in range(DEFAULT_WINDOW + 5):
            agent.tick()
        before = agent.spool.rows
        assert before > 0
        with open(filler, "wb", buffering=0) as handle:  # take every free byte
            try:
                while True:
                    handle.write(b"\0" * 65536)
            except OSError:
                pass
        verdicts = agent.metrics.verdicts.labels("normal")._value.get() + \
            agent.metrics.verdicts.labels("anomalous")._value.get()
        for _ in range(300):
            agent.tick()  # never raises
        after = agent.metrics.verdicts.labels("normal")._value.get() + \
            agent.metrics.verdicts.labels("anomalous")._value.get()
        assert after - verdicts == 300  # detection went on
        assert agent.spool.drops["disk full"] > 0
        assert agent.metrics.registry.get_sample_value(
            "vmad_agent_spool_drops_total", {"reason": "disk full"}) > 0
        stuck = agent.spool.rows
        filler.unlink()  # space is back
        for _ in range(5):
            agent.tick()
        assert agent.spool.rows == stuck + 5  # spooling resumed by itself
        full = agent.spool.drops["disk full"]
        agent.tick()
        assert agent.spool.drops["disk full"] == full
    finally:
        agent.stop()


@pytest.mark.slow
def test_wal_stays_inside_max_bytes(tmp_path):
    limit = 256 * 1024
    spool = Spool(tmp_path / "s.db", max_bytes=limit, max_rows=100_000)
    rng = np.random.default_rng(0)
    worst = 0
    for seq in range(1, 2501):
        spool.append(seq, rng.bytes(60), rng.bytes(40))
        if seq % 500 == 0:
            spool.ack(seq - 250)  # the trainer acks most of it now and then
        worst = max(worst, spool.disk_bytes())
    assert worst <= limit, worst
    assert spool.bytes <= limit // 2
    spool.close()


def test_corrupt_spool_is_moved_aside_and_a_fresh_one_starts(tmp_path):
    path = tmp_path / "spool.db"
    old = Spool(path, 1 << 20, 1000)
    for seq in range(1, 11):
        old.append(seq, b"sample")
    old_id = old.spool_id
    old.close()
    with open(path, "r+b") as handle:  # scribble over the header and the first pages
        handle.write(os.urandom(8192))
    fresh = Spool(path, 1 << 20, 1000)
    assert fresh.rows == 0 and fresh.next_seq() == 1
    assert fresh.spool_id != old_id
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("spool.db.corrupt-")]
    assert moved, list(tmp_path.iterdir())
    assert fresh.append(1, b"sample")
    fresh.close()
    again = Spool(path, 1 << 20, 1000)  # and the fresh one is a good one
    assert (again.rows, again.spool_id) == (1, fresh.spool_id)


def _batch(first: int, n: int):
    seqs = np.arange(first, first + n)
    return seqs, 1e9 + seqs * 5.0, np.ones((n, 4), np.float32)


def test_new_spool_is_a_new_seq_space_at_the_trainer(tmp_path):
    store = TelemetryStore(tmp_path / "t.sqlite")
    a, b = uuid.uuid4().hex[:16], uuid.uuid4().hex[:16]
    r = store.ingest("vm", DEFAULT_METRICS, *_batch(1, 100), spool_id=a)
    assert (r.stored, r.acked) == (100, 100)
    # The operator deleted the spool: seqs restart at 1 under a new id.
    r = store.ingest("vm", DEFAULT_METRICS, *_batch(1, 50), spool_id=b)
    assert (r.stored, r.duplicates, r.lost, r.acked) == (50, 0, 0, 50)
    r = store.ingest("vm", DEFAULT_METRICS, *_batch(41, 20), spool_id=b)  # a replay
    assert (r.stored, r.duplicates, r.acked) == (10, 10, 60)
    counters = store.counters("vm")
    assert (counters.received, counters.duplicates, counters.lost) == (160, 10, 0)
    assert store.recent("vm").seqs.tolist() == list(range(1, 161))  # one seq space
    # A new spool whose first 7 samples were dropped before it ever reached the trainer.
    r = store.ingest("vm-new", DEFAULT_METRICS, *_batch(8, 5), spool_id=a)
    assert (r.stored, r.lost, r.acked) == (5, 7, 12)
    # An agent that names the spool it always had (an upgrade) keeps its seqs.
    store.ingest("vm-old", DEFAULT_METRICS, *_batch(1, 10))
    r = store.ingest("vm-old", DEFAULT_METRICS, *_batch(11, 10), spool_id=b)
    assert (r.stored, r.lost, r.acked) == (10, 0, 20)
    store.close()


def test_spool_counts_its_bound_drops_by_reason(tmp_path):
    spool = Spool(tmp_path / "s.db", max_bytes=1 << 20, max_rows=10)
    for seq in range(1, 16):
        assert spool.append(seq, b"x")
    assert spool.drops[SPOOL_FULL] == 5 == spool.dropped
