"""The Zoom-CNN detector and the baselines it is compared against.

Every model maps normalized windows `float32[B, M, T]` (B windows, M metrics, T samples)
to one anomaly logit per window `float32[B]`; a window is anomalous when
sigmoid(logit) >= threshold (0.5 unless a threshold was picked on labelled data).

Zoom-CNN follows Jiang, "AI-based adaptive anomaly detection for IaaS cloud VMs"
(J. Eng. Appl. Sci., 2024), with the gaps the paper leaves filled as DESIGN.md says:
a zoom layer of parallel 1-D convolutions (one branch per kernel size, stride equal to
the kernel by default) applied to every metric with shared weights, branch outputs
concatenated along time into a [channels, M, L] image, two 3x3 convolutions + ReLU,
a 2x2 max-pool, and fully connected layers down to one logit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

__all__ = ["MLP", "MODEL_BUILDERS", "MODEL_KINDS", "NetworkColumns", "PlainCNN", "ZoomCNN",
           "build_model", "early_layers"]

# Kernel sizes of the paper's zoom layer that divide the default window of 64 samples.
DEFAULT_ZOOM_KERNELS: tuple[int, ...] = (2, 4, 8, 16)
MODEL_KINDS: tuple[str, ...] = ("zoom-cnn", "cnn", "mlp", "zoom-2", "zoom-4")
# Models see normalized values within +-INPUT_CLAMP: the range they were trained on.
# Normalizers clip much wider, so the per-metric score still sees how far off a metric is.
INPUT_CLAMP = 10.0


class ZoomLayer(nn.Module):
    """Multi-scale 1-D convolutions over time, shared across metrics.

    Input `[B, M, T]`; output `[B, C, M, L]` with C = `channels` and
    L = sum over branches of floor((T - k) / s) + 1 for kernel k and stride s.
    """

    def __init__(
        self, window: int, kernels: Sequence[int], channels: int,
        strides: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        strides = tuple(strides) if strides is not None else tuple(kernels)
        if len(strides) != len(kernels):
            raise ValueError("zoom kernels and strides must have the same length")
        if any(k > window for k in kernels):
            raise ValueError(f"zoom kernels {tuple(kernels)} must not exceed the window {window}")
        self.branches = nn.ModuleList(
            nn.Conv1d(1, channels, kernel_size=k, stride=s)
            for k, s in zip(kernels, strides, strict=True)
        )
        self.channels = channels
        self.length = sum((window - k) // s + 1 for k, s in zip(kernels, strides, strict=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, metrics, time = x.shape
        flat = x.reshape(batch * metrics, 1, time)
        zoomed = torch.cat([branch(flat) for branch in self.branches], dim=2)  # [B*M, C, L]
        return zoomed.reshape(batch, metrics, self.channels, self.length).permute(0, 2, 1, 3)


class CorrelationBlock(nn.Module):
    """Two 3x3 convolutions (stride 1, padding 1) with ReLU, then a 2x2 max-pool.

    `[B, C_in, H, W]` -> `[B, C_out, ceil(H/2), ceil(W/2)]`; ceil so one metric still works.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, stride=1, padding=1),
            nn.ReLU(),
            nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2, ceil_mode=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def _classifier(in_features: int, hidden: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_features, hidden),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(hidden, 1),
    )


class ZoomCNN(nn.Module):
    """Zoom layer -> correlation block -> classifier. `[B, M, T]` -> logits `[B]`."""

    def __init__(
        self,
        n_metrics: int,
        window: int,
        kernels: Sequence[int] = DEFAULT_ZOOM_KERNELS,
        strides: Sequence[int] | None = None,
        zoom_channels: int = 8,
        conv_channels: int = 16,
        hidden: int = 64,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        self.zoom = ZoomLayer(window, kernels, zoom_channels, strides)
        self.correlation = CorrelationBlock(zoom_channels, conv_channels)
        pooled = -(-n_metrics // 2) * -(-self.zoom.length // 2)
        self.classifier = _classifier(conv_channels * pooled, hidden, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.clamp(-INPUT_CLAMP, INPUT_CLAMP)
        return self.classifier(self.correlation(self.zoom(x))).squeeze(1)


class PlainCNN(nn.Module):
    """The same correlation block straight on the `[1, M, T]` image: Zoom-CNN minus zoom."""

    def __init__(
        self, n_metrics: int, window: int, conv_channels: int = 16, hidden: int = 64,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        self.correlation = CorrelationBlock(1, conv_channels)
        pooled = -(-n_metrics // 2) * -(-window // 2)
        self.classifier = _classifier(conv_channels * pooled, hidden, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.clamp(-INPUT_CLAMP, INPUT_CLAMP)
        return self.classifier(self.correlation(x.unsqueeze(1))).squeeze(1)


class MLP(nn.Module):
    """Flattened window -> two hidden layers -> logit. `[B, M, T]` -> `[B]`."""

    def __init__(
        self, n_metrics: int, window: int, hidden: Sequence[int] = (128, 64), dropout: float = 0.2
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = n_metrics * window
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU(), nn.Dropout(dropout)]
            width = size
        layers.append(nn.Linear(width, 1))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x.clamp(-INPUT_CLAMP, INPUT_CLAMP)).squeeze(1)


def _zoom(n_metrics: int, window: int) -> nn.Module:
    return ZoomCNN(n_metrics, window, kernels=tuple(k for k in DEFAULT_ZOOM_KERNELS if k <= window))


# The registry of network kinds by name: benches, CLIs and checkpoints build from it.
MODEL_BUILDERS: dict[str, Callable[[int, int], nn.Module]] = {
    "zoom-cnn": _zoom,
    "cnn": PlainCNN,
    "mlp": MLP,
    "zoom-2": lambda m, t: ZoomCNN(m, t, kernels=(2,)),
    "zoom-4": lambda m, t: ZoomCNN(m, t, kernels=(4,)),
}
assert tuple(MODEL_BUILDERS) == MODEL_KINDS


def build_model(kind: str, n_metrics: int, window: int) -> nn.Module:
    """A fresh model of `kind` (one of MODEL_KINDS) for M = n_metrics, T = window."""
    builder = MODEL_BUILDERS.get(kind)
    if builder is None:
        raise ValueError(f"unknown model kind {kind!r}; choose from {', '.join(MODEL_KINDS)}")
    return builder(n_metrics, window)


class NetworkColumns(nn.Module):
    """A network over the first `n_metrics` metrics of wider windows `[B, M, T]`: a VM
    that reports more metrics than the network reads (its own after the network's); the
    VM's unsupervised parts read all of them (trainer/transfer.py)."""

    def __init__(self, network: nn.Module, n_metrics: int) -> None:
        super().__init__()
        self.network = network
        self.n_metrics = n_metrics

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        return self.network(windows[:, :self.n_metrics])


def early_layers(model: nn.Module) -> list[nn.Module]:
    """The feature layers that `freeze_early` fine-tuning keeps fixed: the zoom layer and
    correlation block of CNNs, all but the last two linear layers of the MLP."""
    if isinstance(model, ZoomCNN):
        return [model.zoom, model.correlation]
    if isinstance(model, PlainCNN):
        return [model.correlation]
    if isinstance(model, MLP):
        linears = [m for m in model.layers if isinstance(m, nn.Linear)]
        return linears[:-2]
    raise TypeError(f"no early layers defined for {type(model).__name__}")
