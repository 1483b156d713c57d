"""Real fault injection on this machine (`vmad inject`) and the labelled-interval file.

Each fault really happens, within caps so a test or demo cannot take the host down:
- memory-leak: allocates and touches memory in steps up to `intensity` x the cap
  (`max_memory_share` of total RAM, and never more than what is available minus 10 %);
- cpu-hog: `intensity` x CPU count busy-looping processes;
- disk-write: writes and fsyncs a temporary file at about `intensity` x 50 MB/s, never
  more than `max_disk_share` of free disk or `max_disk_bytes`; the file is removed;
- net-flood: UDP datagrams over loopback at about `intensity` x 50 MB/s.

When it ends (normally or by Ctrl-C) the interval it covered is appended to the labels
file as one JSON line, which the agent reads and ships to the trainer as ground truth.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import tempfile
import time
import uuid
from pathlib import Path

__all__ = ["FAULTS", "append_label", "inject"]

FAULTS = ("memory-leak", "cpu-hog", "disk-write", "net-flood")
_RATE_MB_S = 50.0


def append_label(path: str | Path, start: float, end: float, anomalous: bool, kind: str,
                 source: str, vm_id: str | None = None) -> dict:
    """Append one labelled interval as a JSON line (a single write, so readers never see
    half a line from us)."""
    item = {"id": uuid.uuid4().hex, "start": start, "end": end, "anomalous": anomalous,
            "kind": kind, "source": source}
    if vm_id:
        item["vm_id"] = vm_id
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, (json.dumps(item) + "\n").encode())
    finally:
        os.close(fd)
    return item


def _spin(until: float) -> None:
    x = 0
    while time.time() < until:
        x = (x * 1103515245 + 12345) & 0xFFFFFFFF


def _memory_leak(duration: float, intensity: float, max_share: float) -> int:
    import psutil

    memory = psutil.virtual_memory()
    cap = min(max_share * memory.total, max(memory.available - 0.1 * memory.total, 0))
    target = int(cap * intensity)
    steps = max(int(duration), 1)
    chunks: list[bytearray] = []
    held = 0
    start = time.time()
    for step in range(steps):
        want = target * (step + 1) // steps
        if want > held:
            chunk = bytearray(want - held)
            # Touch every page so the memory is resident, not just reserved.
            for i in range(0, len(chunk), 4096):
                chunk[i] = 1
            chunks.append(chunk)
            held = want
        time.sleep(max(0.0, start + (step + 1) * duration / steps - time.time()))
    del chunks
    return held


def _cpu_hog(duration: float, intensity: float) -> int:
    count = max(1, round((os.cpu_count() or 1) * intensity))
    until = time.time() + duration
    processes = [multiprocessing.Process(target=_spin, args=(until,), daemon=True)
                 for _ in range(count)]
    for process in processes:
        process.start()
    for process in processes:
        process.join()
    return count


def _disk_write(duration: float, intensity: float, max_share: float, max_bytes: int,
                directory: str | None) -> int:
    import shutil

    directory = directory or tempfile.gettempdir()
    cap = min(int(shutil.disk_usage(directory).free * max_share), max_bytes)
    rate = _RATE_MB_S * intensity * 1e6
    block = b"\xa5" * (1 << 20)
    written = 0
    start = time.time()
    fd, name = tempfile.mkstemp(prefix="vmad-inject-", dir=directory)
    try:
        while time.time() - start < duration:
            if written + len(block) > cap:  # stay under the cap: rewrite from the start
                os.lseek(fd, 0, os.SEEK_SET)
            else:
                written += len(block)
            os.write(fd, block)
            os.fsync(fd)
            ahead = written / rate - (time.time() - start)
            if ahead > 0:
                time.sleep(min(ahead, 0.5))
    finally:
        os.close(fd)
        os.unlink(name)
    return written


def _net_flood(duration: float, intensity: float) -> int:
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.setblocking(False)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    payload = b"\x00" * 60_000
    rate = _RATE_MB_S * intensity * 1e6
    sent = 0
    start = time.time()
    try:
        while time.time() - start < duration:
            sender.sendto(payload, receiver.getsockname())
            sent += len(payload)
            try:
                while True:
                    receiver.recv(65536)
            except BlockingIOError:
                pass
            ahead = sent / rate - (time.time() - start)
            if ahead > 0:
                time.sleep(min(ahead, 0.5))
    finally:
        sender.close()
        receiver.close()
    return sent


def inject(fault: str, duration: float, intensity: float, labels_file: str | Path,
           max_memory_share: float = 0.25, max_disk_share: float = 0.10,
           max_disk_bytes: int = 2 * 1024**3, vm_id: str | None = None,
           directory: str | None = None) -> dict:
    """Cause `fault` for `duration` seconds, then record its interval; returns the label."""
    if fault not in FAULTS:
        raise ValueError(f"unknown fault {fault!r}; one of {', '.join(FAULTS)}")
    if not 0 < intensity <= 1:
        raise ValueError(f"intensity must lie in (0, 1], got {intensity}")
    if duration <= 0:
        raise ValueError(f"duration must be positive, got {duration}")
    start = time.time()
    try:
        if fault == "memory-leak":
            amount = _memory_leak(duration, intensity, max_memory_share)
        elif fault == "cpu-hog":
            amount = _cpu_hog(duration, intensity)
        elif fault == "disk-write":
            amount = _disk_write(duration, intensity, max_disk_share, max_disk_bytes, directory)
        else:
            amount = _net_flood(duration, intensity)
    finally:
        label = append_label(labels_file, start, time.time(), True, fault, "injection", vm_id)
    label["amount"] = amount
    return label
