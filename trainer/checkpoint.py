"""Trainer-side checkpoints: PyTorch weights plus the facts needed to rebuild and export
the model. A checkpoint is a folder with `weights.pt` (a state_dict, loaded with
`weights_only=True`, so nothing is unpickled beyond tensors) and `checkpoint.json`.

Checkpoints stay on the trainer; agents receive ONNX bundles (trainer/export.py).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vmad.errors import InputError
from vmad.trainer.models import build_model
from vmad.windows import Normalizer

__all__ = [
    "DEFAULT_CHECKPOINT_DIR", "Checkpoint", "CheckpointError", "load_checkpoint",
    "load_default_checkpoint", "save_checkpoint",
]

FORMAT_VERSION = 1
WEIGHTS_FILE = "weights.pt"
META_FILE = "checkpoint.json"
DEFAULT_CHECKPOINT_DIR = Path(__file__).resolve().parent / "default_checkpoint"


class CheckpointError(InputError):
    """A checkpoint that is missing, corrupt, or does not fit its own description."""


@dataclass
class Checkpoint:
    model: nn.Module
    kind: str
    metrics: tuple[str, ...]
    window: int
    normalizer: Normalizer
    threshold: float = 0.5
    provenance: dict[str, Any] = field(default_factory=dict)


def save_checkpoint(folder: str | Path, checkpoint: Checkpoint) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(checkpoint.model.state_dict(), buffer)
    weights = buffer.getvalue()
    meta = {
        "format_version": FORMAT_VERSION,
        "kind": checkpoint.kind,
        "metrics": list(checkpoint.metrics),
        "window": checkpoint.window,
        "normalization": checkpoint.normalizer.to_dict(),
        "threshold": checkpoint.threshold,
        "provenance": checkpoint.provenance,
        "weights_sha256": hashlib.sha256(weights).hexdigest(),
    }
    # Weights first, metadata last: a reader that finds the metadata finds its weights.
    _write_atomic(folder / WEIGHTS_FILE, weights)
    _write_atomic(folder / META_FILE, (json.dumps(meta, indent=2) + "\n").encode())
    return folder


def load_checkpoint(folder: str | Path) -> Checkpoint:
    folder = Path(folder)
    try:
        meta = json.loads((folder / META_FILE).read_text())
        weights = (folder / WEIGHTS_FILE).read_bytes()
    except FileNotFoundError as error:
        raise CheckpointError(f"checkpoint file missing: {error.filename}") from None
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{folder / META_FILE} is not valid JSON: {error}") from None
    if meta.get("format_version") != FORMAT_VERSION:
        version = meta.get("format_version")
        raise CheckpointError(f"{folder}: unsupported format_version {version!r}")
    if hashlib.sha256(weights).hexdigest() != meta.get("weights_sha256"):
        raise CheckpointError(f"{folder / WEIGHTS_FILE}: checksum does not match checkpoint.json")
    try:
        metrics = tuple(meta["metrics"])
        model = build_model(meta["kind"], len(metrics), int(meta["window"]))
        state = torch.load(io.BytesIO(weights), weights_only=True, map_location="cpu")
        model.load_state_dict(state)
        normalizer = Normalizer.from_dict(meta["normalization"])
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{folder}: cannot rebuild the model: {error}") from None
    model.eval()
    return Checkpoint(model, meta["kind"], metrics, int(meta["window"]), normalizer,
                      float(meta.get("threshold", 0.5)), dict(meta.get("provenance") or {}))


def load_default_checkpoint() -> Checkpoint:
    """The pretrained Zoom-CNN for the default metrics, shipped inside the package."""
    return load_checkpoint(DEFAULT_CHECKPOINT_DIR)


def _write_atomic(path: Path, data: bytes) -> None:
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_bytes(data)
    os.replace(staging, path)
