"""Export a trainer checkpoint to an agent bundle (ONNX + metadata, see vmad/bundle.py).

The agent normalizes with the statistics in the bundle metadata; the graph then returns
two outputs per window: the fused anomaly score in [0, 1] (the network's logit, the
newest sample's per-metric deviation, its distance from the VM's principal subspace and
its distance from the nearest of the VM's usual states, combined as
trainer/adaptation.py says) and
each metric's contribution `[batch, M]`, which names the metrics to blame (what changed
within the window, trainer/attribution.py; it does not enter the score). Without a
VM adaptation the score is the network's probability alone and the bundle is marked
`warmup` (pooled statistics: the agent raises no alarm on it). Export goes through ONNX
Runtime's own loader before it is returned, so a bundle that leaves this module has
passed the agent's checks.
"""

from __future__ import annotations

import io
import threading
import warnings
from pathlib import Path

import torch
from torch import nn

from vmad.bundle import Bundle, BundleMetadata, sha256_hex
from vmad.trainer.adaptation import Fusion, VMAdaptation
from vmad.trainer.attribution import AttributionModel, WindowAttribution
from vmad.trainer.checkpoint import Checkpoint
from vmad.trainer.residual import ResidualModel
from vmad.trainer.states import NormalStates

__all__ = ["export_bundle", "onnx_bytes"]

ONNX_OPSET = 17
_EXPORT_LOCK = threading.Lock()


class _Deviation(nn.Module):
    """`ResidualModel.score_samples` of the newest samples `[B, M]` -> `[B]`."""

    def __init__(self, residual: ResidualModel) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(residual.mean, dtype=torch.float32))
        self.register_buffer("components",
                             torch.tensor(residual.components, dtype=torch.float32))
        self.register_buffer("spread", torch.tensor(residual.spread, dtype=torch.float32))
        self.use_components = residual.components.shape[0] > 0
        self.norm = residual.norm

    def forward(self, newest: torch.Tensor) -> torch.Tensor:
        centred = newest - self.mean
        if self.use_components:
            centred = centred - (centred @ self.components.T) @ self.components
        contributions = centred.abs() / self.spread
        if self.norm == "l2":
            return torch.sqrt(torch.sum(contributions * contributions, dim=1))
        return contributions.max(dim=1).values


class _StateDistance(nn.Module):
    """`NormalStates.score_samples` of the newest samples `[B, M]` -> `[B]`."""

    def __init__(self, states: NormalStates) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(states.mean, dtype=torch.float32))
        self.register_buffer("spread", torch.tensor(states.spread, dtype=torch.float32))
        self.register_buffer("centres", torch.tensor(states.centres, dtype=torch.float32))

    def forward(self, newest: torch.Tensor) -> torch.Tensor:
        units = (newest - self.mean) / self.spread
        offsets = (units.unsqueeze(1) - self.centres.unsqueeze(0)).abs()  # [B, P, M]
        return offsets.amax(dim=2).amin(dim=1)


class _FusedScore(nn.Module):
    """`windows[B, M, T]` -> (`score[B]`, `contributions[B, M]`)."""

    def __init__(self, model: nn.Module, residual: ResidualModel, fusion: Fusion,
                 attribution: WindowAttribution, subspace: ResidualModel | None,
                 states: NormalStates | None) -> None:
        super().__init__()
        self.model = model
        self.attribution = attribution
        self.deviation = _Deviation(residual)
        self.distance = _Deviation(subspace) if subspace is not None else None
        self.state = _StateDistance(states) if states is not None else None
        self.fusion = fusion

    def forward(self, windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.fusion
        newest = windows[:, :, -1]
        unsupervised = (1.0 - f.sub_share - f.state_share) * \
            (torch.log1p(self.deviation(newest)) - f.dev_center) / f.dev_scale
        if self.distance is not None:
            unsupervised = unsupervised + f.sub_share * \
                (torch.log1p(self.distance(newest)) - f.sub_center) / f.sub_scale
        if self.state is not None:
            unsupervised = unsupervised + f.state_share * \
                (torch.log1p(self.state(newest)) - f.state_center) / f.state_scale
        z = torch.zeros_like(unsupervised)
        # Decided when the graph is traced: a VM whose weight is 0 gets a graph without
        # the network, and its agent does not pay for running it.
        if f.cnn_weight > 0.0:
            z = f.cnn_weight * (self.model(windows) - f.cnn_center) / f.cnn_scale
        if f.cnn_weight < 1.0:
            z = z + (1.0 - f.cnn_weight) * unsupervised
        # The score's per-metric deviation is not what names the metric to blame.
        return torch.sigmoid(z - f.offset), self.attribution(windows)


def onnx_bytes(model: nn.Module, n_metrics: int, window: int,
               adaptation: VMAdaptation | None = None) -> bytes:
    """Serialize `model` (logits) fused with `adaptation`'s per-metric score as ONNX:
    `windows[batch, M, T]` -> `score[batch]`, `contributions[batch, M]`."""
    model.eval()
    residual = adaptation.residual if adaptation else ResidualModel.identity(n_metrics)
    fusion = adaptation.fusion if adaptation else Fusion()
    attribution = adaptation.attribution if adaptation and adaptation.attribution \
        else AttributionModel.identity(n_metrics)
    example = torch.zeros(2, n_metrics, window)
    buffer = io.BytesIO()
    # torch.onnx.export keeps global state: two exports at once (the worker adapting one
    # VM while a bundle watch exports another's bundle) fail its assertions.
    with _EXPORT_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _FusedScore(model, residual, fusion, WindowAttribution(attribution, window),
                        adaptation.subspace if adaptation else None,
                        adaptation.states if adaptation else None),
            (example,), buffer,
            input_names=["windows"], output_names=["score", "contributions"],
            dynamic_axes={"windows": {0: "batch"}, "score": {0: "batch"},
                          "contributions": {0: "batch"}},
            opset_version=ONNX_OPSET, dynamo=False,
        )
    return buffer.getvalue()


def export_bundle(checkpoint: Checkpoint, version: str, folder: str | Path | None = None,
                  adaptation: VMAdaptation | None = None,
                  warmup: bool | None = None, alarm_after: int = 1) -> Bundle:
    """Export `checkpoint` as a verified bundle named `version`, adapted to one VM when
    `adaptation` is given (its normalizer, per-metric score, fusion and threshold);
    saved to `folder` if given. `warmup` (default: no adaptation given) marks a bundle
    whose statistics are not the VM's own: agents raise no alarm on it. Agents raise an
    alarm once `alarm_after` windows in a row reach the threshold."""
    data = onnx_bytes(checkpoint.model, len(checkpoint.metrics), checkpoint.window, adaptation)
    provenance = dict(checkpoint.provenance)
    if adaptation is not None:
        provenance["adaptation"] = {
            "fusion": adaptation.fusion.to_dict(), "deviation": adaptation.describe(),
            "samples_fitted": adaptation.samples_fitted,
            "fitted_at": adaptation.fitted_at, "generation": adaptation.generation}
    metadata = BundleMetadata(
        version=version,
        model_kind=checkpoint.kind,
        metrics=checkpoint.metrics,
        window=checkpoint.window,
        normalization=adaptation.normalizer if adaptation else checkpoint.normalizer,
        threshold=float(adaptation.threshold if adaptation else checkpoint.threshold),
        onnx_sha256=sha256_hex(data),
        provenance=provenance,
        warmup=adaptation is None if warmup is None else warmup,
        alarm_after=alarm_after,
    )
    bundle = Bundle.from_parts(metadata.to_json(), data)
    if folder is not None:
        bundle.save(folder)
    return bundle
