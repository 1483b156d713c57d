"""The agent's bounded on-disk queue of telemetry not yet acknowledged by the trainer.

SQLite in WAL mode (one file, crash-safe, survives restarts). Each row is one sample,
keyed by its sequence number, with the serialized `Sample` and, when the window ending
there was scored, the serialized `Verdict`. Label intervals wait in their own table.

Bound: `max_rows` samples and `max_bytes` of stored payload. When an append would
exceed either, the oldest samples are deleted first and counted in `dropped` (persisted,
exported as `vmad_agent_spool_dropped_total`): detection never stops because the
trainer is away; the oldest telemetry is what goes.

Sequence numbers come from here (`next_seq` persisted), so they keep growing across
agent restarts and (vm_id, seq) stays unique for the receiver's de-duplication.
`ack(seq)` deletes every sample with a sequence <= seq.
"""

from __future__ import annotations

import threading
from pathlib import Path

from vmad import sqlite as vmad_sqlite

__all__ = ["Spool"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS samples (seq INTEGER PRIMARY KEY, sample BLOB NOT NULL,
                                    verdict BLOB);
CREATE TABLE IF NOT EXISTS labels (id TEXT PRIMARY KEY, payload BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


class Spool:
    def __init__(self, path: str | Path, max_bytes: int, max_rows: int) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.max_rows = max_rows
        self._lock = threading.Lock()
        # One connection shared by the agent's threads, serialized by the lock.
        self._db = vmad_sqlite.connect(self.path)
        self._db.executescript(_SCHEMA)
        rows, size = self._db.execute(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(sample) + COALESCE(LENGTH(verdict), 0)), 0)"
            " FROM samples").fetchone()
        self._rows, self._bytes = int(rows), int(size)
        self._next_seq = max(self._meta("next_seq", 1), self._max_seq() + 1)
        self.dropped = self._meta("dropped", 0)

    def _meta(self, key: str, default: int) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return int(row[0]) if row else default

    def _set_meta(self, key: str, value: int) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def _max_seq(self) -> int:
        return int(self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM samples").fetchone()[0])

    def next_seq(self) -> int:
        """Reserve the next sequence number (persisted with the next append)."""
        with self._lock:
            return self._next_seq

    def append(self, seq: int, sample: bytes, verdict: bytes | None = None) -> None:
        size = len(sample) + (len(verdict) if verdict else 0)
        with vmad_sqlite.transaction(self._db, self._lock):
            self._db.execute("INSERT INTO samples (seq, sample, verdict) VALUES (?, ?, ?)",
                             (seq, sample, verdict))
            self._rows += 1
            self._bytes += size
            self._next_seq = max(self._next_seq, seq + 1)
            self._set_meta("next_seq", self._next_seq)
            self._enforce_bound()

    def _enforce_bound(self) -> None:
        while self._rows > self.max_rows or (self._bytes > self.max_bytes and self._rows > 1):
            over_rows = max(self._rows - self.max_rows, 1)
            # Drop in chunks: one statement per chunk, not per row, when far over.
            victims = self._db.execute(
                "SELECT seq, LENGTH(sample) + COALESCE(LENGTH(verdict), 0) FROM samples"
                " ORDER BY seq LIMIT ?", (min(over_rows, 1000),)).fetchall()
            if self._rows <= self.max_rows:  # over in bytes only: drop until under
                victims, freed = [], 0
                for seq, size in self._db.execute(
                        "SELECT seq, LENGTH(sample) + COALESCE(LENGTH(verdict), 0)"
                        " FROM samples ORDER BY seq LIMIT 1000"):
                    if self._bytes - freed <= self.max_bytes or len(victims) == self._rows - 1:
                        break
                    victims.append((seq, size))
                    freed += size
            if not victims:
                break
            last = victims[-1][0]
            self._db.execute("DELETE FROM samples WHERE seq <= ?", (last,))
            self._rows -= len(victims)
            self._bytes -= sum(size for _, size in victims)
            self.dropped += len(victims)
        self._set_meta("dropped", self.dropped)

    def pending(self, after_seq: int, limit: int) -> list[tuple[int, bytes, bytes | None]]:
        """Up to `limit` spooled samples with seq > after_seq, oldest first."""
        with self._lock:
            return self._db.execute(
                "SELECT seq, sample, verdict FROM samples WHERE seq > ? ORDER BY seq LIMIT ?",
                (after_seq, limit)).fetchall()

    def first_seq(self) -> int:
        """Oldest seq still held (next_seq when empty)."""
        with self._lock:
            row = self._db.execute("SELECT MIN(seq) FROM samples").fetchone()
            return int(row[0]) if row[0] is not None else self._next_seq

    def ack(self, seq: int) -> int:
        """Forget every sample with seq <= `seq`; returns how many went."""
        with self._lock:
            row = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(LENGTH(sample) + COALESCE(LENGTH(verdict), 0)),"
                " 0) FROM samples WHERE seq <= ?", (seq,)).fetchone()
            self._db.execute("DELETE FROM samples WHERE seq <= ?", (seq,))
            self._rows -= int(row[0])
            self._bytes -= int(row[1])
            return int(row[0])

    def add_label(self, label_id: str, payload: bytes) -> None:
        with self._lock:
            self._db.execute("INSERT OR IGNORE INTO labels (id, payload) VALUES (?, ?)",
                             (label_id, payload))

    def labels(self) -> list[tuple[str, bytes]]:
        with self._lock:
            return self._db.execute("SELECT id, payload FROM labels ORDER BY id").fetchall()

    def remove_labels(self, ids: list[str]) -> None:
        with self._lock:
            self._db.executemany("DELETE FROM labels WHERE id = ?", [(i,) for i in ids])

    def get_meta(self, key: str, default: int = 0) -> int:
        with self._lock:
            return self._meta(key, default)

    def set_meta(self, key: str, value: int) -> None:
        with self._lock:
            self._set_meta(key, value)

    @property
    def rows(self) -> int:
        return self._rows

    @property
    def bytes(self) -> int:
        return self._bytes

    def close(self) -> None:
        with self._lock:
            self._db.close()
