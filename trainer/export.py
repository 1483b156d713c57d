"""Export a trainer checkpoint to an agent bundle (ONNX + metadata, see vmad/bundle.py).

The exported graph includes normalization-free inference only: the agent normalizes
with the statistics in the bundle metadata, then the graph returns sigmoid(logit), the
anomaly probability per window. Export goes through ONNX Runtime's own loader before
it is returned, so a bundle that leaves this module has passed the agent's checks.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import torch
from torch import nn

from vmad.bundle import Bundle, BundleMetadata, sha256_hex
from vmad.trainer.checkpoint import Checkpoint

__all__ = ["export_bundle", "onnx_bytes"]

ONNX_OPSET = 17


class _Probability(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.model(windows))


def onnx_bytes(model: nn.Module, n_metrics: int, window: int) -> bytes:
    """Serialize `model` (logits) as ONNX: `windows[batch, M, T]` -> `probability[batch]`."""
    model.eval()
    example = torch.zeros(2, n_metrics, window)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _Probability(model), (example,), buffer,
            input_names=["windows"], output_names=["probability"],
            dynamic_axes={"windows": {0: "batch"}, "probability": {0: "batch"}},
            opset_version=ONNX_OPSET, dynamo=False,
        )
    return buffer.getvalue()


def export_bundle(checkpoint: Checkpoint, version: str, folder: str | Path | None = None) -> Bundle:
    """Export `checkpoint` as a verified bundle named `version`; saved to `folder` if given."""
    data = onnx_bytes(checkpoint.model, len(checkpoint.metrics), checkpoint.window)
    metadata = BundleMetadata(
        version=version,
        model_kind=checkpoint.kind,
        metrics=checkpoint.metrics,
        window=checkpoint.window,
        normalization=checkpoint.normalizer,
        threshold=float(checkpoint.threshold),
        onnx_sha256=sha256_hex(data),
        provenance=dict(checkpoint.provenance),
    )
    bundle = Bundle.from_parts(metadata.to_json(), data)
    if folder is not None:
        bundle.save(folder)
    return bundle
