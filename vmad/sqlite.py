"""The one way vmad opens a SQLite file and runs a write transaction.

Used by the agent's spool, the trainer's store and the controller's registry: each keeps
one connection shared by its threads, serialized by a lock, in WAL mode, and writes in
explicit transactions (autocommit mode, `isolation_level=None`, so Python never opens
one behind our back).
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

__all__ = ["connect", "transaction"]


def connect(path: str | Path, synchronous: str = "NORMAL") -> sqlite3.Connection:
    """A connection for use from several threads (the caller serializes with a lock).

    WAL with synchronous=NORMAL survives the process being killed; FULL also survives a
    power cut, at an fsync per commit.
    """
    if synchronous not in ("NORMAL", "FULL"):
        raise ValueError(f"synchronous must be NORMAL or FULL, not {synchronous!r}")
    db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA synchronous={synchronous}")
    return db


@contextlib.contextmanager
def transaction(db: sqlite3.Connection, lock: threading.Lock | threading.RLock | None,
                mode: str = "IMMEDIATE") -> Iterator[sqlite3.Connection]:
    """Hold `lock` (None: the caller holds it already), run the block in one
    transaction; commit, or roll back on any error.

    IMMEDIATE takes the write lock at BEGIN, so a transaction never fails half-way for
    want of it. A failed rollback (disk full can fail it too) never hides the error that
    caused it: SQLite has already rolled back in that case.
    """
    with lock if lock is not None else contextlib.nullcontext():
        db.execute(f"BEGIN {mode}")
        try:
            yield db
        except BaseException:
            if db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
            raise
        try:
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
            raise
